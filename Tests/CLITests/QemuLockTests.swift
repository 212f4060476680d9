import Glibc
import Testing
import VImageTestSupport

/// vdisk and qemu see each other's image locks (Sources/BlockIO/QemuImageLocks.swift): a process of either
/// kind writing an image makes the other refuse it, in both orders, on VIMG, qcow2 and backing files; and
/// what qemu allows alongside a writer (`qemu-img info -U`, a reader of a backing file) still works.
@Suite(
    .serialized,
    .enabled(if: VimgCLITests.hasQemu && Clients.vdiskBuilt && TestEnvironment.which("qemu-nbd") != nil)
)
struct QemuLockTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    func qemu(_ program: String, _ arguments: [String]) -> ProcessResult {
        run(TestEnvironment.which(program)!, arguments)
    }

    /// A qemu-nbd writer on `image` until the returned closure stops it.
    func qemuNBD(_ image: String, format: String, dir: String) throws -> () -> Void {
        let pidFile = dir + "/qemu-nbd.pid"
        let r = qemu(
            "qemu-nbd",
            ["--fork", "--persistent", "--pid-file=" + pidFile, "-k", dir + "/qemu.sock", "-f", format, image]
        )
        try #require(r.status == 0, "qemu-nbd: \(r.stderr)")
        let pid = try #require(pid_t(readFile(pidFile).filter(\.isNumber)))
        return {
            kill(pid, SIGTERM)
            for _ in 0..<500 where kill(pid, 0) == 0 { usleep(10_000) }
        }
    }

    /// `vdisk serve` of `image` until the returned closure stops it; nil (with its stderr) when it refused.
    func serve(_ image: String, dir: String) -> (stop: (() -> Void)?, said: String) {
        unlink(dir + "/vdisk.sock")
        guard let server = ServeProcess(["--socket", dir + "/vdisk.sock", image], directory: dir) else {
            return (nil, readFile(dir + "/serve.err"))
        }
        return ({ server.stop() }, "")
    }

    /// A new 64 MiB image of `kind` ("vimg", made by vimg; "qcow2", made by qemu-img) in `dir`.
    func makeImage(_ kind: String, in dir: String) throws -> String {
        let image = dir + "/disk." + kind
        let made =
            kind == "vimg"
            ? run(vimg, ["create", image, "64M"]) : qemu("qemu-img", ["create", "-f", "qcow2", image, "64M"])
        try #require(made.status == 0, "\(made.stderr)")
        return image
    }

    /// Invariant: while qemu writes an image, vdisk refuses to write it or read it (as `qemu-img info`
    /// does), naming the reason; once qemu is gone, it opens.
    @Test(arguments: ["vimg", "qcow2"]) func qemuFirstThenVdisk(_ kind: String) throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-qemulock")
        defer { TestEnvironment.remove(dir) }
        let image = try makeImage(kind, in: dir)
        // qemu sees a VIMG file as raw bytes: a user who points it there by mistake must be stopped too.
        let stopQemu = try qemuNBD(image, format: kind == "vimg" ? "raw" : "qcow2", dir: dir)
        var stopped = false
        defer { if !stopped { stopQemu() } }

        let served = serve(image, dir: dir)
        #expect(served.stop == nil && served.said.contains("in use"), "\(served.said)")
        served.stop?()
        if kind == "vimg" {
            let snapshot = run(vimg, ["snapshot", "-c", "s1", image])
            #expect(snapshot.status != 0 && snapshot.stderr.contains("in use"), "\(snapshot.stderr)")
        }
        let check = run(vimg, ["check", image])
        #expect(check.status != 0 && check.stderr.contains("in use"), "\(check.stdout)\(check.stderr)")

        stopQemu()
        stopped = true
        let again = serve(image, dir: dir)
        #expect(again.stop != nil, "\(again.said)")
        again.stop?()
    }

    /// Invariant: while vdisk serves an image read-write (VIMG or qcow2), qemu cannot write it, and opens
    /// it to read only as it may beside a running VM (a writer's image only with -U, force share); beside
    /// a read-only `vdisk serve`, a read-only qemu-nbd runs.
    @Test(arguments: ["vimg", "qcow2"]) func vdiskFirstThenQemu(_ kind: String) throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-qemulock")
        defer { TestEnvironment.remove(dir) }
        let image = try makeImage(kind, in: dir)
        let format = kind == "vimg" ? "raw" : "qcow2"
        let served = serve(image, dir: dir)
        let stop = try #require(served.stop, "\(served.said)")
        var stopped = false
        defer { if !stopped { stop() } }

        let write = qemu("qemu-io", ["-f", format, "-c", "write 0 4k", image])
        #expect(write.status != 0 && write.stderr.contains("lock"), "\(write.stdout)\(write.stderr)")
        // A read-only qemu-nbd export does not share writing (qemu-io does share everything, so it is no
        // test): beside a writer it is refused; beside a read-only server it runs.
        let reader = qemu(
            "qemu-nbd",
            ["-r", "--fork", "--pid-file=" + dir + "/reader.pid", "-k", dir + "/reader.sock", "-f", format, image]
        )
        #expect(reader.status != 0 && reader.stderr.contains("lock"), "\(reader.stdout)\(reader.stderr)")
        let forced = qemu("qemu-img", ["info", "-U", "-f", format, image])
        #expect(forced.status == 0, "\(forced.stderr)")
        // And our own info, the same way.
        let info = run(vimg, ["info", image])
        let ourForced = run(vimg, ["info", "-U", image])
        #expect(ourForced.status == 0 && ourForced.stdout.contains("virtual size: 64 MiB"), "\(ourForced.stderr)")
        #expect(info.status != 0 && info.stderr.contains("another process"), "\(info.stderr)")
        stop()
        stopped = true

        // Served read-only, the image may be read by a read-only qemu-nbd as well.
        unlink(dir + "/vdisk.sock")
        let readOnly = try #require(
            ServeProcess(["--read-only", "--socket", dir + "/vdisk.sock", image], directory: dir),
            "\(readFile(dir + "/serve.err"))"
        )
        defer { _ = readOnly.stop() }
        let second = qemu(
            "qemu-nbd",
            ["-r", "--fork", "--pid-file=" + dir + "/reader.pid", "-k", dir + "/reader.sock", "-f", format, image]
        )
        #expect(second.status == 0, "\(second.stderr)")
        if let pid = pid_t(readFile(dir + "/reader.pid").filter(\.isNumber)) { kill(pid, SIGTERM) }
    }

    /// Invariant: the backing file of a served clone is locked as qemu locks a backing file: qemu cannot
    /// write it, may read it; and a backing file qemu is writing cannot be put under a vdisk clone.
    @Test func backingFilesAreLockedToo() throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-qemulock")
        defer { TestEnvironment.remove(dir) }
        let base = dir + "/base.qcow2"
        let top = dir + "/top.vimg"
        #expect(qemu("qemu-img", ["create", "-f", "qcow2", base, "64M"]).status == 0)
        #expect(run(vimg, ["clone", base, top]).status == 0)
        do {
            let served = serve(top, dir: dir)
            let stop = try #require(served.stop, "\(served.said)")
            defer { stop() }
            let write = qemu("qemu-io", ["-f", "qcow2", "-c", "write 0 4k", base])
            #expect(write.status != 0 && write.stderr.contains("lock"), "\(write.stderr)")
            let read = qemu("qemu-io", ["-r", "-f", "qcow2", "-c", "read 0 4k", base])
            #expect(read.status == 0, "\(read.stderr)")
        }
        let stopQemu = try qemuNBD(base, format: "qcow2", dir: dir)
        defer { stopQemu() }
        let served = serve(top, dir: dir)
        #expect(served.stop == nil && served.said.contains("in use"), "\(served.said)")
        served.stop?()
    }
}
