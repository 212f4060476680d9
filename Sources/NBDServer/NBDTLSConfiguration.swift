import BlockIO
import NBDProtocol
import NIOSSL

#if canImport(Glibc)
import Glibc
#endif

// Design notes
// ------------
// TLS is negotiated inside the NBD handshake (NBD_OPT_STARTTLS), so the server needs no TLS listener: the
// handshake handler puts a `NIOSSLServerHandler` made from `context` at the front of the connection's
// pipeline when the client asks, and everything after the STARTTLS acknowledgement is encrypted.
//
// Certificates come from one directory with fixed names, the layout nbdkit and qemu-nbd use, so one
// directory can serve all three (and libnbd and qemu read the same names on the client side):
//
//   DIR/server-cert.pem   the server's certificate, optionally followed by intermediates   (required)
//   DIR/server-key.pem    its private key, unencrypted                                     (required)
//   DIR/ca-cert.pem       the CA that signs client certificates                  (with verifyPeer only)
//
// Everything is loaded and checked once, when the configuration is made, so a bad file stops the server
// before it listens instead of failing every connection. TLS 1.2 is the oldest version accepted (the
// spec: implementations SHOULD NOT offer older versions by default).

/// TLS for `NBDServer`: whether it is required, and the certificates to use.
public struct NBDTLSConfiguration: Sendable {
    /// How a server treats clients that do not ask for TLS.
    public enum Mode: Sendable, Hashable, CustomStringConvertible {
        /// TLS is offered; clients that do not ask for it are served in plaintext.
        case optional
        /// Every option but STARTTLS and ABORT is refused until TLS is up (the spec's FORCEDTLS).
        case required

        public var description: String {
            switch self {
            case .optional: return "optional"
            case .required: return "required"
            }
        }
    }

    /// Whether plaintext clients are served.
    public var mode: Mode
    /// The TLS context every connection's handler is made from.
    public let context: NIOSSLContext
    /// True if clients must present a certificate signed by the configured CA.
    public let verifiesPeer: Bool

    /// The handshake policy this configuration stands for.
    var policy: NBDTLSPolicy {
        switch mode {
        case .optional: return .optional
        case .required: return .required
        }
    }

    /// Uses a TLS context made by the caller.
    /// - Parameters:
    ///   - mode: whether plaintext clients are served.
    ///   - context: a server context (certificate chain and key set).
    ///   - verifiesPeer: whether `context` requires client certificates (only reported, not enforced here).
    public init(mode: Mode, context: NIOSSLContext, verifiesPeer: Bool = false) {
        self.mode = mode
        self.context = context
        self.verifiesPeer = verifiesPeer
    }

