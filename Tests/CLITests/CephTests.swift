import BlockIO
import Dispatch
import ImageFormats
import RBD
import Synchronization
import Testing
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

// Images in a real Ceph cluster (one monitor, one OSD, started once per test process by
// `CephTestCluster`): the RBD device under many threads, `vimg` on raw and VIMG-on-RBD images, qemu's rbd
// driver reading what we wrote and the reverse, a local clone of a golden image in Ceph, the exclusive lock
// and its fencing, faults that must be one clear line, the bus through FUSE + loop, and a cluster that
// goes away under a plugged disk. One serialized suite: the fault test stops the shared cluster.

@Suite(.serialized, .enabled(if: CephTestCluster.conf != nil, "no Ceph test cluster (see CephTestCluster's message)"))
struct CephTests {
    let vimg = TestEnvironment.product("vimg")
    let vdisk = TestEnvironment.product("vdisk")
    static let mib = 1 << 20

    func spec(_ name: String) throws -> RBDSpec { try RBDSpec(parsing: CephTestCluster.image(name)) }

    func vi(_ arguments: [String]) -> ProcessResult { run(vimg, arguments) }

    @discardableResult
    func must(_ program: String, _ arguments: [String]) -> ProcessResult {
        let r = run(program, arguments)
        #expect(r.status == 0, "\(program) \(arguments): \(r.stdout)\(r.stderr)")
        return r
    }

