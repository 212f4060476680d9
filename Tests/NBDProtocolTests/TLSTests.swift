import Logging
import NBDProtocol
import NIOCore
import NIOEmbedded
import NIOSSL
import NIOTLS
import Testing
import VImageTestSupport

@testable import NBDServer

#if canImport(Glibc)
import Glibc
#endif

/// NBD_OPT_STARTTLS in the pure state machine: the spec's NOTLS, SELECTIVETLS and FORCEDTLS rules.
@Suite struct TLSStateMachineTests {
    func negotiating(
        _ tls: NBDTLSPolicy,
        flags: NBDClientFlags = [.fixedNewstyle, .noZeroes]
    ) -> (NBDHandshakeStateMachine, [NBDHandshakeStateMachine.Action]) {
        var machine = NBDHandshakeStateMachine(exports: testExports, tls: tls)
        _ = machine.start()
        var bytes = ClientBytes.flags(flags)
        let actions = machine.receive(&bytes)
        return (machine, actions)
    }

    /// Invariant: with TLS required, every option but STARTTLS and ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD before TLS, including INFO, GO and unknown options, and nothing is negotiated.
    @Test func requiredRefusesOptionsBeforeTLS() {
        var (machine, _) = negotiating(.required)
        let options: [(NBDOption, [UInt8])] = [
            (.list, []), (.structuredReply, []), (.info, ClientBytes.goData("disk")), (.go, ClientBytes.goData("")),
            (.listMetaContext, ClientBytes.metaContextData("", queries: [])),
            (.setMetaContext, ClientBytes.metaContextData("", queries: ["base:allocation"])),
            (.extendedHeaders, []), (NBDOption(rawValue: 42), [1, 2, 3]),
        ]
        for (option, data) in options {
            var bytes = ClientBytes.option(option, data)
            let actions = machine.receive(&bytes)
            #expect(optionReplies(actions).map(\.1) == [.errTLSRequired], "\(option)")
            #expect(optionReplies(actions).first?.0 == option)
            #expect(session(in: actions) == nil && !closes(actions))
        }
        #expect(machine.isNegotiating)
        #expect(!machine.isTLSActive)
        var abort = ClientBytes.option(.abort)
        let aborted = machine.receive(&abort)
        #expect(optionReplies(aborted).map(\.1) == [.ack])
        #expect(closes(aborted))
    }

    /// Invariant: with TLS required, EXPORT_NAME before TLS (which has no error reply) closes the connection
    /// and sends nothing about the export.
    @Test func requiredExportNameBeforeTLSCloses() {
        var (machine, _) = negotiating(.required)
        var bytes = ClientBytes.option(.exportName, Array("disk".utf8))
        let actions = machine.receive(&bytes)
        #expect(actions.count == 1 && closes(actions))
        #expect(!machine.isNegotiating)
    }

    /// Invariant: with TLS required, a client without FIXED_NEWSTYLE (which cannot ask for TLS) is closed on.
    @Test func requiredRefusesNonFixedNewstyleClient() {
        let (machine, actions) = negotiating(.required, flags: [])
        #expect(closes(actions))
        #expect(!machine.isNegotiating)
        // Offered, not required: such a client is served in plaintext, but cannot start TLS.
        var (offered, none) = negotiating(.optional, flags: [])
        #expect(none.isEmpty)
        var startTLS = ClientBytes.option(.startTLS)
        #expect(optionReplies(offered.receive(&startTLS)).map(\.1) == [.errPolicy])
    }

