import BlockIO
import NBDProtocol

#if canImport(Glibc)
import Glibc
#endif

/// One negotiated connection to an export, carrying one request at a time (the caller serializes).
final class NBDConnection: @unchecked Sendable {
    let fd: Int32
    let uri: String
    let size: UInt64
    let flags: NBDTransmissionFlags
    private var nextCookie: UInt64 = 1

    private init(fd: Int32, uri: String, size: UInt64, flags: NBDTransmissionFlags) {
        self.fd = fd
        self.uri = uri
        self.size = size
        self.flags = flags
    }

    deinit { Glibc.close(fd) }

    func fail(_ message: String, errno code: Int32 = EIO) -> BlockIOError {
        BlockIOError(.system, operation: .open, errno: code, path: uri, message: message)
    }

    // MARK: Connect and negotiate

    static func open(_ target: NBDURI, uri: String) throws -> NBDConnection {
        let fd = try connectSocket(target, uri: uri)
        var timeout = timeval(tv_sec: 30, tv_usec: 0)  // a server that stops answering fails the request
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        do {
            return try negotiate(fd: fd, export: target.export, uri: uri)
        } catch {
            Glibc.close(fd)
            throw error
        }
    }

    private static func connectSocket(_ target: NBDURI, uri: String) throws -> Int32 {
        switch target.transport {
        case .unix(let path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { throw BlockIOError(.system, operation: .open, errno: errno, path: uri, message: "socket failed") }
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
            let rc = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard rc == 0 else {
                let e = errno
                Glibc.close(fd)
                throw BlockIOError(.system, operation: .open, errno: e, path: uri, message: "cannot connect to \(path): \(String(cString: strerror(e)))")
            }
            return fd
        case .tcp(let host, let port):
            var hints = addrinfo()
            hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
            var result: UnsafeMutablePointer<addrinfo>?
            let rc = getaddrinfo(host, String(port), &hints, &result)
            guard rc == 0, let first = result else {
                throw BlockIOError(.system, operation: .open, errno: EHOSTUNREACH, path: uri, message: "cannot resolve \(host): \(String(cString: gai_strerror(rc)))")
            }
            defer { freeaddrinfo(result) }
            var lastErrno = ECONNREFUSED
            var info: UnsafeMutablePointer<addrinfo>? = first
            while let ai = info {
                let fd = socket(ai.pointee.ai_family, ai.pointee.ai_socktype, ai.pointee.ai_protocol)
                if fd >= 0 {
                    if Glibc.connect(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0 {
                        var one: Int32 = 1
                        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
                        return fd
                    }
                    lastErrno = errno
                    Glibc.close(fd)
                }
                info = ai.pointee.ai_next
            }
            throw BlockIOError(.system, operation: .open, errno: lastErrno, path: uri, message: "cannot connect to \(host):\(port): \(String(cString: strerror(lastErrno)))")
        }
    }

    /// Fixed newstyle negotiation: NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME on old servers).
    private static func negotiate(fd: Int32, export: String, uri: String) throws -> NBDConnection {
        let io = RawIO(fd: fd, uri: uri)
        let greeting = try io.read(18)
        var r = Reader(greeting)
        guard r.u64() == NBDMagic.greeting, r.u64() == NBDMagic.options else {
            throw io.error("not an NBD server (bad greeting)")
        }
        let serverFlags = NBDHandshakeFlags(rawValue: r.u16())
        guard serverFlags.contains(.fixedNewstyle) else { throw io.error("the server does not speak fixed newstyle NBD") }
        var clientFlags: NBDClientFlags = [.fixedNewstyle]
        if serverFlags.contains(.noZeroes) { clientFlags.insert(.noZeroes) }
        var w = Writer()
        w.u32(clientFlags.rawValue)
        let name = Array(export.utf8)
        guard name.count <= NBDLimits.maximumString else { throw io.error("export name too long") }
        // NBD_OPT_GO: name, then no information requests (the server sends NBD_INFO_EXPORT anyway).
        w.u64(NBDMagic.options)
        w.u32(NBDOption.go.rawValue)
        w.u32(UInt32(4 + name.count + 2))
        w.u32(UInt32(name.count))
        w.bytes(name)
        w.u16(0)
        try io.write(w.data)
        var size: UInt64?
        var flags = NBDTransmissionFlags()
        while true {
            var h = Reader(try io.read(20))
            guard h.u64() == NBDMagic.optionReply else { throw io.error("bad option reply magic") }
            _ = h.u32()
            let type = NBDOptionReplyType(rawValue: h.u32())
            let length = Int(h.u32())
            guard length <= 64 * 1024 else { throw io.error("option reply of \(length) bytes is too long") }
            let data = try io.read(length)
            if type == .ack { break }
            if type == .info {
                var d = Reader(data)
                guard data.count >= 2 else { throw io.error("short NBD_REP_INFO") }
                if NBDInfoType(rawValue: d.u16()) == .export {
                    guard data.count >= 12 else { throw io.error("short NBD_INFO_EXPORT") }
                    size = d.u64()
                    flags = NBDTransmissionFlags(rawValue: d.u16())
                }
                continue
            }
            if type == .errUnsupported {
                // An old server: NBD_OPT_EXPORT_NAME ends negotiation with size and flags.
                var e = Writer()
                e.u64(NBDMagic.options)
                e.u32(NBDOption.exportName.rawValue)
                e.u32(UInt32(name.count))
                e.bytes(name)
                try io.write(e.data)
                var x = Reader(try io.read(10))
                size = x.u64()
                flags = NBDTransmissionFlags(rawValue: x.u16())
                if !clientFlags.contains(.noZeroes) { _ = try io.read(124) }
                break
            }
            if type.rawValue & (1 << 31) != 0 {
                let message = String(decoding: data, as: UTF8.self)
                if type == .errUnknown { throw io.error("the server has no export named '\(export)'", errno: ENOENT) }
                throw io.error("the server refused the export '\(export)'\(message.isEmpty ? "" : ": \(message)")")
            }
            // Other replies (NBD_REP_SERVER...) are ignored.
        }
        guard let size else { throw io.error("the server did not say the export's size") }
        guard size <= 1 << 62 else { throw io.error("export size \(size) is not plausible") }
        return NBDConnection(fd: fd, uri: uri, size: size, flags: flags)
    }

    // MARK: Transmission

    /// Sends one request and waits for its simple reply; reads land in `readInto`.
    func request(
        _ command: NBDCommand, flags: NBDCommandFlags, offset: UInt64, length: UInt32,
        payload: UnsafeRawBufferPointer? = nil, readInto: UnsafeMutableRawBufferPointer? = nil
    ) throws {
        let io = RawIO(fd: fd, uri: uri)
        let cookie = nextCookie
        nextCookie &+= 1
        var w = Writer()
        w.u32(NBDMagic.request)
        w.u16(flags.rawValue)
        w.u16(command.rawValue)
        w.u64(cookie)
        w.u64(offset)
        w.u32(length)
        try io.write(w.data)
        if let payload { try io.write(payload) }
        var r = Reader(try io.read(16))
        guard r.u32() == NBDMagic.simpleReply else { throw io.error("bad reply magic from the server") }
        let error = r.u32()
        guard r.u64() == cookie else { throw io.error("reply for an unknown request") }
        if error != 0 {
            throw BlockIOError(.system, operation: command == .read ? .read : .write, errno: Int32(bitPattern: error), path: uri,
                message: "the server answered \(command) at \(offset)+\(length) with error \(error)")
        }
        if let readInto { try io.read(into: readInto) }
    }

    func disconnect() {
        var w = Writer()
        w.u32(NBDMagic.request)
        w.u16(0)
        w.u16(NBDCommand.disconnect.rawValue)
        w.u64(0)
        w.u64(0)
        w.u32(0)
        try? RawIO(fd: fd, uri: uri).write(w.data)
        shutdown(fd, Int32(SHUT_RDWR))
    }
}

/// Blocking full reads and writes on a socket.
struct RawIO {
    let fd: Int32
    let uri: String

    func error(_ message: String, errno code: Int32 = EIO) -> BlockIOError {
        BlockIOError(.system, operation: .read, errno: code, path: uri, message: message)
    }

    func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    func write(_ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = send(fd, buffer.baseAddress! + done, buffer.count - done, Int32(MSG_NOSIGNAL))
            if n < 0 {
                if errno == EINTR { continue }
                throw error("connection lost: \(String(cString: strerror(errno)))", errno: errno)
            }
            done += n
        }
    }

    func read(_ count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try read(into: $0) }
        return bytes
    }

