// Design notes
// ------------
// A remote NBD export as a `BlockDevice`, so the bus can plug a disk whose storage is another server.
// The device is synchronous like every `BlockDevice`, so the client is plain blocking sockets: a small
// pool of connections, each carrying one request at a time (simple replies only; no structured replies
// are negotiated). Several connections are opened only when the server advertises multi-conn, which
// promises that a flush on one connection covers writes acknowledged on the others; otherwise one
// connection serializes everything. Every value from the server is checked (magic, cookie, sizes).
// With an `nbds` URI every connection starts TLS before it negotiates anything (TLSSession.swift), and
// never falls back to plaintext. A broken connection is replaced and its request sent again, for as long as
// the reconnect policy allows (Reconnect.swift).

import BlockIO
import NBDProtocol
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Where an NBD export lives, and whether it is reached over TLS. The syntax is libnbd's:
///
///     nbd://host[:port]/export                 nbd+unix:///export?socket=PATH
///     nbds://host[:port]/export?QUERY          nbds+unix:///export?socket=PATH&QUERY
///
/// `nbds` schemes require TLS (never falling back to plaintext); their query may hold
/// `tls-certificates=DIR` (ca-cert.pem, and client-cert.pem + client-key.pem to present a client
/// certificate) and `tls-verify-peer=false` (do not check the server's certificate). Plain `nbd` schemes
/// never use TLS and refuse these parameters, as they refuse every unknown one.
public struct NBDURI: Sendable, Hashable {
    public enum Transport: Sendable, Hashable {
        case tcp(host: String, port: UInt16)
        case unix(path: String)
    }

    /// How an `nbds` URI wants TLS.
    public struct TLS: Sendable, Hashable {
        /// The certificates directory (`tls-certificates=DIR`); nil to trust the system's CAs and present
        /// no client certificate.
        public var certificates: String?
        /// Whether the server's certificate is checked (`tls-verify-peer`, default true): its chain, and
        /// over TCP the URI's host.
        public var verifyPeer: Bool

        public init(certificates: String? = nil, verifyPeer: Bool = true) {
            self.certificates = certificates
            self.verifyPeer = verifyPeer
        }
    }

    public var transport: Transport
    public var export: String
    /// nil for plaintext (`nbd://`, `nbd+unix://`).
    public var tls: TLS?

    public init(transport: Transport, export: String, tls: TLS? = nil) {
        self.transport = transport
        self.export = export
        self.tls = tls
    }

    /// The query parameters understood, by scheme.
    private static let socketParameter = "socket"
    private static let tlsParameters = ["tls-certificates", "tls-verify-peer"]

