import BlockIO
import NBDProtocol
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

/// One negotiated connection to an export, carrying one request at a time: the caller serializes, and
/// with TLS must (one thread at a time per OpenSSL session; `NBDClientDevice`'s pool hands a connection to
/// one thread, which sends the request and reads its reply).
final class NBDConnection: @unchecked Sendable {
    let fd: Int32
    let uri: String
    let size: UInt64
    let flags: NBDTransmissionFlags
    /// The socket itself, or the TLS session over it.
    let transport: NBDTransport
    private var nextCookie: UInt64 = 1
    private var disconnected = false
    /// A send or receive failed part-way, or the server broke the framing: where the next reply starts is
    /// unknown, so the connection is shut down and must be replaced (`NBDClientDevice` reconnects).
    private(set) var isBroken = false

    private init(fd: Int32, transport: NBDTransport, uri: String, size: UInt64, flags: NBDTransmissionFlags) {
        self.fd = fd
        self.transport = transport
        self.uri = uri
        self.size = size
        self.flags = flags
    }

    deinit { Glibc.close(fd) }  // the TLS session, if any, is freed after: it never closes the socket

    func fail(_ message: String, errno code: Int32 = EIO) -> BlockIOError {
        BlockIOError(.system, operation: .open, errno: code, path: uri, message: message)
    }

    // MARK: Connect and negotiate

    /// How long a request may wait for the server to take it or answer it before the connection counts as
    /// broken (and is replaced).
    static let requestTimeout: Duration = .seconds(30)

    /// Connects and negotiates within `timeout` (connect, TLS handshake and options together, at most
    /// `requestTimeout` per send or receive); with `tls` (required for an `nbds` URI), starts TLS before
    /// anything else.
    static func open(
        _ target: NBDURI,
        uri: String,
        tls: TLSClientContext?,
        timeout: Duration = requestTimeout
    ) throws -> NBDConnection {
        precondition((target.tls == nil) == (tls == nil), "an nbds URI needs a TLS context, and only it")
        let deadline = ContinuousClock.now + timeout
        let fd = try connectSocket(target, uri: uri, timeout: timeout)
        do {
            setTimeouts(fd, min(max(deadline - .now, .milliseconds(100)), requestTimeout))
            var serverName: String?
            if case .tcp(let host, _) = target.transport { serverName = host }
            let connection = try negotiate(fd: fd, export: target.export, uri: uri, tls: tls.map { ($0, serverName) })
            // A server that stops answering, or stops taking a request, breaks the connection after this.
            setTimeouts(fd, requestTimeout)
            return connection
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    /// Bounds every blocking send and receive on `fd`.
    private static func setTimeouts(_ fd: Int32, _ timeout: Duration) {
        var value = timeout.timeval
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &value, socklen_t(MemoryLayout<timeval>.size))
    }

    /// `connect(2)` that gives up after `timeout` (a TCP peer that drops SYNs would take minutes; a unix
    /// socket whose listen backlog is full would block): non-blocking, then poll.
    private static func connect(
        _ fd: Int32,
        _ address: UnsafePointer<sockaddr>,
        _ length: socklen_t,
        timeout: Duration
    ) -> Int32 {
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
        defer { _ = fcntl(fd, F_SETFL, flags) }
        if Glibc.connect(fd, address, length) == 0 { return 0 }
        guard errno == EINPROGRESS else { return errno }  // EAGAIN on a unix socket: the backlog is full
        let deadline = ContinuousClock.now + timeout
        while true {
            let remaining = deadline - .now
            guard remaining > .zero else { return ETIMEDOUT }
            var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            let ready = poll(&entry, 1, Int32(min(max(1, remaining.seconds * 1000), 60_000)))
            if ready < 0 && errno == EINTR { continue }
            if ready < 0 { return errno }
            if ready == 0 { continue }
            var error: Int32 = 0
            var errorLength = socklen_t(MemoryLayout<Int32>.size)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &errorLength)
            return error
        }
    }

