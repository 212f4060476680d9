import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

// `vdisk serve` checked against real NBD clients: libnbd's nbdinfo, nbdcopy and nbdsh, and QEMU's
// qemu-img and qemu-io. Each test starts the built binary on a unix socket (or TCP) over a VIMG image made
// by the built `vimg`, and skips only when the client program is missing.

/// A `vdisk serve` process running in the background.
final class ServeProcess {
    let pid: pid_t
    let directory: String
    let stderrPath: String
    /// The "serving ... on ..." line, once the server is ready.
    private(set) var banner = ""

    /// Starts `vdisk serve ARGS` and waits until it prints its banner (or exits).
    init?(_ arguments: [String], directory: String, name: String = "serve") {
        self.directory = directory
        stderrPath = directory + "/\(name).err"
        guard
            let pid = spawn(
                TestEnvironment.product("vdisk"),
                ["serve"] + arguments,
                stdout: directory + "/\(name).out",
                stderr: stderrPath
            )
        else { return nil }
        self.pid = pid
        for _ in 0..<200 {
            let text = readFile(stderrPath)
            if let line = text.split(separator: "\n").first(where: { $0.contains("serving") }) {
                banner = String(line)
                return
            }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid { return nil }
            usleep(50_000)
        }
        kill(pid, SIGKILL)
        return nil
    }

    var stderr: String { readFile(stderrPath) }

    /// The TCP port from the banner (`tcp:HOST:PORT`).
    var tcpPort: Int? {
        guard let word = banner.split(separator: " ").first(where: { $0.hasPrefix("tcp:") }),
            let colon = word.lastIndex(of: ":")
        else { return nil }
        return Int(word[word.index(after: colon)...].prefix { $0.isNumber })
    }

    func signal(_ number: Int32) { kill(pid, number) }

    /// Sends `number` and waits up to 30 s for the exit; returns the exit status (128+n for a signal).
    @discardableResult
    func stop(_ number: Int32 = SIGTERM) -> Int32 {
        kill(pid, number)
        return wait()
    }

    func wait() -> Int32 { waitForExit(pid) }

    deinit { killIfRunning(pid) }
}

/// A temporary directory with a fresh 64 MiB VIMG image and a server on a unix socket in it.
final class ServedImage {
    let directory = TestEnvironment.temporaryDirectory("vdisk-nbd")
    var image: String { directory + "/disk.vimg" }
    var socket: String { directory + "/nbd.sock" }
    var uri: String { "nbd+unix:///?socket=\(socket)" }
    private(set) var server: ServeProcess?

    init(start: Bool = true, serveArguments: [String] = []) throws {
        let created = run(TestEnvironment.product("vimg"), ["create", image, "64M"])
        try #require(created.status == 0, "vimg create: \(created.stderr)")
        if start { try self.start(serveArguments) }
    }

    func start(_ arguments: [String] = [], images: [String]? = nil) throws {
        server = ServeProcess(["--socket", socket] + arguments + (images ?? [image]), directory: directory)
        try #require(server != nil, "vdisk serve did not start: \(readFile(directory + "/serve.err"))")
    }

    /// Stops the server with SIGTERM; returns its exit status.
    @discardableResult
    func stop() -> Int32 {
        defer { server = nil }
        return server?.stop() ?? -1
    }

    deinit {
        server = nil
        TestEnvironment.remove(directory)
    }
}

enum Clients {
    static let nbdinfo = TestEnvironment.which("nbdinfo")
    static let nbdcopy = TestEnvironment.which("nbdcopy")
    static let qemuImg = TestEnvironment.which("qemu-img")
    static let qemuIO = TestEnvironment.which("qemu-io")
    /// nbdsh runs `python3 -mnbd`; Debian's python3 has the libnbd bindings, so pin PATH to it.
    static let nbdsh: String? =
        access("/usr/bin/nbdsh", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/nbdsh" : nil
    static let vdiskBuilt =
        access(TestEnvironment.product("vdisk"), X_OK) == 0 && access(TestEnvironment.product("vimg"), X_OK) == 0

    /// Runs an nbdsh script (Python, with `nbd` imported) against `uri`; the handle `h` is connected
    /// with base:allocation requested. The URI may name local files (`tls-certificates=DIR`), which
    /// libnbd refuses unless allowed.
    static func nbdshScript(_ uri: String, _ body: String) -> ProcessResult {
        let script = """
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.set_uri_allow_local_file(True)
            h.connect_uri(\(pythonString(uri)))
            \(body)
            """
        return run(nbdsh!, ["-c", script], environment: ["PATH": "/usr/bin:/bin"])
    }

    static func pythonString(_ text: String) -> String { "'" + text.replacingAll("'", with: "\\'") + "'" }
}

extension String {
    func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}

/// Certificate directories for the TLS tests, laid out as each program reads them.
struct TLSDirectories {
    /// For `vdisk serve --tls-certificates`: server-cert.pem, server-key.pem, ca-cert.pem.
    let server: String
    /// For libnbd and qemu clients presenting the CA's client certificate.
    let client: String
    /// For clients with no certificate of their own: ca-cert.pem only.
    let anonymous: String
    /// For a client presenting a certificate the CA did not sign.
    let stranger: String

