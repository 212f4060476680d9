// Design notes
// ------------
// Writes the corrupt-image fixtures (Fixtures/corrupt) and the fuzz seed corpus (Fixtures/fuzz/corpus),
// deterministically: every image is built in memory by the engine from fixed content, snapshot
// timestamps are overwritten with a constant, and the damage is a few byte edits at offsets read from
// the image's own metadata. Each corrupt image's expected report is written by hand below, from the
// damage done (see Sources/VImageTestSupport/Fixtures.swift), not by running the checker.
//
// The base image (4 KiB clusters, 4 MiB virtual, two L2 tables):
//
//   guest clusters 0-3     pattern seed 7 (16 KiB)       -> L2 table A
//   guest clusters 600-601 pattern seed 7 (8 KiB)        -> L2 table B
//   (compressed variant) guest clusters 4-5 as LZ4 records sharing one host cluster
//
//   Usage: vimg-fixtures OUTDIR     (writes OUTDIR/corrupt/* and OUTDIR/fuzz/corpus/*)

import BlockIO
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

let cs = 4096
let virtualSize: UInt64 = 4 << 20
let seed: UInt64 = 7
let offsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
let copied: UInt64 = 1 << 63
let farAway: UInt64 = 1 << 30  // 1 GiB: past the end of every fixture, beyond its refcount blocks
let fixedTime: UInt64 = 1_700_000_000_000_000_000

let baseWritten: [FixtureSpec.Written] = [
    .init(offset: 0, length: 4 * cs, content: .pattern, seed: seed),
    .init(offset: 600 * UInt64(cs), length: 2 * cs, content: .pattern, seed: seed),
]
let compressedWritten: [FixtureSpec.Written] = [
    .init(offset: 4 * UInt64(cs), length: 2 * cs, content: .text, seed: 0)
]

/// An image under construction, with raw access to its metadata.
/// Every fixture's UUID: a random one would change the bytes on every run.
let fixedUUID = ImageUUID(bytes: Array("vdisk fixtures!!".utf8))!

struct Fixture {
    let host = MemoryDevice(size: 0, growable: true)
    var written = baseWritten

    init(snapshots: [String] = [], compressed: Bool = false, backingFile: String? = nil, checksums: Bool = false) throws
    {
        try VImage.create(
            on: host,
            virtualSize: virtualSize,
            options: .init(clusterBits: 12, backingFile: backingFile, checksums: checksums, uuid: fixedUUID)
        )
        // A clone's writes need a backing device; an empty one stands in for the named file.
        let image = try VImage.open(
            host: host,
            readOnly: false,
            backing: backingFile == nil ? nil : MemoryDevice(size: virtualSize)
        )
        if backingFile != nil { written = [.init(offset: UInt64(cs), length: cs, content: .pattern, seed: 11)] }
        for w in written {
            try image.write(w.content.bytes(count: w.length, offset: w.offset, seed: w.seed), at: w.offset)
        }
        if compressed {
            for w in compressedWritten {
                for c in stride(from: 0, to: w.length, by: cs) {
                    let data = w.content.bytes(count: cs, offset: w.offset + UInt64(c), seed: w.seed)
                    try data.withUnsafeBytes {
                        try image.writeCompressed(cluster: (w.offset + UInt64(c)) / UInt64(cs), data: $0)
                    }
                }
            }
            written += compressedWritten
        }
        try image.close()
        // One snapshot per open, each table's creation times fixed before the next is written (an old
        // table stays in the file as free space), so no byte depends on the clock.
        for name in snapshots {
            let image = try VImage.open(host: host, readOnly: false)
            try image.createSnapshot(named: name)
            try image.close()
            var entries = try snapshotEntries()
            for i in entries.indices { entries[i].createdNanoseconds = fixedTime }
            try writeSnapshotTable(entries)
        }
    }

    var header: ImageHeader { get throws { try ImageHeader.decode(try host.read(count: cs, at: 0)) } }

