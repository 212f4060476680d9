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
    func negotiating(_ exports: [NBDExportDescription] = testExports) -> NBDHandshakeStateMachine {
        var machine = NBDHandshakeStateMachine(exports: exports)
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

    /// Invariant: an export's own contexts are listed with id 0 and selected with ids in offer order
    /// (base:allocation 1, then 2, 3...); LIST takes the "qemu:" and "qemu:dirty-bitmap:" wildcards, SET
    /// only exact names (a wildcard or unknown name selects nothing), duplicates select once, and the
    /// session carries the selection.
    @Test func qemuMetaContexts() {
        let export = NBDExportDescription(
            name: "disk",
            size: 1 << 20,
            flags: [.hasFlags],
            metaContexts: ["qemu:allocation-depth", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b:c"]
        )
        var machine = negotiating([export])
        var structured = ClientBytes.option(.structuredReply)
        _ = machine.receive(&structured)
        func names(_ replies: [(NBDOption, NBDOptionReplyType, [UInt8])]) -> [String] {
            replies.filter { $0.1 == .metaContext }.map { String(decoding: $0.2.dropFirst(4), as: UTF8.self) }
        }
        func ids(_ replies: [(NBDOption, NBDOptionReplyType, [UInt8])]) -> [UInt32] {
            replies.filter { $0.1 == .metaContext }.map { $0.2.prefix(4).reduce(0) { $0 << 8 | UInt32($1) } }
        }
        func list(_ queries: [String]) -> [(NBDOption, NBDOptionReplyType, [UInt8])] {
            var bytes = ClientBytes.option(.listMetaContext, ClientBytes.metaContextData("disk", queries: queries))
            return optionReplies(machine.receive(&bytes))
        }
        #expect(names(list([])) == ["base:allocation"] + export.metaContexts)
        #expect(ids(list([])) == [0, 0, 0, 0])
        #expect(names(list(["qemu:"])) == export.metaContexts)
        #expect(names(list(["qemu:dirty-bitmap:"])) == ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b:c"])
        #expect(names(list(["base:", "qemu:dirty-bitmap:a"])) == ["base:allocation", "qemu:dirty-bitmap:a"])
        // Only the two wildcard forms: a prefix of a bitmap's name is not one.
        #expect(names(list(["qemu:dirty-bitmap:b:", "x-other:"])) == [])

        var set = ClientBytes.option(
            .setMetaContext,
            ClientBytes.metaContextData(
                "disk",
                queries: ["qemu:dirty-bitmap:b:c", "qemu:", "qemu:dirty-bitmap:", "nope:x", "qemu:dirty-bitmap:b:c"]
            )
        )
        let selected = optionReplies(machine.receive(&set))
        #expect(names(selected) == ["qemu:dirty-bitmap:b:c"])
        #expect(ids(selected) == [4])
        var go = ClientBytes.option(.go, ClientBytes.goData("disk"))
        let negotiated = session(in: machine.receive(&go))
        #expect(negotiated?.metaContextIDs == [4])
        #expect(negotiated?.metaContextNames == ["qemu:dirty-bitmap:b:c"])
        #expect(negotiated?.baseAllocationContextID == nil)
    }

    /// Invariant: hostile meta-context queries are bounded and never select anything by accident: a query
    /// over 4096 bytes is refused (ERR_TOO_BIG) before it is read, a count larger than the data is
    /// malformed (ERR_INVALID), a query that is not UTF-8 or is in an unknown namespace is ignored (and a
    /// LIST made only of such queries lists nothing, not everything), and the machine negotiates on after.
    @Test func hostileMetaContextQueries() {
        let export = NBDExportDescription(
            name: "disk",
            size: 1 << 20,
            flags: [.hasFlags],
            metaContexts: ["qemu:dirty-bitmap:a"]
        )
        var machine = negotiating([export])
        var structured = ClientBytes.option(.structuredReply)
        _ = machine.receive(&structured)
        func send(_ option: NBDOption, _ data: [UInt8]) -> [(NBDOption, NBDOptionReplyType, [UInt8])] {
            var bytes = ClientBytes.option(option, data)
            return optionReplies(machine.receive(&bytes))
        }
        func header(queries count: UInt32) -> [UInt8] {
            var bytes: [UInt8] = []
            ClientBytes.append(&bytes, UInt32(4))
            bytes += Array("disk".utf8)
            ClientBytes.append(&bytes, count)
            return bytes
        }
        // Too long: the length alone decides, with the bytes not even sent.
        var long = header(queries: 1)
        ClientBytes.append(&long, UInt32(NBDLimits.maximumString + 1))
        #expect(send(.listMetaContext, long).map(\.1) == [.errTooBig])
        // A count the data does not hold.
        var short = header(queries: 0xFFFF_FFFF)
        ClientBytes.append(&short, UInt32(2))
        short += Array("q:".utf8)
        #expect(send(.setMetaContext, short).map(\.1) == [.errInvalid])
        // Not UTF-8, and unknown namespaces: ignored.
        var invalid = header(queries: 3)
        for query in [[0xFF, 0xFE, 0x3A], Array("x-unknown:".utf8), Array("qemu:dirty-bitmap:zz".utf8)] {
            ClientBytes.append(&invalid, UInt32(query.count))
            invalid += query
        }
        #expect(send(.listMetaContext, invalid).map(\.1) == [.ack])
        #expect(send(.setMetaContext, invalid).map(\.1) == [.ack])
        // Still negotiating: a good SET selects, and GO carries it.
        let good = send(.setMetaContext, ClientBytes.metaContextData("disk", queries: ["qemu:dirty-bitmap:a"]))
        #expect(good.map(\.1) == [.metaContext, .ack])
        var go = ClientBytes.option(.go, ClientBytes.goData("disk"))
        #expect(session(in: machine.receive(&go))?.metaContextNames == ["qemu:dirty-bitmap:a"])
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
