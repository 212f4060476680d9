// Blocking unix stream sockets for the control protocol: a handful of small requests, so plain threads
// and blocking calls are the simplest correct thing (the data path never goes through here).

#if canImport(Glibc)
import Glibc
#endif

/// A connected unix stream socket that reads and writes lines.
final class LineSocket {
    let fd: Int32
    private var buffer: [UInt8] = []
    /// Lines longer than this are refused: a request is a few hundred bytes.
    static let maximumLine = 1 << 20

    init(fd: Int32) { self.fd = fd }

    deinit { close(fd) }

    /// Connects to the socket at `path`.
    static func connect(to path: String) throws -> LineSocket {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw BusError("cannot create a socket: \(String(cString: strerror(errno)))") }
        var address = try unixAddress(path)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw BusError(
                e == ENOENT || e == ECONNREFUSED
                    ? "no bus is running at \(path)" : "cannot connect to \(path): \(String(cString: strerror(e)))"
            )
        }
        return LineSocket(fd: fd)
    }

    func writeLine(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw BusError("control connection lost: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    /// The next line without its newline, or nil at end of stream.
    func readLine() throws -> [UInt8]? {
        while true {
            if let newline = buffer.firstIndex(of: 0x0A) {
                let line = Array(buffer[..<newline])
                buffer.removeSubrange(...newline)
                return line
            }
            guard buffer.count < Self.maximumLine else { throw BusError("control message too long") }
            var chunk = [UInt8](repeating: 0, count: 65536)
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n < 0 {
                if errno == EINTR { continue }
                throw BusError("control connection lost: \(String(cString: strerror(errno)))")
            }
            if n == 0 { return nil }
            buffer += chunk[..<n]
        }
    }

    /// The uid of the process at the other end.
    var peerUID: uid_t? {
        // struct ucred { pid_t pid; uid_t uid; gid_t gid; } (Glibc hides it behind _GNU_SOURCE).
        var credentials: (Int32, UInt32, UInt32) = (0, 0, 0)
        var length = socklen_t(MemoryLayout<(Int32, UInt32, UInt32)>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else { return nil }
        return credentials.1
    }
}

func unixAddress(_ path: String) throws -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    let bytes = Array(path.utf8)
    let capacity = MemoryLayout.size(ofValue: address.sun_path)
    guard bytes.count < capacity else {
        throw BusError("socket path too long (\(bytes.count) bytes, at most \(capacity - 1)): \(path)")
    }
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in bytes.enumerated() { raw[i] = b }
        raw[bytes.count] = 0
    }
    return address
}

/// Creates a listening unix socket at `path` with mode 0600 (the umask is tightened around bind so the
/// socket is never reachable by others, even for a moment).
func listenUnix(path: String) throws -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard fd >= 0 else { throw BusError("cannot create a socket: \(String(cString: strerror(errno)))") }
    var address = try unixAddress(path)
    let old = umask(0o177)
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    umask(old)
    guard rc == 0, listen(fd, 64) == 0 else {
        let e = errno
        close(fd)
        throw BusError("cannot listen on \(path): \(String(cString: strerror(e)))")
    }
    chmod(path, 0o600)
    return fd
}

/// Runs `body` on a new detached thread.
func spawnThread(_ body: @escaping @Sendable () -> Void) {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    var thread = pthread_t()
    let rc = pthread_create(
        &thread,
        nil,
        { raw in
            let box = Unmanaged<AnyObject>.fromOpaque(raw!).takeRetainedValue() as! Box
            box.body()
            return nil
        },
        box
    )
    if rc == 0 {
        pthread_detach(thread)
    } else {
        Unmanaged<AnyObject>.fromOpaque(box).release()
        body()
    }
}
