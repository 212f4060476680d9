import BlockIO
import Logging
import NBDClient
import NBDServer
import Synchronization
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// A plain `NBDServer` on a unix socket over `device`, which outlives the server when it is a file (a
/// memory device would be closed with it), so a second server can take over the same data.
private func startServer(device: any BlockDevice, socket: String) async throws -> NBDServer {
    var configuration = NBDServerConfiguration(listeners: [.unixSocket(path: socket)])
    configuration.deviceThreads = 2
    let server = NBDServer(
        exports: [NBDExport(name: "disk", device: device)],
        configuration: configuration,
        logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    )
    try await server.start()
    return server
}

private func startServer(file: String, socket: String) async throws -> NBDServer {
    try await startServer(device: try FileDevice.open(path: file, readOnly: false), socket: socket)
}

/// Runs blocking client I/O on a thread of its own (not the test's), so the test can restart the server
/// while the call waits.
/// Runs `body` on a thread of its own, not on the cooperative pool: the test waits by polling (blocking
/// its own pool thread), and a loaded machine's other tests may hold the rest of the pool, so a Task here
/// might never start. `value` joins the thread.
private final class Background<T: Sendable>: @unchecked Sendable {
    private final class Outcome: @unchecked Sendable {
        let value = Mutex<Result<T, any Error>?>(nil)
    }
    private let outcome = Outcome()
    private let thread: TestThread

    init(_ body: @escaping @Sendable () throws -> T) {
        let outcome = self.outcome
        thread = TestThread {
            let result = Result { try body() }
            outcome.value.withLock { $0 = result }
        }
    }

    var value: T {
        get throws {
            try thread.join()
            return try outcome.value.withLock { $0! }.get()
        }
    }
}

private func inBackground<T: Sendable>(_ body: @escaping @Sendable () throws -> T) -> Background<T> {
    Background(body)
}

/// Polls `condition` (the marker) every 10 ms for up to 30 s.
private func waitUntil(_ condition: () -> Bool) -> Bool {
    for _ in 0..<3000 {
        if condition() { return true }
        usleep(10_000)
    }
    return false
}

/// A temporary directory with a 4 MiB raw file and the socket path a server listens on.
private final class Scratch {
    let directory = TestEnvironment.temporaryDirectory("nbd-reconnect")
    var file: String { directory + "/disk.raw" }
    var socket: String { directory + "/nbd.sock" }
    var uri: String { "nbd+unix:///disk?socket=\(socket)" }

    init() {
        let fd = creat(file, 0o600)
        #expect(fd >= 0 && ftruncate(fd, 4 << 20) == 0)
        close(fd)
    }

    deinit { TestEnvironment.remove(directory) }
}

@Suite(.serialized) struct ReconnectTests {
    /// Invariant: requests made while the server is away wait for it (the link says `reconnecting`, the
    /// marker the test waits on) and, when it is back within the reconnect timeout, complete without an
    /// error: a write sent while nothing listened lands, and everything written before reads back.
    @Test func serverRestartWithinTimeout() async throws {
        let scratch = Scratch()
        var server = try await startServer(file: scratch.file, socket: scratch.socket)
        let client = try NBDClientDevice.connect(
            uri: scratch.uri,
            readOnly: false,
            connections: 2,
            reconnect: NBDReconnectPolicy(timeout: .seconds(30))
        )
        #expect(client.connectionStatus.state == .connected)
        let first = Pattern.bytes(count: 65536, offset: 0, seed: 21)
        try client.write(first, at: 0)
        try client.flush()

        try await server.shutdown()
        let second = Pattern.bytes(count: 65536, offset: 1 << 20, seed: 22)
        let pending = inBackground {
            try client.write(second, at: 1 << 20)
            return try client.read(count: 65536, at: 0)
        }
        #expect(waitUntil { client.connectionStatus.state == .reconnecting }, "\(client.connectionStatus)")
        #expect(client.connectionStatus.since != nil)
        server = try await startServer(file: scratch.file, socket: scratch.socket)
        #expect(try pending.value == first)
        #expect(client.connectionStatus.state == .connected)
        #expect(client.connectionStatus.reconnects >= 1)
        #expect(try client.read(count: 65536, at: 1 << 20) == second)
        try client.close()
        try await server.shutdown()

        let check = try FileDevice.open(path: scratch.file, readOnly: true)
        defer { try? check.close() }
        #expect(try check.read(count: 65536, at: 1 << 20) == second)
    }