    func u64(_ offset: UInt64) throws -> UInt64 {
        try host.read(count: 8, at: offset).reduce(0) { $0 << 8 | UInt64($1) }
    }
    func put(_ offset: UInt64, _ value: UInt64) throws {
        try host.write((0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) }, at: offset)
    }
    func put16(_ offset: UInt64, _ value: UInt16) throws {
        try host.write([UInt8(value >> 8), UInt8(value & 0xff)], at: offset)
    }

    /// Host offset of active L1 entry `index`.
    func l1Entry(_ index: Int) throws -> UInt64 { try header.l1TableOffset.rawValue + UInt64(index * 8) }
    /// Host offset of the L2 entry mapping `guestCluster`.
    func l2Entry(_ guestCluster: Int) throws -> UInt64 {
        let table = try u64(try l1Entry(guestCluster / (cs / 8))) & offsetMask
        return table + UInt64(guestCluster % (cs / 8) * 8)
    }
    /// Host offset of the data cluster mapping `guestCluster`.
    func dataCluster(_ guestCluster: Int) throws -> UInt64 { try u64(try l2Entry(guestCluster)) & offsetMask }
    /// Host offset of the refcount of host cluster `cluster`.
    func refcount(ofCluster cluster: UInt64) throws -> UInt64 {
        let perBlock = UInt64(cs / 2)
        let block = try u64(try header.refcountTableOffset.rawValue + cluster / perBlock * 8) & offsetMask
        return block + cluster % perBlock * 2
    }
    /// Appends a cluster of zeroes with refcount 1 and no reference (a leak).
    func leakCluster() throws {
        let end = host.size / UInt64(cs)
        try host.write([UInt8](repeating: 0, count: cs), at: end * UInt64(cs))
        try put16(try refcount(ofCluster: end), 1)
    }
    func setFeatures(_ features: IncompatibleFeatures) throws {
        var h = try header
        h.incompatibleFeatures.formUnion(features)
        try host.write(h.encodeFixed(), at: 0)
    }
    func snapshotEntries() throws -> [SnapshotEntry] {
        let h = try header
        let bytes = try host.read(count: Int(h.snapshotTableSize), at: h.snapshotTableOffset.rawValue)
        return try SnapshotTable.decode(bytes, count: Int(h.snapshotCount), geometry: h.geometry, fileSize: host.size)
    }
    func writeSnapshotTable(_ entries: [SnapshotEntry]) throws {
        let h = try header
        let bytes = SnapshotTable.encode(entries)
        precondition(bytes.count == Int(h.snapshotTableSize), "the snapshot table must keep its size")
        try host.write(bytes, at: h.snapshotTableOffset.rawValue)
    }

    func guestCluster(_ c: Int) -> (offset: UInt64, length: Int) { (UInt64(c * cs), cs) }
}

typealias F = FixtureSpec.Finding

