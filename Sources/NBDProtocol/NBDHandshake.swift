import NIOCore

// Design notes
// ------------
// The fixed newstyle handshake as a pure state machine: bytes in, actions out. No sockets, no timers, no
// devices; the server's handler performs the actions (send, start transmission, close) and owns the
// timeout. That keeps every branch of the negotiation testable with plain buffers.
//
//   server: "NBDMAGIC" "IHAVEOPT" handshake-flags(u16)
//   client: client-flags(u32)
//   repeat:
//     client: "IHAVEOPT" option(u32) length(u32) data[length]
//     server: option reply magic(u64) option(u32) reply-type(u32) length(u32) data[length]   (0..n times)
//   until GO is acknowledged or EXPORT_NAME is answered, then transmission.
//
// `receive(_:)` consumes complete messages from the caller's cumulation buffer and leaves partial ones in
// place, so the caller can feed bytes in any split (one at a time works). It stops consuming as soon as it
// decides to start transmission: bytes after that belong to the request decoder, and the caller forwards
// them there.
//
// Hostile input: a bad magic, unknown client flags or an option longer than `maximumOptionLength` closes
// the connection (there is no way to resynchronise or it is not worth buffering). Every length inside an
// option is checked against the option's own length before use.
//
// TLS (the spec's "TLS support"): with a `tls` policy other than `.unavailable`, NBD_OPT_STARTTLS is
// acknowledged and answered with `.startTLS`; the machine then waits (`.awaitingTLS`, consuming nothing)
// until the caller has put TLS on the connection and calls `tlsStarted()`, after which negotiation goes on
// over TLS exactly as before, with the state of the plaintext part forgotten as the spec requires. With
// `.required` (the spec's FORCEDTLS) every option but STARTTLS and ABORT is refused with
// NBD_REP_ERR_TLS_REQD before that, and EXPORT_NAME, which cannot be refused, closes the connection.
//
//   plaintext:  flags, [options...], STARTTLS -> ACK
//   TLS handshake (the caller's business)
//   over TLS:   options..., GO -> transmission

/// What the server knows about one export during negotiation.
public struct NBDExportDescription: Sendable, Hashable {
    public var name: String
    public var description: String
    public var size: UInt64
    /// The transmission flags to advertise (`hasFlags` is added when sent).
    public var flags: NBDTransmissionFlags
    /// The metadata contexts offered besides `base:allocation`, which every export has. Context ids follow
    /// this order: `base:allocation` is 1, `metaContexts[i]` is `i + 2`.
    public var metaContexts: [String]

    public init(
        name: String,
        description: String = "",
        size: UInt64,
        flags: NBDTransmissionFlags,
        metaContexts: [String] = []
    ) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.metaContexts = metaContexts
    }

    /// Every context the export offers, in id order (the id of `allMetaContexts[i]` is `i + 1`).
    public var allMetaContexts: [String] { [NBDBaseAllocation.name] + metaContexts }

    /// The name of the context with this id, if the export has one.
    public func metaContextName(id: UInt32) -> String? {
        let all = allMetaContexts
        guard id >= 1, id <= all.count else { return nil }
        return all[Int(id) - 1]
    }

    /// The ids of the contexts `queries` name. SET selects exact names only (the spec says a wildcard
    /// should select nothing there, and unknown names are ignored); LIST also takes the wildcards
    /// `NAMESPACE:` (every context of the namespace) and `qemu:dirty-bitmap:` (every bitmap), as qemu
    /// does, and no query at all lists everything.
    public func metaContextIDs(matching queries: [String], listing: Bool) -> [UInt32] {
        let all = allMetaContexts
        if listing && queries.isEmpty { return (1...UInt32(all.count)).map { $0 } }
        // A set, and one lookup per context and form: a client may send thousands of queries.
        let wanted = Set(queries)
        var ids: [UInt32] = []
        for (index, name) in all.enumerated() {
            var matches = wanted.contains(name)
            if listing && !matches, let colon = name.firstIndex(of: ":") {
                matches =
                    wanted.contains(String(name[...colon]))
                    || (name.hasPrefix(NBDQemuContext.dirtyBitmapPrefix)
                        && wanted.contains(NBDQemuContext.dirtyBitmapPrefix))
            }
            if matches { ids.append(UInt32(index + 1)) }
        }
        return ids
    }
}

