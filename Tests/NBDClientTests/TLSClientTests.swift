import BlockIO
import Logging
import NBDClient
import NBDServer
import NIOCore
import Synchronization
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Certificate directories laid out as `vdisk serve`, nbdkit and qemu-nbd (server) and libnbd and qemu
/// (client) read them.
struct PKI {
    let base: String
    /// server-cert.pem, server-key.pem, ca-cert.pem
    let server: String
    /// ca-cert.pem, client-cert.pem, client-key.pem (signed by the CA)
    let client: String
    /// ca-cert.pem only
    let anonymous: String
    /// ca-cert.pem with a client certificate the CA did not sign
    let stranger: String
    /// a CA that signed nothing here (the stranger's self-signed certificate)
    let wrongCA: String

    init() throws {
        let certificates = try #require(TestCertificates.shared, "openssl could not make certificates")
        base = TestEnvironment.temporaryDirectory("nbd-client-pki")
        server = base + "/server"
        client = base + "/client"
        anonymous = base + "/anonymous"
        stranger = base + "/stranger"
        wrongCA = base + "/wrong-ca"
        for directory in [server, client, anonymous, stranger, wrongCA] { mkdir(directory, 0o700) }
        certificates.writeServerFiles(to: server)
        certificates.writeClientFiles(to: client, identity: .client)
        certificates.writeClientFiles(to: anonymous, identity: .none)
        certificates.writeClientFiles(to: stranger, identity: .stranger)
        writeFile(wrongCA + "/ca-cert.pem", certificates.strangerCertificate)
    }

    func remove() { TestEnvironment.remove(base) }
}

/// An in-process `NBDServer` over a memory device, on a unix socket and a TCP port of 127.0.0.1 (or
/// `host`), with the given TLS.
final class TestServer {
    let directory = TestEnvironment.temporaryDirectory("nbd-client")
    let device: MemoryDevice
    let server: NBDServer
    var socket: String { directory + "/nbd.sock" }
    let port: Int

    init(tls: NBDTLSConfiguration?, host: String = "127.0.0.1", size: UInt64 = 8 << 20) async throws {
        device = MemoryDevice(size: size)
        var configuration = NBDServerConfiguration(listeners: [
            .unixSocket(path: directory + "/nbd.sock"), .tcp(host: host, port: 0),
        ])
        configuration.tls = tls
        configuration.deviceThreads = 4
        server = NBDServer(
            exports: [NBDExport(name: "mem", device: device)],
            configuration: configuration,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await server.start()
        port = try #require(server.tcpPort)
    }

    func stop() async {
        try? await server.shutdown()
        TestEnvironment.remove(directory)
    }

    func unixURI(_ query: String = "", secure: Bool = true) -> String {
        "nbd\(secure ? "s" : "")+unix:///mem?socket=\(socket)\(query.isEmpty ? "" : "&" + query)"
    }

    func tcpURI(_ query: String = "", host: String = "127.0.0.1", secure: Bool = true) -> String {
        "nbd\(secure ? "s" : "")://\(host):\(port)/mem\(query.isEmpty ? "" : "?" + query)"
    }
}

/// Runs `body` with a server and certificates, and always stops and cleans up.
func withTLSServer(
    mode: NBDTLSConfiguration.Mode? = .required,
    verifyPeer: Bool = false,
    host: String = "127.0.0.1",
    _ body: (TestServer, PKI) async throws -> Void
) async throws {
    let pki = try PKI()
    defer { pki.remove() }
    let tls = try mode.map { try NBDTLSConfiguration.load(directory: pki.server, mode: $0, verifyPeer: verifyPeer) }
    let server = try await TestServer(tls: tls, host: host)
    do {
        try await body(server, pki)
    } catch {
        await server.stop()
        throw error
    }
    await server.stop()
}

/// The error `body` throws, as text (empty and recorded as an issue if it does not throw).
func failure(_ body: () throws -> Void, sourceLocation: SourceLocation = #_sourceLocation) -> String {
    do {
        try body()
        Issue.record("expected an error", sourceLocation: sourceLocation)
        return ""
    } catch {
        return "\(error)"
    }
}

@Suite(.serialized, .enabled(if: TestCertificates.shared != nil, "openssl is needed to make certificates"))
struct TLSClientTests {
    /// Writes patterns through `uri`, reads them back, zeroes, flushes; checks the server's device holds it.
    func roundTrip(_ uri: String, server: TestServer, seed: UInt64) throws {
        let client = try NBDClientDevice.connect(uri: uri, readOnly: false)
        #expect(client.size == server.device.size)
        #expect(client.capabilities.contains(.flush) && client.capabilities.contains(.writeZeroes))
        let data = Pattern.bytes(count: 3 << 20 + 4096, offset: 0, seed: seed)  // more than many TLS records
        try data.withUnsafeBytes { try client.write($0, at: 512 * 1024, fua: false) }
        try client.writeZeroes(at: 1 << 20, count: 65536, mayUnmap: true, fast: false)
        try client.flush()
        var expected = data
        expected.replaceSubrange(
            (1 << 20 - 512 * 1024)..<(1 << 20 - 512 * 1024 + 65536),
            with: repeatElement(0, count: 65536)
        )
        var back = [UInt8](repeating: 0xff, count: data.count)
        try back.withUnsafeMutableBytes { try client.read(into: $0, at: 512 * 1024) }
        #expect(back == expected)
        #expect(try server.device.read(count: data.count, at: 512 * 1024) == expected)
        try client.close()
    }