/// Builds each corrupt fixture: the image and its expected report.
func corruptFixtures() throws -> [(spec: FixtureSpec, image: [UInt8])] {
    var out: [(FixtureSpec, [UInt8])] = []
    func add(
        _ name: String,
        _ description: String,
        _ fixture: Fixture,
        findings: [F],
        check: Int32,
        repair: Int32,
        opens: Bool = true,
        recoverable: Bool = true,
        lost: [(offset: UInt64, length: Int)] = [],
        note: String = ""
    ) {
        let spec = FixtureSpec(
            name: name,
            description: description,
            virtualSize: virtualSize,
            clusterSize: cs,
            findings: findings,
            checkExit: check,
            repairExit: repair,
            opens: opens,
            recoverable: recoverable,
            written: fixture.written,
            lost: lost,
            note: note
        )
        out.append((spec, fixture.host.snapshotBytes()))
    }

    var f = try Fixture()
    try f.leakCluster()
    add(
        "leaked-cluster",
        "One cluster appended at the end of the file with refcount 1 and no reference.",
        f,
        findings: [F("leaked-cluster", "leak")],
        check: 3,
        repair: 0
    )

    f = try Fixture()
    try f.put16(try f.refcount(ofCluster: try f.dataCluster(1) / UInt64(cs)), 0)
    add(
        "refcount-too-low",
        "The data cluster of guest cluster 1 has refcount 0 but one reference.",
        f,
        findings: [F("refcount-too-low", "corruption")],
        check: 2,
        repair: 0
    )

    f = try Fixture(snapshots: ["s"])
    try f.put(try f.l1Entry(0), try f.u64(try f.l1Entry(0)) | copied)
    add(
        "copied-flag",
        "Snapshot 's' shares L2 table A (refcount 2); the active L1 entry 0 has COPIED set anyway.",
        f,
        findings: [F("copied-flag", "corruption")],
        check: 2,
        repair: 0,
        note: "Repair clears the flag; the snapshot is kept."
    )

    f = try Fixture()
    let oldData2 = try f.dataCluster(2)
    _ = oldData2
    try f.put(try f.l2Entry(2), farAway | copied)
    add(
        "l2-entry-outside-file",
        "The L2 entry of guest cluster 2 points at 1 GiB, past the end of the file and beyond every refcount block; its old data cluster is no longer referenced.",
        f,
        findings: [F("refcount-too-low", "corruption"), F("leaked-cluster", "leak")],
        check: 2,
        repair: 0,
        lost: [f.guestCluster(2)],
        note:
            "A data reference past the end of the file is not an outside-file finding (a crash between allocation and the data write can leave one, and it reads as zeroes); it is reported as refcount-too-low because no refcount block covers it. Repair drops the entry."
    )

    f = try Fixture()
    try f.put(try f.l2Entry(0), try f.u64(try f.l2Entry(0)) | 0x2)
    add(
        "reserved-bits-l2",
        "The L2 entry of guest cluster 0 has reserved bit 1 set.",
        f,
        findings: [F("reserved-bits", "corruption")],
        check: 2,
        repair: 0
    )

    f = try Fixture()
    try f.put(try f.l1Entry(1), try f.u64(try f.l1Entry(1)) | 0x2)
    add(
        "reserved-bits-l1",
        "Active L1 entry 1 (L2 table B) has reserved bit 1 set.",
        f,
        findings: [F("reserved-bits", "corruption")],
        check: 2,
        repair: 0
    )

    f = try Fixture(compressed: true)
    let entry5 = try f.u64(try f.l2Entry(5))
    precondition(entry5 & (1 << 62) != 0, "guest cluster 5 must be compressed")
    try f.put(try f.l2Entry(5), (entry5 & ~((1 << 47) - 1)) | (farAway / 512))
    add(
        "compressed-out-of-range",
        "Guest clusters 4 and 5 are LZ4 records sharing one host cluster (refcount 2); guest 5's descriptor is moved to 1 GiB, past the end of the file.",
        f,
        findings: [F("compressed-out-of-range", "corruption"), F("refcount-too-high", "leak")],
        check: 2,
        repair: 0,
        lost: [f.guestCluster(5)],
        note: "Guest cluster 4 (compressed) survives the repair."
    )

    f = try Fixture(snapshots: ["s1", "s2"])
    var entries = try f.snapshotEntries()
    entries[1].id = entries[0].id
    try f.writeSnapshotTable(entries)
    add(
        "snapshot-table",
        "Two snapshots with the same id. The table cannot be trusted, so nothing it references is counted: the two snapshot L1 copies leak and both L2 tables have refcount 3 for 1 reference.",
        f,
        findings: [
            F("snapshot-table", "corruption"), F("leaked-cluster", "leak", count: 2),
            F("refcount-too-high", "leak", count: 2),
        ],
        check: 2,
        repair: 0,
        opens: false,
        note:
            "Open validates the snapshot table, so it refuses the image (invalidImage) until repair drops the table; the active data is intact."
    )

    f = try Fixture()
    try f.put(try f.l2Entry(3), try f.header.l1TableOffset.rawValue)
    add(
        "metadata-overlap",
        "The L2 entry of guest cluster 3 maps data onto the active L1 table (without COPIED); its old data cluster is no longer referenced.",
        f,
        findings: [
            F("metadata-overlap", "corruption"), F("refcount-too-low", "corruption"), F("leaked-cluster", "leak"),
        ],
        check: 2,
        repair: 0,
        lost: [f.guestCluster(3)],
        note: "A guest write to cluster 3 would overwrite the L1 table. Repair drops the entry."
    )

    f = try Fixture()
    try f.put(try f.l1Entry(1), ((try f.u64(try f.l1Entry(1)) & offsetMask) + 512) | copied)
    add(
        "l2-table-misaligned",
        "Active L1 entry 1 points 512 bytes into L2 table B; table B and its two data clusters are no longer referenced.",
        f,
        findings: [F("outside-file", "corruption"), F("leaked-cluster", "leak", count: 3)],
        check: 2,
        repair: 0,
        lost: [(600 * UInt64(cs), 2 * cs)],
        note: "Repair drops the L1 entry: guest clusters 600-601 read as zeroes."
    )

    f = try Fixture()
    try f.put(try f.l1Entry(1), farAway | copied)
    add(
        "l2-table-outside-file",
        "Active L1 entry 1 points at 1 GiB, past the end of the file; table B and its two data clusters are no longer referenced.",
        f,
        findings: [F("outside-file", "corruption"), F("leaked-cluster", "leak", count: 3)],
        check: 2,
        repair: 0,
        lost: [(600 * UInt64(cs), 2 * cs)],
        note: "Repair drops the L1 entry: guest clusters 600-601 read as zeroes."
    )

    f = try Fixture()
    var h = try f.header
    h.l1TableOffset = HostOffset(farAway)
    try f.host.write(h.encodeFixed(), at: 0)
    add(
        "l1-table-outside-file",
        "The header's l1_table_offset is 1 GiB, past the end of the file.",
        f,
        findings: [],
        check: 1,
        repair: 1,
        opens: false,
        recoverable: false,
        note:
            "Header validation refuses the image: open fails with invalidImage and check cannot complete (exit 1), before and after -r all. Not repairable (the active L1 table cannot be found)."
    )

    f = try Fixture()
    try f.setFeatures(.dirty)
    try f.leakCluster()
    add(
        "dirty",
        "The dirty bit is set and one cluster leaked, as a writer that crashed after an allocation leaves it.",
        f,
        findings: [F("dirty", "info"), F("leaked-cluster", "leak")],
        check: 3,
        repair: 0,
        note: "Repair clears the dirty bit. A read-write open would also free the leak and clear it."
    )

    f = try Fixture()
    try f.setFeatures(.corrupt)
    add(
        "marked-corrupt",
        "The corrupt bit is set; the metadata is otherwise consistent.",
        f,
        findings: [F("marked-corrupt", "info")],
        check: 0,
        repair: 0,
        note: "A read-write open is refused until -r all clears the bit; read-only opens work."
    )

    f = try Fixture(backingFile: "backing-missing-base.vimg")
    add(
        "backing-missing",
        "A clone (guest cluster 1 written) whose backing file 'backing-missing-base.vimg' does not exist.",
        f,
        findings: [F("backing-missing", "info")],
        check: 1,
        repair: 1,
        opens: false,
        recoverable: false,
        note:
            "The image's own metadata is clean; its chain cannot be opened, so check cannot complete (exit 1, as qemu-img check, which fails to open it) and open fails with notFound. Repair cannot fix it; 'vimg rebase -u' can."
    )

    f = try Fixture(backingFile: "backing-loop.vimg")
    add(
        "backing-loop",
        "A clone (guest cluster 1 written) whose backing file is itself, 'backing-loop.vimg'.",
        f,
        findings: [F("backing-loop", "info")],
        check: 1,
        repair: 1,
        opens: false,
        recoverable: false,
        note:
            "The chain loops: check cannot complete (exit 1) and open fails with invalidImage. Must keep its file name."
    )
    return out
}

