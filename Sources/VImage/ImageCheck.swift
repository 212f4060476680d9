// Design notes
// ------------
// `vimg check` rebuilds every cluster's expected refcount from the references it can find (header,
// refcount table and blocks, active and snapshot L1 tables, each distinct L2 table once, data and
// compressed clusters, the snapshot table) and compares it with the stored refcounts:
//
//   stored > expected  leak        (harmless: space is wasted; what a crash is allowed to leave)
//   stored < expected  corruption  (a write could overwrite live data)
//
// It reads the file directly, trusts nothing, and allocates memory proportional to the real file size
// (one counter per host cluster), never to a size field read from the image.

import BlockIO

/// The result of a consistency check, in the terms of `qemu-img check`.
public struct CheckReport: Sendable {
    public enum Severity: String, Sendable { case corruption, leak, info }

    public struct Finding: Sendable, Hashable {
        /// A stable kind, e.g. `refcount-too-low`, `leaked-cluster`, `copied-flag`, `outside-file`.
        public var kind: String
        public var severity: Severity
        public var message: String
        public var hostOffset: UInt64?
    }

    /// The first findings (at most `maxFindings`); counts below cover all of them.
    public var findings: [Finding] = []
    public var corruptions = 0
    public var leaks = 0
    /// Errors that stopped the check from completing (exit code 1).
    public var checkErrors = 0
    public var incompleteReason: String?
    /// Guest clusters in the virtual disk and those allocated in this image.
    public var totalClusters: UInt64 = 0
    public var allocatedClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    public var imageEndOffset: UInt64 = 0
    public var isDirty = false
    public var isMarkedCorrupt = false

    public static let maxFindings = 1000

    public init() {}

    /// qemu-img check's exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only.
    public var exitCode: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }

    public var isClean: Bool { exitCode == 0 }

    /// Counts a finding and keeps it if fewer than `maxFindings` are kept (for checkers of other formats).
    public mutating func add(_ severity: Severity, _ kind: String, _ message: String, at offset: UInt64? = nil) {
        switch severity {
        case .corruption: corruptions += 1
        case .leak: leaks += 1
        case .info: break
        }
        if findings.count < Self.maxFindings {
            findings.append(Finding(kind: kind, severity: severity, message: message, hostOffset: offset))
        }
    }
}

/// Where a check found a reference: walk `walk` (the active L1 table, then each snapshot's), L1 entry
/// `l1`, and L2 entry `l2` (or one of the markers for the L1 entry itself).
struct Site {
    static let l1Entry: Int32 = -1
    /// The active L1 entry, named without the walk (as COPIED findings read).
    static let activeL1Entry: Int32 = -2
    var walk: Int32
    var l1: Int32
    var l2: Int32
    init(walk: Int32, l1: Int, l2: Int) {
        self.walk = walk
        self.l1 = Int32(l1)
        self.l2 = Int32(l2)
    }
    init(walk: Int32, l1: Int, l2: Int32) {
        self.walk = walk
        self.l1 = Int32(l1)
        self.l2 = l2
    }
}

/// Checks a VIMG image's metadata.
public enum ImageCheck {
    /// The largest file (in clusters) we are willing to hold counters for: 4 GiB of counters.
    static let maxClusters: UInt64 = 1 << 30

    /// Whether this checker (the one repairs use) takes a qcow2 image with this header: the layouts the
    /// engine opens (Qcow2Format.read).
    public static func takes(_ header: Qcow2Header) -> Bool {
        header.clusterBits >= Qcow2Format.minClusterBits && header.virtualSize % 512 == 0
    }

    /// Checks the image stored on `host`. Never throws: problems become findings or check errors.
    public static func check(host: any BlockDevice) -> CheckReport {
        var report = CheckReport()
        do {
            try run(host: host, report: &report)
        } catch {
            report.checkErrors += 1
            report.incompleteReason = "\(error)"
        }
        return report
    }

    /// What a check learned, kept for repair.
    struct Analysis {
        var header: ImageHeader
        var format: any OnDiskFormat
        var fileClusters: UInt64
        /// References per host cluster (inside the file) and past its end.
        var expected: [UInt32]
        var beyond: [UInt64: UInt32]
        var stored: [UInt64]
        var storedBeyond: [UInt64: UInt64]
        /// Existing refcount block per table index.
        var blockOffsets: [UInt64?]
        /// Entries to rewrite for `-r all`: host offset of a big-endian u64 and its trusted value.
        var entryFixes: [(offset: UInt64, value: UInt64)] = []
        /// The snapshot table cannot be trusted: `-r all` drops it.
        var dropSnapshots = false
        /// The bitmap directory cannot be trusted: `-r all` empties it.
        var dropBitmapDirectory = false
        /// Clusters of the refcount structure itself (table and blocks).
        var refcountStructure: [UInt64] = []
        /// Metadata clusters whose checksums are covered by the checksum table (not cluster 0, not the
        /// checksum structures themselves).
        var metadataClusters: [UInt64] = []
        /// 4 KiB host blocks of metadata whose checksum is stale after a crash (`-r leaks` recomputes them).
        var staleChecksumBlocks: [UInt64] = []
        /// The checksum table or a checksum block cannot be trusted: `-r all` computes them all again.
        var dropChecksums = false
    }

    /// The metadata clusters of the image on `host` whose checksums the checksum table keeps (for a
    /// reader's recovery after a crash; checksums are not verified here).
    static func metadataClusters(host: any BlockDevice) throws -> [UInt64] {
        var report = CheckReport()
        var check = try CheckRun(host: host, report: report)
        check.verifiesChecksums = false
        try check.walkAll()
        report = check.report
        return check.metadataClusters
    }

    /// The check, step by step (each step is a method of `CheckRun` below).
    @discardableResult
    static func run(host: any BlockDevice, report: inout CheckReport) throws -> Analysis {
        var check = try CheckRun(host: host, report: report)
        try check.walkAll()
        try check.findDataOnMetadata()
        try check.compareRefcounts()
        try check.checkCopiedFlags()
        try check.verifyMetadataChecksums()
        report = check.report
        return check.analysis
    }
}