    /// Many threads at once through librbd's asynchronous requests read back exactly what a flat reference
    /// disk holds (writes, zeroes, discards of random sizes, seeds fixed and printed), and extents report
    /// the written object as data and untouched space as a hole.
    @Test func manyThreadsAgainstAReference() throws {
        let name = try spec("threads")
        try RBDDevice.create(name, size: 64 << 20)
        defer { try? RBDDevice.remove(name) }
        let device = try RBDDevice.open(name, readOnly: false)
        defer { try? device.close() }
        #expect(
            try device.extents(at: 0, count: 64 << 20) == [Extent(offset: 0, length: 64 << 20, flags: [.hole, .zero])]
        )
        // The reference lives as long as the image: each seed continues where the previous one left off.
        let reference = MemoryDevice(size: 64 << 20)
        for seed in TestSeeds.seeds(1..<3, test: "CephTests.manyThreadsAgainstAReference") {
            // Each thread owns a 8 MiB slice, so the reference needs no ordering between threads.
            let threads = 8
            let failures = Mutex<[String]>([])
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var rng = SeededRandom(seed: seed &+ UInt64(t))
                let base = UInt64(t) * (8 << 20)
                do {
                    for _ in 0..<40 {
                        let offset = base + rng.next() % (8 << 20 - 300_000)
                        let count = 1 + Int(rng.next() % 300_000)
                        switch rng.next() % 4 {
                        case 0:
                            try device.writeZeroes(at: offset, count: UInt64(count), mayUnmap: true, fast: false)
                            try reference.writeZeroes(at: offset, count: UInt64(count), mayUnmap: true, fast: false)
                        case 1:
                            let got = try device.read(count: count, at: offset)
                            let want = try reference.read(count: count, at: offset)
                            if let at = firstDifference(got[...], want[...]) {
                                failures.withLock { $0.append("seed \(seed) thread \(t): byte \(offset + UInt64(at))") }
                            }
                        default:
                            let bytes = Pattern.bytes(count: count, offset: offset, seed: rng.next())
                            try device.write(bytes, at: offset)
                            try reference.write(bytes, at: offset)
                        }
                    }
                } catch {
                    failures.withLock { $0.append("seed \(seed) thread \(t): \(error)") }
                }
            }
            #expect(failures.withLock { $0 } == [])
            try device.flush()
            let all = try device.read(count: 64 << 20, at: 0)
            #expect(firstDifference(all[...], try reference.read(count: 64 << 20, at: 0)[...]) == nil, "seed \(seed)")
        }
        let extents = try device.extents(at: 0, count: 64 << 20)
        #expect(extents.contains { $0.flags.isEmpty }, "\(extents)")
    }

    /// `vimg` on images in Ceph: create raw and VIMG, convert in and out, compare, info, check, snapshots
    /// (RBD snapshots on raw images, internal ones on VIMG), resize; qemu's rbd driver reads what we wrote
    /// byte for byte, and we read what it wrote.
    @Test func vimgAndQemuOnRBD() throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-ceph")
        defer { TestEnvironment.remove(dir) }
        let raw = try spec("cli-raw")
        let vimgImage = try spec("cli-vimg")
        defer {
            try? RBDDevice.remove(raw)
            try? RBDDevice.remove(vimgImage)
        }
        let source = dir + "/src.raw"
        let bytes = Pattern.bytes(count: 6 * Self.mib, offset: 0, seed: 14)
        let file = try FileDevice.open(path: source, readOnly: false, create: true, growable: true)
        try file.write(bytes, at: 2 * UInt64(Self.mib))
        try file.truncate(to: 16 << 20)
        try file.close()
        must(vimg, ["convert", "-O", "raw", source, raw.text])
        must(vimg, ["convert", "-O", "vimg", "-c", source, vimgImage.text])
        must(vimg, ["compare", source, raw.text])
        must(vimg, ["compare", vimgImage.text, raw.text])
        let check = must(vimg, ["check", vimgImage.text])
        #expect(check.stdout.contains("No errors"))
        #expect(must(vimg, ["info", vimgImage.text]).stdout.contains("file format: vimg"))
        if let qemuImg = TestEnvironment.which("qemu-img") {
            must(qemuImg, ["compare", "-f", "raw", "-F", "raw", source, raw.text])
            // qemu writes, we read.
            must("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 1M 64k", raw.text])
            let device = try ImageFormats.open(path: raw.text, readOnly: true)
            #expect(try device.read(count: 65536, at: 1 << 20) == [UInt8](repeating: 0x5a, count: 65536))
            try device.close()
        }
        must(vimg, ["snapshot", "-c", "v1", raw.text])
        #expect(must(vimg, ["snapshot", "-l", raw.text]).stdout.contains("v1"))
        must(vimg, ["compare", raw.at(snapshot: "v1").text, raw.text])
        must(vimg, ["snapshot", "-c", "s1", vimgImage.text])
        #expect(must(vimg, ["snapshot", "-l", vimgImage.text]).stdout.contains("s1"))
        must(vimg, ["resize", raw.text, "+1M"])
        #expect(must(vimg, ["info", raw.text]).stdout.contains("(17825792 bytes)"))
        let existing = vi(["create", "-f", "raw", raw.text, "1M"])
        #expect(existing.status == 1 && existing.stderr.contains("already exists"), "\(existing.stderr)")
    }

    /// The golden-image case: a local VIMG clone over an RBD snapshot in the cluster reads the base
    /// through, keeps its writes local, never changes the base, and checks clean.
    @Test func localCloneOfAGoldenImage() throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-ceph")
        defer { TestEnvironment.remove(dir) }
        let golden = try spec("golden")
        try RBDDevice.create(golden, size: 8 << 20)
        defer { try? RBDDevice.remove(golden) }
        let base = Pattern.bytes(count: 8 << 20, offset: 0, seed: 7)
        let writer = try RBDDevice.open(golden, readOnly: false)
        try writer.write(base, at: 0)
        try writer.createSnapshot(named: "v1")
        try writer.close()
        let clone = dir + "/local.vimg"
        must(vimg, ["create", "-b", golden.at(snapshot: "v1").text, "-F", "raw", clone])
        let image = try ImageFormats.openVImage(path: clone, readOnly: false)
        #expect(try image.read(count: 8 << 20, at: 0) == base)
        let mine = Pattern.bytes(count: 65536, offset: 1 << 20, seed: 8)
        try image.write(mine, at: 1 << 20)
        try image.close()
        let reopened = try ImageFormats.open(path: clone, readOnly: true)
        #expect(try reopened.read(count: 65536, at: 1 << 20) == mine)
        #expect(try reopened.read(count: 65536, at: 2 << 20) == Array(base[(2 << 20)..<((2 << 20) + 65536)]))
        try reopened.close()
        let untouched = try ImageFormats.open(path: golden.text, readOnly: true)
        #expect(try untouched.read(count: 8 << 20, at: 0) == base)
        try untouched.close()
        must(vimg, ["check", clone])
        #expect(must(vimg, ["info", "--backing-chain", clone]).stdout.contains("file format: raw"))
    }

    /// Wrong pool, image, snapshot, key or conf file: exit 1 and one line on stderr naming what is wrong.
    @Test func faultsAreOneLineNamingTheCause() throws {
        let conf = CephTestCluster.conf!
        let cases: [(String, String)] = [
            ("rbd:nopool/img:conf=\(conf)", "no pool 'nopool'"),
            ("rbd:rbd/noimage:conf=\(conf)", "no image 'noimage'"),
            ("rbd:rbd/noimage@s:conf=\(conf)", "no image 'noimage'"),
            ("rbd:rbd/x:conf=/nonexistent/ceph.conf", "conf file /nonexistent/ceph.conf"),
            ("rbd:rbd/x:conf=\(conf):key=AQBSdFpm6kxfExAAgfAnDWNrcd0CxbXUIvW8vA==", "refused client.admin"),
            ("rbd:rbd/x:conf=\(conf):no_such_option=1", "unknown Ceph option 'no_such_option'"),
            ("rbd:bad", "invalid rbd: name"),
        ]
        for (name, expected) in cases {
            let r = vi(["info", name])
            let lines = r.stderr.split(separator: "\n")
            #expect(r.status == 1 && lines.count == 1 && r.stderr.contains(expected), "\(name): \(r.stderr)")
        }
        let snap = try spec("faults")
        try RBDDevice.create(snap, size: 1 << 20)
        defer { try? RBDDevice.remove(snap) }
        let r = vi(["info", snap.at(snapshot: "nosnap").text])
        #expect(r.status == 1 && r.stderr.contains("no snapshot 'nosnap'"), "\(r.stderr)")
    }

    /// Exactly one writer: a second one is refused naming the holder; breaking the lock of a holder that
    /// was paused (SIGSTOP) blocklists it first, so when it wakes (SIGCONT) its next write fails, the new
    /// writer's data stands, and the VIMG image inside checks clean.
    @Test func secondWriterRefusedAndAPausedHolderFenced() throws {
        let dir = TestEnvironment.temporaryDirectory("vdisk-ceph")
        defer { TestEnvironment.remove(dir) }
        let name = try spec("fence")
        defer { try? RBDDevice.remove(name) }
        must(vimg, ["create", name.text, "16M"])
        let socket = dir + "/nbd.sock"
        guard let holder = ServeProcess(["--socket", socket, name.text], directory: dir) else {
            Issue.record("vdisk serve did not start")
            return
        }
        let uri = "nbd+unix:///?socket=\(socket)"
        must("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "flush", uri])

        let second = vi(["snapshot", "-c", "x", name.text])
        #expect(second.status == 1 && second.stderr.contains("in use by another writer"), "\(second.stderr)")

        holder.signal(SIGSTOP)
        let broken = must(vimg, ["rbd-break-lock", name.text])
        #expect(broken.stdout.contains("blocklisted"), "\(broken.stdout)")
        // The new writer: writes its own data and closes cleanly (repairing what the old one left dirty).
        let image = try ImageFormats.open(path: name.text, readOnly: false)
        try image.write([UInt8](repeating: 0x22, count: 65536), at: 65536)
        try image.close()
        holder.signal(SIGCONT)
        let late = run("qemu-io", ["-f", "raw", "-c", "write -P 0x33 64k 64k", "-c", "flush", uri])
        #expect(late.stdout.contains("failed") || late.stderr.contains("failed"), "\(late.stdout)\(late.stderr)")
        holder.stop()
        let check = vi(["check", name.text])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let after = try ImageFormats.open(path: name.text, readOnly: true)
        #expect(try after.read(count: 65536, at: 0) == [UInt8](repeating: 0x11, count: 65536))
        #expect(try after.read(count: 65536, at: 65536) == [UInt8](repeating: 0x22, count: 65536))
        try after.close()
    }
}