    private static func connectSocket(_ target: NBDURI, uri: String, timeout: Duration) throws -> Int32 {
        switch target.transport {
        case .unix(let path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else {
                throw BlockIOError(.system, operation: .open, errno: errno, path: uri, message: "socket failed")
            }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                Glibc.close(fd)
                throw BlockIOError(.invalidArgument, operation: .open, path: uri, message: "socket path too long")
            }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (i, b) in bytes.enumerated() { raw[i] = b }
            }
            let e = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size), timeout: timeout)
                }
            }
            guard e == 0 else {
                Glibc.close(fd)
                throw BlockIOError(
                    .system,
                    operation: .open,
                    errno: e,
                    path: uri,
                    message: "cannot connect to \(path): \(String(cString: strerror(e)))"
                )
            }
            return fd
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var result: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &result)
            guard rc == 0, let first = result else {
                throw BlockIOError(
                    .system,
                    operation: .open,
                    errno: EHOSTUNREACH,
                    path: uri,
                    message: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))"
                )
            }
            defer { freeaddrinfo(result) }
            var lastErrno = ECONNREFUSED
            var info: UnsafeMutablePointer<addrinfo>? = first
            while let ai = info {
                let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype, ai.pointee.ai_protocol)
                if fd >= 0 {
                    lastErrno = connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen, timeout: timeout)
                    if lastErrno == 0 {
                        var one: Int32 = 1
                        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                        return fd
                    }
                    Glibc.close(fd)
                }
                info = ai.pointee.ai_next
            }
            throw BlockIOError(
                .system,
                operation: .open,
                errno: lastErrno,
                path: uri,
                message: "cannot connect to \(host):\(port): \(String(cString: strerror(lastErrno)))"
            )
        }
    }

    /// Fixed newstyle negotiation: NBD_OPT_STARTTLS first when `tls` is given (the server name is the
    /// URI's host, nil over a unix socket), then NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME on old
    /// servers).
    private static func negotiate(
        fd: Int32,
        export: String,
        uri: String,
        tls: (context: TLSClientContext, serverName: String?)?
    ) throws -> NBDConnection {
        var io = RawIO(transport: .socket(fd), uri: uri)
        var r = try io.readBuffer(18)
        guard r.readInteger(as: UInt64.self) == NBDMagic.greeting, r.readInteger(as: UInt64.self) == NBDMagic.options
        else {
            throw io.error("not an NBD server (bad greeting)")
        }
        let serverFlags = NBDHandshakeFlags(rawValue: r.readInteger()!)
        guard serverFlags.contains(.fixedNewstyle) else {
            throw io.error("the server does not speak fixed newstyle NBD")
        }
        var clientFlags: NBDClientFlags = [.fixedNewstyle]
        if serverFlags.contains(.noZeroes) { clientFlags.insert(.noZeroes) }
        var flagsBuffer = ByteBuffer()
        flagsBuffer.writeInteger(clientFlags.rawValue)
        try io.write(flagsBuffer)
        if let tls {
            try startTLS(io: io)
            // Everything from here on, the rest of the negotiation included, is inside TLS.
            let session = try TLSSession(context: tls.context, fd: fd, serverName: tls.serverName, uri: uri)
            io = RawIO(transport: .tls(session), uri: uri)
        }
        var w = ByteBuffer()
        let name = Array(export.utf8)
        guard name.count <= NBDLimits.maximumString else { throw io.error("export name too long") }
        // NBD_OPT_GO: name, then no information requests (the server sends NBD_INFO_EXPORT anyway).
        w.writeInteger(NBDMagic.options)
        w.writeInteger(NBDOption.go.rawValue)
        w.writeInteger(UInt32(4 + name.count + 2))
        w.writeInteger(UInt32(name.count))
        w.writeBytes(name)
        w.writeInteger(UInt16(0))
        try io.write(w)
        var size: UInt64?
        var flags = NBDTransmissionFlags()
        while true {
            let (type, reply) = try io.readOptionReply()
            var data = reply
            if type == .ack { break }
            if type == .info {
                guard let info = data.readInteger(as: UInt16.self) else { throw io.error("short NBD_REP_INFO") }
                if NBDInfoType(rawValue: info) == .export {
                    guard let exportSize = data.readInteger(as: UInt64.self),
                        let exportFlags = data.readInteger(as: UInt16.self)
                    else {
                        throw io.error("short NBD_INFO_EXPORT")
                    }
                    size = exportSize
                    flags = NBDTransmissionFlags(rawValue: exportFlags)
                }
                continue
            }
            if type == .errUnsupported {
                // An old server: NBD_OPT_EXPORT_NAME ends negotiation with size and flags.
                var e = ByteBuffer()
                e.writeInteger(NBDMagic.options)
                e.writeInteger(NBDOption.exportName.rawValue)
                e.writeInteger(UInt32(name.count))
                e.writeBytes(name)
                try io.write(e)
                var x = try io.readBuffer(10)
                size = x.readInteger(as: UInt64.self)
                flags = NBDTransmissionFlags(rawValue: x.readInteger()!)
                if !clientFlags.contains(.noZeroes) { _ = try io.readBuffer(124) }
                break
            }
            if type.isError {
                let message = printable(data)
                if type == .errUnknown { throw io.error("the server has no export named '\(export)'", errno: ENOENT) }
                if type == .errTLSRequired {
                    throw io.error("the server requires TLS: use an nbds:// or nbds+unix:// URI", errno: EACCES)
                }
                throw io.error("the server refused the export '\(export)'\(message.isEmpty ? "" : ": \(message)")")
            }
            // Other replies (NBD_REP_SERVER...) are ignored.
        }
        guard let size else { throw io.error("the server did not say the export's size") }
        guard size <= 1 << 62 else { throw io.error("export size \(size) is not plausible") }
        return NBDConnection(fd: fd, transport: io.transport, uri: uri, size: size, flags: flags)
    }

    /// Sends NBD_OPT_STARTTLS and requires NBD_REP_ACK. Any other answer fails the connection: an `nbds`
    /// URI never falls back to plaintext.
    private static func startTLS(io: RawIO) throws {
        var w = ByteBuffer()
        w.writeInteger(NBDMagic.options)
        w.writeInteger(NBDOption.startTLS.rawValue)
        w.writeInteger(UInt32(0))
        try io.write(w)
        // The ACK is the server's last plaintext; nothing may follow it before the TLS handshake, and we
        // read exactly the reply, so nothing a man in the middle appends can pass for TLS-protected data.
        let (type, data) = try io.readOptionReply(for: .startTLS)
        if type == .ack { return }
        let message = printable(data)
        let detail = message.isEmpty ? "" : " (\(message))"
        switch type {
        case .errUnsupported:
            throw io.error(
                "the server does not offer TLS: NBD_OPT_STARTTLS is unsupported\(detail)",
                errno: EPROTONOSUPPORT
            )
        case .errPolicy:
            throw io.error("the server refused TLS by policy\(detail)", errno: EACCES)
        default:
            if type.isError {
                throw io.error("the server refused TLS with error \(type.rawValue & 0x7fff_ffff)\(detail)")
            }
            throw io.error(
                "the server answered NBD_OPT_STARTTLS with reply type \(type.rawValue), not an acknowledgement"
            )
        }
    }

    // MARK: Transmission

    /// Sends one request and waits for its simple reply; reads land in `readInto`.
    func request(
        _ command: NBDCommand,
        flags: NBDCommandFlags,
        offset: UInt64,
        length: UInt32,
        payload: UnsafeRawBufferPointer? = nil,
        readInto: UnsafeMutableRawBufferPointer? = nil
    ) throws {
        guard !disconnected else {
            throw BlockIOError(.closed, operation: .read, path: uri, message: "the connection is closed")
        }
        let io = RawIO(transport: transport, uri: uri)
        let cookie = nextCookie
        nextCookie &+= 1
        var header = ByteBuffer()
        NBDRequest(flags: flags, command: command, cookie: cookie, offset: offset, length: length).encode(into: &header)
        let error: UInt32
        do {
            try io.write(header)
            if let payload { try io.write(payload) }
            var r = try io.readBuffer(16)
            guard r.readInteger(as: UInt32.self) == NBDMagic.simpleReply else {
                throw io.error("bad reply magic from the server")
            }
            error = r.readInteger(as: UInt32.self)!
            guard r.readInteger(as: UInt64.self) == cookie else { throw io.error("reply for an unknown request") }
            if error == 0, let readInto { try io.read(into: readInto) }
        } catch {
            // A timeout or a short transfer leaves the stream mid-message; nothing later can be trusted.
            isBroken = true
            disconnected = true
            shutdown(fd, Int32(SHUT_RDWR))
            throw error
        }
        if error == NBDErrorCode.ESHUTDOWN.rawValue {
            // The server is going away; the spec asks for a soft disconnect, and the request is sent again
            // on a new connection like any other that a broken connection interrupted.
            disconnect()
            isBroken = true
            throw io.error("the server is shutting down", errno: ESHUTDOWN)
        }
        if error != 0 {
            throw BlockIOError(
                .system,
                operation: command == .read ? .read : .write,
                errno: Int32(bitPattern: error),
                path: uri,
                message: "the server answered \(command) at \(offset)+\(length) with error \(error)"
            )
        }
    }

    /// Says goodbye (NBD_CMD_DISC, then TLS close_notify) and shuts the socket down; later requests fail.
    func disconnect() {
        guard !disconnected else { return }
        disconnected = true
        var request = ByteBuffer()
        NBDRequest(command: .disconnect, cookie: 0).encode(into: &request)
        let io = RawIO(transport: transport, uri: uri)
        try? io.write(request)
        if case .tls(let session) = transport { session.close() }
        shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// Where a connection's bytes go: the socket itself, or (after STARTTLS) a TLS session over it. Both move
/// at least one byte per call or throw; a receive of 0 is the server's end of file.
enum NBDTransport {
    case socket(Int32)
    case tls(TLSSession)

    func send(_ buffer: UnsafeRawBufferPointer, uri: String) throws -> Int {
        switch self {
        case .socket(let fd):
            while true {
                let n = Glibc.send(fd, buffer.baseAddress!, buffer.count, Int32(MSG_NOSIGNAL))
                if n >= 0 { return n }
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN {
                    throw RawIO.error("the server did not take the request", errno: ETIMEDOUT, uri: uri)
                }
                throw RawIO.error("connection lost: \(describeErrno(code))", errno: code, uri: uri)
            }
        case .tls(let session):
            return try session.send(buffer)
        }
    }

    func receive(into buffer: UnsafeMutableRawBufferPointer, uri: String) throws -> Int {
        switch self {
        case .socket(let fd):
            while true {
                let n = recv(fd, buffer.baseAddress!, buffer.count, 0)
                if n >= 0 { return n }
                let code = errno
                if code == EINTR { continue }
                if code == EAGAIN { throw RawIO.error("the server did not answer", errno: ETIMEDOUT, uri: uri) }
                throw RawIO.error("connection lost: \(describeErrno(code))", errno: code, uri: uri)
            }
        case .tls(let session):
            return try session.receive(into: buffer)
        }
    }
}

/// Server text (an error reply's message) made safe to print: printable ASCII only, at most 200 characters.
func printable(_ buffer: ByteBuffer) -> String {
    let bytes = buffer.readableBytesView.prefix(200)
    return String(decoding: bytes.map { (0x20..<0x7f).contains($0) ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
}

/// Blocking full reads and writes over a connection's transport.
struct RawIO {
    let transport: NBDTransport
    let uri: String

    static func error(_ message: String, errno code: Int32 = EIO, uri: String) -> BlockIOError {
        BlockIOError(.system, operation: .read, errno: code, path: uri, message: message)
    }

    func error(_ message: String, errno code: Int32 = EIO) -> BlockIOError {
        Self.error(message, errno: code, uri: uri)
    }

    /// One option reply (header and data, at most 64 KiB); with `option`, the reply must be to it.
    func readOptionReply(for option: NBDOption? = nil) throws -> (NBDOptionReplyType, ByteBuffer) {
        var h = try readBuffer(20)
        guard h.readInteger(as: UInt64.self) == NBDMagic.optionReply else { throw error("bad option reply magic") }
        let replyTo = NBDOption(rawValue: h.readInteger()!)
        if let option, replyTo != option { throw error("the server answered option \(replyTo) instead of \(option)") }
        let type = NBDOptionReplyType(rawValue: h.readInteger()!)
        let length = Int(h.readInteger(as: UInt32.self)!)
        guard length <= 64 * 1024 else { throw error("option reply of \(length) bytes is too long") }
        return (type, try readBuffer(length))
    }

    func write(_ buffer: ByteBuffer) throws {
        try buffer.withUnsafeReadableBytes { try write($0) }
    }

    func write(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            done += try transport.send(UnsafeRawBufferPointer(rebasing: buffer[done...]), uri: uri)
        }
    }

    /// Exactly `count` bytes, as a buffer to read big-endian fields from.
    func readBuffer(_ count: Int) throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            try read(into: UnsafeMutableRawBufferPointer(rebasing: raw[..<count]))
            return count
        }
        return buffer
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = try transport.receive(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), uri: uri)
            if n == 0 { throw error("the server closed the connection") }
            done += n
        }
    }
}