/// The state of one check as its steps build it up.
///
/// Marks per cluster of the file: metadata (the header, refcount structure, L1 tables and snapshot table:
/// "structural"; L2 tables), data referenced by an L2 entry, and data claimed exclusive by an active COPIED
/// L2 entry. Data on metadata and COPIED on a shared cluster are rare: the marks tell whether any exists,
/// and only then are the L2 tables read again to name the entries, so the common case keeps no
/// per-reference list (memory stays one counter and one byte per cluster).
struct CheckRun {
    static let structuralMark: UInt8 = 1
    static let l2Mark: UInt8 = 2
    static let dataMark: UInt8 = 4
    static let copiedMark: UInt8 = 8

    let host: any BlockDevice
    let header: ImageHeader
    let format: any OnDiskFormat
    let entries: EntryCodec
    let refcountWidth: RefcountWidth
    /// Refcounts per refcount block.
    let perBlock: UInt64
    let g: ClusterGeometry
    let cs: UInt64
    let fileSize: UInt64
    let fileClusters: UInt64
    var report: CheckReport

    /// References per host cluster inside the file, and past its end (data clusters unwritten when a
    /// writer crashed).
    var expected: [UInt32]
    var beyond: [UInt64: UInt32] = [:]
    var marks: [UInt8]
    /// Where each reference was found, as indices: the text is built only for a finding.
    var walkNames: [String] = []
    var l2References: [(entry: UInt64, cluster: UInt64, site: Site)] = []
    var entryFixes: [(offset: UInt64, value: UInt64)] = []
    var dropSnapshots = false
    var dropBitmapDirectory = false
    var refcountStructure: [UInt64] = []
    /// Clusters of the checksum table and blocks (they protect themselves).
    var checksumStructure = Set<UInt64>()
    /// The checksum table's values and each checksum block's, when the image has checksums.
    var checksumTable: [UInt64] = []
    var checksumBlocks: [UInt64: [UInt64]] = [:]
    var verifiesChecksums = true
    var staleChecksumBlocks: [UInt64] = []
    var dropChecksums = false
    var refcountTable: [UInt64] = []
    var blockOffsets: [UInt64?] = []
    var visitedL2 = Set<UInt64>()
    /// qcow2: the clusters each walked L2 table references, counted again for every L1 table sharing it.
    var tableReferences: [UInt64: [UInt64]] = [:]
    /// Each distinct L2 table, where it was first reached, and whether its COPIED flags are promises
    /// (reached through an active L1 entry with COPIED).
    var l2Walked: [(offset: UInt64, walk: Int32, l1: Int, copiedScan: Bool)] = []
    var l1CopiedChecks: [(cluster: UInt64, site: Site, entry: UInt64, raw: UInt64)] = []
    /// An active COPIED entry points past the end of the file (its references are known only at the end).
    var copiedBeyond = false
    /// qcow2 (exact COPIED flags): every active L1 entry naming an L2 table, for the check of clear flags.
    var activeTables: [(l1: Int, entry: UInt64, raw: UInt64, l2: UInt64)] = []
    var lastHost: UInt64? = nil
    var stored: [UInt64] = []
    var storedBeyond: [UInt64: UInt64] = [:]
    var covered: [Bool] = []

    /// Step 1: the header, validated, and the counters sized by the real file (never by a field).
    init(host: any BlockDevice, report: CheckReport) throws {
        self.host = host
        self.report = report
        fileSize = host.size
        (header, format) = try readEngineHeader(host, fileSize: fileSize, forWriting: false)
        entries = format.entries
        refcountWidth = format.refcounts
        perBlock = UInt64(format.refcounts.entriesPerBlock(clusterSize: header.clusterSize))
        g = header.geometry
        cs = UInt64(g.clusterSize)
        fileClusters = g.clusters(covering: fileSize)
        guard fileClusters <= ImageCheck.maxClusters else {
            throw VImageError(.limitExceeded, message: "file is too large to check (\(fileClusters) clusters)")
        }
        self.report.isDirty = header.incompatibleFeatures.contains(.dirty)
        self.report.isMarkedCorrupt = header.incompatibleFeatures.contains(.corrupt)
        self.report.totalClusters = g.clusters(covering: header.virtualSize)
        self.report.imageEndOffset = fileSize
        if self.report.isDirty {
            self.report.add(
                .info,
                "dirty",
                "the image was not closed cleanly (dirty bit set); leaked clusters are possible"
            )
        }
        if self.report.isMarkedCorrupt {
            self.report.add(.info, "marked-corrupt", "the image is marked corrupt")
        }
        // Informational extensions are ignored when malformed; say so, without failing the check.
        for problem in header.informationalExtensionProblems {
            self.report.add(.info, "header-extension", problem)
        }
        expected = [UInt32](repeating: 0, count: Int(fileClusters))
        marks = [UInt8](repeating: 0, count: Int(fileClusters))
        if fileClusters > 0 { marks[0] = Self.structuralMark }
        reference(0)
    }

    var analysis: ImageCheck.Analysis {
        ImageCheck.Analysis(
            header: header,
            format: format,
            fileClusters: fileClusters,
            expected: expected,
            beyond: beyond,
            stored: stored,
            storedBeyond: storedBeyond,
            blockOffsets: blockOffsets,
            entryFixes: entryFixes,
            dropSnapshots: dropSnapshots,
            dropBitmapDirectory: dropBitmapDirectory,
            refcountStructure: refcountStructure,
            metadataClusters: metadataClusters,
            staleChecksumBlocks: staleChecksumBlocks,
            dropChecksums: dropChecksums
        )
    }

    /// Steps 2 to 6: every structure the header reaches, referenced and marked.
    mutating func walkAll() throws {
        try countRefcountStructure()
        try walkActiveL1()
        try walkSnapshots()
        try walkBitmaps()
        try walkQcow2Bitmaps()
        try walkChecksums()
    }

