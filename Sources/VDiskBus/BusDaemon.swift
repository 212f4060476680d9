import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// The bus process: takes the host's bus lock, serves the control socket, and on SIGINT/SIGTERM (or a
/// `shutdown` request) unplugs every disk cleanly before it exits.
public final class BusDaemon: Sendable {
    private let current: Mutex<Bus>
    public var bus: Bus { current.withLock { $0 } }
    private let lockFD = Mutex<Int32>(-1)
    private let listenFD = Mutex<Int32>(-1)
    private let stopping = Atomic<Bool>(false)
    /// The disks went to the next bus: exit without unplugging or waiting for anything.
    private let handedOver = Atomic<Bool>(false)
    /// Written to wake `run()` when it is time to stop.
    private let wakePipe: (read: Int32, write: Int32)

    public init(bus: Bus) throws {
        current = Mutex(bus)
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { throw BusError("cannot create a pipe: \(String(cString: strerror(errno)))") }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        wakePipe = (fds[0], fds[1])
    }

    /// Prepares the runtime folder, takes the lock (refusing if another bus holds it) and starts listening.
    /// Call before `BusExporter`s start, so a second bus fails before touching anything.
    public func prepare() throws {
        let paths = bus.paths
        if mkdir(paths.runtimeDirectory, 0o700) != 0 && errno != EEXIST {
            throw BusError("cannot create \(paths.runtimeDirectory): \(String(cString: strerror(errno)))")
        }
        let fd = open(paths.lockFile, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BusError("cannot open \(paths.lockFile): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let other =
                (try? String(contentsOfFile: paths.lockFile, encoding: .utf8))?.trimmingCharacters(
                    in: .whitespacesAndNewlines
                ) ?? "?"
            close(fd)
            throw BusError("a bus is already running on \(paths.controlSocket) (pid \(other))")
        }
        ftruncate(fd, 0)
        let pid = Array("\(getpid())\n".utf8)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        lockFD.withLock { $0 = fd }
        // We hold the lock, so any socket left here belongs to a bus that died: replace it.
        unlink(paths.controlSocket)
        unlink(paths.nbdSocket)
        let listener = try listenUnix(path: paths.controlSocket)
        listenFD.withLock { $0 = listener }
    }

    /// Replaces the bus the control socket serves (after `prepare`, once its NBD server is up).
    public func attach(_ bus: Bus) {
        current.withLock { $0 = bus }
    }

    /// Serves control requests until SIGINT, SIGTERM or a `shutdown` request, then unplugs everything.
    public func run() {
        let listener = listenFD.withLock { $0 }
        spawnThread { [self] in acceptLoop(listener) }
        installSignalHandlers()
        // Park until woken.
        var byte: UInt8 = 0
        while read(wakePipe.read, &byte, 1) < 0 && errno == EINTR {}
        bus.log("shutting down")
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        unlink(bus.paths.controlSocket)
        let handedOver = handedOver.load(ordering: .relaxed)
        if !handedOver { bus.shutDown() }
        let lock = lockFD.withLock { $0 }
        if lock >= 0 {
            unlink(bus.paths.lockFile)
            close(lock)
        }
        if handedOver {
            // Sealed disks park whoever still calls them; nothing may wait for those threads.
            bus.log("exiting after the handover")
            exit(0)
        }
    }

    /// Routes SIGINT, SIGTERM and SIGHUP to a clean stop (the handler only writes a byte to the wake pipe,
    /// which is async-signal-safe); ignores SIGPIPE.
    private func installSignalHandlers() {
        signalWakeFD = wakePipe.write
        var action = sigaction()
        action.__sigaction_handler.sa_handler = { _ in
            var byte: UInt8 = 1
            _ = write(signalWakeFD, &byte, 1)
        }
        sigemptyset(&action.sa_mask)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaction(s, &action, nil) }
        signal(SIGPIPE, SIG_IGN)
    }

    public func requestStop() {
        guard !stopping.exchange(true, ordering: .relaxed) else { return }
        var byte: UInt8 = 1
        _ = write(wakePipe.write, &byte, 1)
    }

    private func acceptLoop(_ listener: Int32) {
        while !stopping.load(ordering: .relaxed) {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return  // the listener was closed
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            spawnThread { [self] in serve(LineSocket(fd: fd)) }
        }
    }

    private func serve(_ connection: LineSocket) {
        // Root only: the socket is 0600, and the peer's uid is checked too (a socket handed over by a
        // root process must not let anyone else plug devices).
        guard let uid = connection.peerUID, uid == 0 || uid == getuid() else {
            try? connection.writeLine(
                try Wire.encode(BusResponse.failure("permission denied: the bus serves root only"))
            )
            return
        }
        while let line = try? connection.readLine() {
            let response: BusResponse
            var stop = false
            do {
                let request = try Wire.decode(BusRequest.self, from: line)
                response = bus.handle(request)
                stop = request.op == .shutdown || (request.op == .handover && response.ok)
                if stop && request.op == .handover { handedOver.store(true, ordering: .relaxed) }
            } catch {
                response = .failure("malformed request: \(error)")
            }
            guard let bytes = try? Wire.encode(response), (try? connection.writeLine(bytes)) != nil else { return }
            if stop {
                requestStop()
                return
            }
        }
    }
}

/// The wake pipe's write end, for the signal handler (which cannot capture context).
nonisolated(unsafe) private var signalWakeFD: Int32 = -1

/// Talks to a running bus.
public struct BusClient: Sendable {
    public let paths: BusPaths

    public init(paths: BusPaths) { self.paths = paths }

    /// Sends one request and returns the bus's response (throws if no bus answers).
    public func send(_ request: BusRequest) throws -> BusResponse {
        let socket = try LineSocket.connect(to: paths.controlSocket)
        try socket.writeLine(try Wire.encode(request))
        guard let line = try socket.readLine() else {
            throw BusError("the bus closed the connection without answering")
        }
        return try Wire.decode(BusResponse.self, from: line)
    }

    /// Whether a bus answers on the control socket.
    public var isRunning: Bool { (try? send(BusRequest(op: .ping)))?.ok == true }
}