/// The outcome of a successful negotiation: what transmission must honour.
public struct NBDSession: Sendable, Hashable {
    /// The export, resolved from the name the client used (the empty name means the default export).
    public var export: NBDExportDescription
    public var clientFlags: NBDClientFlags
    /// The client negotiated `NBD_OPT_STRUCTURED_REPLY`.
    public var structuredReplies: Bool
    /// The ids of the metadata contexts the client selected for this export, ascending (see
    /// `NBDExportDescription.allMetaContexts`); BLOCK_STATUS answers one chunk for each.
    public var metaContextIDs: [UInt32]

    public init(
        export: NBDExportDescription,
        clientFlags: NBDClientFlags = .known,
        structuredReplies: Bool = false,
        metaContextIDs: [UInt32] = []
    ) {
        self.export = export
        self.clientFlags = clientFlags
        self.structuredReplies = structuredReplies
        self.metaContextIDs = metaContextIDs
    }

    /// The id of `base:allocation` if the client selected it.
    public var baseAllocationContextID: UInt32? {
        metaContextIDs.contains(NBDBaseAllocation.contextID) ? NBDBaseAllocation.contextID : nil
    }

    /// The names of the selected contexts, in id order.
    public var metaContextNames: [String] { metaContextIDs.compactMap { export.metaContextName(id: $0) } }
}

/// A message the server sends during the handshake.
public enum NBDHandshakeMessage: Sendable, Hashable {
    /// "NBDMAGIC", "IHAVEOPT" and the server's handshake flags.
    case greeting(NBDHandshakeFlags)
    /// A reply to an option; `data` is the reply's payload.
    case optionReply(option: NBDOption, type: NBDOptionReplyType, data: [UInt8])
    /// The old-fashioned answer to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client
    /// asked to drop them.
    case exportNameReply(size: UInt64, flags: NBDTransmissionFlags, zeroes: Bool)

    public func encode(into buffer: inout ByteBuffer) {
        switch self {
        case .greeting(let flags):
            buffer.writeInteger(NBDMagic.greeting)
            buffer.writeInteger(NBDMagic.options)
            buffer.writeInteger(flags.rawValue)
        case .optionReply(let option, let type, let data):
            buffer.writeInteger(NBDMagic.optionReply)
            buffer.writeInteger(option.rawValue)
            buffer.writeInteger(type.rawValue)
            buffer.writeInteger(UInt32(data.count))
            buffer.writeBytes(data)
        case .exportNameReply(let size, let flags, let zeroes):
            buffer.writeInteger(size)
            buffer.writeInteger(flags.rawValue)
            if zeroes { buffer.writeRepeatingByte(0, count: 124) }
        }
    }

    /// An `NBD_REP_INFO` payload for `NBD_INFO_EXPORT`.
    static func infoExport(_ export: NBDExportDescription) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(NBDInfoType.export.rawValue)
        bytes.appendBigEndian(export.size)
        bytes.appendBigEndian(export.flags.union(.hasFlags).rawValue)
        return bytes
    }
}

/// Whether a server offers TLS during negotiation (the modes of the spec's "TLS support" section).
public enum NBDTLSPolicy: Sendable, Hashable {
    /// No TLS (NOTLS): NBD_OPT_STARTTLS is unsupported.
    case unavailable
    /// TLS on the client's request; plaintext clients are served too (SELECTIVETLS with no TLS-only
    /// export).
    case optional
    /// TLS before anything else (FORCEDTLS): every option but STARTTLS and ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD until TLS is up.
    case required
}

/// The fixed newstyle negotiation (see the design notes above).
public struct NBDHandshakeStateMachine: Sendable {
    public enum Action: Sendable, Hashable {
        case send(NBDHandshakeMessage)
        /// Put TLS on the connection once what came before is sent, then call `tlsStarted()`. Every later
        /// byte belongs to the TLS handshake.
        case startTLS
        /// Negotiation is over; every later byte is a transmission request.
        case startTransmission(NBDSession)
        /// Close the connection after sending what came before.
        case close(reason: String)
    }

    private enum State: Sendable {
        case idle
        case awaitingClientFlags
        case options(NBDClientFlags)
        /// STARTTLS was acknowledged; nothing is consumed until `tlsStarted()`.
        case awaitingTLS(NBDClientFlags)
        case done
    }

