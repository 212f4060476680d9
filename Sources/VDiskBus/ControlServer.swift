// Design notes
// ------------
// The bus's control protocol (BusProtocol.swift) served by a process that is not the bus: `vdisk serve
// --control-socket PATH` answers `crash`, `mark` and `ping` on it, so the same `vdisk crash` and
// `vdisk mark` commands drive a served export. One JSON request per line, one response line; the socket
// is mode 0600 and the peer must be root or our own user, as on the bus's socket. A handful of small
// requests: a blocking thread per connection is the simplest correct thing.

import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Answers control requests on a unix socket until stopped.
public final class ControlServer: Sendable {
    public let path: String
    private let listener: Int32
    private let stopped = Atomic<Bool>(false)

    /// Listens on `path` (a stale socket there is replaced; a live one is an error) and answers each
    /// request with `handler`, on a thread per connection.
    /// - Throws: `BusError` when the socket cannot be set up.
    public init(path: String, handler: @escaping @Sendable (BusRequest) -> BusResponse) throws {
        self.path = path
        if (try? LineSocket.connect(to: path)) != nil {
            throw BusError("\(path) is in use by another process")
        }
        unlink(path)
        listener = try listenUnix(path: path)
        spawnThread { [self] in
            while !stopped.load(ordering: .relaxed) {
                let fd = accept(listener, nil, nil)
                if fd < 0 {
                    if errno == EINTR || errno == ECONNABORTED { continue }
                    return  // the listener was closed
                }
                _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
                spawnThread { Self.serve(LineSocket(fd: fd), handler) }
            }
        }
    }

    /// Stops listening and removes the socket file.
    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        unlink(path)
    }

    private static func serve(_ connection: LineSocket, _ handler: @Sendable (BusRequest) -> BusResponse) {
        guard let uid = connection.peerUID, uid == 0 || uid == getuid() else {
            try? connection.writeLine(try Wire.encode(BusResponse.failure("permission denied")))
            return
        }
        while let line = try? connection.readLine() {
            let response: BusResponse
            do {
                response = handler(try Wire.decode(BusRequest.self, from: line))
            } catch {
                response = .failure("malformed request: \(error)")
            }
            guard let bytes = try? Wire.encode(response), (try? connection.writeLine(bytes)) != nil else { return }
        }
    }
}

extension BusClient {
    /// Sends one request to the control socket at `path` (a `vdisk serve --control-socket`) and returns
    /// the response.
    public static func send(_ request: BusRequest, toSocket path: String) throws -> BusResponse {
        let socket: LineSocket
        do {
            socket = try LineSocket.connect(to: path)
        } catch {
            throw BusError("nothing answers on \(path) (is 'vdisk serve --control-socket \(path)' running?)")
        }
        try socket.writeLine(try Wire.encode(request))
        guard let line = try socket.readLine() else {
            throw BusError("\(path) closed the connection without answering")
        }
        return try Wire.decode(BusResponse.self, from: line)
    }
}