    /// - Throws: `BlockIOError` `.invalidArgument` naming what is wrong.
    public init(parsing uri: String) throws {
        func bad(_ why: String) -> BlockIOError {
            BlockIOError(.invalidArgument, operation: .open, path: uri, message: "invalid NBD URI: \(why)")
        }
        let schemes: [(prefix: String, secure: Bool, unix: Bool)] = [
            ("nbd://", false, false), ("nbds://", true, false), ("nbd+unix://", false, true),
            ("nbds+unix://", true, true),
        ]
        guard let scheme = schemes.first(where: { uri.hasPrefix($0.prefix) }) else {
            throw bad("use nbd[s]://host[:port]/export or nbd[s]+unix:///export?socket=PATH")
        }
        var rest = uri.dropFirst(scheme.prefix.count)
        var query: [String: String] = [:]
        if let mark = rest.firstIndex(of: "?") {
            for item in rest[rest.index(after: mark)...].split(separator: "&") {
                let pair = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                let key = Self.percentDecoded(String(pair[0]))
                guard query[key] == nil else { throw bad("\(key) is given twice") }
                query[key] = pair.count == 2 ? Self.percentDecoded(String(pair[1])) : ""
            }
            rest = rest[..<mark]
        }
        if scheme.unix {
            guard rest.first == "/" || rest.isEmpty else { throw bad("\(scheme.prefix) URIs have no host") }
            export = Self.percentDecoded(String(rest.dropFirst()))
            guard let socket = query.removeValue(forKey: Self.socketParameter), !socket.isEmpty else {
                throw bad("missing ?socket=PATH")
            }
            transport = .unix(path: socket)
        } else {
            let slash = rest.firstIndex(of: "/") ?? rest.endIndex
            let authority = rest[..<slash]
            export = slash == rest.endIndex ? "" : Self.percentDecoded(String(rest[rest.index(after: slash)...]))
            var host = String(authority)
            var port: UInt16 = 10809
            if let colon = authority.lastIndex(of: ":"), !authority.hasSuffix("]") {
                guard let p = UInt16(authority[authority.index(after: colon)...]) else { throw bad("bad port") }
                port = p
                host = String(authority[..<colon])
            }
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            guard !host.isEmpty else { throw bad("missing host") }
            transport = .tcp(host: host, port: port)
        }
        if scheme.secure {
            var settings = TLS()
            if let directory = query.removeValue(forKey: "tls-certificates") {
                guard !directory.isEmpty else { throw bad("tls-certificates needs a directory") }
                settings.certificates = directory
            }
            if let verify = query.removeValue(forKey: "tls-verify-peer") {
                guard let value = Self.boolean(verify) else {
                    throw bad("tls-verify-peer must be true or false, not '\(verify)'")
                }
                settings.verifyPeer = value
            }
            tls = settings
        } else {
            if let key = Self.tlsParameters.first(where: { query[$0] != nil }) {
                throw bad("\(key) needs an nbds:// or nbds+unix:// URI (nbd:// never uses TLS)")
            }
            tls = nil
        }
        if let unknown = query.keys.sorted().first {
            let known = (scheme.unix ? [Self.socketParameter] : []) + (scheme.secure ? Self.tlsParameters : [])
            throw bad(
                "unknown parameter '\(unknown)'\(known.isEmpty ? "" : " (\(scheme.prefix) knows \(known.joined(separator: ", ")))")"
            )
        }
    }

