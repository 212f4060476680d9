import BlockIO
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

// Crash testing end to end (docs/CRASH.md): power cuts of `vdisk plug --crash-sim` disks under ext4 and
// raw writers, through the kernel (FUSE + loop, as root); write logs recorded by `--record` and replayed
// by `vimg replay`; the same through `vdisk serve` and its control socket (no root needed).

/// The kernel paths: the bus's requirements, and ext4's tools.
@Suite(
    .serialized,
    .enabled(
        if: busTestsCanRun && TestEnvironment.which("fsck.ext4") != nil,
        "needs root, /dev/fuse, loop and e2fsprogs"
    )
)
struct PowerCutTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    func sh(_ script: String) -> ProcessResult { run("/bin/sh", ["-c", script]) }

    /// The bytes of a VIMG image's disk (converted to raw next to it).
    func diskBytes(_ image: String) throws -> [UInt8] {
        let raw = image + ".raw"
        let converted = run(vimg, ["convert", "-O", "raw", image, raw])
        try #require(converted.status == 0, "vimg convert: \(converted.stderr)")
        defer { unlink(raw) }
        return try contents(raw)
    }

    /// Writes `writes` (offset, byte) to a fresh 16 MiB `--crash-sim=SEED` disk with O_DIRECT and no
    /// flush, each 4 KiB of that byte, cuts the power, and returns the image's disk afterwards.
    func powerCut(
        _ h: BusTests.Harness,
        seed: UInt64,
        mode: [String],
        writes: [(offset: Int, byte: UInt8, count: Int)]
    ) throws -> (bytes: [UInt8], report: String) {
        let image = h.dir + "/raw-writer.vimg"
        unlink(image)
        #expect(run(vimg, ["create", image, "16M"]).status == 0)
        let device = try h.plug(["--crash-sim=\(seed)", "--name", "raw", image])
        for (offset, byte, count) in writes {
            let data = h.dir + "/data"
            unlink(data)
            let file = try FileDevice.open(path: data, readOnly: false, create: true, growable: true)
            try file.write([UInt8](repeating: byte, count: count), at: 0)
            try file.close()
            let written = run(
                "dd",
                ["if=\(data)", "of=\(device)", "bs=\(count)", "seek=\(offset / count)", "oflag=direct", "status=none"]
            )
            try #require(written.status == 0, "dd: \(written.stderr)")
        }
        let crash = h.vd(["crash", "raw"] + mode)
        try #require(crash.status == 0, "vdisk crash: \(crash.stderr)")
        #expect(crash.stdout.hasPrefix("power cut on raw: seed \(seed), mode \(mode[1])"), "\(crash.stdout)")
        // The dead disk fails every I/O.
        let dead = sh("dd if=\(device) of=/dev/null bs=4096 count=1 iflag=direct status=none")
        #expect(dead.status != 0, "a read after the power cut succeeded")
        #expect(h.vd(["unplug", "raw"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
        return (try diskBytes(image), crash.stdout)
    }

    /// Invariant: ext4 (data=ordered, journal) on a `--crash-sim` disk, its power cut at a seed-chosen
    /// write during a workload that fsyncs, always mounts again, `fsck.ext4 -fn` finds nothing, and every
    /// file whose fsync returned is intact; in drop, reorder and tear modes, 10 seeds (`Tools/crash-loop.sh
    /// N` runs more).
    @Test func ext4SurvivesSeededPowerCuts() throws {
        let loop = run(
            "/bin/bash",
            [TestEnvironment.packageRoot + "/Tools/crash-loop.sh", "10", "1"],
            environment: ["VDISK_BIN_DIR": String(vdisk.dropLast("/vdisk".count))]
        )
        #expect(loop.status == 0, "\(loop.stdout)\(loop.stderr)")
        #expect(loop.stdout.contains("10 of 10 seeds passed"), "\(loop.stdout)")
        // The cuts landed mid-load: most found writes in the cache.
        let busy = loop.stdout.split(separator: "\n").filter { $0.contains(" in the cache;") }
        #expect(busy.count >= 5, "\(loop.stdout)")
    }

    /// Invariant: a canary writer (a record, then its commit marker, no flush between) is caught - marker
    /// on the disk, record not - by `reorder` in some seeds, and never by `drop`.
    @Test func canaryIsCaughtByReorderNeverByDrop() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        // Eight canaries per power cut: record i at 1 MiB + 8 KiB * i, its marker at 4 KiB * i.
        var writes: [(offset: Int, byte: UInt8, count: Int)] = []
        for i in 0..<8 { writes += [((1 << 20) + 8192 * i, 0xA0 + UInt8(i), 4096), (4096 * i, 0xC0 + UInt8(i), 512)] }
        var caught: [String: Int] = [:]
        for mode in ["drop", "reorder"] {
            for seed in UInt64(1)...4 {
                let (bytes, _) = try powerCut(h, seed: seed, mode: ["--mode", mode], writes: writes)
                for i in 0..<8 {
                    let marker = bytes[4096 * i] == 0xC0 + UInt8(i)
                    let record = bytes[(1 << 20) + 8192 * i] == 0xA0 + UInt8(i)
                    if marker && !record { caught[mode, default: 0] += 1 }
                }
            }
        }
        #expect(caught["drop"] == nil, "drop mode let a marker through without its record")
        #expect((caught["reorder"] ?? 0) > 0, "reorder mode never caught the canary in 4 seeds x 8 canaries")
    }

    /// Invariant: the simulator really loses data: a writer that never flushes loses writes in most seeds
    /// (a simulator that kept everything would fail this), all of them in `drop` mode.
    @Test func unflushedWritesAreLost() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let writes = (0..<16).map { (offset: 65_536 * $0, byte: UInt8(0x31 + $0), count: 4096) }
        let modes = [["--mode", "reorder"], ["--mode", "tear", "--tear-size", "512"], ["--mode", "drop"]]
        var seedsWithLoss = 0
        for seed in UInt64(1)...9 {
            let mode = modes[Int(seed) % modes.count]
            let (bytes, report) = try powerCut(h, seed: seed, mode: mode, writes: writes)
            let kept = writes.filter { w in bytes[w.offset..<w.offset + w.count].allSatisfy { $0 == w.byte } }.count
            if kept < writes.count { seedsWithLoss += 1 }
            if mode[1] == "drop" { #expect(kept == 0, "seed \(seed): drop kept \(kept) unflushed writes") }
            #expect(report.contains("16 writes (64 KiB) in the cache"), "\(report)")
        }
        #expect(seedsWithLoss >= 7, "only \(seedsWithLoss) of 9 seeds lost an unflushed write")
    }

    /// Invariant: a disk recorded with `--record` while ext4 works on it replays, up to every flush point
    /// of its log, to images that mount and `fsck.ext4 -fn` clean; up to a mark, to the files of that
    /// moment; and the whole log to the disk as it was unplugged.
    @Test func replayAtEveryFlushPointMountsClean() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/recorded.vimg"
        let log = h.dir + "/recorded.log"
        let point = h.dir + "/m"
        mkdir(point, 0o755)
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        let fresh = try h.plug(["--name", "rec", image])
        #expect(run("mkfs.ext4", ["-q", fresh]).status == 0)
        #expect(h.vd(["unplug", "rec"]).status == 0)
        let device = try h.plug(["--name", "rec", "--record", log, image])
        #expect(run("mount", [device, point]).status == 0)
        let work = sh(
            """
            set -e
            for i in 1 2 3 4; do head -c $((i * 50000)) /dev/urandom > \(point)/f$i; sync \(point)/f$i \(point); done
            (cd \(point) && sha256sum f1 f2 f3 f4) > \(h.dir)/sums
            """
        )
        try #require(work.status == 0, "\(work.stderr)")
        let mark = h.vd(["mark", "rec", "four files"])
        #expect(mark.status == 0 && mark.stdout.contains("mark 'four files' is record"), "\(mark.stdout)\(mark.stderr)")
        #expect(sh("head -c 300000 /dev/urandom > \(point)/later && rm \(point)/f1").status == 0)
        #expect(run("umount", [point]).status == 0)
        #expect(h.vd(["unplug", "rec"]).status == 0)

        let listed = run(vimg, ["replay", "--list", log])
        #expect(listed.status == 0, "\(listed.stderr)")
        let flushes = listed.stdout.split(separator: "\n").filter { $0.hasPrefix("flush ") }.count
        #expect(listed.stdout.contains("ended cleanly") && flushes >= 4, "\(listed.stdout)")
        let out = h.dir + "/replayed.raw"
        for n in 0...flushes {
            let replay = run(vimg, ["replay", "-O", "raw", "--until-flush", "\(n)", log, image, out])
            try #require(replay.status == 0, "flush \(n): \(replay.stderr)")
            #expect(run("mount", ["-o", "loop", out, point]).status == 0, "flush \(n) does not mount")
            #expect(run("umount", [point]).status == 0)
            let fsck = run("fsck.ext4", ["-fn", out])
            #expect(fsck.status == 0, "flush \(n): fsck.ext4 -fn: \(fsck.stdout)\(fsck.stderr)")
        }
        let atMark = run(vimg, ["replay", "-O", "raw", "--until-mark", "four files", log, image, out])
        try #require(atMark.status == 0, "\(atMark.stderr)")
        #expect(run("mount", ["-o", "loop", out, point]).status == 0)
        let sums = sh("cd \(point) && sha256sum -c \(h.dir)/sums")
        #expect(sums.status == 0, "the files at the mark: \(sums.stdout)")
        #expect(run("umount", [point]).status == 0)
        let whole = run(vimg, ["replay", "-O", "raw", log, image, out])
        #expect(whole.status == 0 && run(vimg, ["compare", out, image]).status == 0, "\(whole.stderr)")
    }

    /// Invariant: crash-testing requests the disk cannot honour are refused with a clear message, and
    /// leave nothing plugged.
    @Test func refusedRequests() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/plain.vimg"
        let raw = h.dir + "/plain.raw"
        #expect(run(vimg, ["create", image, "16M"]).status == 0)
        #expect(run(vimg, ["create", "-f", "raw", raw, "16M"]).status == 0)
        _ = try h.plug(["--name", "plain", image])
        let noSim = h.vd(["crash", "plain"])
        #expect(noSim.status == 1 && noSim.stderr.contains("was not plugged with --crash-sim"), "\(noSim.stderr)")
        let noLog = h.vd(["mark", "plain", "x"])
        #expect(noLog.status == 1 && noLog.stderr.contains("was not plugged with --record"), "\(noLog.stderr)")
        #expect(h.vd(["unplug", "plain"]).status == 0)
        let rawRecord = h.vd(["plug", "--record", h.dir + "/raw.log", raw])
        #expect(
            rawRecord.status == 1 && rawRecord.stderr.contains("--record needs a VIMG image"),
            "\(rawRecord.stderr)"
        )
        let readOnly = h.vd(["plug", "--read-only", "--crash-sim", image])
        #expect(readOnly.status == 1 && readOnly.stderr.contains("need a writable disk"), "\(readOnly.stderr)")
        #expect(sh("echo > \(h.dir)/exists.log").status == 0)
        let exists = h.vd(["plug", "--record", h.dir + "/exists.log", image])
        #expect(exists.status == 1 && exists.stderr.contains("already exists"), "\(exists.stderr)")
        let tear = h.vd(["crash", "plain", "--tear-size", "4K"])
        #expect(tear.status == 64 && tear.stderr.contains("--tear-size goes with --mode tear"), "\(tear.stderr)")
        #expect(h.vd(["list"]).stdout == "No disks are plugged.\n")
        // A failed --record leaves no log and no start snapshot behind.
        #expect(access(h.dir + "/raw.log", F_OK) != 0)
        #expect(!run(vimg, ["snapshot", "-l", image]).stdout.contains("vdisk-record"))
    }
}

