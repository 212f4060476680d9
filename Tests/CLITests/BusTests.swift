import Glibc
import Testing
import VImageTestSupport

let busTestsCanRun =
    TestEnvironment.isRoot && access("/dev/fuse", F_OK) == 0 && access("/dev/loop-control", F_OK) == 0
    && TestEnvironment.which("mkfs.ext4") != nil && TestEnvironment.which("sfdisk") != nil

/// The bus end to end, as root, through the kernel: plug, partition, mkfs, mount, copy, unmount, unplug,
/// plug again and compare; snapshots of mounted disks; many disks at once; failure paths that must leave
/// nothing behind. Runs where FUSE and loop devices work (CI runs as root); skips elsewhere.
@Suite(.serialized, .enabled(if: busTestsCanRun, "needs root, /dev/fuse and /dev/loop-control"))
struct BusTests {
    let vdisk = TestEnvironment.product("vdisk")
    let vimg = TestEnvironment.product("vimg")

    /// A bus of its own (its own runtime folder), stopped and checked for leftovers at the end.
    final class Harness {
        let dir: String
        let runtime: String
        let vdisk: String
        var env: [String: String] { ["VDISK_RUNTIME_DIR": runtime] }

        init(vdisk: String) {
            self.vdisk = vdisk
            dir = TestEnvironment.temporaryDirectory("vdisk-bus")
            runtime = dir + "/run"
        }

        @discardableResult
        func vd(_ args: [String]) -> ProcessResult { run(vdisk, args, environment: env) }

        /// Plugs and returns the device path (fails the test with the bus's message otherwise).
        func plug(_ args: [String]) throws -> String {
            let r = vd(["plug"] + args)
            try #require(r.status == 0, "plug \(args): \(r.stderr)")
            return r.stdout.split(separator: "\n").first.map(String.init) ?? ""
        }

        func stopAndCheckClean() {
            let stop = vd(["bus", "--stop"])
            #expect(stop.status == 0, "\(stop.stderr)")
            #expect(leftovers() == [], "left behind: \(leftovers())")
            TestEnvironment.remove(dir)
        }

        /// Loop devices bound to our FUSE files, our FUSE mounts, and a bus that is still running.
        func leftovers() -> [String] {
            var found: [String] = []
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

    /// Invariant: a VIMG disk survives partition + mkfs + copy + unplug + re-plug bit for bit.
    @Test func vimgDiskEndToEnd() throws {
        let h = Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/disk.vimg"
        #expect(run(vimg, ["create", image, "256M"]).status == 0)
        try partitionedRoundTrip(h, source: [image], replug: true, checkImage: image)
    }

    /// Invariant: the same on a raw file.
    @Test func rawDiskEndToEnd() throws {
        let h = Harness(vdisk: vdisk)
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
        .enabled(if: TestEnvironment.which("qemu-nbd") != nil, "qemu-nbd not installed"),
        arguments: RemoteServer.allCases.filter { $0 == .qemu || TestCertificates.shared != nil }
    )
    func remoteNBDExportEndToEnd(_ server: RemoteServer) throws {
        let h = Harness(vdisk: vdisk)
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
            for _ in 0..<100 where access(socket, F_OK) != 0 { usleep(20_000) }
        case .vdiskTLS:
            let serving = sh(
                "\(vdisk) serve --socket \(socket) --export exp --tls=require --tls-verify-peer --tls-certificates \(h.dir)/pki-server "
                    + "\(file) >/dev/null 2>\(h.dir)/serve.err & echo $! > \(h.dir)/server.pid"
            )
            #expect(serving.status == 0)
            for _ in 0..<200 where access(socket, F_OK) != 0 { usleep(20_000) }
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
    @Test func ramDiskEndToEnd() throws {
        let h = Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        try partitionedRoundTrip(h, source: ["--ram", "128M", "--name", "scratch"], replug: false, checkImage: nil)
    }

    /// Invariant: a clone over a base holding a file system sees the base's files, takes new ones, and
    /// leaves the base untouched.
    @Test func cloneOverBase() throws {
        let h = Harness(vdisk: vdisk)
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
    @Test func snapshotOfMountedDisk() throws {
        let h = Harness(vdisk: vdisk)
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
        unmount(point)
        #expect(h.vd(["unplug", "then"]).status == 0)
        #expect(h.vd(["unplug", "live"]).status == 0)
        #expect(run(vimg, ["check", image]).status == 0)
        let list = run(vimg, ["snapshot", "-l", image])
        #expect(list.stdout.contains("s1"))
    }

    /// Invariant: many disks at once, listed, then unplugged in random order, leave nothing behind.
    @Test func eightDisksAtOnce() throws {
        let h = Harness(vdisk: vdisk)
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
            if: TestEnvironment.which("qemu-io") != nil && TestEnvironment.which("nbdinfo") != nil,
            "qemu-io/nbdinfo not installed"
        )
    )
    func exportsOnTheBusSocket() throws {
        let h = Harness(vdisk: vdisk)
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
    @Test func failurePaths() throws {
        let h = Harness(vdisk: vdisk)
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
            let rw = h.vd(["plug", qcow])
            #expect(rw.status == 1 && rw.stderr.contains("read-only"), "\(rw.stderr)")
        }
        // A second bus on the same runtime folder refuses to start.
        let second = h.vd(["bus"])
        #expect(second.status == 1 && second.stderr.contains("already running"), "\(second.stderr)")
        let list = h.vd(["list", "--output=json"])
        #expect(list.stdout.split(separator: "\"name\"").count == 2, "exactly one disk: \(list.stdout)")
        #expect(h.vd(["unplug", "--all"]).status == 0)
    }

    /// Invariant: with --persist the bus re-plugs its disks after a restart.
    @Test func persistReplugsAfterRestart() throws {
        let h = Harness(vdisk: vdisk)
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

    /// The /dev/nbdN path, where the kernel has NBD (these CI machines do not).
    @Test(
        .enabled(
            if: access("/dev/nbd0", F_OK) == 0 && TestEnvironment.which("nbd-client") != nil,
            "the kernel has no /dev/nbd0 here"
        )
    )
    func kernelNBDDevice() throws {
        let h = Harness(vdisk: vdisk)
        defer { h.stopAndCheckClean() }
        let image = h.dir + "/n.vimg"
        #expect(run(vimg, ["create", image, "64M"]).status == 0)
        let d = try h.plug([image, "--device", "nbd"])
        #expect(d.hasPrefix("/dev/nbd"))
        #expect(run("mkfs.ext4", ["-q", d]).status == 0)
        fsckClean(d)
        #expect(h.vd(["unplug", d]).status == 0)
    }
}
