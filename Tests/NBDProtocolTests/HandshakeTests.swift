import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded
import Testing

@testable import NBDServer

/// Client-side bytes for the handshake, built field by field as a client would.
enum ClientBytes {
    static func flags(_ flags: NBDClientFlags = [.fixedNewstyle, .noZeroes]) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(flags.rawValue)
        return buffer
    }

    static func option(_ option: NBDOption, _ data: [UInt8] = [], magic: UInt64 = NBDMagic.options) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.writeInteger(magic)
        buffer.writeInteger(option.rawValue)
        buffer.writeInteger(UInt32(data.count))
        buffer.writeBytes(data)
        return buffer
    }

    /// The data of NBD_OPT_INFO / NBD_OPT_GO.
    static func goData(_ name: String, infos: [NBDInfoType] = []) -> [UInt8] {
        var bytes: [UInt8] = []
        append(&bytes, UInt32(name.utf8.count))
        bytes += Array(name.utf8)
        append(&bytes, UInt16(infos.count))
        for info in infos { append(&bytes, info.rawValue) }
        return bytes
    }

    /// The data of NBD_OPT_{LIST,SET}_META_CONTEXT.
    static func metaContextData(_ name: String, queries: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        append(&bytes, UInt32(name.utf8.count))
        bytes += Array(name.utf8)
        append(&bytes, UInt32(queries.count))
        for query in queries {
            append(&bytes, UInt32(query.utf8.count))
            bytes += Array(query.utf8)
        }
        return bytes
    }

    static func append<T: FixedWidthInteger>(_ bytes: inout [UInt8], _ value: T) {
        withUnsafeBytes(of: value.bigEndian) { bytes.append(contentsOf: $0) }
    }

    static func concat(_ buffers: ByteBuffer...) -> ByteBuffer {
        var out = ByteBuffer()
        for var buffer in buffers { out.writeBuffer(&buffer) }
        return out
    }
}

let testExports = [
    NBDExportDescription(name: "disk", description: "the disk", size: 1 << 20, flags: [.hasFlags, .sendFlush]),
    NBDExportDescription(name: "other", size: 4096, flags: [.hasFlags, .readOnly]),
]

/// The option replies among `actions`, as (option, type, data).
func optionReplies(_ actions: [NBDHandshakeStateMachine.Action]) -> [(NBDOption, NBDOptionReplyType, [UInt8])] {
    actions.compactMap {
        if case .send(.optionReply(let option, let type, let data)) = $0 { return (option, type, data) }
        return nil
    }
}

func session(in actions: [NBDHandshakeStateMachine.Action]) -> NBDSession? {
    for action in actions { if case .startTransmission(let session) = action { return session } }
    return nil
}

func closes(_ actions: [NBDHandshakeStateMachine.Action]) -> Bool {
    actions.contains { if case .close = $0 { return true } else { return false } }
}

@Suite struct HandshakeStateMachineTests {
    /// Runs the machine past the client flags.
    func negotiating() -> NBDHandshakeStateMachine {
        var machine = NBDHandshakeStateMachine(exports: testExports)
        _ = machine.start()
        var flags = ClientBytes.flags()
        #expect(machine.receive(&flags).isEmpty)
        return machine
    }

    /// Invariant: the greeting is NBDMAGIC, IHAVEOPT and the fixed-newstyle + no-zeroes flags, 18 bytes.
    @Test func greeting() {
        var machine = NBDHandshakeStateMachine(exports: testExports)
        let actions = machine.start()
        #expect(actions == [.send(.greeting([.fixedNewstyle, .noZeroes]))])
        var buffer = ByteBuffer()
        NBDHandshakeMessage.greeting([.fixedNewstyle, .noZeroes]).encode(into: &buffer)
        #expect(buffer.readableBytes == 18)
        #expect(buffer.readInteger(as: UInt64.self) == 0x4E42_444D_4147_4943)
        #expect(buffer.readInteger(as: UInt64.self) == 0x4948_4156_454F_5054)
        #expect(buffer.readInteger(as: UInt16.self) == 3)
    }