    init(in base: String) throws {
        let certificates = try #require(TestCertificates.shared, "openssl could not make certificates")
        server = base + "/pki-server"
        client = base + "/pki-client"
        anonymous = base + "/pki-anonymous"
        stranger = base + "/pki-stranger"
        for directory in [server, client, anonymous, stranger] { mkdir(directory, 0o700) }
        certificates.writeServerFiles(to: server)
        certificates.writeClientFiles(to: client, identity: .client)
        certificates.writeClientFiles(to: anonymous, identity: .none)
        certificates.writeClientFiles(to: stranger, identity: .stranger)
    }
}

/// libnbd URIs for TLS: over the unix socket, or TCP (where libnbd checks the certificate's IP SAN).
func tlsURI(socket: String, certificates: String) -> String {
    "nbds+unix:///?socket=\(socket)&tls-certificates=\(certificates)"
}

func tlsURI(port: Int, certificates: String) -> String {
    "nbds://127.0.0.1:\(port)/?tls-certificates=\(certificates)"
}

/// The `--object` and `--image-opts` arguments for qemu-img and qemu-io to reach an export over TLS; on a
/// unix socket qemu needs a name to check the certificate against, and the certificate says `localhost`.
func qemuTLSArguments(socket: String? = nil, port: Int? = nil, certificates: String) -> [String] {
    let server =
        if let port { "server.type=inet,server.host=127.0.0.1,server.port=\(port)" } else {
            "server.type=unix,server.path=\(socket!),tls-hostname=localhost"
        }
    return [
        "--object", "tls-creds-x509,id=tls0,dir=\(certificates),endpoint=client",
        "--image-opts", "driver=nbd,\(server),tls-creds=tls0",
    ]
}

/// Runs `qemu-io -f raw URI -c ... -c ...` and returns the result.
@discardableResult
func qemuIO(_ uri: String, _ commands: [String], readOnly: Bool = false) -> ProcessResult {
    run(Clients.qemuIO!, (readOnly ? ["-r"] : []) + ["-f", "raw", uri] + commands.flatMap { ["-c", $0] })
}

/// An endless load on an export from libnbd (Debian's python3): pipelined 64 KiB writes of 0x43 to
/// [8 MiB, 40 MiB), and write-zeroes and trims in [40 MiB, 48 MiB), eight requests in flight, until the
/// first error. Each acknowledged write's offset is printed as it completes, so a test can wait for a
/// number of them (a marker) and then stop the server knowing the load is still running: the
/// interleaving is forced, not hoped for.
final class WriteLoad {
    let pid: pid_t
    let output: String

    static let script = """
        import collections
        chunk = 65536
        data = nbd.Buffer.from_bytearray(bytearray(b'\\x43' * chunk))
        pending = collections.deque()
        n = 0
        try:
            while True:
                while len(pending) < 8:
                    if n % 4 == 3:
                        off = (40 << 20) + (n * chunk) % (8 << 20)
                        cookie = h.aio_zero(chunk, off) if n % 8 == 3 else h.aio_trim(chunk, off)
                    else:
                        off = (8 << 20) + (n * chunk) % (32 << 20)
                        cookie = h.aio_pwrite(data, off)
                    pending.append((cookie, n % 4 != 3, off))
                    n += 1
                while not h.aio_command_completed(pending[0][0]):
                    h.poll(-1)
                cookie, wrote, off = pending.popleft()
                if wrote:
                    print(off, flush=True)
        except nbd.Error as e:
            print('stopped:', e.string, flush=True)
        """

    init?(uri: String, directory: String) {
        output = directory + "/load.out"
        guard
            let pid = spawn(
                "/usr/bin/python3",
                ["-m", "nbd", "-c", "h.connect_uri(\(Clients.pythonString(uri)))", "-c", Self.script],
                stdout: output,
                stderr: directory + "/load.err"
            )
        else { return nil }
        self.pid = pid
    }

    /// Offsets of the writes acknowledged so far.
    var acknowledged: [UInt64] { readFile(output).split(separator: "\n").compactMap { UInt64($0) } }

    /// Waits (up to 60 s) until `count` writes were acknowledged; false if the load ended or never got there.
    func waitForAcknowledged(_ count: Int) -> Bool {
        for _ in 0..<1200 {
            if acknowledged.count >= count { return true }
            if readFile(output).contains("stopped:") { return false }
            usleep(50_000)
        }
        return false
    }

    /// Waits for the load to end by itself (after the server went away).
    @discardableResult
    func wait() -> Int32 { waitForExit(pid) }