    /// Invariant: STARTTLS with data is NBD_REP_ERR_INVALID and changes nothing; without data it is
    /// acknowledged, asks for TLS, and consumes nothing more until `tlsStarted()`.
    @Test func startTLS() {
        var (machine, _) = negotiating(.required)
        var withData = ClientBytes.option(.startTLS, [0])
        #expect(optionReplies(machine.receive(&withData)).map(\.1) == [.errInvalid])
        #expect(!machine.isTLSActive)

        // The client's first TLS record rides behind the option: it must stay in the buffer.
        var bytes = ClientBytes.concat(ClientBytes.option(.startTLS), ByteBuffer(bytes: [0x16, 0x03, 0x01]))
        let actions = machine.receive(&bytes)
        #expect(actions == [.send(.optionReply(option: .startTLS, type: .ack, data: [])), .startTLS])
        #expect(machine.isTLSActive)
        #expect(bytes.readableBytes == 3)
        #expect(machine.receive(&bytes).isEmpty)
        #expect(bytes.readableBytes == 3)
    }

    /// Invariant: once TLS is up, options behave as without TLS (never ERR_TLS_REQD), a second STARTTLS is
    /// NBD_REP_ERR_INVALID, and nothing negotiated before STARTTLS survives it.
    @Test func afterTLS() {
        var (machine, _) = negotiating(.optional)
        var structured = ClientBytes.option(.structuredReply)
        #expect(optionReplies(machine.receive(&structured)).map(\.1) == [.ack])
        var startTLS = ClientBytes.option(.startTLS)
        #expect(optionReplies(machine.receive(&startTLS)).map(\.1) == [.ack])
        machine.tlsStarted()

        var again = ClientBytes.option(.startTLS)
        #expect(optionReplies(machine.receive(&again)).map(\.1) == [.errInvalid])
        var list = ClientBytes.option(.list)
        #expect(optionReplies(machine.receive(&list)).map(\.1) == [.server, .server, .ack])
        // STRUCTURED_REPLY from the plaintext part was forgotten: SET_META_CONTEXT needs it again.
        var set = ClientBytes.option(.setMetaContext, ClientBytes.metaContextData("", queries: ["base:allocation"]))
        #expect(optionReplies(machine.receive(&set)).map(\.1) == [.errInvalid])
        var go = ClientBytes.option(.go, ClientBytes.goData(""))
        let negotiated = session(in: machine.receive(&go))
        #expect(negotiated?.export.name == "disk")
        #expect(negotiated?.structuredReplies == false)
    }

    /// Invariant: TLS offered but not required serves plaintext clients as before.
    @Test func optionalServesPlaintext() {
        var (machine, _) = negotiating(.optional)
        var list = ClientBytes.option(.list)
        #expect(optionReplies(machine.receive(&list)).map(\.1) == [.server, .server, .ack])
        var go = ClientBytes.option(.go, ClientBytes.goData("other"))
        #expect(session(in: machine.receive(&go))?.export.name == "other")
    }

    /// Invariant: without TLS configured, STARTTLS is NBD_REP_ERR_UNSUP and negotiation goes on.
    @Test func unavailable() {
        var (machine, _) = negotiating(.unavailable)
        var bytes = ClientBytes.option(.startTLS)
        #expect(optionReplies(machine.receive(&bytes)).map(\.1) == [.errUnsupported])
        #expect(!machine.isTLSActive && machine.isNegotiating)
    }
}

/// The test certificates as library objects.
extension TestCertificates {
    func serverConfiguration(_ mode: NBDTLSConfiguration.Mode, verifyPeer: Bool = false) throws -> NBDTLSConfiguration {
        try NBDTLSConfiguration(
            mode: mode,
            certificateChain: NIOSSLCertificate.fromPEMBytes(Array(serverCertificate.utf8)),
            privateKey: NIOSSLPrivateKey(bytes: Array(serverKey.utf8), format: .pem),
            clientCertificateAuthorities: verifyPeer ? NIOSSLCertificate.fromPEMBytes(Array(caCertificate.utf8)) : nil
        )
    }

    /// A client handler that checks the server against the test CA and the name `localhost`.
    func clientHandler(certificate: String? = nil, key: String? = nil) throws -> NIOSSLClientHandler {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMBytes(Array(caCertificate.utf8)))
        if let certificate, let key {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMBytes(Array(certificate.utf8)).map {
                .certificate($0)
            }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(bytes: Array(key.utf8), format: .pem))
        }
        return try NIOSSLClientHandler(
            context: NIOSSLContext(configuration: configuration),
            serverHostname: "localhost"
        )
    }
}