extension CephTests {
    /// The bus end to end on images in Ceph, through FUSE + loop: a raw RBD disk and a VIMG-on-RBD disk go
    /// through mkfs, mount, write, unplug, re-plug, compare and fsck; `vdisk snapshot` of the raw disk
    /// makes an RBD snapshot; the VIMG image checks clean afterwards.
    @Test(.enabled(if: busTestsCanRun, "needs root, /dev/fuse and /dev/loop-control"))
    func pluggedThroughTheBus() throws {
        let bus = BusTests()
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let raw = try spec("bus-raw")
        let inside = try spec("bus-vimg")
        try RBDDevice.create(raw, size: 64 << 20)
        must(vimg, ["create", inside.text, "64M"])
        defer {
            try? RBDDevice.remove(raw)
            try? RBDDevice.remove(inside)
        }
        let point = h.dir + "/mnt"
        for (image, disk) in [(raw, "ceph-raw"), (inside, "ceph-vimg")] {
            let device = try h.plug(["--name", disk, image.text])
            must("mkfs.ext4", ["-q", device])
            try bus.mount(device, point)
            try bus.writeTree(point, seed: 14)
            bus.unmount(point)
            let unplug = h.vd(["unplug", disk])
            #expect(unplug.status == 0, "\(unplug.stderr)")
            let again = try h.plug(["--name", disk, image.text])
            try bus.mount(again, point)
            bus.verifyTree(point, sums: point + ".sums")
            bus.unmount(point)
            bus.fsckClean(again)
            let snapshot = h.vd(["snapshot", disk, "s1"])
            #expect(snapshot.status == 0, "\(snapshot.stderr)")
            let last = h.vd(["unplug", disk])
            #expect(last.status == 0, "\(last.stderr)")
        }
        #expect(must(vimg, ["snapshot", "-l", raw.text]).stdout.contains("s1"), "an RBD snapshot of the raw disk")
        let check = vi(["check", inside.text])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        #expect(must(vimg, ["snapshot", "-l", inside.text]).stdout.contains("s1"))
    }