    /// The exports a client may ask for; the first is the default (the empty name).
    public let exports: [NBDExportDescription]
    /// Whether STARTTLS is accepted, and whether it is mandatory.
    public let tls: NBDTLSPolicy
    private var state: State = .idle
    /// True once STARTTLS was acknowledged: from then on every byte travels over TLS.
    public private(set) var isTLSActive = false
    private var structuredReplies = false
    /// The export the client's last SET_META_CONTEXT was for, and the ids of the contexts it selected.
    private var metaContextSelection: (export: String, ids: [UInt32])?

    public init(exports: [NBDExportDescription], tls: NBDTLSPolicy = .unavailable) {
        self.exports = exports
        self.tls = tls
    }

    public static let serverFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// True until the negotiation finished or failed.
    public var isNegotiating: Bool {
        if case .done = state { return false }
        return true
    }

    /// The greeting; call once when the connection opens.
    public mutating func start() -> [Action] {
        precondition(isIdle, "start() called twice")
        state = .awaitingClientFlags
        return [.send(.greeting(Self.serverFlags))]
    }

    private var isIdle: Bool {
        if case .idle = state { return true }
        return false
    }

    /// Resumes the negotiation after `.startTLS`, once the caller has put TLS on the connection: the next
    /// bytes passed to `receive(_:)` are the options the client sends over TLS.
    public mutating func tlsStarted() {
        guard case .awaitingTLS(let clientFlags) = state else {
            preconditionFailure("tlsStarted() without a pending STARTTLS")
        }
        state = .options(clientFlags)
    }

    /// Consumes every complete client message in `buffer` and returns what to do. Partial messages stay in
    /// `buffer`; after `.startTransmission` or `.close`, nothing more is consumed.
    public mutating func receive(_ buffer: inout ByteBuffer) -> [Action] {
        var actions: [Action] = []
        while true {
            switch state {
            case .idle, .done, .awaitingTLS:
                // After STARTTLS the bytes are TLS records, not options: leave them to the caller.
                return actions
            case .awaitingClientFlags:
                guard let raw = buffer.readInteger(as: UInt32.self) else { return actions }
                let flags = NBDClientFlags(rawValue: raw)
                guard NBDClientFlags.known.isSuperset(of: flags) else {
                    state = .done
                    actions.append(.close(reason: "unknown client flags 0x\(String(raw, radix: 16))"))
                    return actions
                }
                // TLS is only defined for fixed newstyle; a client without it could never negotiate it,
                // and a server requiring TLS has nothing to offer it.
                if tls == .required && !flags.contains(.fixedNewstyle) {
                    state = .done
                    actions.append(.close(reason: "TLS is required but the client does not speak fixed newstyle"))
                    return actions
                }
                state = .options(flags)
            case .options(let clientFlags):
                guard buffer.readableBytes >= 16 else { return actions }
                let start = buffer.readerIndex
                let magic = buffer.getInteger(at: start, as: UInt64.self)!
                let option = NBDOption(rawValue: buffer.getInteger(at: start + 8, as: UInt32.self)!)
                let length = buffer.getInteger(at: start + 12, as: UInt32.self)!
                guard magic == NBDMagic.options else {
                    state = .done
                    actions.append(.close(reason: "bad option magic 0x\(String(magic, radix: 16))"))
                    return actions
                }
                guard length <= NBDLimits.maximumOptionLength else {
                    state = .done
                    actions.append(.close(reason: "\(option) claims \(length) bytes of data"))
                    return actions
                }
                guard buffer.readableBytes >= 16 + Int(length) else { return actions }
                buffer.moveReaderIndex(forwardBy: 16)
                let data = buffer.readBytes(length: Int(length))!
                actions += handle(option, data: data, clientFlags: clientFlags)
            }
        }
    }

    /// The export a name designates: the empty name is the first export.
    public func export(named name: String) -> NBDExportDescription? {
        if name.isEmpty { return exports.first }
        return exports.first { $0.name == name }
    }

