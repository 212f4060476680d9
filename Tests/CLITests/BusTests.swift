import BlockIO
import Glibc
import Testing
import VImageTestSupport

/// The kernel device a bus test plugs its disks into: /dev/loopN over a FUSE file (the host lane), or
/// /dev/nbdN (the guest lane, Tools/vm-test.sh: the host kernel has no NBD).
enum FrontEnd: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case loop, nbd

    var testDescription: String { rawValue }

    /// Set by Tools/vm-test.sh: tests that need the guest's kernel must run there, so a missing /dev/nbd0
    /// or tool is a failure, not a skip (a test skipped in both lanes would never run).
    static let guestLane = getenv("VDISK_GUEST_LANE") != nil
    static let hasNBD = access("/dev/nbd0", F_OK) == 0

    /// Where each lane runs the bus suite: the guest runs it through /dev/nbdN only (loop is the host's).
    static let lanes: [FrontEnd] = guestLane ? [.nbd] : hasNBD ? [.loop, .nbd] : [.loop]
}

let busTestsCanRun =
    FrontEnd.guestLane
    || (TestEnvironment.isRoot && access("/dev/fuse", F_OK) == 0 && access("/dev/loop-control", F_OK) == 0
        && TestEnvironment.which("mkfs.ext4") != nil && TestEnvironment.which("sfdisk") != nil)

