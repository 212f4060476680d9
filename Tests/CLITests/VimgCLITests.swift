import BlockIO
import Glibc
import ImageFormats
import Testing
import VImage
import VImageTestSupport

/// The built `vimg` binary: stdout, stderr and exit codes against golden text, and `qemu-img`/`qemu-io`
/// reading what we write.
@Suite(.serialized) struct VimgCLITests {
    let vimg = TestEnvironment.product("vimg")
    static let hasQemu = TestEnvironment.which("qemu-img") != nil && TestEnvironment.which("qemu-io") != nil

    func inTemporaryDirectory(_ body: (String) throws -> Void) rethrows {
        let dir = TestEnvironment.temporaryDirectory("vimg-cli")
        defer { TestEnvironment.remove(dir) }
        try body(dir)
    }

    /// Output minus lines whose value depends on the file system (allocated size) or is random (UUID).
    func stable(_ text: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("disk size:") && !$0.contains("\"actual-size\"") && !$0.contains("uuid") }
            .joined(separator: "\n")
    }

    /// Invariant: create and info print qemu-img's layout, byte for byte.
    @Test func createAndInfoGolden() {
        inTemporaryDirectory { dir in
            let r = run(vimg, ["create", "-o", "cluster_size=4K", dir + "/a.vimg", "10G"])
            #expect(r.status == 0)
            #expect(r.stdout == "Formatting '\(dir)/a.vimg', fmt=vimg cluster_size=4096 size=10737418240\n")
            let info = run(vimg, ["info", dir + "/a.vimg"])
            #expect(info.status == 0)
            #expect(
                stable(info.stdout) == """
                    image: \(dir)/a.vimg
                    file format: vimg
                    virtual size: 10 GiB (10737418240 bytes)
                    cluster_size: 4096
                    Format specific information:
                        version: 1
                        refcount bits: 16
                        snapshots: 0
                        dirty: no
                        corrupt: no
                        checksums: no

                    """
            )
            let json = run(vimg, ["info", "--output=json", dir + "/a.vimg"])
            #expect(json.status == 0)
            #expect(json.stdout.contains("\"virtual-size\": 10737418240,"))
            #expect(json.stdout.contains("\"cluster-size\": 4096,"))
            #expect(json.stdout.contains("\"format\": \"vimg\","))
            // A new image gets a random version-4 UUID (docs/FORMAT.md, "Image UUID").
            let uuid = info.stdout.split(separator: "\n").first { $0.contains("uuid:") }?.split(separator: " ").last
            #expect(
                uuid?.count == 36 && uuid?.split(separator: "-").map(\.count) == [8, 4, 4, 4, 12],
                "\(info.stdout)"
            )
            #expect(json.stdout.contains("\"uuid\": \"\(uuid ?? "")\""))
        }
    }

    /// Invariant: sizes take qemu-img's suffixes; bad input is a clear error with a non-zero exit.
    @Test func createErrors() {
        inTemporaryDirectory { dir in
            for (size, bytes) in [
                ("512M", "536870912"), ("1T", "1099511627776"), ("1536K", "1572864"), ("65536", "65536"),
            ] {
                let r = run(vimg, ["create", dir + "/s\(size).vimg", size])
                #expect(r.status == 0 && r.stdout.contains("size=\(bytes)"), "\(size): \(r.stdout)\(r.stderr)")
            }
            let bad = run(vimg, ["create", dir + "/bad.vimg", "10X"])
            #expect(bad.status != 0 && bad.stderr.contains("invalid size '10X'"))
            let cluster = run(vimg, ["create", "-o", "cluster_size=3000", dir + "/c.vimg", "1G"])
            #expect(cluster.status != 0 && cluster.stderr.contains("cluster_size"))
            let again = run(vimg, ["create", dir + "/s512M.vimg", "1G"])
            #expect(again.status == 1 && again.stderr == "vimg: error: \(dir)/s512M.vimg: file already exists\n")
            let missing = run(vimg, ["info", dir + "/none.vimg"])
            #expect(missing.status == 1 && missing.stderr.lowercased().contains("no such file or directory"))
            #expect(run(vimg, ["create", "-f", "qcow3", dir + "/q", "1G"]).status != 0)
        }
    }

    /// Invariant: map reports data, zero and unallocated extents with qemu-img map's fields.
    @Test func mapAfterWrites() throws {
        try inTemporaryDirectory { dir in
            let path = dir + "/m.vimg"
            try VImage.create(path: path, virtualSize: 4 << 20)
            let image = try VImage.open(path: path, readOnly: false)
            try image.write([UInt8](repeating: 0xAB, count: 1 << 16), at: 1 << 20)
            try image.write([UInt8](repeating: 0xCD, count: 1 << 16), at: 2 << 20)
            try image.writeZeroes(at: 2 << 20, count: 1 << 16, mayUnmap: false, fast: false)
            try image.close()
            let r = run(vimg, ["map", "--output=json", path])
            #expect(r.status == 0)
            let compact = r.stdout.filter { !$0.isWhitespace }
            #expect(
                compact.contains(
                    "{\"start\":0,\"length\":1048576,\"depth\":0,\"present\":false,\"zero\":true,\"data\":false}"
                ),
                "\(r.stdout)"
            )
            #expect(
                compact.contains(
                    "{\"start\":1048576,\"length\":65536,\"depth\":0,\"present\":true,\"zero\":false,\"data\":true,\"offset\":"
                ),
                "\(r.stdout)"
            )
            #expect(
                compact.contains(
                    "{\"start\":2097152,\"length\":65536,\"depth\":0,\"present\":true,\"zero\":true,\"data\":false"
                ),
                "\(r.stdout)"
            )
            let human = run(vimg, ["map", path])
            #expect(human.status == 0)
            #expect(
                human.stdout.hasPrefix(
                    "Offset          Length          Mapped to       File\n0x100000        0x10000         0x"
                ),
                "\(human.stdout)"
            )
        }
    }

    /// Offset of cluster `cluster`'s 16-bit refcount in the file (first refcount block only).
    func refcountEntryOffset(_ path: String, cluster: Int) throws -> UInt64 {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        let header = try ImageHeader.decode(try file.read(count: 4096, at: 0))
        let table = try file.read(count: 8, at: header.refcountTableOffset.rawValue)
        let block = table.reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        return block + UInt64(cluster * 2)
    }

    func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    func poke(_ path: String, _ bytes: [UInt8], at offset: UInt64) throws {
        let file = try FileDevice.open(path: path, readOnly: false, create: !exists(path), growable: true)
        try file.write(bytes, at: offset)
        try file.close()
    }

    /// Invariant: check's exit codes are qemu-img's: 0 clean, 3 leaks only, 2 corruptions, 1 not completed;
    /// `-r leaks` and `-r all` return the state after repair.
    @Test func checkExitCodes() throws {
        try inTemporaryDirectory { dir in
            let path = dir + "/c.vimg"
            try VImage.create(path: path, virtualSize: 64 << 20)
            let image = try VImage.open(path: path, readOnly: false)
            try image.write([UInt8](repeating: 1, count: 3 << 16), at: 0)
            try image.close()
            let clean = run(vimg, ["check", path])
            #expect(clean.status == 0)
            #expect(clean.stdout.hasPrefix("No errors were found on the image.\n"), "\(clean.stdout)")

            // A leak: a cluster past everything referenced, counted once. Grow the file to cover it.
            let file = try FileDevice.open(path: path, readOnly: false, growable: true)
            let end = file.size
            try file.write([UInt8](repeating: 0, count: 1 << 16), at: end)
            try file.close()
            try poke(path, [0, 1], at: try refcountEntryOffset(path, cluster: Int(end >> 16)))
            let leak = run(vimg, ["check", path])
            #expect(leak.status == 3, "\(leak.stdout)")
            #expect(
                leak.stdout.contains("Leaked: cluster \(end >> 16) has refcount 1 but 0 references"),
                "\(leak.stdout)"
            )
            let leakJSON = run(vimg, ["check", "--output=json", path])
            #expect(leakJSON.status == 3 && leakJSON.stdout.contains("\"leaks\": 1"), "\(leakJSON.stdout)")
            let dry = run(vimg, ["check", "-r", "leaks", "--dry-run", path])
            #expect(dry.status == 3, "\(dry.stdout)")
            let fixed = run(vimg, ["check", "-r", "leaks", path])
            #expect(fixed.status == 0, "\(fixed.stdout)\(fixed.stderr)")
            #expect(run(vimg, ["check", path]).status == 0)

            // A corruption: a data cluster whose refcount is 0 while the L2 table references it.
            let data = try firstDataCluster(path)
            try poke(path, [0, 0], at: try refcountEntryOffset(path, cluster: data))
            let corrupt = run(vimg, ["check", path])
            #expect(corrupt.status == 2, "\(corrupt.stdout)")
            #expect(corrupt.stdout.contains("ERROR"), "\(corrupt.stdout)")
            let repaired = run(vimg, ["check", "-r", "all", path])
            #expect(repaired.status == 0, "\(repaired.stdout)\(repaired.stderr)")
            let reopened = try VImage.open(path: path, readOnly: true)
            #expect(try reopened.read(count: 3 << 16, at: 0) == [UInt8](repeating: 1, count: 3 << 16))
            try reopened.close()

            // Not an image at all: the check cannot complete.
            try poke(dir + "/junk", [UInt8](repeating: 0x5A, count: 8192), at: 0)
            let junk = run(vimg, ["check", dir + "/junk"])
            #expect(junk.status == 1, "\(junk.stdout)\(junk.stderr)")
        }
    }

    func firstDataCluster(_ path: String) throws -> Int {
        let image = try VImage.open(path: path, readOnly: true)
        defer { try? image.close() }
        let extents = try image.mapping(at: 0, count: image.size)
        for m in extents { if case .data(let host) = m.kind { return Int(host >> 16) } }
        throw VImageError(.notFound, message: "no data cluster")
    }

    /// Invariant: a raw image we create, and a raw base we commit a clone into, read in qemu-img and qemu-io
    /// exactly as we wrote them.
    @Test(.enabled(if: hasQemu, "qemu-img/qemu-io not installed (Tools/setup.sh installs qemu-utils)"))
    func qemuReadsOurRaw() throws {
        try inTemporaryDirectory { dir in
            let base = dir + "/base.raw"
            let child = dir + "/child.vimg"
            #expect(run(vimg, ["create", "-f", "raw", base, "64M"]).status == 0)
            let info = run("qemu-img", ["info", "--output=json", "-f", "raw", base])
            #expect(info.status == 0 && info.stdout.contains("\"virtual-size\": 67108864"), "\(info.stdout)")
            #expect(run(vimg, ["clone", base, child]).status == 0)
            let image = try ImageFormats.openVImage(path: child, readOnly: false)
            try image.write([UInt8](repeating: 0xAB, count: 1 << 20), at: 4 << 20)
            try image.write([UInt8](repeating: 0xCD, count: 4096), at: (64 << 20) - 4096)
            try image.write([UInt8](repeating: 0xEF, count: 700), at: 12345)
            try image.close()
            let commit = run(vimg, ["commit", child])
            #expect(commit.status == 0, "\(commit.stderr)")
            let io = run(
                "qemu-io",
                [
                    "-f", "raw", "-r", base,
                    "-c", "read -P 0xab 4M 1M", "-c", "read -P 0xcd 67104768 4096", "-c", "read -P 0xef 12345 700",
                    "-c", "read -P 0 0 12345", "-c", "read -P 0 5M 1M",
                ]
            )
            #expect(io.status == 0 && !io.stdout.contains("Pattern verification failed"), "\(io.stdout)\(io.stderr)")
            // And qemu-img agrees the clone (through its raw base) and the base are the same guest disk.
            let plain = dir + "/plain.raw"
            #expect(run(vimg, ["create", "-f", "raw", plain, "64M"]).status == 0)
            let dev = try FileDevice.open(path: plain, readOnly: false)
            try dev.write([UInt8](repeating: 0xAB, count: 1 << 20), at: 4 << 20)
            try dev.write([UInt8](repeating: 0xCD, count: 4096), at: (64 << 20) - 4096)
            try dev.write([UInt8](repeating: 0xEF, count: 700), at: 12345)
            try dev.close()
            let compare = run("qemu-img", ["compare", "-f", "raw", "-F", "raw", base, plain])
            #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
            #expect(run(vimg, ["compare", base, plain]).status == 0)
        }
    }
}