    /// qcow2: the clusters of qemu's persistent bitmaps, kept but not maintained by vdisk (Qcow2Bitmaps.swift).
    /// A directory that cannot be read stops the check: a repair must not free clusters it cannot account for.
    mutating func walkQcow2Bitmaps() throws {
        guard let q = format as? Qcow2Format,
            let ext = q.original.otherExtensions.first(where: { $0.type == Qcow2Header.bitmapsExtension })
        else { return }
        let clusters = try Qcow2BitmapClusters.read(extension: ext.data, host: host, clusterSize: g.clusterSize)
        for t in clusters.tables { _ = referenceMetadata(t.offset, bytes: t.length, t.what) }
        for d in clusters.data { _ = referenceMetadata(d.offset, bytes: cs, d.what) }
    }

    /// Metadata clusters (structural and L2 marks) but cluster 0 and the checksum structures.
    var metadataClusters: [UInt64] {
        (1..<fileClusters).filter {
            marks[Int($0)] & (Self.structuralMark | Self.l2Mark) != 0 && !checksumStructure.contains($0)
        }
    }

    /// Step 6: the checksum table and blocks (docs/FORMAT.md, "End-to-end checksums"): referenced as
    /// metadata, each sector checked against its own checksum.
    mutating func walkChecksums() throws {
        guard header.incompatibleFeatures.contains(.checksums), let data = header.checksumTableData else { return }
        let pointer: ChecksumTablePointer
        switch ChecksumTablePointer.decode(data, clusterSize: g.clusterSize, fileSize: fileSize) {
        case .success(let p): pointer = p
        case .failure(let error):
            report.add(.corruption, "checksum-structure", error.message)
            dropChecksums = true
            return
        }
        let geometry = ChecksumGeometry(clusterSize: g.clusterSize)
        let tableBytes = UInt64(pointer.clusters) * cs
        guard referenceMetadata(pointer.offset.rawValue, bytes: tableBytes, "checksum table") else {
            dropChecksums = true
            return
        }
        for c in g.clusterIndex(pointer.offset.rawValue)..<g.clusters(covering: pointer.offset.rawValue + tableBytes) {
            checksumStructure.insert(c)
        }
        do {
            checksumTable = try geometry.decode(
                try host.read(count: Int(tableBytes), at: pointer.offset.rawValue),
                at: pointer.offset.rawValue
            )
        } catch let error as ChecksumSectorError {
            report.add(
                .corruption,
                "checksum-structure",
                "a checksum table sector fails its own checksum",
                at: error.offset
            )
            dropChecksums = true
            return
        }
        for (i, raw) in checksumTable.enumerated() where raw != 0 {
            let offset = raw & hostOffsetMask
            guard raw & ~hostOffsetMask == 0, referenceMetadata(offset, bytes: cs, "checksum block \(i)") else {
                dropChecksums = true
                continue
            }
            checksumStructure.insert(g.clusterIndex(offset))
            do {
                checksumBlocks[offset] = try geometry.decode(try host.read(count: Int(cs), at: offset), at: offset)
            } catch let error as ChecksumSectorError {
                report.add(
                    .corruption,
                    "checksum-structure",
                    "a checksum block sector fails its own checksum",
                    at: error.offset
                )
                dropChecksums = true
            }
        }
    }

    /// Step 10: every metadata block against its checksum. After a crash (the dirty bit set) a mismatch is
    /// a stale checksum of metadata written since the last flush (FORMAT.md, rule 3): `-r leaks`, and any
    /// writer's open, recompute it. On a cleanly closed image it is corruption.
    mutating func verifyMetadataChecksums() throws {
        guard verifiesChecksums, header.incompatibleFeatures.contains(.checksums), !checksumTable.isEmpty else {
            return
        }
        let geometry = ChecksumGeometry(clusterSize: g.clusterSize)
        let bs = UInt64(ChecksumGeometry.blockSize)
        let n = geometry.blocksPerChecksumBlock
        for cluster in metadataClusters where cluster * cs < fileSize {
            // The last cluster may end past the end of the file (a short table written last): the rest
            // reads as zeroes, and its blocks have the checksums of zero blocks.
            var bytes = try host.read(count: Int(min(cs, fileSize - cluster * cs)), at: cluster * cs)
            bytes += [UInt8](repeating: 0, count: Int(cs) - bytes.count)
            for b in 0..<cs / bs {
                let block = (cluster * cs) / bs + b
                let tableIndex = Int(block / n)
                guard tableIndex < checksumTable.count,
                    let values = checksumBlocks[checksumTable[tableIndex] & hostOffsetMask]
                else { continue }  // not covered yet: nothing to compare
                let value = values[Int((block % n) / 2)]
                let stored = UInt32(truncatingIfNeeded: block % 2 == 0 ? value : value >> 32)
                let computed = bytes.withUnsafeBytes {
                    ChecksumGeometry.checksum(
                        of: UnsafeRawBufferPointer(rebasing: $0[Int(b * bs)..<Int((b + 1) * bs)]),
                        at: block * bs
                    )
                }
                guard stored != computed else { continue }
                if report.isDirty {
                    report.add(
                        .leak,
                        "checksum-stale",
                        "metadata block at 0x\(String(block * bs, radix: 16)) has a stale checksum (written since the last flush)",
                        at: block * bs
                    )
                    staleChecksumBlocks.append(block)
                } else {
                    report.add(
                        .corruption,
                        "checksum",
                        "metadata block at 0x\(String(block * bs, radix: 16)) fails its checksum",
                        at: block * bs
                    )
                }
            }
        }
    }

    mutating func reference(_ cluster: UInt64) {
        if cluster < fileClusters {
            expected[Int(cluster)] &+= 1
        } else {
            beyond[cluster, default: 0] &+= 1
        }
    }

    func isMarked(_ cluster: UInt64, _ mark: UInt8) -> Bool {
        cluster < fileClusters && marks[Int(cluster)] & mark != 0
    }

    func describe(_ site: Site) -> String {
        switch site.l2 {
        case Site.l1Entry: return "\(walkNames[Int(site.walk)]) L1 entry \(site.l1)"
        case Site.activeL1Entry: return "L1 entry \(site.l1)"
        default: return "\(walkNames[Int(site.walk)]) L2 table \(site.l1) entry \(site.l2)"
        }
    }