    deinit { killIfRunning(pid) }
}

/// qemu-io commands that check `pattern` in 64 KiB at each of `offsets` (each once).
func patternChecks(_ offsets: [UInt64], pattern: String) -> [String] {
    Set(offsets).sorted().map { "read -P \(pattern) \($0) 64k" }
}

@Suite(.serialized, .enabled(if: Clients.vdiskBuilt)) struct NBDInteropTests {
    /// Invariant: nbdinfo sees the size, the write-side capabilities of a writable export, the
    /// base:allocation map of a fresh image, and the export list.
    @Test(.enabled(if: Clients.nbdinfo != nil)) func nbdinfo() throws {
        let served = try ServedImage()
        let size = run(Clients.nbdinfo!, ["--size", served.uri])
        #expect(size.status == 0)
        #expect(size.stdout == "67108864\n")
        for capability in ["write", "flush", "trim", "zero", "fua", "multi-conn", "fast-zero", "cache"] {
            #expect(run(Clients.nbdinfo!, ["--can", capability, served.uri]).status == 0, "can \(capability)")
        }
        #expect(run(Clients.nbdinfo!, ["--is", "read-only", served.uri]).status == 2)
        let map = run(Clients.nbdinfo!, ["--map", served.uri])
        #expect(map.status == 0)
        #expect(map.stdout.contains("67108864    3  hole,zero"), "\(map.stdout)")
        let list = run(Clients.nbdinfo!, ["--list", served.uri])
        #expect(list.status == 0)
        #expect(list.stdout.contains("export=\"disk.vimg\""))
        #expect(served.stop() == 0)
    }

    /// Invariant: a read-only export says so and refuses writes; the image is untouched.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func readOnly() throws {
        let served = try ServedImage(serveArguments: ["--read-only"])
        #expect(run(Clients.nbdinfo!, ["--is", "read-only", served.uri]).status == 0)
        #expect(run(Clients.nbdinfo!, ["--can", "write", served.uri]).status == 2)
        #expect(run(Clients.nbdinfo!, ["--can", "trim", served.uri]).status == 2)
        #expect(qemuIO(served.uri, ["read -P 0 0 1M"], readOnly: true).status == 0)
        #expect(qemuIO(served.uri, ["write -P 1 0 4k"]).status != 0)
        #expect(served.stop() == 0)
    }