/// The bus end to end, as root, through the kernel: plug, partition, mkfs, mount, copy, unmount, unplug,
/// plug again and compare; snapshots of mounted disks; many disks at once; failure paths that must leave
/// nothing behind. Every test runs once per front end of its lane (loop on the host, /dev/nbdN in the
/// guest). Runs where FUSE and loop devices work (CI runs as root); skips elsewhere, never in the guest.
@Suite(.serialized, .enabled(if: busTestsCanRun, "needs root, /dev/fuse and /dev/loop-control"))
struct BusTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    /// A bus of its own (its own runtime folder), stopped and checked for leftovers at the end.
    final class Harness {
        let dir: String
        let runtime: String
        let vdisk: String
        let frontEnd: FrontEnd
        var env: [String: String] { ["VDISK_RUNTIME_DIR": runtime] }

        init(vdisk: String, _ frontEnd: FrontEnd = .loop) {
            self.vdisk = vdisk
            self.frontEnd = frontEnd
            dir = TestEnvironment.temporaryDirectory("vdisk-bus")
            runtime = dir + "/run"
        }

        @discardableResult
        func vd(_ args: [String]) -> ProcessResult {
            let r = run(vdisk, args, environment: env)
            // The bus never uses Foundation's run loop machinery (it printed this where loopback is down).
            #expect(!r.stderr.contains("CFSocket"), "\(args): \(r.stderr)")
            return r
        }

        /// Plugs (into this harness's front end unless `args` names one) and returns the device path (fails
        /// the test with the bus's message otherwise).
        func plug(_ args: [String]) throws -> String {
            let device = args.contains("--device") ? [] : ["--device", frontEnd.rawValue]
            let r = vd(["plug"] + device + args)
            try #require(r.status == 0, "plug \(args): \(r.stderr)")
            return r.stdout.split(separator: "\n").first.map(String.init) ?? ""
        }

        /// kill -9 of the bus (the pid in its lock file), waiting until it is gone.
        func killBus() throws {
            let pid = try #require(pid_t(readFile(runtime + "/bus.lock").filter(\.isNumber)), "no bus")
            try #require(kill(pid, SIGKILL) == 0)
            for _ in 0..<500 where kill(pid, 0) == 0 { usleep(20_000) }
        }

        func stopAndCheckClean() {
            let stop = vd(["bus", "--stop"])
            #expect(stop.status == 0, "\(stop.stderr)")
            #expect(leftovers() == [], "left behind: \(leftovers())")
            let log = readFile(runtime + "/bus.log")
            #expect(!log.contains("CFSocket"), "\(log)")
            TestEnvironment.remove(dir)
        }

        /// Loop devices bound to our FUSE files, /dev/nbdN connected by our bus, our FUSE mounts, and a bus
        /// that is still running.
        func leftovers() -> [String] {
            var found: [String] = []
            for i in 0..<16 {
                let backend = readFile("/sys/block/nbd\(i)/backend")
                if backend.contains("vdisk:\(runtime):") { found.append("/dev/nbd\(i) -> \(backend)") }
            }
            let mounts = readFile("/proc/self/mounts")
            for line in mounts.split(separator: "\n") where line.contains(runtime) || line.contains(dir + "/mnt") {
                found.append(String(line))
            }
            for i in 0..<64 {
                let backing = readFile("/sys/block/loop\(i)/loop/backing_file")
                if backing.contains(runtime) { found.append("/dev/loop\(i) -> \(backing)") }
            }
            if access(runtime + "/bus.lock", F_OK) == 0 { found.append("bus still running") }
            return found
        }
    }

    func sh(_ script: String) -> ProcessResult { run("/bin/sh", ["-c", script]) }

    /// Partitions `device` (GPT, one Linux partition) and returns the partition's device. This kernel may
    /// lack partition-table parsers, so the partition is also added explicitly with partx.
    func partition(_ device: String) throws -> String {
        let r = sh("printf 'label: gpt\\n,,L\\n' | sfdisk -q \(device)")
        try #require(r.status == 0, "sfdisk: \(r.stderr)")
        let part = device + "p1"
        if access(part, F_OK) != 0 { _ = run("partx", ["-a", device]) }
        for _ in 0..<50 where access(part, F_OK) != 0 { usleep(20_000) }
        try #require(access(part, F_OK) == 0, "no \(part) after partitioning")
        return part
    }

    func addPartitions(_ device: String) {
        if access(device + "p1", F_OK) != 0 { _ = run("partx", ["-a", device]) }
    }

    /// Writes a small tree of files with known content into `root`.
    func writeTree(_ root: String, seed: Int) throws {
        let r = sh(
            """
            set -e
            mkdir -p \(root)/tree/a/b \(root)/tree/c
            for i in $(seq 1 20); do head -c $((i * 3000 + \(seed))) /dev/urandom > \(root)/tree/a/b/f$i; done
            cp -r \(TestEnvironment.packageRoot)/Sources/VImage \(root)/tree/c/
            (cd \(root)/tree && find . -type f -exec sha256sum {} + | sort -k2) > \(root).sums
            """
        )
        try #require(r.status == 0, "writing files: \(r.stderr)")
    }

    func verifyTree(_ root: String, sums: String) {
        let r = sh("cd \(root)/tree && find . -type f -exec sha256sum {} + | sort -k2 | diff - \(sums)")
        #expect(r.status == 0, "files differ after re-plugging: \(r.stdout)")
    }

    func mount(_ device: String, _ point: String) throws {
        _ = mkdir(point, 0o755)
        let r = run("mount", [device, point])
        try #require(r.status == 0, "mount \(device): \(r.stderr)")
    }

    func unmount(_ point: String) {
        let r = run("umount", [point])
        #expect(r.status == 0, "umount: \(r.stderr)")
    }

    func fsckClean(_ device: String) {
        let r = run("fsck.ext4", ["-n", "-f", device])
        #expect(r.status == 0, "fsck.ext4 -n -f \(device): \(r.stdout)\(r.stderr)")
    }

    /// The issue's scenario on a partitioned disk: plug, partition, mkfs, mount, copy, unmount, unplug,
    /// check; plug again, mount, files identical; fsck clean.
    func partitionedRoundTrip(_ h: Harness, source: [String], replug: Bool, checkImage: String?) throws {
        let device = try plug(source, h)
        #expect(device.hasPrefix("/dev/loop") || device.hasPrefix("/dev/nbd"), "\(device)")
        let part = try partition(device)
        #expect(run("mkfs.ext4", ["-q", part]).status == 0)
        let point = h.dir + "/m"
        try mount(part, point)
        try writeTree(point, seed: 1)
        // Unplug refuses while mounted, and says why.
        let refused = h.vd(["unplug", device])
        #expect(refused.status == 1 && refused.stderr.contains("is mounted"), "\(refused.stderr)")
        unmount(point)
        if !replug {
            fsckClean(part)
            #expect(h.vd(["unplug", device]).status == 0)
            return
        }
        #expect(h.vd(["unplug", device]).status == 0)
        if let checkImage {
            let check = run(vimg, ["check", checkImage])
            #expect(check.status == 0, "vimg check after unplug: \(check.stdout)")
        }
        let again = try plug(source, h)
        addPartitions(again)
        try mount(again + "p1", point)
        verifyTree(point, sums: point + ".sums")
        unmount(point)
        fsckClean(again + "p1")
        #expect(h.vd(["unplug", again]).status == 0)
    }

    func plug(_ args: [String], _ h: Harness) throws -> String { try h.plug(args) }

    /// Invariant: with `--cache=none` (the image file opened with O_DIRECT by the bus) a VIMG disk survives
    /// partition + mkfs + copy + unplug + re-plug bit for bit; RAM disks and remote exports refuse it.
    @Test(arguments: FrontEnd.lanes) func vimgDiskWithCacheNone(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/disk.vimg"
        #expect(run(vimg, ["create", image, "256M"]).status == 0)
        if (try? FileDevice.open(path: image, readOnly: true, cache: .direct).close()) == nil {
            // This folder's file system has no O_DIRECT (tmpfs before Linux 6.6: the guest's /tmp): the plug
            // must refuse in one clear line and leave nothing plugged.
            let refused = h.vd(["plug", "--device", frontEnd.rawValue, "--cache=none", image])
            #expect(refused.status == 1 && refused.stderr.contains("does not support direct I/O"), "\(refused.stderr)")
            #expect(h.vd(["list"]).stdout == "No disks are plugged.\n")
            return
        }
        try partitionedRoundTrip(h, source: ["--cache=none", image], replug: true, checkImage: image)
        let ram = h.vd(["plug", "--cache=none", "--ram", "64M"])
        #expect(ram.status != 0 && ram.stderr.contains("--cache=none is for image files"), "\(ram.stderr)")
    }

    /// Invariant: a VIMG disk survives partition + mkfs + copy + unplug + re-plug bit for bit.
    @Test(arguments: FrontEnd.lanes) func vimgDiskEndToEnd(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/disk.vimg"
        #expect(run(vimg, ["create", image, "256M"]).status == 0)
        try partitionedRoundTrip(h, source: [image], replug: true, checkImage: image)
    }

    /// Invariant (issue 18): a qcow2 disk made by qemu-img plugs read-write by default and survives
    /// partition + mkfs + copy + unplug + re-plug bit for bit; after the unplug both `vimg check` and
    /// `qemu-img check` find it clean, and fsck finds the file system clean after the re-plug.
    @Test(arguments: FrontEnd.lanes) func qcow2DiskEndToEnd(_ frontEnd: FrontEnd) throws {
        let qemuImg = try #require(TestEnvironment.which("qemu-img"), "qemu-img not installed")
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/vm.qcow2"
        #expect(run(qemuImg, ["create", "-q", "-f", "qcow2", image, "256M"]).status == 0)
        try partitionedRoundTrip(h, source: [image], replug: true, checkImage: image)
        let check = run(qemuImg, ["check", image])
        #expect(check.status == 0, "qemu-img check after unplug: \(check.stdout)\(check.stderr)")
        #expect(run(qemuImg, ["info", image]).stdout.contains("file format: qcow2"))
    }

    /// Invariant (issue 16): space goes back to the host. Files written to a plugged VIMG disk's ext4 and
    /// deleted, then `fstrim`, give their clusters back: the image's allocated size on the host falls back to
    /// about what it was before they were written, and the image checks clean. With `--discard=free` the
    /// same trim frees the clusters for reuse but the file keeps its blocks.
    @Test(arguments: FrontEnd.lanes) func fstrimShrinksTheImage(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let mib: UInt64 = 1 << 20
        for policy in ["punch", "free"] {
            let image = h.dir + "/\(policy).vimg"
            #expect(run(vimg, ["create", image, "512M"]).status == 0)
            let device = try plug(["--discard=\(policy)", image], h)
            #expect(run("mkfs.ext4", ["-q", "-E", "nodiscard", device]).status == 0)
            let point = h.dir + "/m"
            try mount(device, point)
            let write = sh("head -c \(64 * mib) /dev/urandom > \(point)/big && sync")
            try #require(write.status == 0, "\(write.stderr)")
            let full = allocatedBytes(image)
            let trim = sh("rm \(point)/big && sync && fstrim \(point) && sync")
            #expect(trim.status == 0, "fstrim: \(trim.stderr)")
            // Freed clusters are punched once the metadata that frees them is durable: the next flushes.
            var after = allocatedBytes(image)
            for _ in 0..<20 where policy == "punch" && after + 48 * mib > full {
                _ = sh("sync")
                usleep(100_000)
                after = allocatedBytes(image)
            }
            unmount(point)
            #expect(h.vd(["unplug", device]).status == 0)
            let check = run(vimg, ["check", image])
            #expect(check.status == 0, "vimg check: \(check.stdout)")
            if policy == "punch" {
                #expect(
                    after + 48 * mib < full,
                    "\(frontEnd) punch: \(after / mib) MiB allocated after fstrim, \(full / mib) MiB before"
                )
            } else {
                #expect(after + 8 * mib > full, "\(frontEnd) free: \(after / mib) MiB of \(full / mib) MiB")
            }
        }
    }

    /// Invariant (issue 15): `vdisk scrub` of a plugged disk with checksums finds nothing while fio writes
    /// and verifies; a byte flipped in the image file's data then reads as EIO (never as data), is counted
    /// in `vdisk list` and logged, and `vdisk scrub` names its guest offset and exits 2.
    @Test(arguments: FrontEnd.lanes) func scrubOfAPluggedDisk(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/disk.vimg"
        #expect(run(vimg, ["create", "-o", "checksums=on", "-o", "cluster_size=4K", image, "64M"]).status == 0)
        let device = try plug(["--name", "crc", image], h)
        // Scrubs, one after the other, for as long as fio writes (then reads back and verifies) its data.
        let load = sh(
            """
            export VDISK_RUNTIME_DIR=\(h.runtime)
            fio --name=w --filename=\(device) --rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=8 \\
                --size=16M --verify=crc32c --verify_fatal=1 --verify_state_save=0 >\(h.dir)/fio.log 2>&1 & pid=$!
            scrubs=0
            while kill -0 $pid 2>/dev/null; do
                \(vdisk) scrub crc >\(h.dir)/scrub.log 2>&1 || { cat \(h.dir)/scrub.log; exit 9; }
                scrubs=$((scrubs + 1))
            done
            wait $pid || { cat \(h.dir)/fio.log; exit 8; }
            echo $scrubs
            """
        )
        try #require(load.status == 0, "under fio: \(load.stdout)\(load.stderr)")
        #expect((Int(load.stdout.filter(\.isNumber)) ?? 0) >= 1, "no scrub ran during the writes")
        #expect(h.vd(["unplug", "crc"]).status == 0)

        // Flip one byte of the first data cluster, in the file.
        let map = run(vimg, ["map", "--output=json", image])
        let fields = map.stdout.split(separator: "{").first { $0.contains("\"data\": true") } ?? ""
        func field(_ name: String) -> UInt64? {
            guard let range = fields.firstRange(of: "\"\(name)\": ") else { return nil }
            return UInt64(fields[range.upperBound...].prefix { $0.isNumber })
        }
        let guest = try #require(field("start"), "no data in \(map.stdout)")
        let host = try #require(field("offset"))
        let fd = open(image, O_RDWR)
        try #require(fd >= 0)
        var byte: UInt8 = 0
        #expect(pread(fd, &byte, 1, off_t(host + 100)) == 1)
        byte ^= 0xFF
        #expect(pwrite(fd, &byte, 1, off_t(host + 100)) == 1)
        close(fd)

        let again = try plug(["--name", "crc", image], h)
        let read = run(
            "dd",
            ["if=\(again)", "of=/dev/null", "bs=4096", "count=1", "skip=\(guest / 4096)", "iflag=direct"]
        )
        #expect(read.status != 0, "the flipped block read without an error")
        let list = h.vd(["list", "--output=json"])
        let counted = list.stdout.firstRange(of: "\"checksumErrors\"").map {
            UInt64(list.stdout[$0.upperBound...].drop { !$0.isNumber }.prefix { $0.isNumber }) ?? 0
        }
        #expect((counted ?? 0) >= 1, "\(list.stdout)")
        let scrub = h.vd(["scrub", "crc"])
        #expect(scrub.status == 2, "\(scrub.stdout)\(scrub.stderr)")
        #expect(scrub.stdout.contains("guest offset \(guest / 4096 * 4096)"), "\(scrub.stdout)")
        #expect(readFile(h.runtime + "/bus.log").contains("fails its checksum"))
        #expect(h.vd(["unplug", "crc"]).status == 0)
    }

    /// The bytes a file occupies on its file system.
    func allocatedBytes(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
    }

    /// Invariant: the same on a raw file.
    @Test(arguments: FrontEnd.lanes) func rawDiskEndToEnd(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/disk.raw"
        #expect(run(vimg, ["create", "-f", "raw", image, "128M"]).status == 0)
        try partitionedRoundTrip(h, source: [image], replug: true, checkImage: nil)
    }

    /// The servers a remote export is plugged from: qemu-nbd in plaintext, qemu-nbd over TLS (GnuTLS,
    /// requiring a client certificate), and `vdisk serve --tls=require --tls-verify-peer`.
    enum RemoteServer: String, CaseIterable, Sendable { case qemu, qemuTLS, vdiskTLS }

    /// Invariant: a remote NBD export, plain or over TLS (nbds+unix://), works as a backend, and what was
    /// written through the bus is in the remote file. The TLS certificates folder may be given relative to
    /// the plugging command's working folder (the bus resolves nothing itself).
    @Test(
        .enabled(if: FrontEnd.guestLane || TestEnvironment.which("qemu-nbd") != nil, "qemu-nbd not installed"),
        arguments: FrontEnd.lanes,
        RemoteServer.allCases.filter { $0 == .qemu || TestCertificates.shared != nil }
    )
    func remoteNBDExportEndToEnd(_ frontEnd: FrontEnd, _ server: RemoteServer) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let file = h.dir + "/remote.raw"
        let socket = h.dir + "/remote.sock"
        #expect(run(vimg, ["create", "-f", "raw", file, "128M"]).status == 0)
        var uri = "nbd+unix:///exp?socket=\(socket)"
        if server != .qemu {
            let certificates = try #require(TestCertificates.shared)
            for directory in ["pki-server", "pki-client"] { mkdir(h.dir + "/" + directory, 0o700) }
            certificates.writeServerFiles(to: h.dir + "/pki-server")
            certificates.writeClientFiles(to: h.dir + "/pki-client", identity: .client)
            // From any working folder, enough ../ reach /.
            let cwd = String(cString: getcwd(nil, 0))
            let relative =
                String(repeating: "../", count: cwd.split(separator: "/").count) + h.dir.dropFirst() + "/pki-client"
            uri =
                "nbds+unix:///exp?socket=\(socket)&tls-certificates=\(server == .vdiskTLS ? relative : h.dir + "/pki-client")"
        }
        switch server {
        case .qemu, .qemuTLS:
            let tls =
                server == .qemu
                ? ""
                : "--object tls-creds-x509,id=tls0,dir=\(h.dir)/pki-server,endpoint=server,verify-peer=on --tls-creds tls0"
            #expect(
                sh(
                    "qemu-nbd \(tls) -f raw -k \(socket) -x exp --persistent --pid-file=\(h.dir)/server.pid \(file) >/dev/null 2>&1 &"
                ).status == 0
            )
            for _ in 0..<1500 where access(socket, F_OK) != 0 { usleep(20_000) }
        case .vdiskTLS:
            let serving = sh(
                "\(vdisk) serve --socket \(socket) --export exp --tls=require --tls-verify-peer --tls-certificates \(h.dir)/pki-server "
                    + "\(file) >/dev/null 2>\(h.dir)/serve.err & echo $! > \(h.dir)/server.pid"
            )
            #expect(serving.status == 0)
            for _ in 0..<1500 where access(socket, F_OK) != 0 { usleep(20_000) }
        }
        defer { _ = sh("kill $(cat \(h.dir)/server.pid) 2>/dev/null") }
        try #require(access(socket, F_OK) == 0, "the \(server) server did not start: \(readFile(h.dir + "/serve.err"))")
        if server != .qemu {
            // nbds:// never falls back: without the client certificate the server refuses us, and says so.
            let anonymous = h.dir + "/pki-anonymous"
            mkdir(anonymous, 0o700)
            TestCertificates.shared!.writeClientFiles(to: anonymous, identity: .none)
            let refused = h.vd([
                "plug", "--name", "refused", "nbds+unix:///exp?socket=\(socket)&tls-certificates=\(anonymous)",
            ])
            #expect(refused.status != 0 && refused.stderr.contains("client certificate"), "\(refused.stderr)")
        }
        try partitionedRoundTrip(h, source: [uri, "--name", "remote"], replug: true, checkImage: nil)
        // The partition table the bus wrote is in the remote file.
        let table = run("sfdisk", ["-d", file])
        #expect(table.stdout.contains("label: gpt"), "\(table.stdout)")
    }

    /// Invariant: a RAM disk takes a file system (its content lives until unplug).
    @Test(arguments: FrontEnd.lanes) func ramDiskEndToEnd(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        try partitionedRoundTrip(h, source: ["--ram", "128M", "--name", "scratch"], replug: false, checkImage: nil)
    }

    /// Invariant: a clone over a base holding a file system sees the base's files, takes new ones, and
    /// leaves the base untouched.
    @Test(arguments: FrontEnd.lanes) func cloneOverBase(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let base = h.dir + "/base.vimg"
        let child = h.dir + "/child.vimg"
        #expect(run(vimg, ["create", base, "128M"]).status == 0)
        let d = try h.plug([base])
        #expect(run("mkfs.ext4", ["-q", d]).status == 0)
        let point = h.dir + "/m"
        try mount(d, point)
        try writeTree(point, seed: 2)
        unmount(point)
        #expect(h.vd(["unplug", "base"]).status == 0)
        #expect(run(vimg, ["clone", base, child]).status == 0)
        let c = try h.plug([child])
        try mount(c, point)
        verifyTree(point, sums: point + ".sums")
        #expect(sh("echo clone-only > \(point)/new.txt").status == 0)
        unmount(point)
        fsckClean(c)
        #expect(h.vd(["unplug", c]).status == 0)
        #expect(run(vimg, ["check", child]).status == 0)
        #expect(run(vimg, ["check", base]).status == 0)
        // The base never saw the clone's file.
        let b = try h.plug(["--read-only", base])
        fsckClean(b)
        #expect(h.vd(["unplug", b]).status == 0)
    }

    /// Invariant: a snapshot of a plugged, mounted disk holds a consistent file system, and a throwaway
    /// clone of it (an overlay) mounts with the files of that moment.
    @Test(arguments: FrontEnd.lanes) func snapshotOfMountedDisk(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/snap.vimg"
        #expect(run(vimg, ["create", image, "128M"]).status == 0)
        let d = try h.plug([image, "--name", "live"])
        #expect(run("mkfs.ext4", ["-q", d]).status == 0)
        let point = h.dir + "/m"
        try mount(d, point)
        try writeTree(point, seed: 3)
        let snap = h.vd(["snapshot", "live", "s1"])
        #expect(snap.status == 0, "\(snap.stderr)")
        #expect(sh("rm -rf \(point)/tree/c && echo after > \(point)/after.txt").status == 0)
        // The snapshot is readable while the disk stays plugged and mounted: a clone of it, in RAM.
        let clone = try h.plug([image, "--snapshot", "s1", "--overlay", "--name", "then"])
        fsckClean(clone)
        let point2 = h.dir + "/m2"
        try mount(clone, point2)
        verifyTree(point2, sums: point + ".sums")
        #expect(access(point2 + "/after.txt", F_OK) != 0)
        unmount(point2)
        // The snapshot itself, read-only, beside the live disk: a clean file system (it was frozen).
        let frozen = try h.plug([image, "--read-only", "--snapshot", "s1", "--name", "ro"])
        fsckClean(frozen)
        let write = sh("dd if=/dev/zero of=\(frozen) bs=4k count=1 oflag=direct status=none")
        #expect(write.status != 0, "a read-only snapshot took a write")
        #expect(h.vd(["unplug", "ro"]).status == 0)
        unmount(point)
        #expect(h.vd(["unplug", "then"]).status == 0)
        #expect(h.vd(["unplug", "live"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
        let list = run(vimg, ["snapshot", "-l", image])
        #expect(list.stdout.contains("s1"))
    }

    /// Invariant: many disks at once, listed, then unplugged in random order, leave nothing behind.
    @Test(arguments: FrontEnd.lanes) func eightDisksAtOnce(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        var names: [String] = []
        var devices = Set<String>()
        for i in 0..<8 {
            let name = "d\(i)"
            if i % 2 == 0 {
                let image = h.dir + "/\(name).vimg"
                #expect(run(vimg, ["create", image, "64M"]).status == 0)
                devices.insert(try h.plug([image, "--name", name]))
            } else {
                devices.insert(try h.plug(["--ram", "32M", "--name", name]))
            }
            names.append(name)
        }
        #expect(devices.count == 8)
        let list = h.vd(["list", "--output=json"])
        #expect(list.status == 0)
        for name in names { #expect(list.stdout.contains("\"name\" : \"\(name)\""), "\(list.stdout)") }
        let human = h.vd(["list"])
        #expect(human.stdout.split(separator: "\n").count == 9, "\(human.stdout)")
        var rng = SeededRandom(seed: 8)
        for name in names.shuffled(using: &rng) {
            let r = h.vd(["unplug", name])
            #expect(r.status == 0, "\(name): \(r.stderr)")
        }
        #expect(h.vd(["list"]).stdout == "No disks are plugged.\n")
    }

    /// Invariant: every plugged disk is an NBD export on the bus's socket; with --device none that is all
    /// it is, and real clients read back what they wrote.
    @Test(
        .enabled(
            if: FrontEnd.guestLane
                || TestEnvironment.which("qemu-io") != nil && TestEnvironment.which("nbdinfo") != nil,
            "qemu-io/nbdinfo not installed"
        ),
        arguments: FrontEnd.lanes
    )
    func exportsOnTheBusSocket(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let uri = try h.plug(["--ram", "32M", "--device", "none", "--name", "r"])
        #expect(uri == "nbd+unix:///r?socket=\(h.runtime)/nbd.sock")
        let info = run("nbdinfo", ["--size", uri])
        #expect(info.stdout == "33554432\n", "\(info.stdout)\(info.stderr)")
        let io = run(
            "qemu-io",
            ["-f", "raw", uri, "-c", "write -P 0x5c 1M 2M", "-c", "read -P 0x5c 1M 2M", "-c", "read -P 0 0 1M"]
        )
        #expect(io.status == 0 && !io.stdout.contains("verification failed"), "\(io.stdout)\(io.stderr)")
        let list = h.vd(["list", "--output=json"])
        #expect(list.stdout.contains("\"bytesWritten\" : 2097152"), "\(list.stdout)")
        // A disk with a kernel device is exported too.
        let image = h.dir + "/e.vimg"
        #expect(run(vimg, ["create", image, "16M"]).status == 0)
        _ = try h.plug([image, "--name", "e"])
        let both = run("nbdinfo", ["--size", "nbd+unix:///e?socket=\(h.runtime)/nbd.sock"])
        #expect(both.stdout == "16777216\n", "\(both.stdout)\(both.stderr)")
        #expect(h.vd(["unplug", "--all"]).status == 0)
    }

    /// Invariant: bad requests get a clear error and leave nothing half-attached.
    @Test(arguments: FrontEnd.lanes) func failurePaths(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let missing = h.vd(["plug", h.dir + "/missing.vimg"])
        #expect(missing.status == 1 && missing.stderr.contains("no such file"), "\(missing.stderr)")
        // A corrupt image: VIMG magic, garbage after it.
        let corrupt = h.dir + "/corrupt.vimg"
        #expect(sh("printf 'VIMG' > \(corrupt) && head -c 70000 /dev/urandom >> \(corrupt)").status == 0)
        let bad = h.vd(["plug", corrupt])
        #expect(bad.status == 1 && bad.stderr.contains("vdisk: error:"), "\(bad.stderr)")
        let image = h.dir + "/ok.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        _ = try h.plug([image])
        let twice = h.vd(["plug", image])
        #expect(twice.status == 1 && twice.stderr.contains("already plugged"), "\(twice.stderr)")
        let unknown = h.vd(["unplug", "nosuchdisk"])
        #expect(
            unknown.status == 1 && unknown.stderr.contains("no plugged disk is named 'nosuchdisk'"),
            "\(unknown.stderr)"
        )
        let badName = h.vd(["plug", "--ram", "1M", "--name", "../x"])
        #expect(badName.status == 1 && badName.stderr.contains("invalid disk name"), "\(badName.stderr)")
        let qcow = h.dir + "/q.qcow2"
        if TestEnvironment.which("qemu-img") != nil {
            #expect(run("qemu-img", ["create", "-q", "-f", "qcow2", qcow, "64M"]).status == 0)
            // qcow2 plugs read-write, except where a write would invalidate the image's dirty bitmaps.
            #expect(run("qemu-img", ["bitmap", "--add", qcow, "backup"]).status == 0)
            let rw = h.vd(["plug", qcow])
            #expect(rw.status == 1 && rw.stderr.contains("bitmaps"), "\(rw.stderr)")
        }
        // A second bus on the same runtime folder refuses to start.
        let second = h.vd(["bus"])
        #expect(second.status == 1 && second.stderr.contains("already running"), "\(second.stderr)")
        let list = h.vd(["list", "--output=json"])
        #expect(list.stdout.split(separator: "\"name\"").count == 2, "exactly one disk: \(list.stdout)")
        #expect(h.vd(["unplug", "--all"]).status == 0)
    }

    /// Invariant: with --persist the bus re-plugs its disks after a restart.
    @Test(arguments: FrontEnd.lanes) func persistReplugsAfterRestart(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/p.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        // Start a persistent bus in the background, as a service manager would.
        #expect(sh("VDISK_RUNTIME_DIR=\(h.runtime) setsid \(vdisk) bus --persist >\(h.dir)/bus.log 2>&1 &").status == 0)
        for _ in 0..<100 where access(h.runtime + "/bus.sock", F_OK) != 0 { usleep(50_000) }
        _ = try h.plug([image, "--name", "kept"])
        #expect(h.vd(["bus", "--stop"]).status == 0)
        #expect(
            sh("VDISK_RUNTIME_DIR=\(h.runtime) setsid \(vdisk) bus --persist >>\(h.dir)/bus.log 2>&1 &").status == 0
        )
        var listed = ""
        for _ in 0..<100 {
            listed = h.vd(["list"]).stdout
            if listed.contains("kept") { break }
            usleep(50_000)
        }
        #expect(listed.contains("kept") && listed.contains(image), "\(listed)\n\(readFile(h.dir + "/bus.log"))")
        #expect(h.vd(["unplug", "kept"]).status == 0)
    }

    /// Invariant: after kill -9 of the bus with a disk mounted and written, the next bus (started by `vdisk
    /// list`, which finds the dead bus's lock) removes the dead one's devices and FUSE mounts and says so;
    /// once the user unmounts what was mounted from the dead disk, nothing is left.
    @Test(arguments: FrontEnd.lanes) func crashLeavesNothingBehind(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/k.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        let d = try h.plug([image, "--name", "k"])
        #expect(run("mkfs.ext4", ["-q", d]).status == 0)
        let point = h.dir + "/m"
        try mount(d, point)
        #expect(sh("echo written > \(point)/file").status == 0)
        try h.killBus()
        let list = h.vd(["list"])
        #expect(list.status == 0 && list.stdout == "No disks are plugged.\n", "\(list.stdout)\(list.stderr)")
        let said = list.stderr
        if frontEnd == .loop {
            #expect(said.contains("\(d) over \(h.runtime)/mnt/k/disk"), "\(said)")
            #expect(said.contains("unmounted \(h.runtime)/mnt/k"), "\(said)")
        } else {
            #expect(said.contains("disconnected \(d) (disk k)"), "\(said)")
        }
        // The file system on the dead disk is the user's to unmount (it fails with I/O errors until then).
        _ = run("umount", ["-l", point])
        for _ in 0..<250 where !h.leftovers().filter({ !$0.contains("bus still running") }).isEmpty {
            usleep(20_000)
        }
        #expect(h.leftovers().filter { !$0.contains("bus still running") } == [], "\(h.leftovers())")
        let check = run(vimg, ["check", image])
        #expect(check.status == 0 || check.status == 3, "\(check.stdout)")
        // The image plugs again.
        let again = try h.plug([image, "--name", "k"])
        #expect(h.vd(["unplug", again]).status == 0)
    }

    /// Invariant: `unplug --force` of a mounted disk unmounts it first, then unplugs cleanly; `unplug --all`
    /// takes every disk, mounted or not, and nothing stays connected.
    @Test(arguments: FrontEnd.lanes) func forcedUnplugOfMountedDisks(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/f.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        let d = try h.plug([image, "--name", "f"])
        let part = try partition(d)
        #expect(run("mkfs.ext4", ["-q", part]).status == 0)
        let point = h.dir + "/m"
        try mount(part, point)
        #expect(sh("echo kept > \(point)/file && sync").status == 0)
        let forced = h.vd(["unplug", "--force", "f"])
        #expect(forced.status == 0 && forced.stderr.contains("unmounted \(point)"), "\(forced.stderr)")
        #expect(isMounted(point) == false)
        #expect(run(vimg, ["check", image]).status == 0)
        // --all with two mounted disks and a RAM disk.
        let again = try h.plug([image, "--name", "f"])
        addPartitions(again)
        try mount(again + "p1", point)
        #expect(readFile(point + "/file") == "kept\n")
        let ram = try h.plug(["--ram", "32M", "--name", "r"])
        #expect(run("mkfs.ext4", ["-q", ram]).status == 0)
        try mount(ram, h.dir + "/r")
        let all = h.vd(["unplug", "--all", "--force"])
        #expect(all.status == 0, "\(all.stderr)")
        #expect(h.vd(["list"]).stdout == "No disks are plugged.\n")
        #expect(isMounted(point) == false && isMounted(h.dir + "/r") == false)
    }

    /// Invariant: a failure after file systems were frozen (here, a snapshot name that exists) leaves every
    /// one of them thawed; and a `--no-freeze` snapshot reports itself crash-consistent.
    @Test(arguments: FrontEnd.lanes) func failedSnapshotThaws(_ frontEnd: FrontEnd) throws {
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/t.vimg"
        #expect(run(vimg, ["create", image, "128M"]).status == 0)
        let d = try h.plug([image, "--name", "t"])
        #expect(sh("printf 'label: gpt\\n,32M,L\\n,,L\\n' | sfdisk -q \(d)").status == 0)
        addPartitions(d)
        for _ in 0..<50 where access(d + "p2", F_OK) != 0 { usleep(20_000) }
        if access(d + "p2", F_OK) != 0 { _ = run("partx", ["-a", d]) }
        var points: [String] = []
        for p in 1...2 {
            #expect(run("mkfs.ext4", ["-q", "\(d)p\(p)"]).status == 0)
            let point = h.dir + "/m\(p)"
            try mount("\(d)p\(p)", point)
            points.append(point)
        }
        let first = h.vd(["snapshot", "t", "s1"])
        #expect(first.status == 0, "\(first.stderr)")
        for point in points { #expect(first.stdout.contains("\(point) (ext4 on "), "\(first.stdout)") }
        #expect(first.stdout.split(separator: "\n").filter { $0.hasSuffix(": frozen") }.count == 2, "\(first.stdout)")
        let again = h.vd(["snapshot", "t", "s1"])
        #expect(again.status == 1 && again.stderr.contains("s1"), "\(again.stderr)")
        for point in points {
            // A frozen file system would block this write until thawed; fsfreeze -u fails on a thawed one.
            let write = sh("timeout 20 sh -c 'echo after > \(point)/after && sync -f \(point)/after'")
            #expect(write.status == 0, "\(point) stayed frozen")
            #expect(run("fsfreeze", ["-u", point]).status != 0, "\(point) was still frozen")
        }
        let crash = h.vd(["snapshot", "--no-freeze", "t", "s2"])
        #expect(crash.status == 0 && crash.stdout.contains("crash-consistent (--no-freeze; synced)"), "\(crash.stdout)")
        for point in points { unmount(point) }
        #expect(h.vd(["unplug", "t"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
    }

    /// Invariant: a disk and a qemu process refuse each other's image, in both orders (qemu's locks,
    /// QemuImageLocks.swift): `vdisk plug` of an image qemu-io has open for writing fails naming why, and
    /// qemu-io cannot write an image that is plugged (read-write, VIMG and qcow2 alike).
    @Test(arguments: FrontEnd.lanes, ["vimg", "qcow2"]) func qemuAndPlugRefuseEachOther(
        _ frontEnd: FrontEnd,
        _ kind: String
    ) throws {
        let qemuIO = try #require(TestEnvironment.which("qemu-io"), "qemu-io not installed")
        let h = Harness(vdisk: vdisk, frontEnd)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/q." + kind
        let format = kind == "vimg" ? "raw" : "qcow2"
        if kind == "vimg" {
            #expect(run(vimg, ["create", image, "64M"]).status == 0)
        } else {
            #expect(run(TestEnvironment.which("qemu-img")!, ["create", "-f", "qcow2", image, "64M"]).status == 0)
        }
        // qemu first: an interactive qemu-io keeps the image open until its input ends (its own session, so
        // the whole pipeline goes at once).
        let holderLog = h.dir + "/qemu-io.err"
        let holder = try #require(
            spawn(
                "/usr/bin/setsid",
                ["sh", "-c", "sleep 120 | \(qemuIO) -f \(format) \(image)"],
                stdout: holderLog,
                stderr: holderLog
            )
        )
        defer {
            kill(-holder, SIGKILL)
            waitForExit(holder)
        }
        var inode = stat()
        try #require(stat(image, &inode) == 0)
        let lockLine = ":\(inode.st_ino) 100 101"  // qemu's write permission taken: it has opened the image
        let deadline = monotonicNow() + 60
        while !readFile("/proc/locks").contains(lockLine) && monotonicNow() < deadline { usleep(20_000) }
        try #require(
            readFile("/proc/locks").contains(lockLine),
            "qemu-io did not open \(image): \(readFile(holderLog))\n\(readFile("/proc/locks"))"
        )
        let refused = h.vd(["plug", "--device", frontEnd.rawValue, image])
        #expect(refused.status != 0 && refused.stderr.contains("in use"), "\(refused.stdout)\(refused.stderr)")
        kill(-holder, SIGKILL)
        waitForExit(holder)

        // vdisk first.
        let d = try h.plug([image, "--name", "q"])
        let write = run(qemuIO, ["-f", format, "-c", "write 0 4k", image])
        #expect(write.status != 0 && write.stderr.contains("lock"), "\(write.stdout)\(write.stderr)")
        #expect(h.vd(["unplug", d]).status == 0)
        let after = run(qemuIO, ["-f", format, "-c", "write 0 4k", image])
        #expect(after.status == 0, "\(after.stderr)")
    }
}