    /// References a metadata area, which must be cluster aligned and inside the file.
    mutating func referenceMetadata(_ offset: UInt64, bytes: UInt64, _ what: String, isL2: Bool = false) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        guard g.isAligned(offset), offset != 0, !overflow, end <= fileSize else {
            report.add(
                .corruption,
                "outside-file",
                "\(what) at 0x\(String(offset, radix: 16)) is misaligned or outside the file",
                at: offset
            )
            return false
        }
        for c in g.clusterIndex(offset)..<g.clusters(covering: end) {
            reference(c)
            marks[Int(c)] |= isL2 ? Self.l2Mark : Self.structuralMark
        }
        return true
    }

    /// Step 2: the refcount table and every block it names.
    mutating func countRefcountStructure() throws {
        let rtBytes = UInt64(header.refcountTableClusters) * cs
        let tableOffset = header.refcountTableOffset.rawValue
        if referenceMetadata(tableOffset, bytes: rtBytes, "refcount table") {
            refcountStructure += Array(g.clusterIndex(tableOffset)..<g.clusters(covering: tableOffset + rtBytes))
        }
        refcountTable = try host.read(count: Int(rtBytes), at: tableOffset).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
        blockOffsets = [UInt64?](repeating: nil, count: refcountTable.count)
        for (i, raw) in refcountTable.enumerated() where raw != 0 {
            if raw & ~hostOffsetMask != 0 {
                report.add(
                    .corruption,
                    "reserved-bits",
                    "refcount table entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))"
                )
            }
            let offset = raw & hostOffsetMask
            if referenceMetadata(offset, bytes: cs, "refcount block \(i)") {
                blockOffsets[i] = offset
                refcountStructure.append(g.clusterIndex(offset))
            }
        }
    }

    /// Step 3: the active L1 table and every L2 table and cluster it reaches.
    mutating func walkActiveL1() throws {
        try walk(l1Offset: header.l1TableOffset.rawValue, l1Size: header.l1Size, active: true, name: "active")
    }

    /// Step 4: the snapshot table and each snapshot's L1 table (a table that cannot be trusted is dropped
    /// by `-r all`).
    mutating func walkSnapshots() throws {
        guard header.snapshotCount > 0 else { return }
        let offset = header.snapshotTableOffset.rawValue
        guard referenceMetadata(offset, bytes: UInt64(header.snapshotTableSize), "snapshot table") else {
            dropSnapshots = true
            return
        }
        let bytes = try host.read(count: Int(header.snapshotTableSize), at: offset)
        do {
            let snapshots = try format.decodeSnapshots(
                bytes,
                count: Int(header.snapshotCount),
                geometry: g,
                fileSize: fileSize
            )
            for s in snapshots {
                try walk(
                    l1Offset: s.l1TableOffset.rawValue,
                    l1Size: s.l1Size,
                    active: false,
                    name: "snapshot '\(s.name)'"
                )
            }
        } catch let error as VImageError {
            report.add(.corruption, "snapshot-table", error.message, at: offset)
            dropSnapshots = true
        }
    }

    /// Step 5: the bitmap directory, each usable bitmap's table, and the bits clusters the tables name
    /// (docs/FORMAT.md, "Persistent dirty bitmaps"). A directory that cannot be trusted is a corruption
    /// (`-r all` empties it); an unusable entry is one too, unless it is marked in use (then it is only
    /// stale, as a crash in the middle of a resize can leave it).
    mutating func walkBitmaps() throws {
        guard let data = header.bitmapDirectoryData else { return }
        func fail(_ message: String) {
            report.add(.corruption, "bitmap-directory", message)
            dropBitmapDirectory = true
        }
        let pointer: BitmapDirectoryPointer
        switch BitmapDirectoryPointer.decode(data, clusterSize: g.clusterSize, fileSize: fileSize) {
        case .success(let p): pointer = p
        case .failure(let problem): return fail(problem.message)
        }
        guard pointer.count > 0 else { return }
        guard referenceMetadata(pointer.offset.rawValue, bytes: pointer.size, "bitmap directory") else {
            dropBitmapDirectory = true
            return
        }
        let decoded: [BitmapEntry.Decoded]
        do {
            decoded = try BitmapEntry.decode(
                try host.read(count: Int(pointer.size), at: pointer.offset.rawValue),
                count: Int(pointer.count),
                virtualSize: header.virtualSize,
                clusterSize: g.clusterSize,
                fileSize: fileSize
            )
        } catch let problem as BitmapProblem {
            return fail(problem.message)
        }
        let maintained = header.autoclearFeatures & AutoclearFeatures.bitmaps != 0
        for d in decoded {
            let name = d.entry.name
            if let problem = d.problem {
                if d.entry.flags.contains(.inUse) {
                    report.add(
                        .info,
                        "bitmap-in-use",
                        "\(problem.message); it is in use (stale) and can only be removed"
                    )
                } else {
                    fail(problem.message)
                }
                continue
            }
            let tableOffset = d.entry.tableOffset.rawValue
            guard referenceMetadata(tableOffset, bytes: UInt64(d.entry.tableSize) * 8, "bitmap '\(name)' table") else {
                dropBitmapDirectory = true
                continue
            }
            let table = try host.read(count: Int(d.entry.tableSize) * 8, at: tableOffset).withUnsafeBytes {
                decodeTable($0, as: UInt64.self)
            }
            for (i, raw) in table.enumerated() {
                switch try? BitmapTableEntry(raw: raw) {
                case .allClean, .allDirty: continue
                case .stored(let offset):
                    if !referenceMetadata(offset.rawValue, bytes: cs, "bitmap '\(name)' bits \(i)") {
                        dropBitmapDirectory = true
                    }
                case nil:
                    fail("bitmap '\(name)' table entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))")
                }
            }
            if d.entry.flags.contains(.inUse) || !maintained {
                report.add(
                    .info,
                    "bitmap-in-use",
                    "bitmap '\(name)' is inconsistent (\(maintained ? "in use: the image was not closed cleanly" : "changed by a writer that does not keep bitmaps")); it can only be removed"
                )
            }
        }
    }

    mutating func walk(l1Offset: UInt64, l1Size: UInt32, active: Bool, name: String) throws {
        // An empty L1 table may still own the cluster reserved for it (a 0-byte image).
        guard l1Size > 0 || l1Offset != 0 else { return }
        guard referenceMetadata(l1Offset, bytes: max(8, UInt64(l1Size) * 8), "\(name) L1 table") else {
            if !active { dropSnapshots = true }
            return
        }
        let l1 = try host.read(count: Int(l1Size) * 8, at: l1Offset).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
        walkNames.append(name)
        let walkIndex = Int32(walkNames.count - 1)
        for (i, raw) in l1.enumerated() where raw != 0 {
            let entry = L1Entry(rawValue: raw)
            let entryOffset = l1Offset + UInt64(i * 8)
            if entry.reservedBits != 0 {
                report.add(
                    .corruption,
                    "reserved-bits",
                    "\(name) L1 entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))",
                    at: entryOffset
                )
                entryFixes.append((entryOffset, raw & (hostOffsetMask | copiedFlag)))
            }
            guard let l2 = entry.l2Table?.rawValue else { continue }
            guard referenceMetadata(l2, bytes: cs, "\(name) L2 table \(i)", isL2: true) else {
                entryFixes.append((entryOffset, 0))
                continue
            }
            l2References.append((entryOffset, g.clusterIndex(l2), Site(walk: walkIndex, l1: i, l2: Site.l1Entry)))
            if active && format.exactCopiedFlags { activeTables.append((i, entryOffset, raw, l2)) }
            if active && entry.isCopied {
                l1CopiedChecks.append(
                    (g.clusterIndex(l2), Site(walk: walkIndex, l1: i, l2: Site.activeL1Entry), entryOffset, raw)
                )
            }
            guard visitedL2.insert(l2).inserted else {
                // qcow2: every L1 table holds its own references on what a shared table maps.
                for c in tableReferences[l2] ?? [] { reference(c) }
                continue
            }
            let copiedScan = active && entry.isCopied
            l2Walked.append((l2, walkIndex, i, copiedScan))
            lastHost = nil  // qemu-img counts fragmentation within each L2 table
            let entries = try host.read(count: Int(cs), at: l2).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            if !format.tablesHoldDataReferences { tableReferences[l2] = dataClusters(of: entries) }
            for (j, raw) in entries.enumerated() where raw != 0 {
                walkL2Entry(
                    raw,
                    site: Site(walk: walkIndex, l1: i, l2: j),
                    at: l2 + UInt64(j * 8),
                    active: active,
                    copiedScan: copiedScan
                )
            }
        }
    }

    mutating func walkL2Entry(_ raw: UInt64, site: Site, at entryOffset: UInt64, active: Bool, copiedScan: Bool) {
        if L2Entry.reservedBits(raw) != 0 {
            report.add(
                .corruption,
                "reserved-bits",
                "\(describe(site)) has reserved bits set (0x\(String(raw, radix: 16)))",
                at: entryOffset
            )
            entryFixes.append((entryOffset, raw & ~L2Entry.reservedBits(raw)))
        }
        let e = entries.decode(raw & ~L2Entry.reservedBits(raw))
        if let host = e.hostCluster?.rawValue, host >= fileSize {
            // Past the end: never written (a crash between the metadata and the data). Reads as
            // zeroes; `-r all` drops the reference so the refcounts need not cover it.
            entryFixes.append((entryOffset, 0))
        }
        if let host = e.hostCluster?.rawValue {
            let c = g.clusterIndex(host)
            reference(c)
            let claimsCopied = copiedScan && raw & copiedFlag != 0
            if c < fileClusters {
                marks[Int(c)] |= claimsCopied ? Self.dataMark | Self.copiedMark : Self.dataMark
            } else if claimsCopied {
                copiedBeyond = true
            }
        }
        if case .compressed(let d) = e {
            let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
            // qemu does not pad the file after the last compressed record: its span may end past the file
            // (inside the last cluster), and reads there see zeroes.
            if overflow || d.hostOffset >= fileSize || end > fileClusters * cs || d.hostOffset == 0 {
                report.add(
                    .corruption,
                    "compressed-out-of-range",
                    "\(describe(site)): compressed record at 0x\(String(d.hostOffset, radix: 16)) (\(d.byteLength) bytes) is outside the file",
                    at: d.hostOffset
                )
                entryFixes.append((entryOffset, 0))
            } else {
                for c in g.clusterIndex(d.hostOffset)...g.clusterIndex(end - 1) {
                    reference(c)
                    marks[Int(c)] |= Self.dataMark
                }
            }
        }
        guard active else { return }
        // qemu-img check's statistics: a preallocated zero cluster is allocated, and a compressed one is
        // always fragmented (neighbours share sectors that are read again).
        switch e {
        case .normal(let host, _), .zero(.some(let host), _):
            report.allocatedClusters += 1
            if let lastHost, host.rawValue != lastHost + cs { report.fragmentedClusters += 1 }
            lastHost = host.rawValue
        case .compressed:
            report.allocatedClusters += 1
            report.compressedClusters += 1
            report.fragmentedClusters += 1
        default: break
        }
    }

    /// The clusters an L2 table's entries reference (data, preallocated zeroes, compressed records inside
    /// the file).
    func dataClusters(of table: [UInt64]) -> [UInt64] {
        var clusters: [UInt64] = []
        for raw in table where raw != 0 {
            let e = entries.decode(raw & ~L2Entry.reservedBits(raw))
            if let host = e.hostCluster?.rawValue { clusters.append(g.clusterIndex(host)) }
            if case .compressed(let d) = e {
                let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
                if !overflow && d.hostOffset < fileSize && end <= fileClusters * cs && d.hostOffset != 0 {
                    clusters += g.clusterIndex(d.hostOffset)...g.clusterIndex(end - 1)
                }
            }
        }
        return clusters
    }

    /// The entries of a walked L2 table, read again (only when a finding needs naming).
    func rereadTable(_ t: (offset: UInt64, walk: Int32, l1: Int, copiedScan: Bool)) throws -> [UInt64] {
        try host.read(count: Int(cs), at: t.offset).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
    }

    /// Step 7: tables or data placed on metadata: whatever is written through them overwrites the metadata.
    mutating func findDataOnMetadata() throws {
        for r in l2References where isMarked(r.cluster, Self.structuralMark) {
            report.add(
                .corruption,
                "metadata-overlap",
                "\(describe(r.site)) points at metadata (cluster \(r.cluster))",
                at: r.entry
            )
            entryFixes.append((r.entry, 0))
        }
        let metadataMarks = Self.structuralMark | Self.l2Mark
        guard marks.contains(where: { $0 & Self.dataMark != 0 && $0 & metadataMarks != 0 }) else { return }
        for t in l2Walked {
            for (j, raw) in try rereadTable(t).enumerated() where raw != 0 {
                let site = Site(walk: t.walk, l1: t.l1, l2: j)
                let entryOffset = t.offset + UInt64(j * 8)
                var clusters: [UInt64] = []
                switch entries.decode(raw & ~L2Entry.reservedBits(raw)) {
                case .normal(let host, _), .zero(.some(let host), _): clusters = [g.clusterIndex(host.rawValue)]
                case .compressed(let d):
                    let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
                    if !overflow && d.hostOffset < fileSize && end <= fileClusters * cs && d.hostOffset != 0 {
                        clusters = Array(g.clusterIndex(d.hostOffset)...g.clusterIndex(end - 1))
                    }
                default: break
                }
                for c in clusters where isMarked(c, metadataMarks) {
                    report.add(
                        .corruption,
                        "metadata-overlap",
                        "\(describe(site)) maps data onto metadata (cluster \(c))",
                        at: entryOffset
                    )
                    entryFixes.append((entryOffset, 0))
                }
            }
        }
    }

    /// Step 8: the stored refcounts against the references found.
    mutating func compareRefcounts() throws {
        stored = [UInt64](repeating: 0, count: Int(fileClusters))
        covered = [Bool](repeating: false, count: refcountTable.count)
        for (i, offset) in blockOffsets.enumerated() {
            guard let offset else { continue }
            covered[i] = true
            let block = try host.read(count: Int(cs), at: offset).withUnsafeBytes { refcountWidth.decode($0) }
            for (j, count) in block.enumerated() where count != 0 {
                let cluster = UInt64(i) * perBlock + UInt64(j)
                if cluster < fileClusters { stored[Int(cluster)] = count } else { storedBeyond[cluster] = count }
            }
        }
        var highest: UInt64? = nil
        for c in 0..<Int(fileClusters) where stored[c] > 0 || expected[c] > 0 {
            highest = UInt64(c)
            compare(UInt64(c), stored: stored[c], expected: expected[c])
        }
        for cluster in Set(beyond.keys).union(storedBeyond.keys).sorted() {
            compare(cluster, stored: storedBeyond[cluster] ?? 0, expected: beyond[cluster] ?? 0)
        }
        // As qemu-img reports it: the end of the last cluster of the file that is counted or referenced.
        report.imageEndOffset = highest.map { ($0 + 1) * cs } ?? 0
    }

    mutating func compare(_ cluster: UInt64, stored: UInt64, expected: UInt32) {
        guard stored != UInt64(expected) else { return }
        let offset = cluster * cs
        if stored > UInt64(expected) {
            report.add(
                .leak,
                expected == 0 ? "leaked-cluster" : "refcount-too-high",
                "cluster \(cluster) has refcount \(stored) but \(expected) references",
                at: offset
            )
        } else {
            let tableIndex = cluster / perBlock
            let hasBlock = tableIndex < UInt64(covered.count) && covered[Int(tableIndex)]
            report.add(
                .corruption,
                "refcount-too-low",
                hasBlock
                    ? "cluster \(cluster) has refcount \(stored) but \(expected) references"
                    : "cluster \(cluster) is referenced \(expected) times but has no refcount block",
                at: offset
            )
        }
    }

    /// Step 9: COPIED flags. A COPIED flag promises the cluster has one reference, so writing it in place
    /// is safe. A set flag on a shared cluster would let a write change a snapshot: corruption. A clear
    /// flag on an owned cluster only costs a needless copy later (a crash between the refcount and flag
    /// updates of a snapshot operation can leave one), so it is not reported.
    mutating func checkCopiedFlags() throws {
        try checkExactCopiedFlags()
        for check in l1CopiedChecks {
            checkCopied(cluster: check.cluster, site: check.site, entry: check.entry, raw: check.raw)
        }
        var copiedSuspect = copiedBeyond
        for c in 0..<Int(fileClusters) where marks[c] & Self.copiedMark != 0 && expected[c] != 1 {
            copiedSuspect = true
            break
        }
        guard copiedSuspect else { return }
        for t in l2Walked where t.copiedScan {
            for (j, raw) in try rereadTable(t).enumerated() where raw & copiedFlag != 0 {
                guard let host = entries.decode(raw & ~L2Entry.reservedBits(raw)).hostCluster?.rawValue else {
                    continue
                }
                checkCopied(
                    cluster: g.clusterIndex(host),
                    site: Site(walk: t.walk, l1: t.l1, l2: j),
                    entry: t.offset + UInt64(j * 8),
                    raw: raw
                )
            }
        }
    }

    /// qcow2 promises more: COPIED is set exactly where the refcount is one, on every active L1 entry and on
    /// every entry of the L2 tables they name (as `qemu-img check` requires, reporting either direction as
    /// an error). A clear flag on an owned cluster is found here, and a set flag in a table the active L1
    /// names without COPIED (the scan above covers only tables named with it). `-r all` sets or clears it.
    mutating func checkExactCopiedFlags() throws {
        guard format.exactCopiedFlags else { return }
        var scanned = Set<UInt64>()
        for t in activeTables {
            let tableCluster = g.clusterIndex(t.l2)
            let tableReferences = tableCluster < fileClusters ? expected[Int(tableCluster)] : 0
            let l1Copied = L1Entry(rawValue: t.raw).isCopied
            if !l1Copied && tableReferences == 1 {
                report.add(
                    .corruption,
                    "copied-flag-clear",
                    "active L1 entry \(t.l1): COPIED flag is clear but the L2 table has 1 reference",
                    at: t.l2
                )
                entryFixes.append((t.entry, t.raw | copiedFlag))
            }
            guard scanned.insert(t.l2).inserted else { continue }
            let table = try host.read(count: Int(cs), at: t.l2).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            for (j, raw) in table.enumerated() where raw != 0 {
                let e = entries.decode(raw & ~L2Entry.reservedBits(raw))
                if case .compressed = e { continue }
                guard let host = e.hostCluster?.rawValue, g.clusterIndex(host) < fileClusters else { continue }
                let cluster = g.clusterIndex(host)
                let flagged = raw & copiedFlag != 0
                if !flagged && expected[Int(cluster)] == 1 {
                    report.add(
                        .corruption,
                        "copied-flag-clear",
                        "active L1 entry \(t.l1), L2 entry \(j): COPIED flag is clear but the cluster has 1 reference",
                        at: cluster * cs
                    )
                    entryFixes.append((t.l2 + UInt64(j * 8), raw | copiedFlag))
                } else if flagged && !l1Copied {
                    checkCopied(
                        cluster: cluster,
                        site: Site(walk: 0, l1: t.l1, l2: j),
                        entry: t.l2 + UInt64(j * 8),
                        raw: raw
                    )
                }
            }
        }
    }

    mutating func checkCopied(cluster: UInt64, site: Site, entry: UInt64, raw: UInt64) {
        let references = cluster < fileClusters ? expected[Int(cluster)] : beyond[cluster] ?? 0
        if references != 1 {
            report.add(
                .corruption,
                "copied-flag",
                "\(describe(site)): COPIED flag is set but the cluster has \(references) references",
                at: cluster * cs
            )
            entryFixes.append((entry, raw & ~copiedFlag))
        }
    }
}

