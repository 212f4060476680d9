import BlockIO
import Glibc
import Testing
import VImage
import VImageTestSupport

/// `vimg convert`, `measure` and the qcow2 side of `info`/`map`/`check`, against qemu-img on fixtures it
/// makes during the run.
@Suite(.serialized, .enabled(if: TestEnvironment.which("qemu-img") != nil && TestEnvironment.which("qemu-io") != nil))
struct ConvertTests {
    let vimg = TestEnvironment.product("vimg")

    func inTemporaryDirectory(_ body: (String) throws -> Void) rethrows {
        let dir = TestEnvironment.temporaryDirectory("vimg-convert")
        defer { TestEnvironment.remove(dir) }
        try body(dir)
    }

    @discardableResult
    func must(_ program: String, _ arguments: [String]) -> ProcessResult {
        let r = run(program, arguments)
        #expect(r.status == 0, "\(program) \(arguments.joined(separator: " ")): \(r.stdout)\(r.stderr)")
        return r
    }

    func bytes(_ path: String) throws -> [UInt8] {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        return try file.read(count: Int(file.size), at: 0)
    }

    func allocated(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_blocks) * 512 : 0
    }

    func writeBytes(_ data: [UInt8], to path: String) throws {
        unlink(path)
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
        try file.write(data, at: 0)
        try file.close()
    }

    /// A raw source: pattern data, text and holes.
    func mixedRaw(_ path: String, size: Int = 4 << 20) throws {
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
        defer { try? file.close() }
        try file.truncate(to: UInt64(size))
        let text = Array("all work and no play makes jack a dull boy\n".utf8)
        var offset = 0
        var piece = 0
        while offset < size {
            let length = min(size - offset, [256 << 10, 192 << 10, 320 << 10][piece % 3])
            if piece % 3 == 0 {
                try file.write(Pattern.bytes(count: length, offset: UInt64(offset), seed: 5), at: UInt64(offset))
            }
            if piece % 3 == 1 { try file.write((0..<length).map { text[$0 % text.count] }, at: UInt64(offset)) }
            offset += length
            piece += 1
        }
    }

    /// Expects `vimg convert -O raw` and `qemu-img convert -O raw` to produce the same bytes.
    func expectSameRaw(_ source: String, _ extra: [String] = [], dir: String) throws {
        let ours = dir + "/ours.raw"
        let theirs = dir + "/theirs.raw"
        unlink(ours)
        unlink(theirs)
        must(vimg, ["convert", "-O", "raw"] + extra + [source, ours])
        must("qemu-img", ["convert", "-O", "raw"] + extra + [source, theirs])
        #expect(firstDifference(try bytes(ours)[...], try bytes(theirs)[...]) == nil, "\(source) \(extra)")
    }

    /// Invariant: for qcow2 sources of every kind (zlib and zstd clusters, zero clusters, snapshots, a
    /// two-deep chain, 512 B and 2 MiB clusters) `vimg convert -O raw` equals `qemu-img convert -O raw`.
    @Test func rawOutputMatchesQemu() throws {
        try inTemporaryDirectory { dir in
            let src = dir + "/src.raw"
            try mixedRaw(src)
            for (name, options) in [
                ("zlib", ["-c"]), ("zstd", ["-c", "-o", "compression_type=zstd"]),
                ("c512", ["-o", "cluster_size=512"]),
                ("c2m", ["-o", "cluster_size=2M"]),
            ] {
                must("qemu-img", ["convert", "-O", "qcow2"] + options + [src, dir + "/\(name).qcow2"])
                try expectSameRaw(dir + "/\(name).qcow2", dir: dir)
            }
            let z = dir + "/z.qcow2"
            must("qemu-img", ["create", "-q", "-f", "qcow2", z, "4M"])
            must("qemu-io", ["-c", "write -P 0xaa 0 3M", "-c", "write -z 1M 256k", z])
            must("qemu-img", ["snapshot", "-c", "before", z])
            must("qemu-io", ["-c", "write -P 0xbb 512k 1M", "-c", "write -z 2M 64k", z])
            try expectSameRaw(z, dir: dir)
            try expectSameRaw(z, ["-l", "before"], dir: dir)
            must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "z.qcow2", "-F", "qcow2", dir + "/mid.qcow2"])
            must("qemu-io", ["-c", "write -P 0x11 64k 128k", dir + "/mid.qcow2"])
            must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", dir + "/top.qcow2"])
            must("qemu-io", ["-c", "write -z 0 64k", "-c", "write -P 0x22 3500k 4k", dir + "/top.qcow2"])
            try expectSameRaw(dir + "/top.qcow2", dir: dir)
        }
    }

    /// Invariant: `-t none` / `-T none` (direct I/O on the output and the source) give the same bytes as
    /// the default, for raw (a size that ends inside a 4 KiB block), VIMG and qcow2 outputs.
    @Test func cacheNoneOutputsAreIdentical() throws {
        try inTemporaryDirectory { dir in
            let src = dir + "/src.raw"
            try mixedRaw(src, size: (4 << 20) + 1536)
            must(vimg, ["convert", "-t", "none", "-T", "none", "-O", "raw", src, dir + "/direct.raw"])
            #expect(firstDifference(try bytes(dir + "/direct.raw")[...], try bytes(src)[...]) == nil)
            must(vimg, ["convert", "-t", "none", "-O", "vimg", src, dir + "/direct.vimg"])
            must(vimg, ["check", dir + "/direct.vimg"])
            must(vimg, ["compare", src, dir + "/direct.vimg"])
            must(vimg, ["convert", "-T", "none", "-t", "none", "-O", "qcow2", dir + "/direct.vimg", dir + "/d.qcow2"])
            must("qemu-img", ["check", dir + "/d.qcow2"])
            must("qemu-img", ["compare", src, dir + "/d.qcow2"])
            let bad = run(vimg, ["convert", "-t", "fast", "-O", "raw", src, dir + "/bad.raw"])
            #expect(bad.status == 64 && bad.stderr.contains("unsafe, writeback or none"), "\(bad.stderr)")
        }
    }

    /// Invariant: VIMG (plain and -c) converted to qcow2 is equal to its source for qemu-img compare and
    /// clean for qemu-img check, and so is raw to qcow2 at 512 B and 2 MiB clusters.
    @Test func qcow2OutputIsCleanAndEqual() throws {
        try inTemporaryDirectory { dir in
            let src = dir + "/src.raw"
            try mixedRaw(src)
            for compress in [false, true] {
                let v = dir + "/v\(compress).vimg"
                let q = dir + "/v\(compress).qcow2"
                must(vimg, ["convert", "-O", "vimg"] + (compress ? ["-c"] : []) + [src, v])
                must(vimg, ["check", v])
                must(vimg, ["convert", "-f", "vimg", "-O", "qcow2", v, q])
                must("qemu-img", ["check", q])
                must("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", src, q])
                must(vimg, ["compare", v, q])
            }
            for size in ["512", "2M"] {
                let q = dir + "/c\(size).qcow2"
                must(vimg, ["convert", "-O", "qcow2", "-o", "cluster_size=\(size)", src, q])
                must("qemu-img", ["check", q])
                must("qemu-img", ["compare", src, q])
            }
        }
    }

    /// Invariant: raw -> vimg -c -> qcow2 -> raw is byte-identical and every output is sparse.
    @Test func roundTripIsIdenticalAndSparse() throws {
        try inTemporaryDirectory { dir in
            let src = dir + "/src.raw"
            try mixedRaw(src, size: 6 << 20)
            must(vimg, ["convert", "-p", "-O", "vimg", "-c", src, dir + "/a.vimg"])
            must(vimg, ["convert", "-O", "qcow2", dir + "/a.vimg", dir + "/b.qcow2"])
            must(vimg, ["convert", "-O", "raw", dir + "/b.qcow2", dir + "/c.raw"])
            #expect(firstDifference(try bytes(src)[...], try bytes(dir + "/c.raw")[...]) == nil)
            // A third of the source is holes, a third text (LZ4 shrinks it a lot).
            let size: UInt64 = 6 << 20
            #expect(allocated(dir + "/c.raw") <= size * 3 / 4, "raw output is not sparse")
            #expect(allocated(dir + "/b.qcow2") <= size * 3 / 4, "qcow2 output is not sparse")
            #expect(allocated(dir + "/a.vimg") <= size / 2, "compressed VIMG is not small")
            // -S 0 writes every byte of a raw file.
            must(vimg, ["convert", "-S", "0", "-O", "raw", dir + "/b.qcow2", dir + "/full.raw"])
            #expect(allocated(dir + "/full.raw") >= size)
            #expect(try bytes(dir + "/full.raw") == bytes(src))
            // No temporary files are left behind.
            let ls = run("/bin/ls", ["-a", dir])
            #expect(!ls.stdout.contains(".convert-"))
        }
    }

    /// Invariant: -B makes a clone holding only the clusters that differ from the backing file (zeroed
    /// clusters included), for VIMG and qcow2 outputs and for a qcow2 backing file.
    @Test func cloneOverBacking() throws {
        try inTemporaryDirectory { dir in
            let base = dir + "/base.raw"
            try mixedRaw(base)
            var changed = try bytes(base)
            for i in 70_000..<70_100 { changed[i] = 0x5A }
            for i in (1 << 20)..<(1 << 20) + (128 << 10) { changed[i] = 0 }  // was pattern data
            try writeBytes(changed, to: dir + "/new.raw")
            must("qemu-img", ["convert", "-O", "qcow2", base, dir + "/base.qcow2"])
            for (format, backing, backingFormat) in [
                ("vimg", "base.raw", "raw"), ("qcow2", "base.raw", "raw"), ("vimg", "base.qcow2", "qcow2"),
            ] {
                let out = dir + "/clone-\(format)-\(backingFormat).\(format)"
                must(vimg, ["convert", "-O", format, "-B", backing, "-F", backingFormat, dir + "/new.raw", out])
                must(vimg, ["compare", out, dir + "/new.raw"])
                let map = must(vimg, ["map", "--output=json", out]).stdout
                // Only the changed clusters (64 KiB at 64 KiB, 128 KiB of zeroes at 1 MiB) live in the clone.
                #expect(map.contains("\"start\": 65536,\n        \"length\": 65536,\n        \"depth\": 0"), "\(map)")
                #expect(
                    map.contains("\"start\": 1048576,\n        \"length\": 131072,\n        \"depth\": 0"),
                    "\(map)"
                )
                if format == "qcow2" {
                    must("qemu-img", ["check", out])
                    must("qemu-img", ["compare", out, dir + "/new.raw"])
                }
            }
        }
    }

    /// Invariant: info, map, check and measure read qcow2 files and agree with qemu-img on the numbers.
    @Test func inspectQcow2() throws {
        try inTemporaryDirectory { dir in
            let src = dir + "/src.raw"
            try mixedRaw(src)
            let q = dir + "/q.qcow2"
            must("qemu-img", ["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, q])
            let info = must(vimg, ["info", q]).stdout
            #expect(info.contains("file format: qcow2\nvirtual size: 4 MiB (4194304 bytes)"))
            #expect(info.contains("cluster_size: 65536") && info.contains("compression type: zstd"))
            let check = run(vimg, ["check", "--output=json", q])
            #expect(
                check.status == 0 && check.stdout.contains("\"format\": \"qcow2\""),
                "\(check.stdout)\(check.stderr)"
            )
            let map = must(vimg, ["map", "--output=json", q]).stdout
            #expect(map.contains("\"data\": true") && map.contains("\"zero\": true"))
            for args in [
                ["-O", "qcow2", src], ["-O", "qcow2", "--size", "10G"], ["-O", "raw", src],
                ["-O", "qcow2", "-o", "cluster_size=4K", src],
            ] {
                let ours = must(vimg, ["measure"] + args).stdout
                let theirs = must("qemu-img", ["measure"] + args).stdout
                #expect(ours == theirs, "measure \(args)")
            }
            let json = must(vimg, ["measure", "--output=json", "-O", "qcow2", src]).stdout
            #expect(json.contains("\"required\": ") && json.contains("\"fully-allocated\": "))
            // A leaked cluster is reported with qemu-img check's exit code 3.
            let leaky = dir + "/leaky.qcow2"
            must("qemu-img", ["create", "-q", "-f", "qcow2", leaky, "1M"])
            must("qemu-io", ["-c", "write 0 64k", leaky])
            var file = try bytes(leaky)
            // Refcount block at the 3rd cluster; bump the refcount of the L1 cluster (index 3) to 2.
            let rt = Int(UInt64(file[48..<56].reduce(0) { $0 << 8 | UInt64($1) }))
            let block = Int(file[rt..<rt + 8].reduce(0) { $0 << 8 | UInt64($1) })
            file[block + 2 * 3 + 1] = 2
            try writeBytes(file, to: leaky)
            #expect(run("qemu-img", ["check", leaky]).status == 3)
            #expect(run(vimg, ["check", leaky]).status == 3)
        }
    }

    /// Invariant: bad requests fail with exit 1 and "vimg: error:", leaving no output file behind.
    @Test func errors() throws {
        try inTemporaryDirectory { dir in
            try mixedRaw(dir + "/src.raw", size: 1 << 20)
            let missing = run(vimg, ["convert", "-O", "raw", dir + "/none.qcow2", dir + "/out.raw"])
            #expect(missing.status == 1 && missing.stderr.hasPrefix("vimg: error: "))
            let snapshot = run(vimg, ["convert", "-l", "nope", "-O", "raw", dir + "/src.raw", dir + "/out.raw"])
            #expect(snapshot.status == 1 && snapshot.stderr.contains("snapshots"))
            #expect(run(vimg, ["convert", "-c", "-O", "raw", dir + "/src.raw", dir + "/out.raw"]).status != 0)
            #expect(
                run(vimg, ["convert", "-O", "vimg", "-o", "cluster_size=512", dir + "/src.raw", dir + "/out.vimg"])
                    .status != 0
            )
            must("qemu-img", ["convert", "-O", "qcow2", dir + "/src.raw", dir + "/s.qcow2"])
            // Shrinking without --shrink is refused (qcow2 is written by the engine, as VIMG is).
            let shrink = run(vimg, ["resize", dir + "/s.qcow2", "512K"])
            #expect(shrink.status == 1 && shrink.stderr.contains("--shrink"), "\(shrink.stderr)")
            let ls = run("/bin/ls", ["-a", dir]).stdout
            #expect(!ls.contains("out.") && !ls.contains(".convert-"), "\(ls)")
        }
    }

    /// Invariant: corrupted qcow2 and VIMG sources (random byte flips in metadata, truncation) make
    /// convert exit 0 or 1, never die of a signal or hang.
    @Test func corruptSourcesNeverTrap() throws {
        try inTemporaryDirectory { dir in
            try mixedRaw(dir + "/src.raw", size: 1 << 20)
            must(
                "qemu-img",
                [
                    "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k,compression_type=zstd", dir + "/src.raw",
                    dir + "/q.qcow2",
                ]
            )
            must(vimg, ["convert", "-c", "-O", "vimg", "-o", "cluster_size=4K", dir + "/src.raw", dir + "/v.vimg"])
            var random = SeededRandom(seed: 7)
            for name in ["q.qcow2", "v.vimg"] {
                let pristine = try bytes(dir + "/" + name)
                for round in 0..<20 {
                    var data = pristine
                    if round % 5 == 4 {
                        data.removeSubrange(Int(random.next() % UInt64(data.count))...)
                    } else {
                        for _ in 0..<3 {
                            let at = Int(random.next() % UInt64(min(data.count, 48 << 10)))
                            data[at] ^= UInt8(truncatingIfNeeded: random.next() | 1)
                        }
                    }
                    let bad = dir + "/bad-" + name
                    try writeBytes(data, to: bad)
                    for format in ["raw", "qcow2"] {
                        unlink(dir + "/out")
                        let r = run("timeout", ["20", vimg, "convert", "-O", format, bad, dir + "/out"])
                        #expect(
                            r.status == 0 || r.status == 1,
                            "\(name) round \(round): status \(r.status) \(r.stderr)"
                        )
                    }
                }
            }
        }
    }
}
