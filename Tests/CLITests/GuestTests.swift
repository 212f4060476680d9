import Glibc
import Testing
import VImageTestSupport

/// Where these tests can run: a kernel with NBD (the guest lane's; the host's has none). In the guest lane
/// (VDISK_GUEST_LANE) they always run, so a missing module or tool fails them instead of skipping them.
let guestKernel = FrontEnd.guestLane || (FrontEnd.hasNBD && TestEnvironment.isRoot)

/// What only the guest's kernel can show: a bus that dies and the next one that cleans up after it, a
/// planned restart under load, and every kind of file system and volume manager on one disk.
@Suite(.serialized, .enabled(if: guestKernel, "needs /dev/nbd0 (the guest lane: Tools/vm-test.sh)"))
struct GuestTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")
    let bus = BusTests()

    func sh(_ script: String) -> ProcessResult { run("/bin/bash", ["-c", script]) }

    /// Invariant: after kill -9 of the bus, a disk that took an acknowledged but unflushed allocating write
    /// fails with EIO (reads and flushes), never reads back as if the write had not happened; the next bus
    /// disconnects it and says so, and leaves devices it did not create (qemu-nbd -c, someone's loop
    /// device) alone.
    @Test func crashFailsWithEIOAndSparesOthers() throws {
        let h = BusTests.Harness(vdisk: vdisk, .nbd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/c.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        // Someone else's devices.
        #expect(sh("truncate -s 16M \(h.dir)/foreign.raw \(h.dir)/foreign-loop.raw").status == 0)
        let qemu = sh("qemu-nbd -f raw -c /dev/nbd15 \(h.dir)/foreign.raw")
        try #require(qemu.status == 0, "qemu-nbd -c: \(qemu.stderr)")
        defer { _ = sh("qemu-nbd -d /dev/nbd15") }
        let loop = sh("losetup -f --show \(h.dir)/foreign-loop.raw")
        try #require(loop.status == 0, "losetup: \(loop.stderr)")
        let foreignLoop = String(loop.stdout.filter { !$0.isWhitespace })
        defer { _ = run("losetup", ["-d", foreignLoop]) }

        let d = try h.plug([image, "--name", "c"])
        try #require(d != "/dev/nbd15")
        // Acknowledged (O_DIRECT completes), never flushed: clusters the engine allocated in memory.
        let write = sh("dd if=/dev/urandom of=\(d) bs=64k count=16 seek=100 oflag=direct status=none")
        try #require(write.status == 0, "\(write.stderr)")
        try h.killBus()

        // The next bus (started by any command that finds the dead one's lock) cleans up and says so.
        let list = h.vd(["list"])
        #expect(list.status == 0, "\(list.stderr)")
        #expect(list.stderr.contains("disconnected \(d) (disk c)"), "\(list.stderr)")
        #expect(readFile(h.runtime + "/bus.log").contains("disconnected \(d)"))
        let read = sh("dd if=\(d) of=/dev/null bs=64k count=1 skip=100 iflag=direct status=none")
        #expect(read.status != 0, "a read after the crash succeeded: the lost write would look like zeroes")
        let flush = sh("dd if=/dev/zero of=\(d) bs=4k count=1 oflag=direct conv=fsync status=none")
        #expect(flush.status != 0, "a write + flush after the crash succeeded")
        // Not ours: untouched.
        #expect(access("/sys/block/nbd15/pid", F_OK) == 0, "the qemu-nbd device was disconnected")
        #expect(readFile("/sys/block/\(foreignLoop.dropFirst(5))/loop/backing_file").contains("foreign-loop.raw"))
        // The image is what a power cut leaves: consistent, perhaps with leaked clusters.
        let check = run(vimg, ["check", image])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout)")
    }

    /// Invariant: `vdisk bus --restart` under fio --verify writes on a mounted file system hands the disk
    /// to the new bus with no I/O error and no verify mismatch, and the file system checks clean.
    @Test func plannedRestartUnderLoad() throws {
        let h = BusTests.Harness(vdisk: vdisk, .nbd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/r.vimg"
        #expect(run(vimg, ["create", image, "256M"]).status == 0)
        let d = try h.plug([image, "--name", "r"])
        // The kernel log is shared with the tests running beside this one: only what comes later, about d.
        let logStart = sh("dmesg | wc -l").stdout.filter(\.isNumber)
        #expect(run("mkfs.ext4", ["-q", d]).status == 0)
        let point = h.dir + "/m"
        try bus.mount(d, point)
        let seed = 11
        print("fio randseed \(seed)")
        let fio = sh(
            "(fio --name=v --directory=\(point) --size=24M --rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio "
                + "--direct=1 --verify=crc32c --verify_fatal=1 --randseed=\(seed) --output=\(h.dir)/fio.out "
                + ">/dev/null 2>\(h.dir)/fio.err; echo $? > \(h.dir)/fio.done) &"
        )
        try #require(fio.status == 0)
        // The marker: fio's writes are reaching the bus.
        var written = 0
        for _ in 0..<1200 where written < 4 << 20 && access(h.dir + "/fio.done", F_OK) != 0 {
            let json = h.vd(["list", "--output=json"]).stdout
            written =
                Int(json.split(separator: "\"bytesWritten\" : ").dropFirst().first?.prefix { $0.isNumber } ?? "") ?? 0
            usleep(100_000)
        }
        #expect(access(h.dir + "/fio.done", F_OK) != 0, "fio ended before the restart")
        let restart = h.vd(["bus", "--restart"])
        #expect(restart.status == 0, "\(restart.stderr)")
        #expect(restart.stderr.contains("took over r as \(d)"), "\(restart.stderr)")
        print("restart: \(restart.stderr)")
        for _ in 0..<6000 where access(h.dir + "/fio.done", F_OK) != 0 { usleep(100_000) }
        #expect(
            readFile(h.dir + "/fio.done") == "0\n",
            "fio: \(readFile(h.dir + "/fio.err"))\(readFile(h.dir + "/fio.out"))"
        )
        #expect(readFile(h.dir + "/fio.out").contains("err= 0"), "\(readFile(h.dir + "/fio.out"))")
        let name = d.dropFirst("/dev/".count)
        let kernel = sh(
            "dmesg | tail -n +\(logStart) | grep -E '(I/O error|timed out).*\\b\(name)\\b|\\b\(name)\\b.*(I/O error|timed out)' || true"
        )
        #expect(kernel.stdout.isEmpty, "the kernel saw errors: \(kernel.stdout)")
        bus.unmount(point)
        bus.fsckClean(d)
        #expect(h.vd(["unplug", "r"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
    }

    /// One partition of the every-kind disk: its file system, how it is made and mounted, and whether
    /// FIFREEZE works on it.
    struct Volume {
        var type: String
        var size: String
        var mkfs: String
        var mount: String
        var frozen: Bool
    }

    static let volumes = [
        Volume(type: "xfs", size: "320M", mkfs: "mkfs.xfs -q -f", mount: "mount", frozen: true),
        Volume(type: "btrfs", size: "160M", mkfs: "mkfs.btrfs -q -f", mount: "mount", frozen: true),
        // vfat has no freeze_fs: the kernel refuses FIFREEZE (EOPNOTSUPP), so it is synced instead.
        Volume(type: "vfat", size: "40M", mkfs: "mkfs.vfat", mount: "mount", frozen: false),
        Volume(type: "ntfs", size: "40M", mkfs: "mkntfs -Q -q", mount: "ntfs-3g", frozen: false),
        Volume(type: "ext4", size: "40M", mkfs: "mkfs.ext4 -q", mount: "mount", frozen: true),
    ]

    /// LVM without udev (the guest has none): scan /dev, create nodes itself.
    static let lvm = "--config 'devices{obtain_device_list_from_udev=0} activation{udev_sync=0 udev_rules=0}'"

    /// Invariant: a GPT disk holding xfs, btrfs, vfat, NTFS (ntfs-3g), ext4 and LVM (ext4 on a logical
    /// volume), all mounted, snapshots with each file system frozen (or, for ntfs-3g, synced and reported
    /// crash-consistent), and each reads back from the snapshot as it was.
    @Test func everyKindOfDisk() throws {
        let h = BusTests.Harness(vdisk: vdisk, .nbd)
        defer { h.stopAndCheckClean() }
        defer { _ = sh("vgchange \(Self.lvm) -an vdtest >/dev/null 2>&1") }
        let image = h.dir + "/all.vimg"
        #expect(run(vimg, ["create", image, "1G"]).status == 0)
        let d = try h.plug([image, "--name", "all"])
        let table = Self.volumes.map { ",\($0.size),L\\n" }.joined() + ",,L\\n"
        let parted = sh("printf 'label: gpt\\n\(table)' | sfdisk -q \(d) && partx -u \(d) 2>/dev/null; true")
        #expect(parted.status == 0, "\(parted.stderr)")
        let lvmPart = "\(d)p\(Self.volumes.count + 1)"
        for _ in 0..<100 where access(lvmPart, F_OK) != 0 { usleep(20_000) }
        try #require(access(lvmPart, F_OK) == 0, "no \(lvmPart)")
        var points: [(Volume?, String, String)] = []  // (volume, device, mountpoint); nil volume: LVM
        for (i, v) in Self.volumes.enumerated() {
            let part = "\(d)p\(i + 1)"
            let made = sh("\(v.mkfs) \(part)")
            try #require(made.status == 0, "\(v.mkfs): \(made.stdout)\(made.stderr)")
            points.append((v, part, h.dir + "/\(v.type)"))
        }
        let lvm = sh(
            "set -e; export LVM_SUPPRESS_FD_WARNINGS=1; pvcreate -q \(Self.lvm) \(lvmPart); "
                + "vgcreate -q \(Self.lvm) vdtest \(lvmPart); lvcreate -q \(Self.lvm) -y -n data -l 100%FREE vdtest; "
                + "mkfs.ext4 -q /dev/vdtest/data"
        )
        try #require(lvm.status == 0, "lvm: \(lvm.stdout)\(lvm.stderr)")
        points.append((nil, "/dev/vdtest/data", h.dir + "/lvm"))
        for (v, device, point) in points {
            mkdir(point, 0o755)
            let mounted = sh("\(v?.mount ?? "mount") \(device) \(point)")
            try #require(mounted.status == 0, "mount \(device): \(mounted.stderr)")
            #expect(sh("echo before-\(v?.type ?? "lvm") > \(point)/file").status == 0)
        }
        let snap = h.vd(["snapshot", "all", "s1"])
        #expect(snap.status == 0, "\(snap.stderr)")
        print(snap.stdout)
        for (v, _, point) in points {
            let line = snap.stdout.split(separator: "\n").first { $0.hasPrefix(point + " (") } ?? ""
            if v?.frozen ?? true {
                #expect(line.hasSuffix(": frozen"), "\(point): \(snap.stdout)")
            } else {
                #expect(line.contains(": crash-consistent (cannot be frozen"), "\(point): \(snap.stdout)")
            }
            #expect(sh("echo after > \(point)/file && sync").status == 0)
        }
        // Back from the snapshot: the live disk's volumes go away first (LVM would see the same VG twice).
        for (_, _, point) in points.reversed() { bus.unmount(point) }
        #expect(sh("vgchange \(Self.lvm) -an vdtest").status == 0)
        #expect(h.vd(["unplug", "all"]).status == 0)
        let s = try h.plug([image, "--snapshot", "s1", "--overlay", "--name", "then"])
        _ = sh(
            "partx -u \(s) 2>/dev/null; vgscan \(Self.lvm) --mknodes >/dev/null 2>&1; vgchange \(Self.lvm) -ay vdtest"
        )
        for (i, (v, _, point)) in points.enumerated() {
            let device = v == nil ? "/dev/vdtest/data" : "\(s)p\(i + 1)"
            for _ in 0..<100 where access(device, F_OK) != 0 { usleep(20_000) }
            let mounted = sh("\(v?.mount ?? "mount") \(device) \(point)")
            #expect(mounted.status == 0, "mount \(device) from the snapshot: \(mounted.stderr)")
            #expect(readFile(point + "/file") == "before-\(v?.type ?? "lvm")\n", "\(point) from the snapshot")
            bus.unmount(point)
        }
        #expect(sh("vgchange \(Self.lvm) -an vdtest").status == 0)
        #expect(h.vd(["unplug", "then"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
    }
}
