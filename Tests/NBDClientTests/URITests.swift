import BlockIO
import NBDClient
import Testing

@Suite struct URITests {
    func parse(_ uri: String) throws -> NBDURI { try NBDURI(parsing: uri) }

    func rejects(_ uri: String, _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let parsed = try parse(uri)
            Issue.record("accepted \(uri) as \(parsed)", sourceLocation: sourceLocation)
        } catch let error as BlockIOError {
            #expect(error.code == .invalidArgument, sourceLocation: sourceLocation)
            #expect(error.message.contains(message), "\(uri): \(error.message)", sourceLocation: sourceLocation)
        } catch {
            Issue.record("\(uri): \(error)", sourceLocation: sourceLocation)
        }
    }

    /// Invariant: plain URIs parse as before and never ask for TLS.
    @Test func plain() throws {
        #expect(
            try parse("nbd://example.org/disk")
                == NBDURI(transport: .tcp(host: "example.org", port: 10809), export: "disk")
        )
        #expect(try parse("nbd://[::1]:1234") == NBDURI(transport: .tcp(host: "::1", port: 1234), export: ""))
        #expect(
            try parse("nbd+unix:///a%20b?socket=/run/x.sock")
                == NBDURI(transport: .unix(path: "/run/x.sock"), export: "a b")
        )
        #expect(try parse("nbd+unix://?socket=/s").export == "")
        #expect(try parse("nbd://h/e").tls == nil)
    }

    /// Invariant: nbds:// and nbds+unix:// always ask for TLS, verifying by default, with the certificates
    /// directory and tls-verify-peer from the query (percent-decoded).
    @Test func secure() throws {
        #expect(
            try parse("nbds://127.0.0.1:10810/disk?tls-certificates=/etc/pki")
                == NBDURI(
                    transport: .tcp(host: "127.0.0.1", port: 10810),
                    export: "disk",
                    tls: NBDURI.TLS(certificates: "/etc/pki", verifyPeer: true)
                )
        )
        #expect(try parse("nbds://server.example").tls == NBDURI.TLS(certificates: nil, verifyPeer: true))
        #expect(try parse("nbds://[::1]/").transport == .tcp(host: "::1", port: 10809))
        let unix = try parse("nbds+unix:///exp?socket=/run/a%26b.sock&tls-certificates=/my%20pki&tls-verify-peer=false")
        #expect(
            unix
                == NBDURI(
                    transport: .unix(path: "/run/a&b.sock"),
                    export: "exp",
                    tls: NBDURI.TLS(certificates: "/my pki", verifyPeer: false)
                )
        )
        // Parameters in any order; the usual spellings of booleans.
        let reordered = try parse("nbds+unix:///?tls-verify-peer=TRUE&socket=/s")
        #expect(reordered.tls == NBDURI.TLS(certificates: nil, verifyPeer: true))
        for (text, value) in [("0", false), ("no", false), ("off", false), ("1", true), ("yes", true), ("on", true)] {
            #expect(try parse("nbds://h/?tls-verify-peer=\(text)").tls?.verifyPeer == value)
        }
    }

    /// Invariant: anything unclear is refused with a message saying what: no silent plaintext for TLS
    /// parameters on nbd://, no unknown or repeated parameters, no empty or non-boolean values.
    @Test func rejected() {
        rejects("http://host/disk", "use nbd[s]://")
        rejects("nbds:/host", "use nbd[s]://")
        rejects("nbd://host/disk?tls-certificates=/pki", "tls-certificates needs an nbds://")
        rejects("nbd+unix:///d?socket=/s&tls-verify-peer=false", "tls-verify-peer needs an nbds://")
        rejects("nbds+unix:///d?tls-certificates=/pki", "missing ?socket=PATH")
        rejects("nbds+unix:///d?socket=", "missing ?socket=PATH")
        rejects("nbds+unix://host/d?socket=/s", "have no host")
        rejects("nbds://h/?tls-certificates=", "tls-certificates needs a directory")
        rejects("nbds://h/?tls-verify-peer=maybe", "tls-verify-peer must be true or false, not 'maybe'")
        rejects("nbds://h/?tls-verify-peer", "tls-verify-peer must be true or false")
        rejects("nbds://h/?tls-certificates=/a&tls-certificates=/b", "tls-certificates is given twice")
        rejects(
            "nbds://h/?tls-certificate=/a",
            "unknown parameter 'tls-certificate' (nbds:// knows tls-certificates, tls-verify-peer)"
        )
        rejects("nbds://h/?socket=/s", "unknown parameter 'socket'")
        rejects("nbd://h/?tls-psk-file=/k", "unknown parameter 'tls-psk-file'")
        rejects("nbds://:10809/", "missing host")
        rejects("nbds://h:port/", "bad port")
        rejects("nbds://h:65536/", "bad port")
    }

    /// Invariant: a relative certificates directory is made absolute for the bus (which runs elsewhere),
    /// escaping what would break the query; absolute ones and other URIs are left alone.
    @Test func resolvingCertificatesDirectory() throws {
        let resolve = { NBDURI.resolvingCertificatesDirectory(in: $0, against: "/home/a b&c") }
        let resolved = resolve("nbds+unix:///e?socket=/s&tls-certificates=pki&tls-verify-peer=true")
        #expect(resolved == "nbds+unix:///e?socket=/s&tls-certificates=/home/a%20b%26c/pki&tls-verify-peer=true")
        #expect(try parse(resolved).tls?.certificates == "/home/a b&c/pki")
        for unchanged in [
            "nbds://h/?tls-certificates=/etc/pki", "nbds://h/?tls-certificates=%2Fetc", "nbds://h/e", "nbd://h/e?x",
        ] {
            #expect(resolve(unchanged) == unchanged)
        }
        #expect(
            NBDURI.resolvingCertificatesDirectory(in: "nbds://h/?tls-certificates=p", against: "/")
                == "nbds://h/?tls-certificates=/p"
        )
    }
}
