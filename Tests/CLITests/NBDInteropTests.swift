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
        guard let pid = spawn(TestEnvironment.product("vdisk"), ["serve"] + arguments, stdout: directory + "/\(name).out", stderr: stderrPath)
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

    deinit {
        var status: Int32 = 0
        if waitpid(pid, &status, WNOHANG) == 0 {
            kill(pid, SIGKILL)
            waitpid(pid, &status, 0)
        }
    }
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
    static let nbdsh: String? = access("/usr/bin/nbdsh", X_OK) == 0 && access("/usr/bin/python3", X_OK) == 0 ? "/usr/bin/nbdsh" : nil
    static let vdiskBuilt = access(TestEnvironment.product("vdisk"), X_OK) == 0 && access(TestEnvironment.product("vimg"), X_OK) == 0

    /// Runs an nbdsh script (Python, with `nbd` imported) against `uri`; the handle `h` is connected
    /// with base:allocation requested.
    static func nbdshScript(_ uri: String, _ body: String) -> ProcessResult {
        let script = """
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
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

/// Runs `qemu-io -f raw URI -c ... -c ...` and returns the result.
@discardableResult
func qemuIO(_ uri: String, _ commands: [String], readOnly: Bool = false) -> ProcessResult {
    run(Clients.qemuIO!, (readOnly ? ["-r"] : []) + ["-f", "raw", uri] + commands.flatMap { ["-c", $0] })
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
            ])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
        #expect(!result.stdout.contains("Pattern verification failed"), "\(result.stdout)")
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
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
        let source = served.directory + "/source.raw", back = served.directory + "/back.raw"
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
            """)
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
            """)
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
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
            """)
        #expect(vanish.status == 0, "\(vanish.stderr)")
        let check = qemuIO(served.uri, (0..<6).map { "read -P \(0x21 + $0) \($0 * 8)M 8M" })
        #expect(check.status == 0 && !check.stdout.contains("Pattern verification failed"), "\(check.stdout)")
        #expect(served.stop() == 0)
        #expect(run(TestEnvironment.product("vimg"), ["check", served.image]).status == 0)
    }

    /// Invariant: SIGTERM during a write load lets the server finish, exit 0 and leave a clean image
    /// whose acknowledged data reads back.
    @Test(.enabled(if: Clients.qemuIO != nil)) func sigtermLeavesCleanImage() throws {
        let served = try ServedImage()
        qemuIO(served.uri, ["write -P 0x42 0 2M"])
        let load = spawn(Clients.qemuIO!, ["-f", "raw", served.uri, "-c", "write -P 0x43 8M 16M", "-c", "write -P 0x44 24M 16M"])
        #expect(load != nil)
        usleep(200_000)
        #expect(served.stop() == 0)
        if let load { waitForExit(load) }
        let check = run(TestEnvironment.product("vimg"), ["check", served.image])
        #expect(check.status == 0, "\(check.stdout)")
        try served.start()
        #expect(qemuIO(served.uri, ["read -P 0x42 0 2M"]).stdout.contains("Pattern verification failed") == false)
        served.stop()
    }

    /// Invariant: kill -9 under a write load never corrupts the image (check exits 0 or 3), and data
    /// flushed before the kill reads back after a restart on the same (now stale) socket path.
    @Test(.enabled(if: Clients.qemuIO != nil)) func killDuringWrites() throws {
        let served = try ServedImage()
        let flushed = qemuIO(served.uri, ["write -P 0x99 1M 4M", "flush"])
        #expect(flushed.status == 0)
        let load = spawn(Clients.qemuIO!, ["-f", "raw", served.uri, "-c", "write -P 0x10 8M 24M", "-c", "write -z 40M 8M", "-c", "discard 1M 64k"])
        usleep(300_000)
        #expect(served.server?.stop(SIGKILL) == 128 + SIGKILL)
        if let load { waitForExit(load) }
        let check = run(TestEnvironment.product("vimg"), ["check", served.image])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout)\(check.stderr)")
        try served.start()
        let readBack = qemuIO(served.uri, ["read -P 0x99 2M 3M"])
        #expect(readBack.status == 0 && !readBack.stdout.contains("Pattern verification failed"), "\(readBack.stdout)")
        #expect(served.stop() == 0)
    }

    /// Invariant: with --port the server listens on 127.0.0.1 only, and clients reach it at nbd://.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func tcp() throws {
        let served = try ServedImage(start: false)
        let server = try #require(ServeProcess(["--port", "0", "--export", "tcpdisk", served.image], directory: served.directory))
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
        #expect(run(Clients.nbdinfo!, ["--size", "nbd+unix:///second.vimg?socket=\(served.socket)"]).stdout == "1048576\n")
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
                stderr: served.directory + "/activate.err"))
        for _ in 0..<100 where access(served.socket, F_OK) != 0 { usleep(50_000) }
        let size = run(Clients.nbdinfo!, ["--size", served.uri])
        #expect(size.stdout == "67108864\n", "\(size.stderr)\(readFile(served.directory + "/activate.err"))")
        // systemd-socket-activate execs the server in place, so the pid is now vdisk's.
        kill(activator, SIGTERM)
        #expect(waitForExit(activator) == 0)
        #expect(readFile(served.directory + "/activate.err").contains("on fd:3"))
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
    }
}
