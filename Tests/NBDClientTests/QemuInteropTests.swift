import BlockIO
import NBDClient
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

private let qemuNBD = TestEnvironment.which("qemu-nbd")
private let qemuIO = TestEnvironment.which("qemu-io")

/// The client against a TLS server that is not ours: qemu-nbd (GnuTLS) with `tls-creds-x509`, which by
/// default also requires client certificates. qemu-io, qemu's own TLS client, writes and reads the other side.
@Suite(
    .serialized,
    .enabled(
        if: qemuNBD != nil && qemuIO != nil && TestCertificates.shared != nil,
        "needs qemu-nbd, qemu-io and openssl"
    )
)
struct QemuInteropTests {
    /// qemu-nbd serving a raw file over TLS, on a unix socket or TCP (127.0.0.1), killed on `stop`.
    final class QemuServer {
        let directory: String
        let pid: pid_t
        let socket: String?
        let port: Int?

        init(file: String, pki: PKI, directory: String, tcp: Bool) throws {
            self.directory = directory
            var listen: [String]
            if tcp {
                let port = try #require(Self.freePort())
                listen = ["-b", "127.0.0.1", "-p", String(port)]
                (socket, self.port) = (nil, port)
            } else {
                let socket = directory + "/qemu.sock"
                listen = ["-k", socket]
                (self.socket, port) = (socket, nil)
            }
            let arguments =
                [
                    "--object", "tls-creds-x509,id=tls0,dir=\(pki.server),endpoint=server,verify-peer=on",
                    "--tls-creds", "tls0",
                ]
                + listen + ["-f", "raw", "-x", "exp", "--persistent", file]
            pid = try #require(spawn(qemuNBD!, arguments, stderr: directory + "/qemu-nbd.err"))
            for _ in 0..<200 where !ready { usleep(25_000) }
            try #require(ready, "qemu-nbd did not start: \(readFile(directory + "/qemu-nbd.err"))")
        }

        /// A port nobody listens on right now (bound and released; good enough for a test).
        static func freePort() -> Int? {
            let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(fd) }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            let bound = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
                }
            }
            return bound ? Int(UInt16(bigEndian: address.sin_port)) : nil
        }

        var ready: Bool {
            if let socket { return access(socket, F_OK) == 0 }
            return run("/bin/sh", ["-c", "ss -ltn | grep -q '127.0.0.1:\(port!) '"]).status == 0
        }

        func uri(certificates: String) -> String {
            if let socket { return "nbds+unix:///exp?socket=\(socket)&tls-certificates=\(certificates)" }
            return "nbds://127.0.0.1:\(port!)/exp?tls-certificates=\(certificates)"
        }

        /// qemu-io over TLS with the client directory `certificates`.
        func qemuIOCommands(_ commands: [String], certificates: String) -> ProcessResult {
            let server =
                if let socket { "server.type=unix,server.path=\(socket),tls-hostname=localhost" } else {
                    "server.type=inet,server.host=127.0.0.1,server.port=\(port!)"
                }
            return run(
                qemuIO!,
                ["--object", "tls-creds-x509,id=tls0,dir=\(certificates),endpoint=client"]
                    + ["--image-opts", "driver=nbd,\(server),export=exp,tls-creds=tls0"]
                    + commands.flatMap { ["-c", $0] }
            )
        }

        func stop() {
            kill(pid, SIGTERM)
            waitForExit(pid)
        }
    }

    /// Invariant: what qemu-io wrote through qemu-nbd's TLS is what the client reads over TLS (unix socket
    /// and TCP, presenting the CA's client certificate), and what the client writes, qemu-io reads back.
    @Test(arguments: [false, true]) func readsWhatQemuWrote(tcp: Bool) throws {
        let pki = try PKI()
        defer { pki.remove() }
        let file = pki.base + "/disk.raw"
        #expect(run("/usr/bin/truncate", ["-s", "16M", file]).status == 0)
        let server = try QemuServer(file: file, pki: pki, directory: pki.base, tcp: tcp)
        defer { server.stop() }

        let wrote = server.qemuIOCommands(["write -P 0xa5 1M 3M", "flush"], certificates: pki.client)
        try #require(wrote.status == 0, "qemu-io: \(wrote.stdout)\(wrote.stderr)")

        let client = try NBDClientDevice.connect(uri: server.uri(certificates: pki.client), readOnly: false)
        #expect(client.size == 16 << 20)
        var back = [UInt8](repeating: 0, count: 4 << 20)
        try back.withUnsafeMutableBytes { try client.read(into: $0, at: 0) }
        #expect(back[..<(1 << 20)].allSatisfy { $0 == 0 })
        #expect(back[(1 << 20)...].allSatisfy { $0 == 0xa5 })
        let mine = [UInt8](repeating: 0x3c, count: 1 << 20)
        try mine.withUnsafeBytes { try client.write($0, at: 8 << 20, fua: true) }
        try client.flush()
        try client.close()

        let read = server.qemuIOCommands(["read -P 0x3c 8M 1M", "read -P 0xa5 1M 3M"], certificates: pki.client)
        #expect(
            read.status == 0 && !read.stdout.contains("Pattern verification failed"),
            "\(read.stdout)\(read.stderr)"
        )
    }

    /// Invariant: qemu-nbd (verify-peer=on) refuses a client without a certificate, and the client says
    /// the TLS negotiation failed instead of hanging or reading garbage; a wrong CA is caught on our side.
    @Test func refusals() throws {
        let pki = try PKI()
        defer { pki.remove() }
        let file = pki.base + "/disk.raw"
        #expect(run("/usr/bin/truncate", ["-s", "1M", file]).status == 0)
        let server = try QemuServer(file: file, pki: pki, directory: pki.base, tcp: false)
        defer { server.stop() }
        let anonymous = failure {
            _ = try NBDClientDevice.connect(uri: server.uri(certificates: pki.anonymous), readOnly: true)
        }
        #expect(anonymous.contains("client certificate"), "\(anonymous)")
        let wrongCA = failure {
            _ = try NBDClientDevice.connect(uri: server.uri(certificates: pki.wrongCA), readOnly: true)
        }
        #expect(wrongCA.contains("the server's TLS certificate was rejected"), "\(wrongCA)")
    }
}