    /// Makes a server context from a certificate chain and its key.
    /// - Parameters:
    ///   - mode: whether plaintext clients are served.
    ///   - certificateChain: the server's certificate first, then any intermediates.
    ///   - privateKey: the key of the first certificate.
    ///   - clientCertificateAuthorities: if given, clients must present a certificate signed by one of these.
    /// - Throws: `NBDServerError` if the key does not belong to the certificate or the context cannot be made.
    public init(
        mode: Mode,
        certificateChain: [NIOSSLCertificate],
        privateKey: NIOSSLPrivateKey,
        clientCertificateAuthorities: [NIOSSLCertificate]? = nil
    ) throws {
        guard !certificateChain.isEmpty else { throw NBDServerError("TLS needs a server certificate") }
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: certificateChain.map { .certificate($0) },
            privateKey: .privateKey(privateKey)
        )
        configuration.minimumTLSVersion = .tlsv12
        // Closing sends close_notify (the spec's "shut down TLS first"), then waits this long for the
        // client's. An idle client may not read until its next request, and NBD frames its own messages,
        // so there is nothing to wait for: keep it short, or every idle client would hold up shutdown.
        configuration.shutdownTimeout = .seconds(1)
        if let authorities = clientCertificateAuthorities {
            guard !authorities.isEmpty else { throw NBDServerError("no CA certificate to verify clients with") }
            configuration.trustRoots = .certificates(authorities)
            // A client certificate names a client, not a host: check the signature and dates only.
            configuration.certificateVerification = .noHostnameVerification
            // Clients holding several certificates pick the one our CA signed.
            configuration.sendCANameList = true
        }
        let context: NIOSSLContext
        do {
            context = try NIOSSLContext(configuration: configuration)
        } catch NIOSSLError.failedToLoadPrivateKey {
            throw NBDServerError("the private key does not belong to the server certificate")
        } catch {
            throw NBDServerError("cannot set up TLS: \(error)")
        }
        self.init(mode: mode, context: context, verifiesPeer: clientCertificateAuthorities != nil)
    }

    /// The file names looked for in a certificates directory.
    public enum FileName {
        public static let certificate = "server-cert.pem"
        public static let privateKey = "server-key.pem"
        public static let certificateAuthority = "ca-cert.pem"
    }

    /// Loads `server-cert.pem` and `server-key.pem` from `directory`, and `ca-cert.pem` when `verifyPeer`
    /// (see the design notes above).
    /// - Parameters:
    ///   - directory: the certificates directory.
    ///   - mode: whether plaintext clients are served.
    ///   - verifyPeer: require client certificates signed by `ca-cert.pem`.
    /// - Throws: `NBDServerError` naming the file for a missing, unreadable or malformed file, or a key that
    ///   does not match the certificate.
    public static func load(directory: String, mode: Mode, verifyPeer: Bool = false) throws -> NBDTLSConfiguration {
        var info = stat()
        guard stat(directory, &info) == 0 else {
            throw NBDServerError("certificates directory \(directory): \(describeErrno(errno))")
        }
        guard info.st_mode & S_IFMT == S_IFDIR else {
            throw NBDServerError("certificates directory \(directory) is not a directory")
        }
        let base = directory.hasSuffix("/") ? directory : directory + "/"
        let chain = try certificates(at: base + FileName.certificate)
        let key = try privateKey(at: base + FileName.privateKey)
        let authorities = verifyPeer ? try certificates(at: base + FileName.certificateAuthority) : nil
        do {
            return try NBDTLSConfiguration(
                mode: mode,
                certificateChain: chain,
                privateKey: key,
                clientCertificateAuthorities: authorities
            )
        } catch let error as NBDServerError {
            throw NBDServerError("\(directory): \(error.message)")
        }
    }

    /// Every certificate in a PEM file.
    static func certificates(at path: String) throws -> [NIOSSLCertificate] {
        let bytes = try contents(of: path)
        let certificates = try? NIOSSLCertificate.fromPEMBytes(bytes)
        guard let certificates, !certificates.isEmpty else {
            throw NBDServerError("\(path) holds no PEM certificate")
        }
        return certificates
    }

    /// The private key in a PEM file.
    static func privateKey(at path: String) throws -> NIOSSLPrivateKey {
        let bytes = try contents(of: path)
        // An encrypted key would need a passphrase at every start; say so rather than "malformed".
        if String(decoding: bytes, as: UTF8.self).contains("ENCRYPTED") {
            throw NBDServerError("\(path) is encrypted; give an unencrypted key (mode 0600)")
        }
        guard let key = try? NIOSSLPrivateKey(bytes: bytes, format: .pem) else {
            throw NBDServerError("\(path) holds no PEM private key")
        }
        return key
    }

    /// A whole file, read with errors that name it. PEM files are small; a huge one is a mistake.
    static func contents(of path: String) throws -> [UInt8] {
        do {
            let file = try FileDevice.open(path: path, readOnly: true)
            defer { try? file.close() }
            guard file.size <= 1 << 20 else { throw NBDServerError("\(path) is too large for a PEM file") }
            return try file.read(count: Int(file.size), at: 0)
        } catch let error as BlockIOError {
            throw NBDServerError("cannot read \(path): \(describeErrno(error.errno))")
        }
    }
}
