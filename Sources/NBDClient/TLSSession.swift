import BlockIO
import COpenSSL

#if canImport(Glibc)
import Glibc
#endif

// Design notes
// ------------
// TLS for the synchronous client, on the system OpenSSL: swift-nio-ssl only works inside a NIO pipeline,
// and the client is blocking sockets. NBD starts TLS inside its own handshake (NBD_OPT_STARTTLS), so the
// connection opens in plaintext; once the server acknowledges STARTTLS, a `TLSSession` is made over the
// same socket and every later byte, the rest of the negotiation included, goes through it.
//
//   NBDConnection --RawIO--> NBDTransport --.socket(fd)----------------------------> send/recv
//                                           '.tls(TLSSession) -> SSL -> socket BIO --> send/recv
//
// The socket BIO (COpenSSL's shim) sends with MSG_NOSIGNAL, as the plaintext path does, so a vanished
// server is an error and never a SIGPIPE. The socket is blocking and the BIO never asks for a retry, so
// SSL_read and SSL_write return bytes, end of file or an error; SSL_ERROR_WANT_READ/WRITE are retried all
// the same, a bounded number of times in a row.
//
// Threads: an SSL object must not run SSL_read on one thread while SSL_write runs on another. A
// connection carries one request at a time and both halves of a request run on the thread that took the
// connection from `NBDClientDevice`'s pool, so each session is only ever used by one thread at a time.
// The context (`TLSClientContext`) is configured once and then only read, which OpenSSL allows from many
// threads (SSL_new).
//
// Verification follows libnbd's URIs: the server's certificate must chain to DIR/ca-cert.pem (or the
// system's trust store when no directory is given) and, over TCP, name the URI's host (a DNS name or an IP
// address in its subject alternative names). Over a unix socket there is no host to compare, so only the
// chain is checked. `tls-verify-peer=false` skips both. TLS 1.2 is the oldest version offered.

/// The client side of TLS for one device: the trust anchors, the optional client certificate, and the
/// verification policy, loaded once from the URI's certificates directory.
final class TLSClientContext: @unchecked Sendable {
    /// The `SSL_CTX`; never changed after `init`.
    let context: OpaquePointer
    let settings: NBDURI.TLS
    /// True if a client certificate (client-cert.pem) is presented.
    let presentsCertificate: Bool

    /// The file names read from a certificates directory (libnbd's and qemu's client layout).
    enum FileName {
        static let certificateAuthority = "ca-cert.pem"
        static let certificate = "client-cert.pem"
        static let privateKey = "client-key.pem"
    }