// MARK: Repair

/// What `vimg check -r` repairs.
public enum RepairMode: String, Sendable, CaseIterable {
    /// Free leaked clusters (refcounts higher than their references).
    case leaks
    /// Also drop references that cannot be trusted and rebuild every refcount from the references.
    case all
}

/// The outcome of a repair: the report before, the actions (done, or planned with `dryRun`), the report after.
public struct RepairResult: Sendable {
    public var before: CheckReport
    public var actions: [String]
    public var after: CheckReport
}

extension ImageCheck {
    /// Repairs the image stored on `host`.
    public static func repair(host: any BlockDevice, mode: RepairMode, dryRun: Bool = false) throws -> RepairResult {
        var before = CheckReport()
        let analysis: Analysis
        do {
            analysis = try run(host: host, report: &before)
        } catch {
            before.checkErrors += 1
            before.incompleteReason = "\(error)"
            return RepairResult(before: before, actions: [], after: before)
        }
        var actions: [String] = []
        var header = analysis.header
        let format = analysis.format
        let g = header.geometry
        let cs = UInt64(g.clusterSize)
        switch mode {
        case .leaks:
            let perBlock = format.refcounts.entriesPerBlock(clusterSize: g.clusterSize)
            var changes: [Int: [(Int, UInt64)]] = [:]
            for c in 0..<Int(analysis.fileClusters) where analysis.stored[c] > UInt64(analysis.expected[c]) {
                let tableIndex = c / perBlock
                guard tableIndex < analysis.blockOffsets.count, analysis.blockOffsets[tableIndex] != nil else {
                    continue
                }
                actions.append("cluster \(c): refcount \(analysis.stored[c]) -> \(analysis.expected[c])")
                changes[tableIndex, default: []].append((c % perBlock, UInt64(analysis.expected[c])))
            }
            for (cluster, count) in analysis.storedBeyond where count > UInt64(analysis.beyond[cluster] ?? 0) {
                let tableIndex = Int(cluster / UInt64(perBlock))
                guard tableIndex < analysis.blockOffsets.count, analysis.blockOffsets[tableIndex] != nil else {
                    continue
                }
                actions.append("cluster \(cluster): refcount \(count) -> \(analysis.beyond[cluster] ?? 0)")
                changes[tableIndex, default: []].append(
                    (Int(cluster % UInt64(perBlock)), UInt64(analysis.beyond[cluster] ?? 0))
                )
            }
            let stale = header.incompatibleFeatures.contains(.checksums) ? analysis.staleChecksumBlocks : []
            if !stale.isEmpty { actions.append("recompute the stale checksums of \(stale.count) metadata blocks") }
            if dryRun { return RepairResult(before: before, actions: actions, after: before) }
            var rewritten: [UInt64] = []
            for (tableIndex, updates) in changes {
                let offset = analysis.blockOffsets[tableIndex]!
                var block = try host.read(count: Int(cs), at: offset).withUnsafeBytes { format.refcounts.decode($0) }
                for (index, value) in updates { block[index] = value }
                try host.write(format.refcounts.encode(block), at: offset)
                rewritten.append(offset)
            }
            try host.flush()
            var checksumsComplete = true
            if header.incompatibleFeatures.contains(.checksums) && !analysis.dropChecksums {
                // The refcount blocks just rewritten and the metadata written since the last flush before a
                // crash (validated as structure by the check) get checksums of what they hold now.
                checksumsComplete = try rehash(
                    host: host,
                    header: header,
                    ranges: rewritten.map { $0..<$0 + cs } + stale.map { $0 * 4096..<($0 + 1) * 4096 }
                )
            }
            if !checksumsComplete {
                actions.append(
                    "left the dirty bit set: some metadata checksums need a checksum block a writer allocates"
                )
            } else if before.corruptions == 0 && header.incompatibleFeatures.contains(.dirty) {
                header.incompatibleFeatures.remove(.dirty)
                try host.write(format.encodeFixedHeader(header), at: 0)
                try host.flush()
                actions.append("cleared the dirty bit")
            }
        case .all:
            // Each round drops or mends what cannot be trusted, then rebuilds the refcounts; a mended
            // entry can expose the next problem, so a few rounds run until the image checks clean.
            var analysis = analysis
            var reenableChecksums = false
            defer {
                if reenableChecksums && !dryRun {
                    do {
                        try VImage.enableChecksums(host: host)
                    } catch {
                        actions.append("could not compute the checksums again: \(error)")
                    }
                }
            }
            for round in 0..<4 {
                var fixes: [UInt64: UInt64] = [:]
                for fix in analysis.entryFixes {
                    // Fixes of one entry combine: each clears bits; dropping the entry (0) wins.
                    fixes[fix.offset] = (fixes[fix.offset] ?? UInt64.max) & fix.value
                }
                for (offset, value) in fixes.sorted(by: { $0.key < $1.key }) {
                    actions.append(
                        value == 0
                            ? "drop the untrusted entry at 0x\(String(offset, radix: 16))"
                            : "rewrite the entry at 0x\(String(offset, radix: 16)) as 0x\(String(value, radix: 16))"
                    )
                }
                if analysis.dropSnapshots { actions.append("drop the snapshot table (it cannot be trusted)") }
                if analysis.dropBitmapDirectory { actions.append("empty the bitmap directory (it cannot be trusted)") }
                if analysis.dropChecksums {
                    actions.append(
                        "drop the checksum table (it cannot be trusted) and compute every checksum again from the blocks as they are"
                    )
                }
                if round == 0 { actions.append("rebuild all refcounts from the references") }
                if dryRun { return RepairResult(before: before, actions: actions, after: before) }
                for (offset, value) in fixes {
                    var w = ByteWriter()
                    w.write(value)
                    try host.write(w.bytes, at: offset)
                }
                if analysis.dropSnapshots {
                    header.snapshotCount = 0
                    header.snapshotTableOffset = .zero
                    header.snapshotTableSize = 0
                    try host.write(format.encodeFixedHeader(header), at: 0)
                }
                if analysis.dropBitmapDirectory {
                    header.setBitmapDirectory(.empty)
                    try host.write(format.encodeHeader(header), at: 0)
                }
                if analysis.dropChecksums {
                    // Without the bit the old structures are unreferenced (freed by the rebuild below); the
                    // checksums are enabled again once the image checks clean.
                    header.incompatibleFeatures.remove(.checksums)
                    header.extensions.removeAll { $0.type == HeaderExtension.checksumTable }
                    try host.write(format.encodeHeader(header), at: 0)
                    reenableChecksums = true
                }
                try host.flush()
                var scratch = CheckReport()
                let fixed = try run(host: host, report: &scratch)
                header = fixed.header
                try rebuildRefcounts(host: host, analysis: fixed, header: &header)
                if header.incompatibleFeatures.contains(.checksums) {
                    // Metadata rewritten by the repair, and metadata whose checksum failed although it holds
                    // a valid structure, get checksums of what they hold now; data keeps its checksums.
                    var scratch = CheckReport()
                    let rebuilt = try run(host: host, report: &scratch)
                    let mismatched = scratch.findings.filter { $0.kind == "checksum" }.count
                    if mismatched > 0 {
                        actions.append("recompute the checksums of \(mismatched) metadata blocks that fail them")
                    }
                    let complete = try rehash(
                        host: host,
                        header: header,
                        ranges: rebuilt.metadataClusters.map { $0 * cs..<($0 + 1) * cs }
                    )
                    if !complete && !header.incompatibleFeatures.contains(.dirty) {
                        // Checksums without a block yet: the next open computes them again (FORMAT.md rule 4).
                        header.incompatibleFeatures.insert(.dirty)
                        try host.write(format.encodeFixedHeader(header), at: 0)
                        try host.flush()
                    }
                }
                var next = CheckReport()
                analysis = try run(host: host, report: &next)
                if next.isClean { break }
            }
        }
        let after = check(host: host)
        return RepairResult(before: before, actions: actions, after: after)
    }

