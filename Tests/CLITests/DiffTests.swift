import BlockIO
import ImageFormats
import Testing
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Snapshot diffs as rbd diff v1 streams: `vimg diff`, `export-diff`, `import-diff`, and Ceph's own
/// `rbd merge-diff` reading ours (it needs no cluster).
@Suite(.serialized) struct DiffTests {
    let vimg = TestEnvironment.product("vimg")
    static let rbd = TestEnvironment.which("rbd")

    /// An image with snapshots s1, s2, s3 taken after three rounds of writes (and a discard); returns the
    /// content at each snapshot.
    func makeHistory(_ path: String) throws -> [String: [UInt8]] {
        #expect(run(vimg, ["create", "-q", "-o", "cluster_size=4K", path, "8M"]).status == 0)
        let image = try ImageFormats.openVImage(path: path, readOnly: false)
        var contents: [String: [UInt8]] = [:]
        var rng = SeededRandom(seed: 42)
        for (round, name) in ["s1", "s2", "s3"].enumerated() {
            for i in 0..<6 {
                let offset = UInt64.random(in: 0..<(8 << 20) - 70000, using: &rng)
                try image.write(Pattern.bytes(count: 65000, offset: offset, seed: UInt64(round * 10 + i)), at: offset)
            }
            if round == 1 { try image.discard(at: 1 << 20, count: 1 << 20) }
            try image.createSnapshot(named: name)
            contents[name] = try image.read(count: 8 << 20, at: 0)
        }
        try image.close()
        return contents
    }

    func content(_ path: String) throws -> [UInt8] {
        let image = try ImageFormats.open(path: path, readOnly: true)
        defer { try? image.close() }
        return try image.read(count: Int(image.size), at: 0)
    }

    /// Invariant: a full diff plus incrementals, exported by vimg and (for two of them) merged by
    /// `rbd merge-diff`, rebuilds a byte-identical disk with the same snapshots when imported into an
    /// empty image; `vimg diff` lists the changed ranges as JSON.
    @Test func fullPlusIncrementalsRestoreTheDisk() throws {
        let dir = TestEnvironment.temporaryDirectory("vimg-diff")
        defer { TestEnvironment.remove(dir) }
        let source = dir + "/src.vimg"
        let contents = try makeHistory(source)
        #expect(run(vimg, ["export-diff", "--to-snap", "s1", source, dir + "/d1"]).status == 0)
        #expect(run(vimg, ["export-diff", "--from-snap", "s1", "--to-snap", "s2", source, dir + "/d2"]).status == 0)
        #expect(run(vimg, ["export-diff", "--from-snap", "s2", "--to-snap", "s3", source, dir + "/d3"]).status == 0)
        let listing = run(vimg, ["diff", "--from-snap", "s1", "--to-snap", "s2", "--output=json", source])
        #expect(
            listing.status == 0 && listing.stdout.contains("\"type\": \"zero\"")
                && listing.stdout.contains("\"type\": \"data\"")
        )

        var incremental = dir + "/d3"
        if let rbd = Self.rbd {
            let merged = run(rbd, ["merge-diff", dir + "/d2", dir + "/d3", dir + "/d23"])
            #expect(merged.status == 0, "rbd merge-diff: \(merged.stderr)")
            incremental = dir + "/d23"
        }
        let target = dir + "/restored.vimg"
        #expect(run(vimg, ["create", "-q", target, "8M"]).status == 0)
        #expect(run(vimg, ["import-diff", dir + "/d1", target]).status == 0)
        if incremental == dir + "/d3" { #expect(run(vimg, ["import-diff", dir + "/d2", target]).status == 0) }
        let applied = run(vimg, ["import-diff", incremental, target])
        #expect(applied.status == 0, "\(applied.stderr)")
        #expect(try content(target) == contents["s3"]!)
        let snapshots = run(vimg, ["snapshot", "-l", target]).stdout
        #expect(snapshots.contains("s1") && snapshots.contains("s3"))
        #expect(run(vimg, ["check", target]).status == 0)
    }