    /// Loads and checks every file, so a bad directory fails before any connection is made.
    /// - Throws: `BlockIOError` naming the file that is missing, unreadable or malformed.
    init(_ settings: NBDURI.TLS, uri: String) throws {
        func fail(_ message: String, errno code: Int32 = EINVAL) -> BlockIOError {
            BlockIOError(.invalidArgument, operation: .open, errno: code, path: uri, message: message)
        }
        ERR_clear_error()
        guard let context = SSL_CTX_new(TLS_client_method()) else {
            throw fail("cannot set up TLS: \(TLSSession.takeErrors())", errno: ENOMEM)
        }
        self.context = context
        self.settings = settings
        var presents = false
        do {
            guard copenssl_ctx_require_tls12(context) == 1 else {
                throw fail("cannot require TLS 1.2: \(TLSSession.takeErrors())")
            }
            // An encrypted key would make OpenSSL prompt on the terminal: refuse it instead.
            SSL_CTX_set_default_passwd_cb(context) { _, _, _, _ in 0 }
            var directory: String?
            if let certificates = settings.certificates {
                guard let kind = Self.fileType(certificates) else {
                    let code = errno
                    throw fail("certificates directory \(certificates): \(describeErrno(code))", errno: code)
                }
                guard kind == S_IFDIR else { throw fail("certificates directory \(certificates) is not a directory") }
                directory = certificates.hasSuffix("/") ? certificates : certificates + "/"
            }
            if settings.verifyPeer {
                SSL_CTX_set_verify(context, SSL_VERIFY_PEER, nil)
                if let directory {
                    let path = directory + FileName.certificateAuthority
                    try Self.requireFile(path, why: "it verifies the server, unless tls-verify-peer=false", fail)
                    guard SSL_CTX_load_verify_locations(context, path, nil) == 1 else {
                        throw fail("\(path) holds no usable PEM certificate: \(TLSSession.takeErrors())")
                    }
                } else {
                    guard SSL_CTX_set_default_verify_paths(context) == 1 else {
                        throw fail("cannot load the system's trusted certificates: \(TLSSession.takeErrors())")
                    }
                }
            } else {
                SSL_CTX_set_verify(context, SSL_VERIFY_NONE, nil)
            }
            if let directory {
                let certificate = directory + FileName.certificate
                let key = directory + FileName.privateKey
                let hasCertificate = Self.fileType(certificate) != nil
                let hasKey = Self.fileType(key) != nil
                if hasCertificate || hasKey {
                    // One without the other is a half-copied directory: say so rather than connect anonymously.
                    try Self.requireFile(certificate, why: "\(FileName.privateKey) needs it", fail)
                    try Self.requireFile(key, why: "\(FileName.certificate) needs it", fail)
                    guard SSL_CTX_use_certificate_chain_file(context, certificate) == 1 else {
                        throw fail("\(certificate) holds no usable PEM certificate: \(TLSSession.takeErrors())")
                    }
                    guard SSL_CTX_use_PrivateKey_file(context, key, SSL_FILETYPE_PEM) == 1 else {
                        let reasons = TLSSession.takeErrors()
                        // OpenSSL checks the key against the certificate as it loads it.
                        if reasons.contains("key values mismatch") {
                            throw fail("\(key) does not belong to \(certificate)")
                        }
                        throw fail("\(key) holds no unencrypted PEM private key: \(reasons)")
                    }
                    guard SSL_CTX_check_private_key(context) == 1 else {
                        throw fail("\(key) does not belong to \(certificate)")
                    }
                    presents = true
                }
            }
        } catch {
            SSL_CTX_free(context)
            throw error
        }
        presentsCertificate = presents
    }

    deinit { SSL_CTX_free(context) }

    /// The file type bits (`S_IFDIR`, `S_IFREG`...) of `path`, or nil with `errno` set.
    private static func fileType(_ path: String) -> mode_t? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return info.st_mode & S_IFMT
    }

    private static func requireFile(_ path: String, why: String, _ fail: (String, Int32) -> BlockIOError) throws {
        guard let kind = fileType(path) else {
            let code = errno
            throw fail("\(path): \(describeErrno(code)) (\(why))", code)
        }
        guard kind == S_IFREG else { throw fail("\(path) is not a file", EINVAL) }
        guard access(path, R_OK) == 0 else {
            let code = errno
            throw fail("\(path): \(describeErrno(code))", code)
        }
    }
}

/// One TLS session over a connected, blocking socket, after NBD_OPT_STARTTLS was acknowledged. Used by one
/// thread at a time (see the design notes).
final class TLSSession: @unchecked Sendable {
    private let ssl: OpaquePointer
    /// What the socket BIO reads and writes; lives as long as `ssl`.
    private let socket: UnsafeMutablePointer<copenssl_socket>
    private let uri: String
    private var closed = false
    /// True until the handshake is done (errors are then about opening the connection).
    private var handshaking = true
    /// True once the server sent data inside TLS: it accepted us, whatever our certificate.
    private var received = false
    /// Whether a client certificate is presented (a server that wants one may just hang up otherwise).
    private let presentsCertificate: Bool

    /// The socket BIO's method, made once per process.
    nonisolated(unsafe) private static let method: OpaquePointer? = copenssl_socket_method()

    /// The largest amount handed to one SSL_read or SSL_write (their lengths are `Int32`).
    private static let maximumCall = 1 << 30
    /// How many SSL_ERROR_WANT_READ/WRITE in a row are retried. On a blocking socket whose BIO never asks
    /// for a retry there should be none; the bound keeps a surprise from becoming a busy loop.
    private static let maximumRetries = 1000