/// A file's bytes.
func contents(_ path: String) throws -> [UInt8] {
    let file = try FileDevice.open(path: path, readOnly: true)
    defer { try? file.close() }
    return try file.read(count: Int(file.size), at: 0)
}

/// `vdisk serve --crash-sim --record --control-socket`: no root needed.
@Suite(.enabled(if: Clients.vdiskBuilt && Clients.nbdsh != nil, "needs the built vdisk and nbdsh"))
struct ServePowerCutTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    /// Invariant: a served export with `--crash-sim` loses its unflushed write at `vdisk crash --mode
    /// drop` through the control socket, fails I/O afterwards, and the server still stops cleanly; its
    /// `--record` log replays to the flushed state and to the end; bad logs, and a log replayed on another
    /// image, are refused with one clear line.
    @Test func servedExportCrashesAndReplays() throws {
        let served = try ServedImage(start: false)
        let dir = served.directory
        let log = dir + "/disk.log"
        let control = dir + "/control.sock"
        try served.start(["--crash-sim=5", "--record", log, "--control-socket", control])
        #expect(served.server!.stderr.contains("crash simulation, seed 5"), "\(served.server!.stderr)")
        let write = Clients.nbdshScript(
            served.uri,
            "h.pwrite(b'\\x11' * 65536, 0)\nh.flush()\nh.pwrite(b'\\x22' * 65536, 65536)"
        )
        #expect(write.status == 0, "\(write.stderr)")
        let mark = run(vdisk, ["mark", "disk.vimg", "two writes", "--control-socket", control])
        #expect(mark.status == 0, "\(mark.stderr)")
        let unknown = run(vdisk, ["crash", "other", "--control-socket", control])
        #expect(unknown.status == 1 && unknown.stderr.contains("no export named 'other'"), "\(unknown.stderr)")
        let crash = run(vdisk, ["crash", "disk.vimg", "--mode", "drop", "--control-socket", control])
        #expect(
            crash.stdout
                == "power cut on disk.vimg: seed 5, mode drop: 1 write (64 KiB) in the cache; 0 landed, 1 lost\n",
            "\(crash.stdout)\(crash.stderr)"
        )
        let dead = Clients.nbdshScript(served.uri, "h.pread(4096, 0)")
        #expect(dead.status != 0, "a read after the power cut succeeded")
        #expect(served.stop() == 0, "\(readFile(dir + "/serve.err"))")
        #expect(run(vimg, ["check", served.image]).status == 0)

        let expected = [UInt8](repeating: 0x11, count: 65_536) + [UInt8](repeating: 0, count: 65_536)
        let written = [UInt8](repeating: 0x11, count: 65_536) + [UInt8](repeating: 0x22, count: 65_536)
        func firstBytes(_ path: String, _ format: String) throws -> [UInt8] {
            let raw = path + ".bytes"
            try #require(run(vimg, ["convert", "-f", format, "-O", "raw", path, raw]).status == 0)
            defer { unlink(raw) }
            return Array(try contents(raw).prefix(131_072))
        }
        // The image holds what survived; the log, what the client was told was written.
        #expect(try firstBytes(served.image, "vimg") == expected)
        let out = dir + "/out.vimg"
        #expect(run(vimg, ["replay", "--until-flush", "1", log, served.image, out]).status == 0)
        #expect(try firstBytes(out, "vimg") == expected)
        let whole = run(vimg, ["replay", "--until-mark", "two writes", log, served.image, out])
        #expect(whole.status == 0 && whole.stdout.contains("2 writes"), "\(whole.stdout)\(whole.stderr)")
        #expect(try firstBytes(out, "vimg") == written)

        // Refusals: one line each, exit 1, no output left behind.
        func refused(_ arguments: [String], saying text: String) {
            unlink(out)
            let r = run(vimg, ["replay"] + arguments)
            #expect(r.status == 1 && r.stderr.hasPrefix("vimg: error: ") && r.stderr.contains(text), "\(r.stderr)")
            #expect(r.stderr.split(separator: "\n").count == 1, "\(r.stderr)")
            #expect(access(out, F_OK) != 0)
        }
        let other = dir + "/other.vimg"
        #expect(run(vimg, ["create", other, "64M"]).status == 0)
        refused([log, other, out], saying: "the log was recorded on image")
        refused(["--until-flush", "7", log, served.image, out], saying: "the log has only 1 flush")
        #expect(run("/bin/cp", [log, dir + "/cut.log"]).status == 0)
        #expect(run("truncate", ["-s", "-20", dir + "/cut.log"]).status == 0)
        refused([dir + "/cut.log", served.image, out], saying: "truncated")
        #expect(run("/bin/cp", [log, dir + "/bad.log"]).status == 0)
        let flip = run(
            "/bin/sh",
            ["-c", "printf '\\377' | dd of=\(dir)/bad.log bs=1 seek=600 conv=notrunc status=none"]
        )
        #expect(flip.status == 0)
        refused([dir + "/bad.log", served.image, out], saying: "corrupt log")
        refused([served.image, served.image, out], saying: "not a vdisk write log")
        let listed = run(vimg, ["replay", "--list", dir + "/cut.log"])
        #expect(listed.status == 1 && listed.stdout.contains("flush 1: record"), "\(listed.stdout)")
    }
}
