#if canImport(Glibc)
import Glibc
#endif

/// Test-only TLS certificates, made fresh by `openssl` for each test process and never committed: a CA,
/// a server certificate it signed for `localhost` and `127.0.0.1` (the SAN clients check on TCP), a client
/// certificate it signed, and a self-signed "stranger" client certificate no server should accept.
///
/// The keys are RSA 2048 and the extensions are the strict ones (critical basic constraints and key
/// usage, extended key usage per role), because qemu's `tls-creds-x509` checks them on its own side.
public struct TestCertificates: Sendable {
    public var caCertificate: String
    public var serverCertificate: String
    public var serverKey: String
    public var clientCertificate: String
    public var clientKey: String
    public var strangerCertificate: String
    public var strangerKey: String

    /// The `openssl` program, or nil (tests needing certificates skip then).
    public static let openssl = TestEnvironment.which("openssl")

    /// A set made once per process (making RSA keys takes a while); nil if `openssl` is missing or fails.
    public static let shared: TestCertificates? = try? generate()

    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    private static let configuration = """
        [req]
        distinguished_name = dn
        prompt = no
        [dn]
        CN = vdisk test
        [ca]
        basicConstraints = critical, CA:TRUE
        keyUsage = critical, keyCertSign, cRLSign
        subjectKeyIdentifier = hash
        [server]
        basicConstraints = critical, CA:FALSE
        keyUsage = critical, digitalSignature, keyEncipherment
        extendedKeyUsage = serverAuth
        subjectAltName = DNS:localhost, IP:127.0.0.1
        [client]
        basicConstraints = critical, CA:FALSE
        keyUsage = critical, digitalSignature, keyEncipherment
        extendedKeyUsage = clientAuth

        """

    /// Runs `openssl` in a scratch directory and reads the results back; the directory is removed.
    public static func generate() throws -> TestCertificates {
        guard let program = Self.openssl else { throw Failure(description: "openssl not found") }
        let directory = TestEnvironment.temporaryDirectory("vdisk-certs")
        defer { TestEnvironment.remove(directory) }
        let config = directory + "/openssl.cnf"
        writeFile(config, configuration)
        func invoke(_ arguments: [String]) throws {
            let result = run(program, arguments)
            guard result.status == 0 else {
                throw Failure(description: "openssl \(arguments.joined(separator: " ")): \(result.stderr)")
            }
        }
        func file(_ name: String) -> String { directory + "/" + name }
        let days = ["-days", "365"]
        let newKey = ["-newkey", "rsa:2048", "-nodes", "-config", config]
        try invoke(
            ["req", "-x509"] + newKey + days
                + [
                    "-keyout", file("ca-key.pem"), "-out", file("ca-cert.pem"), "-subj", "/CN=vdisk test CA",
                    "-extensions", "ca",
                ]
        )
        for (role, subject) in [("server", "/CN=localhost"), ("client", "/CN=vdisk test client")] {
            try invoke(
                ["req", "-new"] + newKey + [
                    "-keyout", file("\(role)-key.pem"), "-out", file("\(role).csr"), "-subj", subject,
                ]
            )
            try invoke(
                ["x509", "-req", "-in", file("\(role).csr"), "-CA", file("ca-cert.pem"), "-CAkey", file("ca-key.pem")]
                    + ["-set_serial", role == "server" ? "2" : "3"] + days
                    + ["-extfile", config, "-extensions", role, "-out", file("\(role)-cert.pem")]
            )
        }
        try invoke(
            ["req", "-x509"] + newKey + days
                + [
                    "-keyout", file("stranger-key.pem"), "-out", file("stranger-cert.pem"), "-subj", "/CN=stranger",
                    "-extensions", "client",
                ]
        )
        let certificates = TestCertificates(
            caCertificate: readFile(file("ca-cert.pem")),
            serverCertificate: readFile(file("server-cert.pem")),
            serverKey: readFile(file("server-key.pem")),
            clientCertificate: readFile(file("client-cert.pem")),
            clientKey: readFile(file("client-key.pem")),
            strangerCertificate: readFile(file("stranger-cert.pem")),
            strangerKey: readFile(file("stranger-key.pem"))
        )
        guard certificates.serverKey.contains("PRIVATE KEY"), certificates.clientCertificate.contains("CERTIFICATE")
        else {
            throw Failure(description: "openssl wrote no usable files")
        }
        return certificates
    }

    /// What `vdisk serve --tls-certificates DIR` reads: server-cert.pem, server-key.pem, ca-cert.pem.
    public func writeServerFiles(to directory: String) {
        writeFile(directory + "/server-cert.pem", serverCertificate)
        writeFile(directory + "/server-key.pem", serverKey)
        writeFile(directory + "/ca-cert.pem", caCertificate)
    }

    /// What libnbd (`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) read as a client: ca-cert.pem
    /// to check the server, and client-cert.pem/client-key.pem if `identity` says which pair to present.
    public enum ClientIdentity: Sendable { case none, client, stranger }

    public func writeClientFiles(to directory: String, identity: ClientIdentity) {
        writeFile(directory + "/ca-cert.pem", caCertificate)
        switch identity {
        case .none:
            break
        case .client:
            writeFile(directory + "/client-cert.pem", clientCertificate)
            writeFile(directory + "/client-key.pem", clientKey)
        case .stranger:
            writeFile(directory + "/client-cert.pem", strangerCertificate)
            writeFile(directory + "/client-key.pem", strangerKey)
        }
    }
}

/// Creates (or replaces) a file with `text`, mode 0600 (some of these files are private keys).
public func writeFile(_ path: String, _ text: String) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    guard fd >= 0 else { return }
    defer { close(fd) }
    var bytes = Array(text.utf8)
    var offset = 0
    while offset < bytes.count {
        let written = bytes[offset...].withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        if written < 0 && errno == EINTR { continue }
        guard written > 0 else { return }
        offset += written
    }
}