/// Small valid images for the fuzz seed corpus.
func corpusImages() throws -> [(String, [UInt8])] {
    var out: [(String, [UInt8])] = []
    out.append(("base.vimg", try Fixture().host.snapshotBytes()))
    out.append(("snapshots.vimg", try Fixture(snapshots: ["a", "b"]).host.snapshotBytes()))
    out.append(("compressed.vimg", try Fixture(compressed: true).host.snapshotBytes()))
    out.append(("clone.vimg", try Fixture(backingFile: "base.vimg").host.snapshotBytes()))
    // End-to-end checksums (a checksum table and blocks, the header's own CRC); no snapshot, whose
    // creation time the fixture patches in place (that would leave its checksum stale).
    out.append(("checksums.vimg", try Fixture(checksums: true).host.snapshotBytes()))
    let empty = MemoryDevice(size: 0, growable: true)
    try VImage.create(on: empty, virtualSize: 64 * 1024, options: .init(clusterBits: 12, uuid: fixedUUID))
    out.append(("empty.vimg", empty.snapshotBytes()))
    let zeroSize = MemoryDevice(size: 0, growable: true)
    try VImage.create(on: zeroSize, virtualSize: 0, options: .init(clusterBits: 12, uuid: fixedUUID))
    out.append(("zero-size.vimg", zeroSize.snapshotBytes()))
    return out
}

func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    unlink(path)
    let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
    try file.write(bytes, at: 0)
    try file.close()
}

func writeText(_ path: String, _ text: String) throws { try writeFile(path, Array(text.utf8)) }

@main
struct VimgFixtures {
    static func main() throws {
        let args = CommandLine.arguments
        guard args.count == 2 else {
            print("usage: vimg-fixtures OUTDIR")
            exit(2)
        }
        let root = args[1]
        for dir in [root + "/corrupt", root + "/fuzz", root + "/fuzz/corpus"] { mkdir(dir, 0o755) }
        for (spec, image) in try corruptFixtures() {
            try writeFile(root + "/corrupt/\(spec.name).vimg", image)
            try writeText(root + "/corrupt/\(spec.name).expected.json", spec.json())
            try writeFile(root + "/fuzz/corpus/corrupt-\(spec.name).vimg", image)
            print("corrupt/\(spec.name).vimg \(image.count) bytes")
        }
        for (name, image) in try corpusImages() {
            try writeFile(root + "/fuzz/corpus/\(name)", image)
            print("fuzz/corpus/\(name) \(image.count) bytes")
        }
    }
}