    /// Invariant: qemu-io's write, read-back pattern check, write-zeroes, discard and flush all work, and
    /// the image checks clean after a SIGTERM.
    @Test(.enabled(if: Clients.qemuIO != nil)) func qemuIOCommands() throws {
        let served = try ServedImage()
        let result = qemuIO(
            served.uri,
            [
                "write -P 0xab 0 1M", "read -P 0xab 0 1M", "write -P 0xcd 1M 3M", "read -P 0xcd 1M 3M",
                "write -z 2M 1M", "read -P 0 2M 1M", "discard 0 512k", "read -P 0 0 512k", "read -P 0xab 512k 512k",
                "write -P 0x11 5000 333", "read -P 0x11 5000 333", "flush",
            ]
        )
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(!result.stdout.contains("Pattern verification failed"), "\(result.stdout)")
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: with `--cache=none` (O_DIRECT image files) aligned and unaligned writes, write-zeroes,
    /// discards and flushes read back; the image checks clean and reads the same through the page cache.
    @Test(.enabled(if: Clients.qemuIO != nil)) func cacheNone() throws {
        let served = try ServedImage(serveArguments: ["--cache=none"])
        let commands = [
            "write -P 0xab 0 1M", "write -P 0x11 5000 333", "write -P 0x22 1048575 2", "write -P 0x33 3M 4097",
            "write -z 2M 1000", "discard 128k 64k", "flush",
        ]
        let reads = [
            "read -P 0xab 0 5000", "read -P 0x11 5000 333", "read -P 0xab 5333 125739", "read -P 0 128k 64k",
            "read -P 0xab 192k 851967", "read -P 0x22 1048575 2", "read -P 0 2M 1000", "read -P 0x33 3M 4097",
        ]
        let result = qemuIO(served.uri, commands + reads)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(!result.stdout.contains("Pattern verification failed"), "\(result.stdout)")
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
        try served.start()  // default cache mode: the same bytes through the page cache
        let again = qemuIO(served.uri, reads)
        #expect(again.status == 0 && !again.stdout.contains("Pattern verification failed"), "\(again.stdout)")
        #expect(served.stop() == 0)
    }

    /// Invariant: qemu-img sees a raw disk of the right size, converts it to a raw file and compares equal.
    @Test(.enabled(if: Clients.qemuImg != nil && Clients.qemuIO != nil)) func qemuImg() throws {
        let served = try ServedImage()
        qemuIO(served.uri, ["write -P 0x5a 3M 2M", "write -P 0x77 40M 64k"])
        let info = run(Clients.qemuImg!, ["info", served.uri])
        #expect(info.status == 0)
        #expect(info.stdout.contains("67108864 bytes"), "\(info.stdout)")
        let copy = served.directory + "/copy.raw"
        let convert = run(Clients.qemuImg!, ["convert", "-O", "raw", served.uri, copy])
        #expect(convert.status == 0, "\(convert.stderr)")
        let compare = run(Clients.qemuImg!, ["compare", "-f", "raw", "-F", "raw", served.uri, copy])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        // And it notices a difference.
        qemuIO(served.uri, ["write -P 0x01 10M 512"])
        #expect(run(Clients.qemuImg!, ["compare", "-f", "raw", "-F", "raw", served.uri, copy]).status == 1)
        #expect(served.stop() == 0)
    }

    /// Invariant: nbdcopy of random data into the export and back out gives the same checksum.
    @Test(.enabled(if: Clients.nbdcopy != nil)) func nbdcopyRoundTrip() throws {
        let served = try ServedImage()
        let source = served.directory + "/source.raw"
        let back = served.directory + "/back.raw"
        #expect(run("/bin/sh", ["-c", "head -c 67108864 /dev/urandom > \(source)"]).status == 0)
        let upload = run(Clients.nbdcopy!, [source, served.uri])
        #expect(upload.status == 0, "\(upload.stderr)")
        let download = run(Clients.nbdcopy!, [served.uri, back])
        #expect(download.status == 0, "\(download.stderr)")
        let sums = run("/usr/bin/sha256sum", [source, back]).stdout.split(separator: "\n").map { $0.prefix(64) }
        #expect(sums.count == 2 && sums[0] == sums[1])
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: base:allocation follows writes, write-zeroes and trims; out-of-range requests fail with
    /// EINVAL/ENOSPC from the server (libnbd's own checks off) and the connection stays usable.
    @Test(.enabled(if: Clients.nbdsh != nil)) func nbdshBlockStatusAndErrors() throws {
        let served = try ServedImage()
        let result = Clients.nbdshScript(
            served.uri,
            """
            def status(offset, length):
                found = []
                def callback(metacontext, off, entries, err):
                    found.extend(entries)
                h.block_status(length, offset, callback)
                return found
            assert status(0, 65536)[1] == 3, status(0, 65536)
            h.pwrite(b'\\xab' * 65536, 0)
            assert status(0, 65536)[1] == 0, status(0, 65536)
            h.pwrite(b'\\xcd' * 65536, 65536)
            h.zero(65536, 65536)
            assert status(65536, 65536)[1] & 2 == 2, status(65536, 65536)
            assert h.pread(65536, 65536) == bytes(65536)
            h.trim(65536, 0)
            assert status(0, 65536)[1] & 2 == 2, status(0, 65536)
            assert h.pread(16, 0) == bytes(16)
            h.set_strict_mode(0)
            size = h.get_size()
            for name, call, errno in [
                ('read past end', lambda: h.pread(2, size - 1), (22, 'EINVAL')),
                ('write past end', lambda: h.pwrite(b'x' * 2, size - 1), (28, 'ENOSPC')),
                ('zero-length read', lambda: h.pread(0, 0), (22, 'EINVAL')),
            ]:
                try:
                    call()
                    raise SystemExit(name + ' did not fail')
                except nbd.Error as e:
                    assert e.errno in errno, (name, e.errno, e.string)
            assert h.pread(4, 0) == bytes(4)
            h.flush()
            h.shutdown()
            print('ok')
            """
        )
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(result.stdout.contains("ok"))
        #expect(served.stop() == 0)
    }

    /// Invariant: a read-only export answers writes with EPERM (libnbd's checks off, so the server decides).
    @Test(.enabled(if: Clients.nbdsh != nil)) func nbdshReadOnlyErrors() throws {
        let served = try ServedImage(serveArguments: ["--read-only"])
        let result = Clients.nbdshScript(
            served.uri,
            """
            assert h.is_read_only()
            h.set_strict_mode(0)
            for call in [lambda: h.pwrite(b'x', 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)]:
                try:
                    call()
                    raise SystemExit('write succeeded on a read-only export')
                except nbd.Error as e:
                    assert e.errno in (1, 'EPERM'), e.errno
            assert h.pread(1, 0) == b'\\x00'
            print('ok')
            """
        )
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(served.stop() == 0)
    }

    /// Invariant: the spec points of issue 11, checked by libnbd with its own checks off so the server
    /// decides: FUA is accepted on every command (the export offers SEND_FUA); TRIM and CACHE past the end
    /// fail with EINVAL while WRITE and WRITE_ZEROES past the end fail with ENOSPC; a client of the default
    /// export '' that lists the exports finds the one it is using (its canonical name).
    @Test(.enabled(if: Clients.nbdsh != nil)) func nbdshSpecPoints() throws {
        let served = try ServedImage()
        let result = Clients.nbdshScript(
            served.uri,
            """
            assert h.can_fua()
            h.set_strict_mode(0)
            size = h.get_size()
            fua = nbd.CMD_FLAG_FUA
            h.pwrite(b'\\x5a' * 4096, 0, fua)
            assert h.pread(4096, 0, fua) == b'\\x5a' * 4096
            h.flush(fua)
            h.cache(4096, 0, fua)
            h.zero(4096, 8192, fua)
            h.trim(4096, 8192, fua)
            h.block_status(4096, 0, lambda metacontext, offset, entries, err: 0, fua)
            for name, call, errno in [
                ('trim past end', lambda: h.trim(2, size - 1), (22, 'EINVAL')),
                ('cache past end', lambda: h.cache(2, size - 1), (22, 'EINVAL')),
                ('write past end', lambda: h.pwrite(b'xy', size - 1), (28, 'ENOSPC')),
                ('zero past end', lambda: h.zero(2, size - 1), (28, 'ENOSPC')),
            ]:
                try:
                    call()
                    raise SystemExit(name + ' did not fail')
                except nbd.Error as e:
                    assert e.errno in errno, (name, e.errno, e.string)
            h.shutdown()

            lister = nbd.NBD()
            lister.set_opt_mode(True)
            lister.connect_uri(\(Clients.pythonString(served.uri)))
            names = []
            lister.opt_list(lambda name, description: names.append(name) or 0)
            lister.opt_info()
            assert lister.get_canonical_export_name() in names, (lister.get_canonical_export_name(), names)
            lister.opt_go()
            assert lister.get_canonical_export_name() == 'disk.vimg', lister.get_canonical_export_name()
            lister.shutdown()
            print('ok')
            """
        )
        #expect(result.status == 0 && result.stdout.contains("ok"), "\(result.stdout)\(result.stderr)")
        #expect(served.stop() == 0)
    }

    /// Invariant: several connections writing disjoint ranges at once all land; a client vanishing with
    /// requests in flight does not disturb a later one.
    @Test(.enabled(if: Clients.qemuIO != nil && Clients.nbdsh != nil)) func concurrentAndVanishingClients() throws {
        let served = try ServedImage()
        let writers = (0..<6).compactMap { i in
            spawn(Clients.qemuIO!, ["-f", "raw", served.uri, "-c", "write -P \(0x21 + i) \(i * 8)M 8M"])
        }
        #expect(writers.count == 6)
        for writer in writers { #expect(waitForExit(writer) == 0) }
        let vanish = Clients.nbdshScript(
            served.uri,
            """
            import os
            buf = nbd.Buffer(4 << 20)
            for i in range(16):
                h.aio_pread(buf, i * (4 << 20))
            h.poll(0)
            os._exit(0)
            """
        )
        #expect(vanish.status == 0, "\(vanish.stderr)")
        let check = qemuIO(served.uri, (0..<6).map { "read -P \(0x21 + $0) \($0 * 8)M 8M" })
        #expect(check.status == 0 && !check.stdout.contains("Pattern verification failed"), "\(check.stdout)")
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: SIGTERM in the middle of a write load (a marker: 32 writes acknowledged, the load still
    /// running) lets the server finish, exit 0 and leave a clean image in which every acknowledged write
    /// reads back, and so does what was written before.
    @Test(.enabled(if: Clients.qemuIO != nil && Clients.nbdsh != nil)) func sigtermLeavesCleanImage() throws {
        let served = try ServedImage()
        qemuIO(served.uri, ["write -P 0x42 0 2M"])
        let load = try #require(WriteLoad(uri: served.uri, directory: served.directory))
        #expect(load.waitForAcknowledged(32), "\(readFile(load.output).suffix(300))")
        #expect(served.stop() == 0)
        load.wait()
        let acknowledged = load.acknowledged
        #expect(readFile(load.output).contains("stopped:"), "the load ended before the server stopped")
        let check = run(TestEnvironment.product("vimg"), ["check", served.image])
        #expect(check.status == 0, "\(check.stdout)")
        try served.start()
        let readBack = qemuIO(served.uri, ["read -P 0x42 0 2M"] + patternChecks(acknowledged, pattern: "0x43"))
        #expect(readBack.status == 0 && !readBack.stdout.contains("Pattern verification failed"), "\(readBack.stdout)")
        served.stop()
    }

    /// Invariant: kill -9 in the middle of a write load (a marker: 32 writes acknowledged, the load still
    /// running) never corrupts the image (check exits 0 or 3), and data flushed before the kill reads back
    /// after a restart on the same (now stale) socket path.
    @Test(.enabled(if: Clients.qemuIO != nil && Clients.nbdsh != nil)) func killDuringWrites() throws {
        let served = try ServedImage()
        let flushed = qemuIO(served.uri, ["write -P 0x99 48M 4M", "flush"])
        #expect(flushed.status == 0)
        let load = try #require(WriteLoad(uri: served.uri, directory: served.directory))
        #expect(load.waitForAcknowledged(32), "\(readFile(load.output).suffix(300))")
        #expect(served.server?.stop(SIGKILL) == 128 + SIGKILL)
        load.wait()
        #expect(readFile(load.output).contains("stopped:"), "the load ended before the server was killed")
        let check = run(TestEnvironment.product("vimg"), ["check", served.image])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout)\(check.stderr)")
        try served.start()
        let readBack = qemuIO(served.uri, ["read -P 0x99 48M 4M"])
        #expect(readBack.status == 0 && !readBack.stdout.contains("Pattern verification failed"), "\(readBack.stdout)")
        #expect(served.stop() == 0)
    }

    /// Invariant: with --port the server listens on 127.0.0.1 only, and clients reach it at nbd://.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func tcp() throws {
        let served = try ServedImage(start: false)
        let server = try #require(
            ServeProcess(["--port", "0", "--export", "tcpdisk", served.image], directory: served.directory)
        )
        #expect(server.banner.contains("tcp:127.0.0.1:"))
        let port = try #require(server.tcpPort)
        let uri = "nbd://127.0.0.1:\(port)/tcpdisk"
        #expect(run(Clients.nbdinfo!, ["--size", uri]).stdout == "67108864\n")
        let io = qemuIO(uri, ["write -P 0x3c 0 1M", "read -P 0x3c 0 1M"])
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"))
        // The default export "" is the first image too.
        #expect(run(Clients.nbdinfo!, ["--size", "nbd://127.0.0.1:\(port)"]).status == 0)
        #expect(run(Clients.nbdinfo!, ["--size", "nbd://127.0.0.1:\(port)/nope"]).status != 0)
        #expect(server.stop() == 0)
    }

    /// Invariant: several images are several exports named after their files; --snapshot serves a
    /// snapshot read-only; the stats file counts what happened.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func exportsSnapshotsAndStats() throws {
        let served = try ServedImage(start: false)
        let vimg = TestEnvironment.product("vimg")
        let second = served.directory + "/second.vimg"
        #expect(run(vimg, ["create", second, "1M"]).status == 0)
        let stats = served.directory + "/stats.json"
        try served.start(["--stats-file", stats], images: [served.image, second])
        let list = run(Clients.nbdinfo!, ["--list", served.uri])
        #expect(list.stdout.contains("export=\"disk.vimg\"") && list.stdout.contains("export=\"second.vimg\""))
        #expect(
            run(Clients.nbdinfo!, ["--size", "nbd+unix:///second.vimg?socket=\(served.socket)"]).stdout == "1048576\n"
        )
        qemuIO(served.uri, ["write -P 0x61 0 1M"])
        served.server?.signal(SIGUSR1)
        var text = ""
        for _ in 0..<50 where !text.contains("\"bytes-written\": 1048576") {
            usleep(100_000)
            text = readFile(stats)
        }
        #expect(text.contains("\"bytes-written\": 1048576"), "\(text)")
        #expect(served.stop() == 0)

        #expect(run(vimg, ["snapshot", "-c", "before", served.image]).status == 0)
        try served.start()
        qemuIO(served.uri, ["write -P 0x62 0 1M"])
        served.stop()
        try served.start(["--snapshot", "before"])
        #expect(run(Clients.nbdinfo!, ["--is", "read-only", served.uri]).status == 0)
        let old = qemuIO(served.uri, ["read -P 0x61 0 1M"], readOnly: true)
        #expect(old.status == 0 && !old.stdout.contains("Pattern verification failed"), "\(old.stdout)")
        #expect(served.stop() == 0)
    }