    /// Invariant: feeding a whole negotiation one byte at a time yields exactly the actions of feeding it
    /// at once, and bytes after GO stay in the buffer for the request decoder.
    @Test func dripFeedEqualsBulk() {
        let conversation = ClientBytes.concat(
            ClientBytes.flags(),
            ClientBytes.option(.structuredReply),
            ClientBytes.option(.list),
            ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("disk", queries: ["base:allocation"])),
            ClientBytes.option(.go, ClientBytes.goData("disk", infos: [.name, .description, .blockSize])),
            ByteBuffer(bytes: [0x25, 0x60, 0x95, 0x13])
        )  // the start of a first request

        var bulkMachine = NBDHandshakeStateMachine(exports: testExports)
        _ = bulkMachine.start()
        var bulk = conversation
        let bulkActions = bulkMachine.receive(&bulk)
        #expect(bulk.readableBytes == 4)

        var dripMachine = NBDHandshakeStateMachine(exports: testExports)
        _ = dripMachine.start()
        var dripActions: [NBDHandshakeStateMachine.Action] = []
        var cumulation = ByteBuffer()
        for byte in conversation.readableBytesView {
            cumulation.writeInteger(byte)
            dripActions += dripMachine.receive(&cumulation)
        }
        #expect(dripActions == bulkActions)
        #expect(cumulation.readableBytes == 4)
        let negotiated = session(in: bulkActions)
        #expect(negotiated?.export.name == "disk")
        #expect(negotiated?.structuredReplies == true)
        #expect(negotiated?.baseAllocationContextID == NBDBaseAllocation.contextID)
        #expect(!bulkMachine.isNegotiating)
    }

    /// Invariant: GO for an unknown export answers NBD_REP_ERR_UNKNOWN and negotiation continues.
    @Test func goUnknownExport() {
        var machine = negotiating()
        var bytes = ClientBytes.option(.go, ClientBytes.goData("nope"))
        let actions = machine.receive(&bytes)
        let replies = optionReplies(actions)
        #expect(replies.count == 1)
        #expect(replies.first?.1 == .errUnknown)
        #expect(session(in: actions) == nil)
        #expect(machine.isNegotiating)
        var retry = ClientBytes.option(.go, ClientBytes.goData(""))
        #expect(session(in: machine.receive(&retry))?.export.name == "disk")
    }

    /// Invariant: GO answers INFO(EXPORT) with size and flags, BLOCK_SIZE 1/4096/32M, NAME and DESCRIPTION
    /// when asked, then ACK.
    @Test func goReplies() {
        var machine = negotiating()
        var bytes = ClientBytes.option(.go, ClientBytes.goData("", infos: [.name, .description]))
        let replies = optionReplies(machine.receive(&bytes))
        #expect(replies.map(\.1) == [.info, .info, .info, .info, .ack])
        var export = ByteBuffer(bytes: replies[0].2)
        #expect(export.readInteger(as: UInt16.self) == NBDInfoType.export.rawValue)
        #expect(export.readInteger(as: UInt64.self) == 1 << 20)
        #expect(export.readInteger(as: UInt16.self) == NBDTransmissionFlags([.hasFlags, .sendFlush]).rawValue)
        var blockSize = ByteBuffer(bytes: replies[1].2)
        #expect(blockSize.readInteger(as: UInt16.self) == NBDInfoType.blockSize.rawValue)
        #expect(blockSize.readInteger(as: UInt32.self) == 1)
        #expect(blockSize.readInteger(as: UInt32.self) == 4096)
        #expect(blockSize.readInteger(as: UInt32.self) == 32 << 20)
        #expect(replies[2].2 == [0, 1] + Array("disk".utf8))
        #expect(replies[3].2 == [0, 2] + Array("the disk".utf8))
    }

    /// Invariant: INFO answers like GO but does not end the negotiation.
    @Test func infoDoesNotStartTransmission() {
        var machine = negotiating()
        var bytes = ClientBytes.option(.info, ClientBytes.goData("other"))
        let actions = machine.receive(&bytes)
        #expect(optionReplies(actions).last?.1 == .ack)
        #expect(session(in: actions) == nil)
        #expect(machine.isNegotiating)
    }

    /// Invariant: LIST sends one SERVER reply per export (name length, name, description), then ACK.
    @Test func list() {
        var machine = negotiating()
        var bytes = ClientBytes.option(.list)
        let replies = optionReplies(machine.receive(&bytes))
        #expect(replies.map(\.1) == [.server, .server, .ack])
        #expect(replies[0].2 == [0, 0, 0, 4] + Array("diskthe disk".utf8))
        #expect(replies[1].2 == [0, 0, 0, 5] + Array("other".utf8))
        var withData = ClientBytes.option(.list, [1])
        #expect(optionReplies(machine.receive(&withData)).map(\.1) == [.errInvalid])
    }

    /// Invariant: SET_META_CONTEXT needs STRUCTURED_REPLY first; then base:allocation is selected with a
    /// nonzero id, other namespaces are ignored, and LIST_META_CONTEXT with no query lists it with the
    /// reserved id 0. A SET that fails still replaces the selection (with none).
    @Test func metaContexts() {
        var machine = negotiating()
        var early = ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("", queries: ["base:allocation"]))
        #expect(optionReplies(machine.receive(&early)).map(\.1) == [.errInvalid])

        var structured = ClientBytes.option(.structuredReply)
        #expect(optionReplies(machine.receive(&structured)).map(\.1) == [.ack])

        var list = ClientBytes.option(.listMetaContext, ClientBytes.metaContextData("", queries: []))
        let listed = optionReplies(machine.receive(&list))
        #expect(listed.map(\.1) == [.metaContext, .ack])
        #expect(listed[0].2 == [0, 0, 0, 0] + Array("base:allocation".utf8))

        var other = ClientBytes.option(
            .setMetaContext,
            ClientBytes.metaContextData("", queries: ["qemu:dirty-bitmap:x"])
        )
        #expect(optionReplies(machine.receive(&other)).map(\.1) == [.ack])

        var unknown = ClientBytes.option(
            .setMetaContext,
            ClientBytes.metaContextData("zzz", queries: ["base:allocation"])
        )
        #expect(optionReplies(machine.receive(&unknown)).map(\.1) == [.errUnknown])

        var set = ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("disk", queries: ["base:allocation"]))
        #expect(optionReplies(machine.receive(&set)).map(\.1) == [.metaContext, .ack])
        // A selection made for "disk" does not carry over to "other".
        var go = ClientBytes.option(.go, ClientBytes.goData("other"))
        #expect(session(in: machine.receive(&go))?.baseAllocationContextID == nil)
    }

    /// Invariant: a SET_META_CONTEXT that fails (unknown export) drops the earlier selection, as the spec
    /// says: transmission then has no base:allocation.
    @Test func failedSetMetaContextClearsSelection() {
        var machine = negotiating()
        var bytes = ClientBytes.concat(
            ClientBytes.option(.structuredReply),
            ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("disk", queries: ["base:allocation"])),
            ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("zzz", queries: ["base:allocation"])),
            ClientBytes.option(.go, ClientBytes.goData("disk"))
        )
        let actions = machine.receive(&bytes)
        #expect(optionReplies(actions).map(\.1) == [.ack, .metaContext, .ack, .errUnknown, .info, .info, .ack])
        #expect(session(in: actions)?.baseAllocationContextID == nil)
    }

    /// Invariant: a client that asks for the default export by the empty name is told its canonical name
    /// (NBD_INFO_NAME, asked for or not), the name NBD_OPT_LIST shows; a client that used the canonical
    /// name and did not ask is not.
    @Test func defaultExportIsNamed() {
        var machine = negotiating()
        var byDefault = ClientBytes.option(.info, ClientBytes.goData(""))
        let replies = optionReplies(machine.receive(&byDefault))
        #expect(replies.map(\.1) == [.info, .info, .info, .ack])
        #expect(replies[2].2 == [0, 1] + Array("disk".utf8))
        var byName = ClientBytes.option(.info, ClientBytes.goData("disk"))
        #expect(optionReplies(machine.receive(&byName)).map(\.1) == [.info, .info, .ack])
    }

    /// Invariant: options the server does not implement get NBD_REP_ERR_UNSUP and the negotiation goes on.
    @Test func unknownOptionsAreUnsupported() {
        var machine = negotiating()
        for code: UInt32 in [5, 11, 42, 0xFFFF_FFFF] {
            var bytes = ClientBytes.option(NBDOption(rawValue: code), [1, 2, 3])
            let replies = optionReplies(machine.receive(&bytes))
            #expect(replies.map(\.1) == [.errUnsupported])
            #expect(replies.first?.0.rawValue == code)
        }
        #expect(machine.isNegotiating)
    }

    /// Invariant: malformed INFO/GO data (short, trailing bytes) is NBD_REP_ERR_INVALID, not a crash.
    @Test func malformedGo() {
        var machine = negotiating()
        for data: [UInt8] in [[], [0, 0, 0, 9, 1], ClientBytes.goData("disk") + [0], [0xFF, 0xFF, 0xFF, 0xFF, 0, 0]] {
            var bytes = ClientBytes.option(.go, data)
            #expect(optionReplies(machine.receive(&bytes)).map(\.1) == [.errInvalid])
        }
    }

    /// Invariant: EXPORT_NAME answers size, flags and 124 zeroes unless NO_ZEROES, and starts transmission;
    /// an unknown name closes the connection.
    @Test func exportName() {
        var machine = NBDHandshakeStateMachine(exports: testExports)
        _ = machine.start()
        var bytes = ClientBytes.concat(
            ClientBytes.flags([.fixedNewstyle]),
            ClientBytes.option(.exportName, Array("other".utf8))
        )
        let actions = machine.receive(&bytes)
        #expect(actions.first == .send(.exportNameReply(size: 4096, flags: [.hasFlags, .readOnly], zeroes: true)))
        #expect(session(in: actions)?.export.name == "other")
        var encoded = ByteBuffer()
        NBDHandshakeMessage.exportNameReply(size: 4096, flags: [.hasFlags], zeroes: true).encode(into: &encoded)
        #expect(encoded.readableBytes == 8 + 2 + 124)

        var unknown = NBDHandshakeStateMachine(exports: testExports)
        _ = unknown.start()
        var bad = ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.exportName, Array("x".utf8)))
        #expect(closes(unknown.receive(&bad)))
    }

    /// Invariant: garbage closes: unknown client flags, a wrong option magic, an absurd option length.
    @Test func garbageCloses() {
        for garbage in [
            ClientBytes.flags(NBDClientFlags(rawValue: 0x80)),
            ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.go, [], magic: 0x1234)),
            ClientBytes.concat(
                ClientBytes.flags(),
                ByteBuffer(bytes: [0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54, 0, 0, 0, 7, 0x7F, 0, 0, 0])
            ),
        ] {
            var machine = NBDHandshakeStateMachine(exports: testExports)
            _ = machine.start()
            var bytes = garbage
            #expect(closes(machine.receive(&bytes)))
            #expect(!machine.isNegotiating)
        }
    }

    /// Invariant: ABORT is acknowledged and ends the connection.
    @Test func abort() {
        var machine = negotiating()
        var bytes = ClientBytes.option(.abort)
        let actions = machine.receive(&bytes)
        #expect(optionReplies(actions).map(\.1) == [.ack])
        #expect(closes(actions))
    }
}