    /// The cluster stops under plugged disks: the bus keeps answering; a request on a disk with a short
    /// reconnect timeout fails with EIO when it runs out; a request on a disk with a long one waits, and
    /// completes without error once the cluster is back; the VIMG image inside checks clean afterwards.
    @Test func clusterAwayUnderPluggedDisks() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let patient = try spec("away-vimg")
        let impatient = try spec("away-raw")
        must(vimg, ["create", patient.text, "16M"])
        try RBDDevice.create(impatient, size: 16 << 20)
        defer {
            try? RBDDevice.remove(patient)
            try? RBDDevice.remove(impatient)
        }
        let long = try h.plug(["--name", "patient", "--device", "none", "--reconnect-timeout", "120", patient.text])
        let short = try h.plug(["--name", "impatient", "--device", "none", "--reconnect-timeout", "3", impatient.text])
        let qemuIO = try #require(TestEnvironment.which("qemu-io"))
        must(qemuIO, ["-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "flush", long])

        try #require(CephTestCluster.control("stop").status == 0)
        #expect(h.vd(["list"]).status == 0, "the bus must answer while the cluster is away")
        let failed = run(qemuIO, ["-f", "raw", "-c", "write -P 0x55 0 64k", short])
        #expect(
            failed.stdout.contains("Input/output error") || failed.stderr.contains("Input/output error"),
            "\(failed.stdout)\(failed.stderr)"
        )
        // Started while the cluster is certainly away, so it is in flight when the cluster comes back.
        let dir = h.dir
        let waiting = try #require(
            spawn(qemuIO, ["-f", "raw", "-c", "write -P 0x66 64k 64k", "-c", "flush", long], stdout: dir + "/io.out")
        )
        let restarted = CephTestCluster.control("restart")
        try #require(restarted.status == 0, "\(restarted.stderr)")
        #expect(waitForExit(waiting, seconds: 180) == 0)
        #expect(readFile(dir + "/io.out").contains("wrote 65536/65536"), "\(readFile(dir + "/io.out"))")
        let unplug = h.vd(["unplug", "patient"])
        #expect(unplug.status == 0, "\(unplug.stderr)")
        _ = h.vd(["unplug", "impatient"])
        let check = vi(["check", patient.text])
        #expect(check.status == 0, "\(check.stdout)\(check.stderr)")
        let image = try ImageFormats.open(path: patient.text, readOnly: true)
        #expect(try image.read(count: 65536, at: 0) == [UInt8](repeating: 0x44, count: 65536))
        #expect(try image.read(count: 65536, at: 65536) == [UInt8](repeating: 0x66, count: 65536))
        try image.close()
    }
}