    /// Runs the TLS handshake on `fd` and checks the server's certificate.
    /// - Parameters:
    ///   - serverName: the host of an `nbds://` URI, checked against the certificate and sent as SNI (for a
    ///     DNS name); nil over a unix socket.
    /// - Throws: `BlockIOError` saying why the handshake failed, with OpenSSL's reason.
    init(context: TLSClientContext, fd: Int32, serverName: String?, uri: String) throws {
        self.uri = uri
        presentsCertificate = context.presentsCertificate
        ERR_clear_error()
        guard let method = Self.method, let ssl = SSL_new(context.context) else {
            throw BlockIOError(
                .system,
                operation: .open,
                errno: ENOMEM,
                path: uri,
                message: "cannot set up TLS: \(Self.takeErrors())"
            )
        }
        socket = .allocate(capacity: 1)
        socket.initialize(to: copenssl_socket(fd: fd, error: 0, end_of_file: 0))
        guard let bio = copenssl_socket_bio(method, socket) else {
            SSL_free(ssl)
            socket.deallocate()
            throw BlockIOError(
                .system,
                operation: .open,
                errno: ENOMEM,
                path: uri,
                message: "cannot set up TLS: \(Self.takeErrors())"
            )
        }
        SSL_set_bio(ssl, bio, bio)  // ssl owns the BIO from here
        self.ssl = ssl
        try configure(context: context, serverName: serverName)
        try handshake(context: context)
    }

    deinit {
        SSL_free(ssl)
        socket.deallocate()
    }