    private static func boolean(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: return nil
        }
    }

    /// `uri` with a relative `tls-certificates` directory made absolute against `directory`, for handing
    /// the URI to another process with another working directory (the bus). Anything else is unchanged.
    public static func resolvingCertificatesDirectory(in uri: String, against directory: String) -> String {
        guard let mark = uri.firstIndex(of: "?") else { return uri }
        let key = "tls-certificates="
        let items = uri[uri.index(after: mark)...].split(separator: "&", omittingEmptySubsequences: false).map { item in
            let value = item.dropFirst(key.count)
            guard item.hasPrefix(key), !value.isEmpty, !percentDecoded(String(value)).hasPrefix("/") else {
                return String(item)
            }
            let base = directory.hasSuffix("/") ? directory : directory + "/"
            return key + percentEncoded(base) + value
        }
        return uri[..<mark] + "?" + items.joined(separator: "&")
    }

    /// Escapes every byte but unreserved characters and `/`.
    static func percentEncoded(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"),
                UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"), UInt8(ascii: "/"):
                out.unicodeScalars.append(UnicodeScalar(b))
            default:
                out += "%" + (b < 16 ? "0" : "") + String(b, radix: 16, uppercase: true)
            }
        }
        return out
    }

    static func percentDecoded(_ s: String) -> String {
        guard s.contains("%") else { return s }
        var out: [UInt8] = []
        var bytes = Array(s.utf8)[...]
        while let b = bytes.popFirst() {
            if b == UInt8(ascii: "%"), bytes.count >= 2,
                let v = UInt8(String(decoding: bytes.prefix(2), as: UTF8.self), radix: 16)
            {
                out.append(v)
                bytes = bytes.dropFirst(2)
            } else {
                out.append(b)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// A remote NBD export.
public final class NBDClientDevice: BlockDevice, ConnectionStatusReporting {
    public let uri: String
    public let size: UInt64
    public let capabilities: BlockDeviceCapabilities
    let transmissionFlags: NBDTransmissionFlags
    private let pool: Mutex<[NBDConnection]>
    /// How many connections there are, idle (in `pool`) or carrying a request.
    private let connectionCount: Int
    private let available = Monitor()
    private let closed = Atomic<Bool>(false)
    /// How to open a replacement for a broken connection.
    private let target: NBDURI
    private let tls: TLSClientContext?
    /// Whether the server is reachable, and how long requests wait when it is not.
    private let link: NBDLink
    /// Changes a new connection writes again (Reconnect.swift); kept only when the server offers flush,
    /// without which nothing would ever let them go.
    private let unflushed = Mutex(UnflushedChanges())
    private let gate = Gate()
    /// One thread at a time flushes because `unflushed` grew past `maximumUnflushedBytes`.
    private let flushingForSpace = Atomic<Bool>(false)
    static let maximumUnflushedBytes = 64 << 20
    /// Requests larger than this are split (the spec's usual maximum).
    static let maximumRequest = 32 << 20

    /// Connects and negotiates. With `readOnly`, writes are refused locally whatever the server allows.
    /// An `nbds` URI loads its certificates first, then starts TLS on every connection.
    /// - Parameters:
    ///   - uri: an `nbd://`, `nbd+unix://`, `nbds://` or `nbds+unix://` URI (see `NBDURI`).
    ///   - readOnly: refuse writes locally.
    ///   - connections: how many connections to open when the server allows several (multi-conn).
    ///   - reconnect: how long requests wait for the server when a connection breaks.
    /// - Throws: `BlockIOError` when the URI is invalid, the certificates cannot be loaded, or the first
    ///   connection fails (plugging does not wait for a server that is not there).
    public static func connect(
        uri: String,
        readOnly: Bool,
        connections: Int = 4,
        reconnect: NBDReconnectPolicy = NBDReconnectPolicy()
    ) throws -> NBDClientDevice {
        let parsed = try NBDURI(parsing: uri)
        let tls = try parsed.tls.map { try TLSClientContext($0, uri: uri) }
        let first = try NBDConnection.open(parsed, uri: uri, tls: tls)
        var all = [first]
        if first.flags.contains(.canMultiConn) {
            for _ in 1..<max(1, connections) {
                guard let more = try? NBDConnection.open(parsed, uri: uri, tls: tls), more.size == first.size else {
                    break
                }
                all.append(more)
            }
        }
        return NBDClientDevice(
            uri: uri,
            target: parsed,
            tls: tls,
            connections: all,
            readOnly: readOnly,
            reconnect: reconnect
        )
    }

    init(
        uri: String,
        target: NBDURI,
        tls: TLSClientContext?,
        connections: [NBDConnection],
        readOnly: Bool,
        reconnect: NBDReconnectPolicy
    ) {
        self.uri = uri
        self.target = target
        self.tls = tls
        link = NBDLink(policy: reconnect)
        let flags = connections[0].flags
        transmissionFlags = flags
        size = connections[0].size
        var caps: BlockDeviceCapabilities = []
        if readOnly || flags.contains(.readOnly) { caps.insert(.readOnly) }
        if flags.contains(.sendFlush) { caps.insert(.flush) }
        if flags.contains(.sendTrim) { caps.insert(.discard) }
        if flags.contains(.sendWriteZeroes) { caps.insert(.writeZeroes) }
        if flags.contains(.sendFastZero) { caps.insert(.fastZero) }
        if flags.contains(.canMultiConn) { caps.insert(.multiConnection) }
        capabilities = caps
        pool = Mutex(connections)
        connectionCount = connections.count
    }

    /// The connection's state as the last request found it (`vdisk list` shows it).
    public var connectionStatus: ConnectionStatus { link.status }

    private func closedError(_ operation: BlockIOError.Operation) -> BlockIOError {
        BlockIOError(.closed, operation: operation, path: uri, message: "the export is closed")
    }

    /// Runs `body` on a free connection; when the connection breaks, on a new one (see Reconnect.swift).
    private func withConnection<T>(_ operation: BlockIOError.Operation, _ body: (NBDConnection) throws -> T) throws -> T
    {
        guard !closed.load(ordering: .relaxed) else { throw closedError(operation) }
        var connection: NBDConnection = available.withLock {
            while true {
                if let c = pool.withLock({ $0.popLast() }) { return c }
                available.wait()
            }
        }
        defer {
            pool.withLock { $0.append(connection) }
            available.withLock { available.broadcast() }
        }
        var deadline: ContinuousClock.Instant?
        var attempt = 0
        while true {
            if connection.isBroken {
                // The old connection goes with its last reference.
                connection = try reconnect(operation, deadline: &deadline, attempt: &attempt)
            }
            do {
                let result = try gate.shared { try body(connection) }
                link.requestAnswered()
                return result
            } catch  where connection.isBroken {
                // The connection died under this request (a server restart, say). Every NBD command is
                // idempotent (writes put the same bytes at the same place), so it is sent again on a new one.
                continue
            } catch {
                link.requestAnswered()  // an error reply: the server is there
                throw error
            }
        }
    }

    /// A new connection in place of a broken one, tried with growing pauses until the request's deadline
    /// (fixed at its first call for a request), then EIO.
    private func reconnect(
        _ operation: BlockIOError.Operation,
        deadline: inout ContinuousClock.Instant?,
        attempt: inout Int
    ) throws -> NBDConnection {
        let clock = ContinuousClock()
        let end = deadline ?? link.brokenConnectionFound(at: clock.now)
        deadline = end
        while true {
            let pause = NBDReconnectPolicy.pause(before: attempt)
            if pause > .zero {
                let remaining = end - clock.now
                guard remaining > .zero else { break }
                try wait(min(pause, remaining), operation)
            }
            attempt += 1
            do {
                let timeout = max(end - clock.now, NBDReconnectPolicy.minimumAttemptTime)
                let fresh = try openReplacement(operation, timeout: timeout)
                do {
                    try replayUnflushed(on: fresh)
                } catch {
                    fresh.disconnect()
                    throw error
                }
                link.reconnected()
                return fresh
            } catch {
                link.attemptFailed(error)
                if clock.now >= end { break }
            }
        }
        link.gaveUp()
        throw BlockIOError(
            .system,
            operation: operation,
            errno: EIO,
            path: uri,
            message: "lost the connection to the server and cannot reconnect (waited up to "
                + "\(formatSeconds(link.policy.timeout)) s): \(link.lastError ?? "no attempt made")"
        )
    }

    /// Sleeps `duration` in short slices, so that `close()` ends the wait of a reconnecting request soon.
    private func wait(_ duration: Duration, _ operation: BlockIOError.Operation) throws {
        let clock = ContinuousClock()
        let end = clock.now + duration
        while clock.now < end {
            guard !closed.load(ordering: .relaxed) else { throw closedError(operation) }
            let slice = min(end - clock.now, .milliseconds(100))
            usleep(UInt32(max(1, slice.seconds * 1e6)))
        }
    }

    /// One attempt at a new connection, within `timeout`. The export must look the same as before: a
    /// different size or flags would make the data or the advertised capabilities wrong.
    private func openReplacement(_ operation: BlockIOError.Operation, timeout: Duration) throws -> NBDConnection {
        let fresh = try NBDConnection.open(target, uri: uri, tls: tls, timeout: timeout)
        guard fresh.size == size, fresh.flags == transmissionFlags else {
            fresh.disconnect()
            throw BlockIOError(
                .system,
                operation: operation,
                errno: EIO,
                path: uri,
                message: "the export changed (size or flags) on reconnecting"
            )
        }
        return fresh
    }

    private var keepsChanges: Bool { transmissionFlags.contains(.sendFlush) }

    /// Records a change the server acknowledged; called inside the request's shared gate, so a replay sees
    /// either the change acknowledged and recorded or not acknowledged at all.
    private func remember(_ change: @autoclosure () -> UnflushedChanges.Change) {
        guard keepsChanges else { return }
        unflushed.withLock { $0.append(change()) }
    }

    /// Flushes when the recorded changes grew past their bound (one thread at a time; the others go on).
    private func boundUnflushed() throws {
        guard keepsChanges, unflushed.withLock({ $0.bytes }) > Self.maximumUnflushedBytes,
            !flushingForSpace.exchange(true, ordering: .acquiring)
        else { return }
        defer { flushingForSpace.store(false, ordering: .releasing) }
        try flush()
    }

    /// Writes every recorded change again on a new connection, then flushes and forgets them (see
    /// Reconnect.swift). Alone under the gate: no request runs meanwhile.
    private func replayUnflushed(on connection: NBDConnection) throws {
        guard keepsChanges else { return }
        try gate.exclusive {
            let (changes, last) = unflushed.withLock { ($0.changes, $0.lastSequence) }
            guard !changes.isEmpty else { return }
            for (_, change) in changes {
                switch change {
                case .write(let offset, let data):
                    try data.withUnsafeBytes {
                        try connection.request(.write, flags: [], offset: offset, length: UInt32($0.count), payload: $0)
                    }
                case .zeroes(let offset, let length, let noHole):
                    try connection.request(.writeZeroes, flags: noHole ? [.noHole] : [], offset: offset, length: length)
                case .trim(let offset, let length):
                    try connection.request(.trim, flags: [], offset: offset, length: length)
                }
            }
            try connection.request(.flush, flags: [], offset: 0, length: 0)
            unflushed.withLock { $0.dropThrough(last) }
        }
    }

    private func checkWritable(_ operation: BlockIOError.Operation) throws {
        if capabilities.contains(.readOnly) {
            throw BlockIOError(.readOnly, operation: operation, path: uri, message: "the export is read-only")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read)
        var done = 0
        while done < buffer.count {
            let n = min(buffer.count - done, Self.maximumRequest)
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            try withConnection(.read) {
                try $0.request(.read, flags: [], offset: offset + UInt64(done), length: UInt32(n), readInto: slice)
            }
            done += n
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try checkWritable(.write)
        try checkRange(offset: offset, count: UInt64(buffer.count), operation: .write)
        var done = 0
        let flags: NBDCommandFlags = fua && transmissionFlags.contains(.sendFUA) ? [.fua] : []
        while done < buffer.count {
            let n = min(buffer.count - done, Self.maximumRequest)
            let slice = UnsafeRawBufferPointer(rebasing: buffer[done..<done + n])
            let at = offset + UInt64(done)
            try withConnection(.write) {
                try $0.request(.write, flags: flags, offset: at, length: UInt32(n), payload: slice)
                remember(.write(offset: at, data: Array(slice)))
            }
            done += n
        }
        try boundUnflushed()
        if fua && !transmissionFlags.contains(.sendFUA) { try flush() }
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try checkWritable(.writeZeroes)
        try checkRange(offset: offset, count: count, operation: .writeZeroes)
        guard capabilities.contains(.writeZeroes) else {
            if fast {
                throw BlockIOError(
                    .notSupported,
                    operation: .writeZeroes,
                    path: uri,
                    message: "the export cannot zero quickly"
                )
            }
            var done: UInt64 = 0
            let zeroes = [UInt8](repeating: 0, count: Int(min(count, 1 << 20)))
            while done < count {
                let n = Int(min(count - done, UInt64(zeroes.count)))
                try zeroes.withUnsafeBytes {
                    try write(UnsafeRawBufferPointer(rebasing: $0[..<n]), at: offset + done, fua: false)
                }
                done += UInt64(n)
            }
            return
        }
        if fast && !capabilities.contains(.fastZero) {
            throw BlockIOError(
                .notSupported,
                operation: .writeZeroes,
                path: uri,
                message: "the export cannot zero quickly"
            )
        }
        var flags: NBDCommandFlags = mayUnmap ? [] : [.noHole]
        if fast { flags.insert(.fastZero) }
        try chunked(offset: offset, count: count) { o, n in
            try withConnection(.writeZeroes) {
                try $0.request(.writeZeroes, flags: flags, offset: o, length: n)
                remember(.zeroes(offset: o, length: n, noHole: !mayUnmap))
            }
        }
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try checkWritable(.discard)
        try checkRange(offset: offset, count: count, operation: .discard)
        guard capabilities.contains(.discard) else { return }  // a hint: ignoring it is correct
        try chunked(offset: offset, count: count) { o, n in
            try withConnection(.discard) {
                try $0.request(.trim, flags: [], offset: o, length: n)
                remember(.trim(offset: o, length: n))
            }
        }
    }

    private func chunked(offset: UInt64, count: UInt64, _ body: (UInt64, UInt32) throws -> Void) throws {
        var done: UInt64 = 0
        let step: UInt64 = 1 << 30  // zero and trim carry no payload: large requests are fine
        while done < count {
            let n = min(count - done, step)
            try body(offset + done, UInt32(n))
            done += n
        }
    }

    public func flush() throws {
        guard transmissionFlags.contains(.sendFlush) else { return }
        // Without multi-conn there is one connection; with it, one flush covers all of them, and every change
        // acknowledged before it was sent (on whichever connection).
        var covered: UInt64 = 0
        try withConnection(.flush) {
            covered = unflushed.withLock { $0.lastSequence }
            try $0.request(.flush, flags: [], offset: 0, length: 0)
        }
        unflushed.withLock { $0.dropThrough(covered) }
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try checkRange(offset: offset, count: count, operation: .extents)
        return allDataExtent(at: offset, count: count)
    }

    /// The flush `close()` promises, on the first connection that still works, or a new one: a connection
    /// idle since the server restarted is only found dead when used.
    private func finalFlush(_ connections: [NBDConnection]) throws {
        for connection in connections where !connection.isBroken {
            do {
                try connection.request(.flush, flags: [], offset: 0, length: 0)
                return
            } catch  where connection.isBroken {
                continue
            }
        }
        let fresh = try openReplacement(.flush, timeout: NBDConnection.requestTimeout)
        defer { fresh.disconnect() }
        try replayUnflushed(on: fresh)
        try fresh.request(.flush, flags: [], offset: 0, length: 0)
    }

    public func close() throws {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        // Take every connection out of the pool, waiting for requests still in flight on other threads: a
        // connection (and its TLS session) is only ever used by the thread that took it.
        let all = available.withLock { () -> [NBDConnection] in
            while pool.withLock({ $0.count }) < connectionCount { available.wait() }
            return pool.withLock { pool in
                defer { pool.removeAll() }
                return pool
            }
        }
        var failure: (any Error)?
        if transmissionFlags.contains(.sendFlush) && !capabilities.contains(.readOnly) {
            do {
                try finalFlush(all)
            } catch {
                failure = error
            }
        }
        for c in all { c.disconnect() }
        // Threads that were waiting for a connection get a disconnected one, which fails their request.
        pool.withLock { $0 = all }
        available.withLock { available.broadcast() }
        if let failure { throw failure }
    }
}

/// Seconds as the user wrote them: "60", "2.5".
func formatSeconds(_ duration: Duration) -> String {
    let seconds = duration.seconds
    return seconds == seconds.rounded() ? String(Int64(seconds)) : String(seconds)
}