    /// Invariant: import-diff refuses a diff whose starting snapshot the image lacks, one whose ending
    /// snapshot it already has, and one over a disk changed since the start (unless --force); a stream cut
    /// short fails and leaves the image exactly as it was.
    @Test func importDiffRefusals() throws {
        let dir = TestEnvironment.temporaryDirectory("vimg-diff")
        defer { TestEnvironment.remove(dir) }
        let source = dir + "/src.vimg"
        _ = try makeHistory(source)
        #expect(run(vimg, ["export-diff", "--to-snap", "s1", source, dir + "/d1"]).status == 0)
        #expect(run(vimg, ["export-diff", "--from-snap", "s1", "--to-snap", "s2", source, dir + "/d2"]).status == 0)
        let target = dir + "/t.vimg"
        #expect(run(vimg, ["create", "-q", target, "8M"]).status == 0)
        let missingFrom = run(vimg, ["import-diff", dir + "/d2", target])
        #expect(missingFrom.status == 1 && missingFrom.stderr.contains("'s1'"))
        #expect(run(vimg, ["import-diff", dir + "/d1", target]).status == 0)
        let again = run(vimg, ["import-diff", dir + "/d1", target])
        #expect(again.status == 1 && again.stderr.contains("already has snapshot 's1'"))

        // A live change since s1: refused, unless forced.
        let image = try ImageFormats.openVImage(path: target, readOnly: false)
        try image.write([UInt8](repeating: 9, count: 4096), at: 0)
        try image.close()
        let changed = run(vimg, ["import-diff", dir + "/d2", target])
        #expect(changed.status == 1 && changed.stderr.contains("changed since snapshot 's1'"))

        // A stream cut in the middle of a data record: error, image unchanged.
        let whole = try FixtureBytes.read(dir + "/d2")
        try FixtureBytes.write(Array(whole.prefix(whole.count / 2)), to: dir + "/cut")
        let before = try content(target)
        let cut = run(vimg, ["import-diff", "--force", dir + "/cut", target])
        #expect(cut.status == 1 && cut.stderr.contains("ends early"), "\(cut.stderr)")
        #expect(try content(target) == before)
        #expect(!run(vimg, ["snapshot", "-l", target]).stdout.contains("import-diff"))
        #expect(run(vimg, ["check", target]).status == 0)
        #expect(run(vimg, ["import-diff", "--force", dir + "/d2", target]).status == 0)
    }

    /// Invariant: hostile streams (bad banner, unknown record, a record past the end, absurd name
    /// lengths) are refused with a clear error, never a trap.
    @Test func hostileStreams() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 20)
        let image = try VImage.open(host: host, readOnly: false)
        defer { try? image.close() }
        func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
        let banner = Array("rbd diff v1\n".utf8)
        let cases: [(String, [UInt8])] = [
            ("banner", Array("rbd diff v2\n".utf8) + [UInt8(ascii: "e")]),
            ("record", banner + [UInt8(ascii: "q")]),
            ("past end", banner + [UInt8(ascii: "z")] + le64(1 << 20) + le64(512) + [UInt8(ascii: "e")]),
            ("overflow", banner + [UInt8(ascii: "w")] + le64(.max) + le64(2) + [UInt8(ascii: "e")]),
            ("name", banner + [UInt8(ascii: "f"), 0xFF, 0xFF, 0xFF, 0x7F]),
            ("empty", []),
        ]
        for (name, bytes) in cases {
            var source = BytesSource(bytes)
            #expect(throws: ImageFormatError.self, "\(name)") { try RBDDiff.apply(&source, to: image) }
        }
        #expect(image.snapshotList.isEmpty)
        #expect(try image.read(count: 4096, at: 0) == [UInt8](repeating: 0, count: 4096))
    }
}

/// Whole-file reads and writes for test fixtures.
enum FixtureBytes {
    static func read(_ path: String) throws -> [UInt8] {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        return try file.read(count: Int(file.size), at: 0)
    }

    static func write(_ bytes: [UInt8], to path: String) throws {
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
        try file.write(bytes, at: 0)
        try file.close()
    }
}