    /// Invariant: when the server stays away past the reconnect timeout, the waiting request fails with EIO
    /// after waiting the timeout (never sooner, never for ever), the link is `failed`, later requests fail
    /// without waiting it again, and once the server is back the next request succeeds (the disk recovers
    /// by itself).
    @Test func serverAwayPastTimeout() async throws {
        let scratch = Scratch()
        var server = try await startServer(file: scratch.file, socket: scratch.socket)
        let timeout = Duration.milliseconds(700)
        let client = try NBDClientDevice.connect(
            uri: scratch.uri,
            readOnly: false,
            connections: 1,
            reconnect: NBDReconnectPolicy(timeout: timeout)
        )
        let first = Pattern.bytes(count: 4096, offset: 0, seed: 23)
        try client.write(first, at: 0)
        try await server.shutdown()

        let clock = ContinuousClock()
        let started = clock.now
        var caught: (any Error)?
        do { _ = try client.read(count: 4096, at: 0) } catch { caught = error }
        let waited = clock.now - started
        let error = try #require(caught as? BlockIOError)
        #expect(error.errno == EIO)
        #expect(error.message.contains("cannot reconnect"), "\(error)")
        #expect(waited >= timeout, "failed after \(waited)")
        #expect(waited < .seconds(20), "failed after \(waited)")
        #expect(client.connectionStatus.state == .failed)
        #expect(client.connectionStatus.lastError?.contains("cannot connect") == true, "\(client.connectionStatus)")

        // Failed: one attempt, no waiting for the timeout again.
        let again = clock.now
        #expect(throws: BlockIOError.self) { try client.write(first, at: 8192) }
        #expect(clock.now - again < .seconds(5))

        server = try await startServer(file: scratch.file, socket: scratch.socket)
        #expect(try client.read(count: 4096, at: 0) == first)
        #expect(client.connectionStatus.state == .connected)
        try client.close()
        try await server.shutdown()
    }

    /// Invariant: changes the server acknowledged but lost in a crash (they were not flushed yet) are written
    /// again on the new connection before anything else, so after the server crashed and came back every
    /// acknowledged write and zeroing reads back; a flush lets them go (nothing is kept after it).
    @Test func crashedServerLosesNothingAcknowledged() async throws {
        let scratch = Scratch()
        let size = 1 << 20
        let first = FaultInjectingDevice(initial: [UInt8](repeating: 0xEE, count: size))
        var server = try await startServer(device: first, socket: scratch.socket)
        let client = try NBDClientDevice.connect(uri: scratch.uri, readOnly: false, connections: 1)
        let flushed = Pattern.bytes(count: 65536, offset: 0, seed: 31)
        try client.write(flushed, at: 0)
        try client.flush()
        let lost = Pattern.bytes(count: 65536, offset: 65536, seed: 32)
        try client.write(lost, at: 65536)
        try client.writeZeroes(at: 4096, count: 4096, mayUnmap: true, fast: false)
        #expect(first.unflushedCount == 2)

        // The crash: nothing more reaches the device's disk (so the server's own flush at shutdown fails),
        // and the restarted server sees only what was flushed.
        first.powerCut()
        try? await server.shutdown()
        let seed: UInt64 = 33
        print("crash image seed \(seed)")
        var rng = SeededRandom(seed: seed)
        let crashed = try first.crashImage(.dropAll, using: &rng).read(count: size, at: 0)
        #expect(Array(crashed[65536..<131072]) != lost, "the crash should have lost the unflushed write")
        server = try await startServer(device: FaultInjectingDevice(initial: crashed), socket: scratch.socket)

        #expect(try client.read(count: 65536, at: 65536) == lost)
        #expect(try client.read(count: 4096, at: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try client.read(count: 4096, at: 0) == Array(flushed[0..<4096]))
        #expect(client.connectionStatus.reconnects == 1)
        try client.close()
        try await server.shutdown()
    }

    /// Invariant: a reply of ESHUTDOWN (a server on its way down) makes the client drop that connection
    /// and send the request again on a new one, so the caller sees no error.
    @Test func shutdownReplyIsRetried() async throws {
        let scratch = Scratch()
        let memory = MemoryDevice(size: 1 << 20, growable: false)
        try memory.write([1, 2, 3, 4], at: 512)
        // The first read fails as a closed device does: ESHUTDOWN on the wire, what a server answers while
        // it shuts down.
        let device = HookedDevice(memory) { index, _ in
            if index == 0 { throw BlockIOError(.closed, operation: .read, message: "shutting down (test)") }
        }
        let server = try await startServer(device: device, socket: scratch.socket)
        let client = try NBDClientDevice.connect(uri: scratch.uri, readOnly: false, connections: 1)
        #expect(try client.read(count: 4, at: 512) == [1, 2, 3, 4])
        let reads = device.reads.load(ordering: .relaxed)
        #expect(reads == 2)
        #expect(client.connectionStatus.reconnects == 1)
        #expect(client.connectionStatus.state == .connected)
        try client.close()
        try await server.shutdown()
    }

    /// Invariant: `close()` ends the wait of a request that is reconnecting, at once rather than at the
    /// reconnect timeout.
    @Test func closeEndsTheWait() async throws {
        let scratch = Scratch()
        let server = try await startServer(file: scratch.file, socket: scratch.socket)
        let client = try NBDClientDevice.connect(
            uri: scratch.uri,
            readOnly: true,
            connections: 1,
            reconnect: NBDReconnectPolicy(timeout: .seconds(600))
        )
        try await server.shutdown()
        let pending = inBackground { try client.read(count: 512, at: 0) }
        #expect(waitUntil { client.connectionStatus.state == .reconnecting })
        let clock = ContinuousClock()
        let started = clock.now
        try? client.close()
        #expect(throws: BlockIOError.self) { try pending.value }
        #expect(clock.now - started < .seconds(10))
    }
}
