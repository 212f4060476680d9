import Logging
import NBDProtocol
import NIOCore

// Design notes
// ------------
// The first handler of every connection. It runs `NBDHandshakeStateMachine` over the incoming bytes and
// performs its actions. When the state machine starts transmission, the handler installs the
// transmission pipeline behind itself,
//
//   NBDReplyWriter -> ByteToMessageHandler(NBDRequestDecoder) -> NBDTransmissionHandler
//
// hands it any bytes that arrived after the final option (a client may pipeline its first requests), and
// removes itself. A connection that does not finish negotiating within `timeout` is closed, as is one that
// sends garbage; neither affects other connections.

final class NBDHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Builds the handlers that serve a negotiated session, or nil if the export went away.
    typealias TransmissionFactory = (NBDSession) -> [any ChannelHandler]?

    private var machine: NBDHandshakeStateMachine
    private let timeout: TimeAmount
    private let logger: Logger
    private let makeTransmission: TransmissionFactory
    private var cumulation: ByteBuffer?
    private var timeoutTask: Scheduled<Void>?
    private var started = false
    private var finished = false

    init(exports: [NBDExportDescription], timeout: TimeAmount, logger: Logger, makeTransmission: @escaping TransmissionFactory) {
        self.machine = NBDHandshakeStateMachine(exports: exports)
        self.timeout = timeout
        self.logger = logger
        self.makeTransmission = makeTransmission
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { start(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        start(context: context)
        context.fireChannelActive()
    }

    private func start(context: ChannelHandlerContext) {
        guard !started else { return }
        started = true
        timeoutTask = context.eventLoop.assumeIsolated().scheduleTask(in: timeout) { [logger] in
            logger.info("closing connection: handshake timed out")
            context.close(promise: nil)
        }
        perform(machine.start(), context: context)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !finished else { return }
        var bytes = Self.unwrapInboundIn(data)
        if cumulation == nil {
            cumulation = bytes
        } else {
            cumulation!.writeBuffer(&bytes)
        }
        let actions = machine.receive(&cumulation!)
        perform(actions, context: context)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if event is NBDServerShutdownEvent {
            // Nothing is in flight before transmission: just go.
            finish(context: context)
            context.close(promise: nil)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("closing connection during handshake", metadata: ["reason": "\(error)"])
        finish(context: context)
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish(context: context)
        context.fireChannelInactive()
    }

    private func finish(context: ChannelHandlerContext) {
        finished = true
        timeoutTask?.cancel()
        timeoutTask = nil
    }

    private func perform(_ actions: [NBDHandshakeStateMachine.Action], context: ChannelHandlerContext) {
        for action in actions {
            switch action {
            case .send(let message):
                var buffer = context.channel.allocator.buffer(capacity: 64)
                message.encode(into: &buffer)
                context.write(Self.wrapOutboundOut(buffer), promise: nil)
            case .close(let reason):
                logger.info("closing connection during handshake", metadata: ["reason": "\(reason)"])
                finish(context: context)
                context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(capacity: 0))).assumeIsolated()
                    .whenComplete { _ in context.close(promise: nil) }
                return
            case .startTransmission(let session):
                finish(context: context)
                context.flush()
                startTransmission(session, context: context)
                return
            }
        }
        context.flush()
    }

    private func startTransmission(_ session: NBDSession, context: ChannelHandlerContext) {
        guard let handlers = makeTransmission(session) else {
            context.close(promise: nil)
            return
        }
        logger.info(
            "client connected",
            metadata: [
                "export": "\(session.export.name)", "structured": "\(session.structuredReplies)",
                "base:allocation": "\(session.baseAllocationContextID != nil)",
            ])
        do {
            try context.pipeline.syncOperations.addHandlers(handlers, position: .after(self))
        } catch {
            logger.error("cannot set up transmission", metadata: ["error": "\(error)"])
            context.close(promise: nil)
            return
        }
        if let rest = cumulation, rest.readableBytes > 0 {
            context.fireChannelRead(Self.wrapInboundOut(rest))
        }
        cumulation = nil
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }
}

@available(*, unavailable)
extension NBDHandshakeHandler: Sendable {}