/// The handshake handler on an `EmbeddedChannel`: the state machine's actions reach the wire.
@Suite struct HandshakeHandlerTests {
    func makeChannel() throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        let handler = NBDHandshakeHandler(
            exports: testExports,
            timeout: .seconds(10),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        ) { _ in [] }
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        return channel
    }

    func drain(_ channel: EmbeddedChannel) throws -> ByteBuffer {
        var out = ByteBuffer()
        while var buffer = try channel.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&buffer) }
        return out
    }

    /// Invariant: a client dripping bytes one at a time gets the greeting, then a reply per option.
    @Test func dripFedBytes() throws {
        let channel = try makeChannel()
        #expect(try drain(channel).readableBytes == 18)
        let conversation = ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.go, ClientBytes.goData("zzz")))
        for byte in conversation.readableBytesView {
            try channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        var reply = try drain(channel)
        #expect(reply.readInteger(as: UInt64.self) == NBDMagic.optionReply)
        #expect(reply.readInteger(as: UInt32.self) == NBDOption.go.rawValue)
        #expect(reply.readInteger(as: UInt32.self) == NBDOptionReplyType.errUnknown.rawValue)
        #expect(channel.isActive)
        _ = try? channel.finish()
    }

    /// Invariant: a bad magic closes the connection.
    @Test func badMagicCloses() throws {
        let channel = try makeChannel()
        _ = try drain(channel)
        try channel.writeInbound(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.go, [], magic: 42)))
        channel.embeddedEventLoop.run()
        #expect(!channel.isActive)
    }

    /// Invariant: a client that does not finish negotiating in time is disconnected.
    @Test func timeoutCloses() throws {
        let channel = try makeChannel()
        channel.embeddedEventLoop.advanceTime(by: .seconds(9))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(2))
        #expect(!channel.isActive)
    }
}