    /// Computes the checksums of host ranges from what they hold and writes them where checksum blocks
    /// exist (a repair does not allocate: a block without one stays unverified until written again).
    /// Returns false when some had no checksum block to go to.
    private static func rehash(host: any BlockDevice, header: ImageHeader, ranges: [Range<UInt64>]) throws -> Bool {
        guard let checked = try ChecksummedHost.open(raw: host, header: header, fileSize: host.size) else {
            return true
        }
        for range in ranges { try checked.rehash(range: range) }
        let complete = try checked.writeExisting()
        try host.flush()
        return complete
    }

    /// Writes a new refcount table and blocks at the end of the file holding exactly the references
    /// found, syncs, switches the header to them (clearing the corrupt and dirty bits), and syncs.
    /// The old refcount structure becomes free space.
    private static func rebuildRefcounts(host: any BlockDevice, analysis: Analysis, header: inout ImageHeader) throws {
        let g = header.geometry
        let cs = UInt64(g.clusterSize)
        let width = analysis.format.refcounts
        let perBlock = UInt64(width.entriesPerBlock(clusterSize: g.clusterSize))
        var counts = analysis.expected
        for c in analysis.refcountStructure where c < UInt64(counts.count) && counts[Int(c)] > 0 { counts[Int(c)] -= 1 }
        let start = analysis.fileClusters
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        while true {
            let total = start + blocks + tableClusters
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = g.clusters(covering: needBlocks * 8)
            if needBlocks == blocks && needTable == tableClusters { break }
            blocks = needBlocks
            tableClusters = needTable
        }
        guard tableClusters * cs / 8 <= ImageHeader.maxRefcountTableEntries else {
            throw VImageError(.limitExceeded, message: "the rebuilt refcount table would exceed its limit")
        }
        let end = start + blocks + tableClusters
        var table = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
        for b in 0..<blocks {
            table[Int(b)] = (start + b) * cs
            var block = [UInt64](repeating: 0, count: Int(perBlock))
            for i in 0..<perBlock {
                let c = b * perBlock + i
                if c < start {
                    block[Int(i)] = min(UInt64(counts[Int(c)]), width.maxValue)
                } else if c < end {
                    block[Int(i)] = 1
                }
            }
            try host.write(width.encode(block), at: (start + b) * cs)
        }
        try host.write(encodeTable(table[...]), at: (start + blocks) * cs)
        try host.flush()
        header.refcountTableOffset = HostOffset((start + blocks) * cs)
        header.refcountTableClusters = UInt32(tableClusters)
        header.incompatibleFeatures.remove(.corrupt)
        header.incompatibleFeatures.remove(.dirty)
        try host.write(analysis.format.encodeFixedHeader(header), at: 0)
        try host.flush()
    }
}