    private mutating func handle(_ option: NBDOption, data: [UInt8], clientFlags: NBDClientFlags) -> [Action] {
        func reply(_ type: NBDOptionReplyType, _ payload: [UInt8] = []) -> Action {
            .send(.optionReply(option: option, type: type, data: payload))
        }
        func error(_ type: NBDOptionReplyType, _ message: String) -> Action {
            reply(type, Array(message.utf8))
        }

        if option == .startTLS {
            return startTLS(data: data, clientFlags: clientFlags)
        }
        if tls == .required && !isTLSActive {
            switch option {
            case .abort:
                break
            case .exportName:
                // EXPORT_NAME has no error reply, so the only refusal is to hang up.
                state = .done
                return [.close(reason: "EXPORT_NAME before STARTTLS, and TLS is required")]
            default:
                return [error(.errTLSRequired, "TLS is required: send STARTTLS first")]
            }
        }

        switch option {
        case .exportName:
            guard data.count <= NBDLimits.maximumString, let name = String(validating: data, as: UTF8.self),
                let export = export(named: name)
            else {
                state = .done
                return [.close(reason: "EXPORT_NAME for an unknown export")]
            }
            state = .done
            let session = makeSession(export: export, requestedName: name, clientFlags: clientFlags)
            return [
                .send(
                    .exportNameReply(
                        size: export.size,
                        flags: export.flags.union(.hasFlags),
                        zeroes: !clientFlags.contains(.noZeroes)
                    )
                ),
                .startTransmission(session),
            ]

        case .abort:
            state = .done
            return [reply(.ack), .close(reason: "client aborted the negotiation")]

        case .list:
            guard data.isEmpty else { return [error(.errInvalid, "LIST takes no data")] }
            var actions: [Action] = []
            for export in exports {
                var payload: [UInt8] = []
                let name = Array(export.name.utf8)
                payload.appendBigEndian(UInt32(name.count))
                payload += name
                payload += Array(export.description.utf8.prefix(NBDLimits.maximumString))
                actions.append(reply(.server, payload))
            }
            actions.append(reply(.ack))
            return actions

        case .structuredReply:
            guard data.isEmpty else { return [error(.errInvalid, "STRUCTURED_REPLY takes no data")] }
            structuredReplies = true
            return [reply(.ack)]

        case .info, .go:
            var cursor = Cursor(data)
            guard let nameLength = cursor.uint32(), nameLength <= NBDLimits.maximumString,
                let nameBytes = cursor.bytes(Int(nameLength)), let count = cursor.uint16()
            else { return [error(.errInvalid, "malformed \(option) request")] }
            var requested: [NBDInfoType] = []
            for _ in 0..<count {
                guard let type = cursor.uint16() else { return [error(.errInvalid, "malformed \(option) request")] }
                requested.append(NBDInfoType(rawValue: type))
            }
            guard cursor.isAtEnd else { return [error(.errInvalid, "malformed \(option) request")] }
            guard let name = String(validating: nameBytes, as: UTF8.self) else {
                return [error(.errInvalid, "export name is not UTF-8")]
            }
            guard let export = export(named: name) else {
                return [error(.errUnknown, "no export named '\(name)'")]
            }
            var actions: [Action] = [reply(.info, NBDHandshakeMessage.infoExport(export))]
            var blockSize: [UInt8] = []
            blockSize.appendBigEndian(NBDInfoType.blockSize.rawValue)
            blockSize.appendBigEndian(NBDLimits.minimumBlockSize)
            blockSize.appendBigEndian(NBDLimits.preferredBlockSize)
            blockSize.appendBigEndian(NBDLimits.maximumPayload)
            actions.append(reply(.info, blockSize))
            // The canonical name also goes unasked to a client that used another name (the empty one for
            // the default export): the spec lets the item be left out only when the client already used
            // the canonical name, and without it a client cannot find its export in NBD_OPT_LIST.
            if requested.contains(.name) || name != export.name {
                var payload: [UInt8] = []
                payload.appendBigEndian(NBDInfoType.name.rawValue)
                payload += Array(export.name.utf8)
                actions.append(reply(.info, payload))
            }
            if requested.contains(.description), !export.description.isEmpty {
                var payload: [UInt8] = []
                payload.appendBigEndian(NBDInfoType.description.rawValue)
                payload += Array(export.description.utf8.prefix(NBDLimits.maximumString))
                actions.append(reply(.info, payload))
            }
            actions.append(reply(.ack))
            if option == .go {
                state = .done
                actions.append(
                    .startTransmission(makeSession(export: export, requestedName: name, clientFlags: clientFlags))
                )
            }
            return actions

        case .listMetaContext, .setMetaContext:
            let isSet = option == .setMetaContext
            // SET replaces the previous selection even when it fails, so a failed SET leaves none.
            if isSet { metaContextSelection = nil }
            if isSet && !structuredReplies {
                return [error(.errInvalid, "SET_META_CONTEXT needs STRUCTURED_REPLY first")]
            }
            var cursor = Cursor(data)
            guard let nameLength = cursor.uint32(), nameLength <= NBDLimits.maximumString,
                let nameBytes = cursor.bytes(Int(nameLength)), let count = cursor.uint32()
            else { return [error(.errInvalid, "malformed \(option) request")] }
            // Queries are bounded three ways: each is an NBD string (at most 4096 bytes, checked before it
            // is read), and their number by the option's length (64 KiB, 4 bytes each at least), so the loop
            // ends when the data does whatever `count` claims. A query that is not UTF-8 names no context:
            // it is ignored, as the spec asks for queries the server does not understand.
            var queries: [String] = []
            for _ in 0..<count {
                guard let length = cursor.uint32() else { return [error(.errInvalid, "malformed \(option) request")] }
                guard length <= NBDLimits.maximumString else { return [error(.errTooBig, "query too long")] }
                guard let bytes = cursor.bytes(Int(length)) else {
                    return [error(.errInvalid, "malformed \(option) request")]
                }
                if let query = String(validating: bytes, as: UTF8.self) { queries.append(query) }
            }
            guard cursor.isAtEnd, let name = String(validating: nameBytes, as: UTF8.self) else {
                return [error(.errInvalid, "malformed \(option) request")]
            }
            guard let export = export(named: name) else {
                return [error(.errUnknown, "no export named '\(name)'")]
            }
            // LIST with no query lists everything; with only ignored queries, nothing.
            let ids = count > 0 && queries.isEmpty ? [] : export.metaContextIDs(matching: queries, listing: !isSet)
            if isSet { metaContextSelection = (export: name, ids: ids) }
            var actions: [Action] = []
            for id in ids {
                var payload: [UInt8] = []
                // LIST's context ids are reserved and should be zero; SET hands out the real ones.
                payload.appendBigEndian(isSet ? id : 0)
                payload += Array((export.metaContextName(id: id) ?? "").utf8)
                actions.append(reply(.metaContext, payload))
            }
            actions.append(reply(.ack))
            return actions

        default:
            return [error(.errUnsupported, "\(option) is not supported")]
        }
    }

