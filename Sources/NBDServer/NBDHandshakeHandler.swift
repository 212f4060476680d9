import Logging
import NBDProtocol
import NIOCore
import NIOSSL
import NIOTLS

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
//
// STARTTLS: when the state machine acknowledges it, the ACK is flushed in plaintext and then a
// `NIOSSLServerHandler` goes in at the very front of the pipeline, so every later byte in either direction
// passes through TLS and this handler keeps negotiating over the decrypted stream:
//
//   before:  [head] -> NBDHandshakeHandler
//   after:   [head] -> NIOSSLServerHandler -> NBDHandshakeHandler   (later: -> transmission handlers)
//
// A client must wait for the ACK before it starts the TLS handshake, so bytes already buffered behind the
// STARTTLS option break the protocol: they would otherwise be taken as plaintext that seems to come from
// inside TLS (the classic STARTTLS injection), and the connection is closed instead. The timeout keeps
// running through the TLS handshake, and a failed TLS handshake closes the connection (NIOSSL reports it
// through `errorCaught`).

final class NBDHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    /// Builds the handlers that serve a negotiated session, or nil if the export went away.
    typealias TransmissionFactory = (NBDSession) -> [any ChannelHandler]?

    private var machine: NBDHandshakeStateMachine
    private let tls: NBDTLSConfiguration?
    /// The TLS handler once STARTTLS put it in the pipeline (for logging what was negotiated).
    private var tlsHandler: NIOSSLServerHandler?
    private let timeout: TimeAmount
    private let logger: Logger
    private let makeTransmission: TransmissionFactory
    private var cumulation: ByteBuffer?
    private var timeoutTask: Scheduled<Void>?
    private var started = false
    private var finished = false

    /// - Parameters:
    ///   - exports: what the client may ask for; the first is the default export.
    ///   - tls: the TLS setup, or nil to answer STARTTLS with NBD_REP_ERR_UNSUP.
    ///   - timeout: how long the whole negotiation, TLS handshake included, may take.
    init(
        exports: [NBDExportDescription],
        tls: NBDTLSConfiguration? = nil,
        timeout: TimeAmount,
        logger: Logger,
        makeTransmission: @escaping TransmissionFactory
    ) {
        self.machine = NBDHandshakeStateMachine(exports: exports, tls: tls?.policy ?? .unavailable)
        self.tls = tls
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
            if case TLSUserEvent.handshakeCompleted = event {
                let version = tlsHandler?.tlsVersion.map { "\($0)" } ?? "?"
                logger.info("TLS established", metadata: ["version": "\(version)"])
            }
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A refused client certificate is what an operator looks for, so TLS failures are logged at info;
        // other errors here are mostly peers going away, with or without a TLS close_notify.
        let level: Logger.Level = machine.isTLSActive && !error.isUncleanTLSShutdown ? .info : .debug
        logger.log(level: level, "closing connection during handshake", metadata: ["reason": "\(error)"])
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
                context.writeAndFlush(Self.wrapOutboundOut(context.channel.allocator.buffer(capacity: 0)))
                    .assumeIsolated()
                    .whenComplete { _ in context.close(promise: nil) }
                return
            case .startTLS:
                // The ACK must leave in plaintext: flush it before the TLS handler goes in front.
                context.flush()
                startTLS(context: context)
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

    private func startTLS(context: ChannelHandlerContext) {
        guard let tls else {
            // The machine only starts TLS when it was given a policy, which only comes with a configuration.
            preconditionFailure("STARTTLS acknowledged without a TLS configuration")
        }
        if let rest = cumulation, rest.readableBytes > 0 {
            logger.info(
                "closing connection during handshake",
                metadata: ["reason": "data sent before the STARTTLS reply"]
            )
            finish(context: context)
            context.close(promise: nil)
            return
        }
        cumulation = nil
        let handler = NIOSSLServerHandler(context: tls.context)
        do {
            try context.pipeline.syncOperations.addHandler(handler, position: .first)
            tlsHandler = handler
        } catch {
            logger.error("cannot start TLS", metadata: ["error": "\(error)"])
            finish(context: context)
            context.close(promise: nil)
            return
        }
        machine.tlsStarted()
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
                "contexts": "\(session.metaContextNames.joined(separator: " "))",
            ]
        )
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

extension Error {
    /// The peer closed the socket without a TLS close_notify. NBD frames every message itself (ABORT and
    /// DISC end a session), so a truncation cannot go unnoticed, and clients commonly skip the alert:
    /// this is a peer going away, not an attack or a fault.
    var isUncleanTLSShutdown: Bool {
        if case NIOSSLError.uncleanShutdown? = self as? NIOSSLError { return true }
        return false
    }
}