    /// Invariant: over TLS on a unix socket and on TCP (address, and DNS name checked against the
    /// certificate), reads, writes, zeroes and flushes round-trip, and land on the server's device.
    @Test func roundTrips() async throws {
        try await withTLSServer { server, pki in
            try roundTrip(server.unixURI("tls-certificates=\(pki.anonymous)"), server: server, seed: 1)
            try roundTrip(server.tcpURI("tls-certificates=\(pki.anonymous)"), server: server, seed: 2)
            try roundTrip(
                server.tcpURI("tls-certificates=\(pki.anonymous)", host: "localhost"),
                server: server,
                seed: 3
            )
            // A client certificate the server does not ask for is harmless.
            try roundTrip(server.unixURI("tls-certificates=\(pki.client)"), server: server, seed: 4)
        }
    }

    /// Invariant: several connections (multi-conn) used from several threads at once each keep their own
    /// TLS session consistent: every thread reads back what it wrote.
    @Test func concurrentConnections() async throws {
        try await withTLSServer { server, pki in
            let client = try NBDClientDevice.connect(
                uri: server.tcpURI("tls-certificates=\(pki.anonymous)"),
                readOnly: false
            )
            #expect(client.capabilities.contains(.multiConnection))
            let failures = Counter()
            DispatchLikeThreads.run(count: 8) { thread in
                for round in 0..<20 {
                    let offset = UInt64(thread) << 20 + UInt64(round % 4) * 65536
                    let data = Pattern.bytes(count: 65536, offset: offset, seed: UInt64(round))
                    var back = [UInt8](repeating: 0, count: data.count)
                    do {
                        try data.withUnsafeBytes { try client.write($0, at: offset, fua: round % 3 == 0) }
                        try back.withUnsafeMutableBytes { try client.read(into: $0, at: offset) }
                    } catch {
                        failures.add()
                        return
                    }
                    if back != data { failures.add() }
                }
            }
            #expect(failures.value == 0)
            try client.close()
            // After close, requests fail cleanly instead of touching a closed TLS session.
            var byte = [UInt8](repeating: 0, count: 1)
            #expect(throws: BlockIOError.self) { try byte.withUnsafeMutableBytes { try client.read(into: $0, at: 0) } }
        }
    }

    /// Invariant: the server's certificate is checked against DIR/ca-cert.pem and, over TCP, the URI's
    /// host; a mismatch fails with a message saying so, and tls-verify-peer=false skips both checks.
    @Test func serverVerification() async throws {
        try await withTLSServer(host: "127.0.0.2") { server, pki in
            for uri in [
                server.unixURI("tls-certificates=\(pki.wrongCA)"),
                server.tcpURI("tls-certificates=\(pki.wrongCA)", host: "127.0.0.2"),
            ] {
                let message = failure { _ = try NBDClientDevice.connect(uri: uri, readOnly: true) }
                #expect(message.contains("the server's TLS certificate was rejected"), "\(message)")
                #expect(message.contains("\(pki.wrongCA)/ca-cert.pem"), "\(message)")
            }
            // The certificate names localhost and 127.0.0.1, not 127.0.0.2.
            let mismatch = failure {
                _ = try NBDClientDevice.connect(
                    uri: server.tcpURI("tls-certificates=\(pki.anonymous)", host: "127.0.0.2"),
                    readOnly: true
                )
            }
            #expect(mismatch.contains("rejected (IP address mismatch)"), "\(mismatch)")
            // Without a directory the system's CAs are used, which do not know the test CA.
            let system = failure { _ = try NBDClientDevice.connect(uri: server.unixURI(), readOnly: true) }
            #expect(system.contains("checked against the system's trusted certificates"), "\(system)")
            // Not verifying: no directory needed, and neither check applies.
            try roundTrip(server.tcpURI("tls-verify-peer=false", host: "127.0.0.2"), server: server, seed: 5)
            try roundTrip(
                server.unixURI("tls-verify-peer=false&tls-certificates=\(pki.wrongCA)"),
                server: server,
                seed: 6
            )
        }
    }