    func read(into buffer: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = recv(fd, buffer.baseAddress! + done, buffer.count - done, 0)
            if n < 0 {
                if errno == EINTR { continue }
                throw error("connection lost: \(String(cString: strerror(errno)))", errno: errno == EAGAIN ? ETIMEDOUT : errno)
            }
            if n == 0 { throw error("the server closed the connection") }
            done += n
        }
    }
}

/// Big-endian field writer for requests.
struct Writer {
    var data: [UInt8] = []
    mutating func u16(_ v: UInt16) { data += [UInt8(v >> 8), UInt8(v & 0xff)] }
    mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { data.append(UInt8((v >> UInt32(s)) & 0xff)) } }
    mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { data.append(UInt8((v >> UInt64(s)) & 0xff)) } }
    mutating func bytes(_ b: [UInt8]) { data += b }
}

/// Big-endian field reader over a buffer whose length the caller already checked.
struct Reader {
    let data: [UInt8]
    var position = 0
    init(_ data: [UInt8]) { self.data = data }
    mutating func u16() -> UInt16 { UInt16(take(2)) }
    mutating func u32() -> UInt32 { UInt32(take(4)) }
    mutating func u64() -> UInt64 { take(8) }
    private mutating func take(_ n: Int) -> UInt64 {
        var v: UInt64 = 0
        for _ in 0..<n {
            v = v << 8 | UInt64(position < data.count ? data[position] : 0)
            position += 1
        }
        return v
    }
}