    private func configure(context: TLSClientContext, serverName: String?) throws {
        guard let serverName else { return }  // a unix socket: no host to check or to name
        let verify = context.settings.verifyPeer
        if isAddress(serverName) {
            // SNI carries DNS names only; an address is checked against the certificate's IP entries.
            if verify && X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), serverName) != 1 {
                throw error("cannot check the certificate against \(serverName): \(Self.takeErrors())", errno: EINVAL)
            }
            return
        }
        guard copenssl_set_server_name(ssl, serverName) == 1 else {
            throw error("cannot send the server name \(serverName): \(Self.takeErrors())", errno: EINVAL)
        }
        if verify {
            SSL_set_hostflags(ssl, UInt32(X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS))
            guard SSL_set1_host(ssl, serverName) == 1 else {
                throw error("cannot check the certificate against \(serverName): \(Self.takeErrors())", errno: EINVAL)
            }
        }
    }

    private func isAddress(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    private func handshake(context: TLSClientContext) throws {
        var retries = 0
        while true {
            ERR_clear_error()
            let rc = SSL_connect(ssl)
            if rc == 1 {
                handshaking = false
                return
            }
            let code = SSL_get_error(ssl, rc)
            if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE) && retries < Self.maximumRetries {
                retries += 1
                continue
            }
            let verification = SSL_get_verify_result(ssl)
            if context.settings.verifyPeer && verification != X509_V_OK {
                let reason = String(cString: X509_verify_cert_error_string(verification))
                let against =
                    context.settings.certificates.map { "\($0)/\(TLSClientContext.FileName.certificateAuthority)" }
                    ?? "the system's trusted certificates"
                throw error(
                    "the server's TLS certificate was rejected (\(reason)); it was checked against \(against)",
                    errno: EACCES
                )
            }
            throw failure(code, during: "the TLS handshake")
        }
    }

    /// Writes up to `buffer.count` bytes; returns how many (at least one).
    func send(_ buffer: UnsafeRawBufferPointer) throws -> Int {
        guard !closed else { throw error("the TLS session is closed", errno: ESHUTDOWN) }
        let count = Int32(min(buffer.count, Self.maximumCall))
        var retries = 0
        while true {
            ERR_clear_error()
            let n = SSL_write(ssl, buffer.baseAddress, count)
            if n > 0 { return Int(n) }
            let code = SSL_get_error(ssl, n)
            if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE) && retries < Self.maximumRetries {
                retries += 1
                continue
            }
            throw failure(code, during: "sending")
        }
    }

    /// Reads up to `buffer.count` bytes; returns how many, or 0 when the server closed the connection.
    func receive(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        guard !closed else { throw error("the TLS session is closed", errno: ESHUTDOWN) }
        let count = Int32(min(buffer.count, Self.maximumCall))
        var retries = 0
        while true {
            ERR_clear_error()
            let n = SSL_read(ssl, buffer.baseAddress, count)
            if n > 0 {
                received = true
                return Int(n)
            }
            let code = SSL_get_error(ssl, n)
            if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE) && retries < Self.maximumRetries {
                retries += 1
                continue
            }
            // close_notify, or the socket's end of file without one (OpenSSL 3 calls that an error; NBD
            // frames its own messages, so a cut-off reply is caught by the caller's exact-length reads).
            if code == SSL_ERROR_ZERO_RETURN || socket.pointee.end_of_file != 0 {
                if !received && !presentsCertificate { throw failure(code, during: "receiving") }
                return 0
            }
            throw failure(code, during: "receiving")
        }
    }

    /// Sends close_notify without waiting for the server's (NBD_CMD_DISC already ended the session).
    func close() {
        guard !closed else { return }
        closed = true
        ERR_clear_error()
        _ = SSL_shutdown(ssl)
        ERR_clear_error()
    }

    // MARK: Errors

    private func error(_ message: String, errno code: Int32) -> BlockIOError {
        BlockIOError(.system, operation: handshaking ? .open : .read, errno: code, path: uri, message: message)
    }

    /// An error for a failed SSL call: the socket's errno if the socket failed, else OpenSSL's reasons.
    private func failure(_ code: Int32, during what: String) -> BlockIOError {
        // A server that wants a client certificate may hang up without saying why (GnuTLS does): before
        // the server sent anything inside TLS, say what the likely cause is.
        let certificateHint =
            received || presentsCertificate
            ? ""
            : " (if the server requires a client certificate, put client-cert.pem and client-key.pem in the"
                + " tls-certificates directory)"
        let socketError = socket.pointee.error
        if socketError != 0 {
            ERR_clear_error()
            if socketError == EAGAIN || socketError == EWOULDBLOCK {
                return error("the server did not answer (TLS, \(what))", errno: ETIMEDOUT)
            }
            let hint = socketError == ECONNRESET || socketError == EPIPE ? certificateHint : ""
            return error("connection lost (TLS, \(what)): \(describeErrno(socketError))\(hint)", errno: socketError)
        }
        if socket.pointee.end_of_file != 0 {
            ERR_clear_error()
            return error("the server closed the connection during \(what)\(certificateHint)", errno: ECONNRESET)
        }
        let reasons = Self.takeErrors()
        var message = "TLS failed during \(what): \(reasons.isEmpty ? "SSL error \(code)" : reasons)"
        // TLS 1.3 finishes the client's handshake before the server has judged the client's certificate,
        // so a refusal arrives as an alert on the first read after it.
        if reasons.contains("certificate required") {
            message +=
                " (the server requires a client certificate: put client-cert.pem and client-key.pem in"
                + " the tls-certificates directory)"
        } else if reasons.contains("unknown ca") || reasons.contains("bad certificate") {
            message += " (the server did not accept the client certificate)"
        }
        return error(message, errno: EPROTO)
    }

    /// OpenSSL's queued errors of this thread, oldest first, as reason strings; empties the queue.
    static func takeErrors() -> String {
        var reasons: [String] = []
        while true {
            let code = ERR_get_error()
            if code == 0 { break }
            if reasons.count >= 4 { continue }  // drain the queue, keep the message short
            if let reason = ERR_reason_error_string(code) {
                reasons.append(String(cString: reason))
            } else {
                var text = [CChar](repeating: 0, count: 256)
                ERR_error_string_n(code, &text, text.count)
                reasons.append(String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
            }
        }
        return reasons.joined(separator: "; ")
    }
}
