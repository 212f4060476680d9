import BlockIO
import Logging
import NBDClient
import NBDServer
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// A plain `NBDServer` on a unix socket over a file, which outlives the server (a memory device would be
/// closed with it), so a second server can take over the same data.
private func startServer(file: String, socket: String) async throws -> NBDServer {
    let device = try FileDevice.open(path: file, readOnly: false)
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

@Suite(.serialized) struct ReconnectTests {
    /// Invariant: when the server goes away and comes back (a restart), the client's next request opens a
    /// new connection and succeeds, with the data the server had; while nothing listens, requests fail with
    /// an error that says so, and a later request still recovers.
    @Test func serverRestart() async throws {
        let directory = TestEnvironment.temporaryDirectory("nbd-reconnect")
        defer { TestEnvironment.remove(directory) }
        let file = directory + "/disk.raw"
        let socket = directory + "/nbd.sock"
        let fd = creat(file, 0o600)
        #expect(fd >= 0 && ftruncate(fd, 4 << 20) == 0)
        close(fd)

        var server = try await startServer(file: file, socket: socket)
        let client = try NBDClientDevice.connect(
            uri: "nbd+unix:///disk?socket=\(socket)",
            readOnly: false,
            connections: 2
        )
        let first = Pattern.bytes(count: 65536, offset: 0, seed: 21)
        try first.withUnsafeBytes { try client.write($0, at: 0, fua: false) }
        try client.flush()

        try await server.shutdown()
        let down = failure { _ = try client.read(count: 4096, at: 0) }
        #expect(down.contains("cannot reconnect"), "\(down)")

        server = try await startServer(file: file, socket: socket)
        #expect(try client.read(count: 65536, at: 0) == first)
        let second = Pattern.bytes(count: 65536, offset: 1 << 20, seed: 22)
        try second.withUnsafeBytes { try client.write($0, at: 1 << 20, fua: false) }
        try client.close()
        try await server.shutdown()

        let check = try FileDevice.open(path: file, readOnly: true)
        defer { try? check.close() }
        #expect(try check.read(count: 65536, at: 1 << 20) == second)
    }
}