/// A server-side handshake handler on an `EmbeddedChannel`, with TLS, and a client that talks to it.
final class TLSConversation {
    let server = EmbeddedChannel()
    /// The client side once TLS started: a `NIOSSLClientHandler` whose plaintext comes out as inbound data.
    private(set) var client: EmbeddedChannel?
    /// Sessions the handshake handed to transmission.
    private(set) var sessions: [NBDSession] = []

    init(tls: NBDTLSConfiguration?, timeout: TimeAmount = .seconds(10)) throws {
        let handler = NBDHandshakeHandler(
            exports: testExports,
            tls: tls,
            timeout: timeout,
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        ) { [unowned self] session in
            self.sessions.append(session)
            return []
        }
        try server.pipeline.syncOperations.addHandler(handler)
        try server.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        var greeting = try serverOutput()
        #expect(greeting.readInteger(as: UInt64.self) == NBDMagic.greeting)
    }

    /// Everything the server wrote so far (ciphertext once TLS is up).
    func serverOutput() throws -> ByteBuffer {
        var out = ByteBuffer()
        while var buffer = try server.readOutbound(as: ByteBuffer.self) { out.writeBuffer(&buffer) }
        return out
    }

    /// Sends plaintext bytes straight to the server, as a client before TLS.
    func sendPlain(_ buffer: ByteBuffer) throws {
        try server.writeInbound(buffer)
        server.embeddedEventLoop.run()
    }

    /// Starts the client's TLS handshake with `handler` and runs both sides until neither has more to say.
    func startClientTLS(_ handler: NIOSSLClientHandler) throws {
        let client = EmbeddedChannel()
        try client.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 10809)).wait()
        try client.pipeline.syncOperations.addHandler(handler)
        self.client = client
        try shuttle()
    }

    /// Moves bytes between the two channels until both are quiet or one closed.
    func shuttle() throws {
        guard let client else { return }
        var moved = true
        while moved {
            moved = false
            // A side that closed may still hold its last words (an alert); the other side gets them if it
            // is still listening.
            while let bytes = try client.readOutbound(as: ByteBuffer.self) {
                moved = true
                if server.isActive { _ = try? server.writeInbound(bytes) }
            }
            while let bytes = try server.readOutbound(as: ByteBuffer.self) {
                moved = true
                if client.isActive { _ = try? client.writeInbound(bytes) }
            }
            client.embeddedEventLoop.run()
            server.embeddedEventLoop.run()
        }
    }

    /// Sends plaintext through the client's TLS and returns the server's decrypted answer.
    func sendOverTLS(_ buffer: ByteBuffer) throws -> ByteBuffer {
        let client = try #require(client)
        try client.writeOutbound(buffer)
        try shuttle()
        var out = ByteBuffer()
        while var piece = try client.readInbound(as: ByteBuffer.self) { out.writeBuffer(&piece) }
        return out
    }
}

/// Parses option replies (magic, option, type, length, data) from a byte stream.
func parseOptionReplies(_ buffer: ByteBuffer) -> [(NBDOption, NBDOptionReplyType, [UInt8])] {
    var buffer = buffer
    var replies: [(NBDOption, NBDOptionReplyType, [UInt8])] = []
    while buffer.readableBytes >= 20 {
        guard buffer.readInteger(as: UInt64.self) == NBDMagic.optionReply,
            let option = buffer.readInteger(as: UInt32.self),
            let type = buffer.readInteger(as: UInt32.self), let length = buffer.readInteger(as: UInt32.self),
            let data = buffer.readBytes(length: Int(length))
        else { break }
        replies.append((NBDOption(rawValue: option), NBDOptionReplyType(rawValue: type), data))
    }
    return replies
}