    private mutating func startTLS(data: [UInt8], clientFlags: NBDClientFlags) -> [Action] {
        func error(_ type: NBDOptionReplyType, _ message: String) -> [Action] {
            [.send(.optionReply(option: .startTLS, type: type, data: Array(message.utf8)))]
        }
        guard tls != .unavailable else { return error(.errUnsupported, "TLS is not configured on this server") }
        guard !isTLSActive else { return error(.errInvalid, "TLS is already active") }
        guard data.isEmpty else { return error(.errInvalid, "STARTTLS takes no data") }
        // Only a fixed-newstyle client may ask (a `.required` server never gets this far without one).
        guard clientFlags.contains(.fixedNewstyle) else {
            return error(.errPolicy, "TLS needs the fixed newstyle handshake")
        }
        // Nothing negotiated in plaintext survives the upgrade: the spec forbids keeping it, and a
        // man in the middle could have chosen it.
        structuredReplies = false
        metaContextSelection = nil
        isTLSActive = true
        state = .awaitingTLS(clientFlags)
        return [.send(.optionReply(option: .startTLS, type: .ack, data: [])), .startTLS]
    }

    private func makeSession(
        export: NBDExportDescription,
        requestedName: String,
        clientFlags: NBDClientFlags
    )
        -> NBDSession
    {
        // A meta context selection is only valid for the export it named (the spec asks servers to forget a
        // selection made for another export).
        var ids: [UInt32] = []
        if structuredReplies, let selection = metaContextSelection,
            self.export(named: selection.export)?.name == export.name
        {
            ids = selection.ids
        }
        return NBDSession(
            export: export,
            clientFlags: clientFlags,
            structuredReplies: structuredReplies,
            metaContextIDs: ids
        )
    }
}

/// A bounds-checked big-endian reader over option data: every read returns nil past the end.
struct Cursor {
    private let bytes: [UInt8]
    private var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var isAtEnd: Bool { position == bytes.count }

    mutating func bytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, count <= bytes.count - position else { return nil }
        defer { position += count }
        return Array(bytes[position..<position + count])
    }

    mutating func uint16() -> UInt16? {
        guard let b = bytes(2) else { return nil }
        return UInt16(b[0]) << 8 | UInt16(b[1])
    }

    mutating func uint32() -> UInt32? {
        guard let b = bytes(4) else { return nil }
        return b.reduce(0) { $0 << 8 | UInt32($1) }
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
    }
}