    /// Invariant: a server that requires client certificates lets in a client presenting one signed by its
    /// CA, and refuses one without a certificate or with a stranger's, with a message saying why.
    @Test func clientCertificates() async throws {
        try await withTLSServer(verifyPeer: true) { server, pki in
            try roundTrip(server.unixURI("tls-certificates=\(pki.client)"), server: server, seed: 7)
            try roundTrip(server.tcpURI("tls-certificates=\(pki.client)"), server: server, seed: 8)
            let anonymous = failure {
                _ = try NBDClientDevice.connect(
                    uri: server.unixURI("tls-certificates=\(pki.anonymous)"),
                    readOnly: true
                )
            }
            #expect(anonymous.contains("client certificate"), "\(anonymous)")
            let stranger = failure {
                _ = try NBDClientDevice.connect(uri: server.unixURI("tls-certificates=\(pki.stranger)"), readOnly: true)
            }
            #expect(stranger.contains("TLS"), "\(stranger)")
        }
    }

    /// Invariant: nbds:// never falls back to plaintext: a server without TLS fails the connection with a
    /// clear message, on either transport. A plain URI to a server requiring TLS says to use nbds://.
    @Test func noSilentPlaintext() async throws {
        try await withTLSServer(mode: nil) { server, pki in
            for uri in [
                server.unixURI("tls-certificates=\(pki.anonymous)"), server.tcpURI("tls-certificates=\(pki.anonymous)"),
            ] {
                let message = failure { _ = try NBDClientDevice.connect(uri: uri, readOnly: true) }
                #expect(message.contains("the server does not offer TLS"), "\(message)")
            }
            // The same server serves plain URIs.
            try roundTrip(server.unixURI(secure: false), server: server, seed: 9)
        }
        try await withTLSServer(mode: .required) { server, _ in
            for uri in [server.unixURI(secure: false), server.tcpURI(secure: false)] {
                let message = failure { _ = try NBDClientDevice.connect(uri: uri, readOnly: true) }
                #expect(message.contains("the server requires TLS: use an nbds:// or nbds+unix:// URI"), "\(message)")
            }
        }
        // A server that offers TLS but does not require it: nbds:// gets TLS, nbd:// plaintext.
        try await withTLSServer(mode: .optional) { server, pki in
            try roundTrip(server.unixURI("tls-certificates=\(pki.anonymous)"), server: server, seed: 10)
            try roundTrip(server.unixURI(secure: false), server: server, seed: 11)
        }
    }

    /// Invariant: a certificates directory that cannot work fails before connecting, naming the file.
    @Test func badCertificateDirectories() async throws {
        let pki = try PKI()
        defer { pki.remove() }
        let certificates = try #require(TestCertificates.shared)
        // No server is needed: the directory is checked first (the socket does not exist).
        func expect(
            _ directory: String,
            _ text: String,
            query: String = "",
            sourceLocation: SourceLocation = #_sourceLocation
        ) {
            let uri = "nbds+unix:///?socket=\(pki.base)/none.sock&tls-certificates=\(directory)\(query)"
            let message = failure(
                { _ = try NBDClientDevice.connect(uri: uri, readOnly: true) },
                sourceLocation: sourceLocation
            )
            #expect(message.contains(text), "\(message)", sourceLocation: sourceLocation)
        }
        expect(pki.base + "/nowhere", "nowhere: No such file or directory")
        expect(pki.server + "/server-cert.pem", "is not a directory")
        let empty = pki.base + "/empty"
        mkdir(empty, 0o700)
        expect(empty, "ca-cert.pem: No such file or directory (it verifies the server, unless tls-verify-peer=false)")
        let broken = pki.base + "/broken"
        mkdir(broken, 0o700)
        writeFile(broken + "/ca-cert.pem", "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        expect(broken, "ca-cert.pem holds no usable PEM certificate")
        certificates.writeClientFiles(to: broken, identity: .client)
        unlink(broken + "/client-key.pem")
        expect(broken, "client-key.pem: No such file or directory (client-cert.pem needs it)")
        writeFile(broken + "/client-key.pem", certificates.strangerKey)
        expect(broken, "client-key.pem does not belong to")
        writeFile(broken + "/client-key.pem", "not a key")
        expect(broken, "client-key.pem holds no unencrypted PEM private key")
        // With verification off, ca-cert.pem is not needed: the socket is what fails then.
        expect(empty, "cannot connect to", query: "&tls-verify-peer=false")
    }
}

final class Counter: Sendable {
    private let count = Mutex(0)
    func add() { count.withLock { $0 += 1 } }
    var value: Int { count.withLock { $0 } }
}

/// Runs `body(index)` on `count` threads at once and waits for all of them.
enum DispatchLikeThreads {
    static func run(count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        var threads: [pthread_t] = []
        final class Box: @unchecked Sendable {
            let body: @Sendable () -> Void
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
        }
        for index in 0..<count {
            let box = Unmanaged.passRetained(Box { body(index) }).toOpaque()
            var thread = pthread_t()
            pthread_create(
                &thread,
                nil,
                { raw in
                    let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
                    box.body()
                    return nil
                },
                box
            )
            threads.append(thread)
        }
        for thread in threads { pthread_join(thread, nil) }
    }
}