    /// Invariant: under systemd socket activation the server adopts fd 3 and needs no --socket.
    @Test(.enabled(if: Clients.nbdinfo != nil && TestEnvironment.which("systemd-socket-activate") != nil))
    func socketActivation() throws {
        let served = try ServedImage(start: false)
        let activator = try #require(
            spawn(
                TestEnvironment.which("systemd-socket-activate")!,
                ["-l", served.socket, TestEnvironment.product("vdisk"), "serve", served.image],
                stderr: served.directory + "/activate.err"
            )
        )
        for _ in 0..<100 where access(served.socket, F_OK) != 0 { usleep(50_000) }
        let size = run(Clients.nbdinfo!, ["--size", served.uri])
        #expect(size.stdout == "67108864\n", "\(size.stderr)\(readFile(served.directory + "/activate.err"))")
        // systemd-socket-activate execs the server in place, so the pid is now vdisk's.
        kill(activator, SIGTERM)
        #expect(waitForExit(activator) == 0)
        #expect(readFile(served.directory + "/activate.err").contains("on fd:3"))
    }

    /// Invariant: with --tls=require, libnbd gets the export over TLS on the unix socket and on TCP (the
    /// certificate checked against the CA and 127.0.0.1), sees it negotiated TLS, and reads and writes
    /// through it; plaintext clients are refused on both listeners; the image checks clean.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.nbdsh != nil && TestCertificates.shared != nil))
    func tlsRequired() throws {
        let served = try ServedImage(start: false)
        let pki = try TLSDirectories(in: served.directory)
        try served.start(["--port", "0", "--tls=require", "--tls-certificates", pki.server])
        let server = try #require(served.server)
        #expect(server.banner.contains("(TLS required)"), "\(server.banner)")
        let port = try #require(server.tcpPort)

        let overSocket = tlsURI(socket: served.socket, certificates: pki.anonymous)
        let info = run(Clients.nbdinfo!, [overSocket])
        #expect(info.status == 0, "\(info.stderr)")
        #expect(info.stdout.contains("with TLS"), "\(info.stdout)")
        #expect(info.stdout.contains("export-size: 67108864"), "\(info.stdout)")
        let overTCP = run(Clients.nbdinfo!, ["--size", tlsURI(port: port, certificates: pki.anonymous)])
        #expect(overTCP.status == 0 && overTCP.stdout == "67108864\n", "\(overTCP.stderr)")
        let list = run(Clients.nbdinfo!, ["--list", overSocket])
        #expect(list.status == 0 && list.stdout.contains("export=\"disk.vimg\""), "\(list.stdout)\(list.stderr)")

        for plain in [served.uri, "nbd://127.0.0.1:\(port)"] {
            let refused = run(Clients.nbdinfo!, ["--size", plain])
            #expect(refused.status != 0, "\(plain): \(refused.stdout)")
            #expect(refused.stderr.contains("TLS"), "\(refused.stderr)")
        }

        let script = Clients.nbdshScript(
            overSocket,
            """
            assert h.get_tls_negotiated()
            h.pwrite(b'\\x5a' * 65536, 1048576)
            assert h.pread(65536, 1048576) == b'\\x5a' * 65536
            found = []
            h.block_status(65536, 1048576, lambda metacontext, offset, entries, err: found.extend(entries))
            assert found[1] == 0, found
            h.flush()
            h.shutdown()
            print('ok')
            """
        )
        #expect(script.status == 0 && script.stdout.contains("ok"), "\(script.stdout)\(script.stderr)")

        // SIGTERM with a TLS client connected and idle: a clean exit and a clean image.
        let idleOutput = served.directory + "/idle.out"
        // nbdsh itself runs whichever python3 is first on PATH; spawn Debian's directly (see Clients.nbdsh).
        let idle = spawn(
            "/usr/bin/python3",
            [
                "-m", "nbd", "-c", "h.set_uri_allow_local_file(True)", "-c",
                "h.connect_uri(\(Clients.pythonString(overSocket)))",
                "-c", "h.pwrite(b'x', 0); print('connected', flush=True)", "-c", "import time; time.sleep(30)",
            ],
            stdout: idleOutput
        )
        for _ in 0..<200 where !readFile(idleOutput).contains("connected") { usleep(50_000) }
        #expect(readFile(idleOutput).contains("connected"))
        #expect(served.stop() == 0)
        if let idle {
            kill(idle, SIGKILL)
            waitForExit(idle)
        }
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: with --tls=on, the same server serves plaintext and TLS clients alike.
    @Test(.enabled(if: Clients.nbdinfo != nil && TestCertificates.shared != nil)) func tlsOptional() throws {
        let served = try ServedImage(start: false)
        let pki = try TLSDirectories(in: served.directory)
        try served.start(["--tls=on", "--tls-certificates", pki.server])
        #expect(served.server?.banner.contains("(TLS offered)") == true)
        let plain = run(Clients.nbdinfo!, [served.uri])
        #expect(plain.status == 0 && plain.stdout.contains("without TLS"), "\(plain.stdout)\(plain.stderr)")
        let secure = run(Clients.nbdinfo!, [tlsURI(socket: served.socket, certificates: pki.anonymous)])
        #expect(secure.status == 0 && secure.stdout.contains("with TLS"), "\(secure.stdout)\(secure.stderr)")
        #expect(served.stop() == 0)
    }

    /// Invariant: qemu's TLS client (tls-creds-x509) reaches a --tls=require server on the unix socket and
    /// on TCP; qemu-io's writes read back with the pattern; plaintext qemu-img is refused.
    @Test(.enabled(if: Clients.qemuImg != nil && Clients.qemuIO != nil && TestCertificates.shared != nil))
    func qemuOverTLS() throws {
        let served = try ServedImage(start: false)
        let pki = try TLSDirectories(in: served.directory)
        try served.start(["--port", "0", "--tls=require", "--tls-certificates", pki.server])
        let port = try #require(served.server?.tcpPort)

        let commands = ["write -P 0xc3 0 2M", "read -P 0xc3 0 2M", "write -z 1M 64k", "read -P 0 1M 64k", "flush"]
        let io = run(
            Clients.qemuIO!,
            qemuTLSArguments(socket: served.socket, certificates: pki.anonymous) + commands.flatMap { ["-c", $0] }
        )
        #expect(io.status == 0, "\(io.stdout)\(io.stderr)")
        #expect(io.stdout.contains("wrote 2097152/2097152"), "\(io.stdout)")
        #expect(!io.stdout.contains("Pattern verification failed"), "\(io.stdout)")

        let info = run(Clients.qemuImg!, ["info"] + qemuTLSArguments(port: port, certificates: pki.anonymous))
        #expect(info.status == 0 && info.stdout.contains("67108864 bytes"), "\(info.stdout)\(info.stderr)")
        let readBack = run(
            Clients.qemuIO!,
            qemuTLSArguments(port: port, certificates: pki.anonymous)
                + ["-r", "-c", "read -P 0xc3 0 1M", "-c", "read -P 0xc3 1088k 960k"]
        )
        #expect(readBack.status == 0, "\(readBack.stdout)\(readBack.stderr)")
        #expect(!readBack.stdout.contains("Pattern verification failed"), "\(readBack.stdout)")

        #expect(run(Clients.qemuImg!, ["info", served.uri]).status != 0)
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: with --tls-verify-peer, a client without a certificate or with one the CA did not sign is
    /// refused in the TLS handshake; libnbd and qemu presenting the CA's client certificate get through.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil && TestCertificates.shared != nil))
    func tlsVerifyPeer() throws {
        let served = try ServedImage(start: false)
        let pki = try TLSDirectories(in: served.directory)
        try served.start(["--tls=require", "--tls-verify-peer", "--tls-certificates", pki.server])
        #expect(served.server?.banner.contains("(TLS required, client certificates verified)") == true)

        for refused in [pki.anonymous, pki.stranger] {
            let result = run(Clients.nbdinfo!, ["--size", tlsURI(socket: served.socket, certificates: refused)])
            #expect(result.status != 0, "\(refused): \(result.stdout)")
        }
        let accepted = run(Clients.nbdinfo!, ["--size", tlsURI(socket: served.socket, certificates: pki.client)])
        #expect(accepted.status == 0 && accepted.stdout == "67108864\n", "\(accepted.stderr)")

        let io = run(
            Clients.qemuIO!,
            qemuTLSArguments(socket: served.socket, certificates: pki.client)
                + ["-c", "write -P 0x7e 4M 64k", "-c", "read -P 0x7e 4M 64k"]
        )
        #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io.stdout)\(io.stderr)")
        let anonymous = run(
            Clients.qemuIO!,
            qemuTLSArguments(socket: served.socket, certificates: pki.anonymous) + ["-c", "read 0 4k"]
        )
        #expect(anonymous.status != 0)
        #expect(served.stop() == 0)
    }

    /// Invariant: TLS options that cannot work are usage errors (64); certificate files that are missing,
    /// not files, malformed or mismatched stop the server before it listens, with one line naming the file
    /// and exit status 1.
    @Test(.enabled(if: TestCertificates.shared != nil)) func badTLSInvocations() throws {
        let vdisk = TestEnvironment.product("vdisk")
        let served = try ServedImage(start: false)
        let pki = try TLSDirectories(in: served.directory)
        let serve = ["serve", "--socket", served.socket]
        for usage in [
            ["--tls=on"], ["--tls=require"], ["--tls-certificates", pki.server], ["--tls-verify-peer"], ["--tls=maybe"],
            ["--tls=off", "--tls-certificates", pki.server],
        ] {
            let result = run(vdisk, serve + usage + [served.image])
            #expect(result.status == 64, "\(usage): \(result.stderr)")
        }

        func expectFailure(
            _ arguments: [String],
            _ message: String,
            sourceLocation: SourceLocation = #_sourceLocation
        ) {
            let result = run(vdisk, serve + ["--tls=require"] + arguments + [served.image])
            #expect(result.status == 1, "\(arguments): \(result.stderr)", sourceLocation: sourceLocation)
            #expect(result.stderr.hasPrefix("vdisk: error: "), "\(result.stderr)", sourceLocation: sourceLocation)
            #expect(result.stderr.contains(message), "\(result.stderr)", sourceLocation: sourceLocation)
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)", sourceLocation: sourceLocation)
            #expect(access(served.socket, F_OK) != 0, sourceLocation: sourceLocation)
        }
        expectFailure(["--tls-certificates", served.directory + "/nowhere"], "nowhere: No such file or directory")
        expectFailure(["--tls-certificates", served.image], "is not a directory")
        expectFailure(["--tls-certificates", pki.client], "server-cert.pem: No such file or directory")

        let certificates = try #require(TestCertificates.shared)
        let broken = served.directory + "/pki-broken"
        mkdir(broken, 0o700)
        certificates.writeServerFiles(to: broken)
        writeFile(broken + "/server-cert.pem", "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
        expectFailure(["--tls-certificates", broken], "server-cert.pem holds no PEM certificate")
        certificates.writeServerFiles(to: broken)
        writeFile(broken + "/server-key.pem", certificates.strangerKey)
        expectFailure(["--tls-certificates", broken], "does not belong to the server certificate")
        unlink(broken + "/server-key.pem")
        mkdir(broken + "/server-key.pem", 0o700)
        expectFailure(["--tls-certificates", broken], "server-key.pem: Is a directory")
        rmdir(broken + "/server-key.pem")
        certificates.writeServerFiles(to: broken)
        unlink(broken + "/ca-cert.pem")
        expectFailure(["--tls-certificates", broken, "--tls-verify-peer"], "ca-cert.pem: No such file or directory")
    }

    /// Invariant: bad invocations fail calmly with one line and exit status 1 (64 for usage errors).
    @Test func badInvocations() throws {
        let vdisk = TestEnvironment.product("vdisk")
        let noListener = run(vdisk, ["serve", "/nonexistent.vimg"])
        #expect(noListener.status == 64)
        let missing = run(vdisk, ["serve", "--socket", "/tmp/vdisk-never.sock", "/nonexistent/disk.vimg"])
        #expect(missing.status == 1)
        #expect(missing.stderr.hasPrefix("vdisk: error: "), "\(missing.stderr)")
        #expect(missing.stderr.split(separator: "\n").count == 1)
        let badCache = run(vdisk, ["serve", "--cache=fast", "--socket", "/tmp/vdisk-never.sock", "/nonexistent.vimg"])
        #expect(badCache.status == 64 && badCache.stderr.contains("writeback"), "\(badCache.stderr)")
    }
}