/// STARTTLS through `NBDHandshakeHandler` on `EmbeddedChannel`s, with a real TLS handshake in memory.
@Suite(.enabled(if: TestCertificates.shared != nil)) struct TLSHandlerTests {
    var certificates: TestCertificates { TestCertificates.shared! }

    /// Invariant: with TLS required, options before STARTTLS are answered NBD_REP_ERR_TLS_REQD on the wire
    /// and the connection stays open; EXPORT_NAME before STARTTLS closes it.
    @Test func requiredRefusesPlaintext() throws {
        let conversation = try TLSConversation(tls: certificates.serverConfiguration(.required))
        try conversation.sendPlain(
            ClientBytes.concat(
                ClientBytes.flags(),
                ClientBytes.option(.list),
                ClientBytes.option(.go, ClientBytes.goData(""))
            )
        )
        let replies = parseOptionReplies(try conversation.serverOutput())
        #expect(replies.map(\.0) == [.list, .go])
        #expect(replies.map(\.1) == [.errTLSRequired, .errTLSRequired])
        #expect(conversation.server.isActive)
        #expect(conversation.sessions.isEmpty)

        try conversation.sendPlain(ClientBytes.option(.exportName, Array("disk".utf8)))
        #expect(try conversation.serverOutput().readableBytes == 0)
        #expect(!conversation.server.isActive)
        #expect(conversation.sessions.isEmpty)
    }

    /// Invariant: STARTTLS with data is NBD_REP_ERR_INVALID on the wire, and no TLS handler goes in.
    @Test func startTLSWithDataIsInvalid() throws {
        let conversation = try TLSConversation(tls: certificates.serverConfiguration(.required))
        try conversation.sendPlain(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS, [1, 2])))
        let replies = parseOptionReplies(try conversation.serverOutput())
        #expect(replies.map(\.1) == [.errInvalid])
        #expect(conversation.server.isActive)
        #expect(throws: (any Error).self) {
            try conversation.server.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
        }
    }

    /// Invariant: a server without TLS answers STARTTLS with NBD_REP_ERR_UNSUP and keeps negotiating.
    @Test func startTLSWithoutConfigurationIsUnsupported() throws {
        let conversation = try TLSConversation(tls: nil)
        try conversation.sendPlain(
            ClientBytes.concat(
                ClientBytes.flags(),
                ClientBytes.option(.startTLS),
                ClientBytes.option(.go, ClientBytes.goData(""))
            )
        )
        let replies = parseOptionReplies(try conversation.serverOutput())
        #expect(replies.map(\.1) == [.errUnsupported, .info, .info, .info, .ack])
        #expect(conversation.sessions.count == 1)
    }

    /// Invariant: bytes sent behind STARTTLS before its ACK (in the same read) are not taken as anything:
    /// the ACK goes out in plaintext, then the connection closes.
    @Test func bytesBeforeACKClose() throws {
        let conversation = try TLSConversation(tls: certificates.serverConfiguration(.optional))
        try conversation.sendPlain(
            ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS), ClientBytes.option(.list))
        )
        let replies = parseOptionReplies(try conversation.serverOutput())
        #expect(replies.map(\.1) == [.ack])
        #expect(!conversation.server.isActive)
    }

    /// Invariant: after the plaintext ACK the TLS handler sits first in the pipeline; a client that
    /// completes the TLS handshake (checking the server's name against the CA) negotiates inside TLS as
    /// without it: LIST works, STARTTLS again is NBD_REP_ERR_INVALID, GO starts transmission.
    @Test func negotiationInsideTLS() throws {
        let conversation = try TLSConversation(tls: certificates.serverConfiguration(.required))
        try conversation.sendPlain(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
        let ack = parseOptionReplies(try conversation.serverOutput())
        #expect(ack.map(\.0) == [.startTLS])
        #expect(ack.map(\.1) == [.ack])
        #expect(throws: Never.self) {
            try conversation.server.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)
        }

        try conversation.startClientTLS(certificates.clientHandler())
        #expect(conversation.client?.isActive == true && conversation.server.isActive)

        let list = parseOptionReplies(try conversation.sendOverTLS(ClientBytes.option(.list)))
        #expect(list.map(\.1) == [.server, .server, .ack])
        let again = parseOptionReplies(try conversation.sendOverTLS(ClientBytes.option(.startTLS)))
        #expect(again.map(\.1) == [.errInvalid])
        let go = parseOptionReplies(
            try conversation.sendOverTLS(
                ClientBytes.concat(
                    ClientBytes.option(.structuredReply),
                    ClientBytes.option(.go, ClientBytes.goData("other"))
                )
            )
        )
        #expect(go.map(\.1) == [.ack, .info, .info, .ack])
        #expect(conversation.sessions.map(\.export.name) == ["other"])
        #expect(conversation.sessions.first?.structuredReplies == true)
    }

    /// Invariant: the handshake timeout covers the TLS handshake: a client that gets the ACK and then
    /// says nothing is disconnected when the negotiation time runs out.
    @Test func timeoutCoversTLSHandshake() throws {
        let conversation = try TLSConversation(tls: certificates.serverConfiguration(.required), timeout: .seconds(5))
        try conversation.sendPlain(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
        #expect(parseOptionReplies(try conversation.serverOutput()).map(\.1) == [.ack])
        conversation.server.embeddedEventLoop.advanceTime(by: .seconds(4))
        #expect(conversation.server.isActive)
        conversation.server.embeddedEventLoop.advanceTime(by: .seconds(2))
        #expect(!conversation.server.isActive)
    }

    /// Invariant: with client verification, a client presenting no certificate, or one the CA did not
    /// sign, fails the TLS handshake and is closed on before any option; the CA's client gets through.
    @Test func verifyPeer() throws {
        let tls = try certificates.serverConfiguration(.required, verifyPeer: true)
        #expect(tls.verifiesPeer)
        for (certificate, key) in [(nil, nil), (certificates.strangerCertificate, certificates.strangerKey)] {
            let conversation = try TLSConversation(tls: tls)
            try conversation.sendPlain(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
            _ = try conversation.serverOutput()
            try conversation.startClientTLS(certificates.clientHandler(certificate: certificate, key: key))
            if conversation.server.isActive {
                // TLS 1.3 clients finish before the server has judged their certificate; the server's
                // verdict arrives with the first data.
                _ = try? conversation.sendOverTLS(ClientBytes.option(.list))
            }
            #expect(!conversation.server.isActive, "certificate: \(certificate == nil ? "none" : "stranger")")
            #expect(conversation.sessions.isEmpty)
        }
        let conversation = try TLSConversation(tls: tls)
        try conversation.sendPlain(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
        _ = try conversation.serverOutput()
        try conversation.startClientTLS(
            certificates.clientHandler(certificate: certificates.clientCertificate, key: certificates.clientKey)
        )
        let go = parseOptionReplies(try conversation.sendOverTLS(ClientBytes.option(.go, ClientBytes.goData(""))))
        #expect(go.map(\.1) == [.info, .info, .info, .ack])  // export, block size, and the default's name
        #expect(conversation.sessions.count == 1)
    }
}

/// Loading certificates from a directory: every bad file is a clear error naming it.
@Suite(.enabled(if: TestCertificates.shared != nil)) struct TLSConfigurationLoadTests {
    var certificates: TestCertificates { TestCertificates.shared! }

    func expectError(
        _ directory: String,
        verifyPeer: Bool = false,
        containing text: String,
        sourceLocation: SourceLocation = #_sourceLocation
    ) {
        do {
            _ = try NBDTLSConfiguration.load(directory: directory, mode: .required, verifyPeer: verifyPeer)
            Issue.record("loaded; expected an error containing '\(text)'", sourceLocation: sourceLocation)
        } catch let error as NBDServerError {
            #expect(error.message.contains(text), "\(error.message)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
        }
    }

    /// Invariant: a complete directory loads, with and without client verification; missing, unreadable,
    /// garbage and mismatched files are `NBDServerError`s naming the file, never a crash.
    @Test func load() throws {
        let directory = TestEnvironment.temporaryDirectory("vdisk-tls-load")
        defer { TestEnvironment.remove(directory) }
        expectError(directory + "/nope", containing: "No such file or directory")
        expectError(directory, containing: "server-cert.pem: No such file or directory")

        certificates.writeServerFiles(to: directory)
        let plain = try NBDTLSConfiguration.load(directory: directory, mode: .optional)
        #expect(plain.mode == .optional && !plain.verifiesPeer)
        #expect(
            try NBDTLSConfiguration.load(directory: directory + "/", mode: .required, verifyPeer: true).verifiesPeer
        )
        expectError(directory + "/server-cert.pem", containing: "is not a directory")

        writeFile(directory + "/server-cert.pem", "not a certificate\n")
        expectError(directory, containing: "server-cert.pem holds no PEM certificate")
        certificates.writeServerFiles(to: directory)

        writeFile(directory + "/server-key.pem", certificates.strangerKey)
        expectError(directory, containing: "does not belong to the server certificate")
        writeFile(
            directory + "/server-key.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"
        )
        expectError(directory, containing: "server-key.pem is encrypted")
        writeFile(directory + "/server-key.pem", String(certificates.serverKey.prefix(200)))
        expectError(directory, containing: "server-key.pem holds no PEM private key")
        certificates.writeServerFiles(to: directory)

        unlink(directory + "/ca-cert.pem")
        #expect(throws: Never.self) { try NBDTLSConfiguration.load(directory: directory, mode: .required) }
        expectError(directory, verifyPeer: true, containing: "ca-cert.pem: No such file or directory")
    }
}

extension RawClient {
    /// Reads until the server closes (true) or the receive timeout passes (false), discarding what comes
    /// first (a TLS alert, say).
    func isEventuallyClosedByServer() -> Bool {
        var bytes = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n == 0 { return true }
            if n < 0 { return false }
        }
    }
}