/// Whether something is mounted on `point`.
func isMounted(_ point: String) -> Bool {
    readFile("/proc/self/mounts").split(separator: "\n").contains {
        $0.split(separator: " ").dropFirst().first == point[...]
    }
}

func monotonicNow() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

/// The bus under an operation that cannot finish soon; front-end independent, so it runs in the host lane
/// only (the guest lane runs BusTests and GuestTests).
@Suite(.enabled(if: busTestsCanRun, "needs root, /dev/fuse and /dev/loop-control"))
struct StuckOperationTests {
    let vdisk = TestEnvironment.product("vdisk")

    func sh(_ script: String) -> ProcessResult { run("/bin/sh", ["-c", script]) }

    /// Invariant: the bus answers `vdisk list` while an operation is stuck (a remote server that accepts
    /// the connection and never says a word), and the stuck plug ends with an error naming the server.
    @Test func listAnswersWhileAPlugIsStuck() throws {
        let h = BusTests.Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let silent = h.dir + "/silent.sock"
        let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(listener) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in silent.utf8.enumerated() { raw[i] = b }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        try #require(bound == 0 && listen(listener, 4) == 0)
        _ = try h.plug(["--ram", "16M", "--name", "before", "--device", "none"])
        // The stuck plug runs in the background; its end is the marker file.
        let plugging = sh(
            "(VDISK_RUNTIME_DIR=\(h.runtime) \(vdisk) plug --device none 'nbd+unix:///x?socket=\(silent)' "
                + ">\(h.dir)/stuck.out 2>\(h.dir)/stuck.err; echo $? > \(h.dir)/stuck.done) &"
        )
        #expect(plugging.status == 0)
        // The plug is inside the bus once the silent server has a connection waiting.
        var waiting = false
        for _ in 0..<200 {
            var entry = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            if poll(&entry, 1, 50) == 1 {
                waiting = true
                break
            }
        }
        try #require(waiting, "the plug never reached the silent server")
        let start = monotonicNow()
        let list = h.vd(["list"])
        #expect(list.status == 0 && list.stdout.contains("before"), "\(list.stdout)\(list.stderr)")
        #expect(monotonicNow() - start < 15, "list waited for the stuck plug")
        #expect(access(h.dir + "/stuck.done", F_OK) != 0, "the plug was not stuck")
        for _ in 0..<900 where access(h.dir + "/stuck.done", F_OK) != 0 { usleep(100_000) }
        #expect(readFile(h.dir + "/stuck.done") == "1\n")
        #expect(readFile(h.dir + "/stuck.err").contains(silent), "\(readFile(h.dir + "/stuck.err"))")
    }
}
