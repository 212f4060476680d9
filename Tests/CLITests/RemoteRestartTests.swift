import Glibc
import Testing
import VImageTestSupport

/// A remote disk riding out its server's restart, end to end through the kernel (FUSE file, loop device,
/// ext4) as root: the server goes away under a load of fsynced writes and comes back within the reconnect
/// timeout, and nothing above the bus notices but a pause.
@Suite(.serialized, .enabled(if: busTestsCanRun, "needs root, /dev/fuse and /dev/loop-control"))
struct RemoteRestartTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    /// The server of the remote export: `vdisk serve` over a VIMG image, or qemu-nbd over a raw file.
    enum Server: String, Sendable { case vdiskServe, qemuNBD }

    /// How the server goes away: a restart (SIGTERM: it answers what it has, flushes and exits), or a crash
    /// of `vdisk serve` (SIGKILL: the VIMG allocation metadata of writes it acknowledged since the last
    /// flush dies with it, so the client must write them again).
    enum Outage: String, CaseIterable, Sendable {
        case vdiskServeRestart, vdiskServeKilled, qemuNBDRestart
        var server: Server { self == .qemuNBDRestart ? .qemuNBD : .vdiskServe }
        var signal: Int32 { self == .vdiskServeKilled ? SIGKILL : SIGTERM }
    }

    /// Starts the server on `socket` (export "exp") and waits until it listens; returns its pid.
    func start(_ server: Server, image: String, socket: String, log: String) throws -> pid_t {
        let pid: pid_t?
        switch server {
        case .vdiskServe:
            pid = spawn(vdisk, ["serve", "--socket", socket, "--export", "exp", image], stderr: log)
        case .qemuNBD:
            pid = spawn(
                TestEnvironment.which("qemu-nbd")!,
                ["-f", "raw", "-k", socket, "-x", "exp", "--persistent", image],
                stderr: log
            )
        }
        let started = try #require(pid, "cannot start \(server)")
        for _ in 0..<400 where access(socket, F_OK) != 0 { usleep(25_000) }
        try #require(access(socket, F_OK) == 0, "\(server) did not start: \(readFile(log))")
        return started
    }

    /// The remote disk's link state as `vdisk list --output=json` reports it ("connected", ...).
    func linkState(_ h: BusTests.Harness) -> String? {
        let list = h.vd(["list", "--output=json"]).stdout
        guard let range = list.firstRange(of: "\"state\" : \"") else { return nil }
        return String(list[range.upperBound...].prefix { $0 != "\"" })
    }

    /// Polls `condition` every 50 ms for up to 60 s.
    func waitUntil(_ condition: () -> Bool) -> Bool {
        for _ in 0..<1200 {
            if condition() { return true }
            usleep(50_000)
        }
        return false
    }

    /// Invariant: with ext4 mounted from a remote export and a writer fsyncing file after file, stopping the
    /// server (SIGTERM, or SIGKILL for `vdisk serve`) for three seconds and starting it again costs no I/O
    /// error: the writer never fails, `vdisk list` shows the link reconnecting during the outage and
    /// connected after it, fsck finds the file system clean, and every file whose fsync returned reads back
    /// intact after a remount.
    @Test(arguments: Outage.allCases.filter { $0.server == .vdiskServe || TestEnvironment.which("qemu-nbd") != nil })
    func serverRestartUnderLoad(_ outage: Outage) throws {
        let server = outage.server
        let h = BusTests.Harness(vdisk: vdisk)
        var pid: pid_t?
        defer {
            // The bus first: with the server gone, unplugging would wait out the reconnect timeout.
            h.stopAndCheckClean()
            if let pid {
                kill(pid, SIGTERM)
                waitForExit(pid)
            }
        }
        let image = h.dir + "/remote.img"
        let socket = h.dir + "/remote.sock"
        let serverLog = h.dir + "/server.err"
        let create = run(
            vimg,
            server == .qemuNBD ? ["create", "-f", "raw", image, "128M"] : ["create", image, "128M"]
        )
        try #require(create.status == 0, "\(create.stderr)")
        pid = try start(server, image: image, socket: socket, log: serverLog)

        let device = try h.plug(["nbd+unix:///exp?socket=\(socket)", "--name", "remote"])
        #expect(linkState(h) == "connected")
        let mkfs = run("mkfs.ext4", ["-q", device])
        try #require(mkfs.status == 0, "\(mkfs.stderr)")
        let point = h.dir + "/m"
        mkdir(point, 0o755)
        let mount = run("mount", [device, point])
        try #require(mount.status == 0, "\(mount.stderr)")
        var mounted = true
        defer { if mounted { _ = run("umount", ["-l", point]) } }

        // The writer: 256 KiB files, each fsynced by dd, its checksum logged (outside the disk) only after
        // the fsync returned; the first error stops it and is logged.
        let written = h.dir + "/written.sha256"
        let errors = h.dir + "/writer.err"
        let stop = h.dir + "/stop"
        let writer = try #require(
            spawn(
                "/bin/sh",
                [
                    "-c",
                    """
                    i=0
                    while [ ! -e \(stop) ]; do
                        i=$((i + 1))
                        dd if=/dev/urandom of=\(point)/f$i bs=64k count=4 conv=fsync status=none 2>>\(errors) || exit 1
                        sha256sum \(point)/f$i >> \(written)
                    done
                    """,
                ]
            )
        )
        defer { killIfRunning(writer) }
        func filesWritten() -> Int { readFile(written).split(separator: "\n").count }

        // Markers, not sleeps: the writer is under way, then the disk is waiting for the server.
        #expect(waitUntil { filesWritten() >= 20 }, "the writer did not get going: \(readFile(errors))")
        kill(pid!, outage.signal)
        let stopped = waitForExit(pid!)
        #expect(
            stopped == (outage.signal == SIGKILL ? 128 + SIGKILL : 0),
            "\(server) did not stop: \(readFile(serverLog))"
        )
        pid = nil
        #expect(waitUntil { linkState(h) == "reconnecting" }, "\(h.vd(["list", "--output=json"]).stdout)")
        let before = filesWritten()
        // The outage itself: the server stays away this long on purpose.
        usleep(3_000_000)
        #expect(filesWritten() <= before + 1, "files were fsynced while the server was away")
        pid = try start(server, image: image, socket: socket, log: serverLog)
        #expect(waitUntil { filesWritten() >= before + 20 }, "the writer did not resume: \(readFile(errors))")
        #expect(linkState(h) == "connected")

        writeFile(stop, "")
        let status = waitForExit(writer)
        #expect(status == 0, "the writer failed: \(readFile(errors))")
        #expect(readFile(errors).isEmpty, "\(readFile(errors))")

        #expect(run("umount", [point]).status == 0)
        mounted = false
        let fsck = run("fsck.ext4", ["-f", "-n", device])
        #expect(fsck.status == 0, "fsck.ext4 -f -n: \(fsck.stdout)\(fsck.stderr)")
        #expect(run("mount", [device, point]).status == 0)
        let verify = run("sha256sum", ["--quiet", "-c", written])
        #expect(verify.status == 0, "files differ after the restart: \(verify.stdout)\(verify.stderr)")
        #expect(run("umount", [point]).status == 0)
        let unplug = h.vd(["unplug", "remote"])
        #expect(unplug.status == 0, "\(unplug.stderr)")
    }

    /// Invariant: unplugging a remote disk whose server is gone does not wait out the reconnect timeout (up
    /// to a day): the final flush waits about 10 s for the server, then the disk is closed and the unplug
    /// says that writes the server had not flushed are lost; nothing is left behind.
    @Test func unplugWithTheServerGoneIsBounded() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/remote.img"
        let socket = h.dir + "/remote.sock"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        let pid = try start(.vdiskServe, image: image, socket: socket, log: h.dir + "/server.err")
        defer { killIfRunning(pid) }
        let device = try h.plug(["nbd+unix:///exp?socket=\(socket)", "--name", "remote", "--reconnect-timeout", "300"])
        let write = run("dd", ["if=/dev/urandom", "of=" + device, "bs=1M", "count=4", "oflag=direct", "status=none"])
        #expect(write.status == 0, "\(write.stderr)")
        kill(pid, SIGKILL)
        waitForExit(pid)
        let started = monotonicNow()
        let unplug = h.vd(["unplug", "remote"])
        let took = monotonicNow() - started
        #expect(took < 30, "unplug took \(took) s")
        #expect(unplug.status != 0 && unplug.stderr.contains("did not come back"), "\(unplug.stderr)")
        #expect(h.vd(["list"]).stdout == "No disks are plugged.\n")
    }
}

/// `vdisk plug --reconnect-timeout`, checked before any bus is involved.
@Suite struct ReconnectTimeoutOptionTests {
    /// Invariant: the option is refused (usage error, 64, one sentence) for files, and outside 0...86400 s
    /// (negative, too long, not a number, NaN), so a remote disk can never be told to wait for ever.
    @Test(.enabled(if: Clients.vdiskBuilt)) func refusals() {
        let vdisk = TestEnvironment.product("vdisk")
        for (arguments, message) in [
            (["--reconnect-timeout", "5", "/tmp/disk.vimg"], "is for remote exports"),
            (["--reconnect-timeout=-1", "nbd://host/disk"], "between 0 and 86400"),
            (["--reconnect-timeout", "86401", "nbd://host/disk"], "between 0 and 86400"),
            (["--reconnect-timeout", "nan", "nbd://host/disk"], "between 0 and 86400"),
            (["--reconnect-timeout", "soon", "nbd://host/disk"], "is invalid"),
        ] {
            let result = run(vdisk, ["plug"] + arguments, environment: ["VDISK_RUNTIME_DIR": "/nonexistent"])
            #expect(result.status == 64, "\(arguments): \(result.stderr)")
            #expect(result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
    }
}