/// A real server over a unix socket with TLS required, driven by the hand-written client.
@Suite(.enabled(if: TestCertificates.shared != nil)) struct TLSServerTests {
    /// Invariant: clients that misbehave around STARTTLS (plaintext after the ACK, silence after the ACK)
    /// lose only their own connection, and plaintext clients are told TLS is required.
    @Test func hostileClients() async throws {
        let tls = try TestCertificates.shared!.serverConfiguration(.required)
        try await withServer(handshakeTimeout: .milliseconds(300), tls: tls) { path, _, _ in
            let plain = try #require(RawClient(socketPath: path))
            _ = try #require(plain.receive(18))
            plain.send(ClientBytes.flags())
            plain.send(ClientBytes.option(.go, ClientBytes.goData("")))
            #expect(plain.readOptionReplies().map(\.0) == [.errTLSRequired])

            // Ignores the ACK and goes on in plaintext: the TLS handshake fails on it.
            let stubborn = try #require(RawClient(socketPath: path))
            _ = try #require(stubborn.receive(18))
            stubborn.send(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
            #expect(stubborn.readOptionReplies().map(\.0) == [.ack])
            stubborn.send(ClientBytes.option(.go, ClientBytes.goData("")))
            #expect(stubborn.isEventuallyClosedByServer())

            // Gets the ACK and never starts TLS: the handshake timeout ends it.
            let silent = try #require(RawClient(socketPath: path))
            _ = try #require(silent.receive(18))
            silent.send(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.startTLS)))
            #expect(silent.readOptionReplies().map(\.0) == [.ack])
            #expect(silent.isEventuallyClosedByServer())

            // The server is none the worse (the first client has timed out by now too).
            let later = try #require(RawClient(socketPath: path))
            _ = try #require(later.receive(18))
            later.send(ClientBytes.concat(ClientBytes.flags(), ClientBytes.option(.list)))
            #expect(later.readOptionReplies().map(\.0) == [.errTLSRequired])
        }
    }
}
