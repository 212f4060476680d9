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

    /// Checks the image file at `path`, opened read-only with a shared lock.
    public static func check(path: String) throws -> CheckReport {
        let file = try wrapIO(path) { try FileDevice.open(path: path, readOnly: true, growable: true, lock: .shared) }
        defer { try? file.close() }
        var report = check(host: file)
        checkBackingChain(host: file, path: path, report: &report)
        return report
    }

    /// A clone whose backing chain cannot be opened cannot be read, so (as `qemu-img check`, which
    /// fails to open it) the check is incomplete: a `backing-missing`, `backing-loop` or
    /// `backing-chain` finding and a check error (exit code 1). Repair cannot fix it; `vimg rebase`
    /// can. Only headers are read.
    static func checkBackingChain(host: any BlockDevice, path: String, report: inout CheckReport) {
        guard let bytes = try? readHeaderCluster(host, fileSize: host.size),
            let header = try? ImageHeader.decode(bytes),
            let name = header.backingFileName
        else { return }
        let kind: String
        let message: String
        do {
            _ = try VImage.backingChainLevels(name: name, format: header.backingFileFormat, childPath: path)
            return
        } catch let failure as VImage.BackingChainFailure {
            kind = failure.kind.rawValue
            message = failure.error.message
        } catch let error as VImageError {
            kind = "backing-chain"
            message = error.message
        } catch {
            kind = "backing-chain"
            message = "\(error)"
        }
        report.add(.info, kind, message)
        report.checkErrors += 1
        if report.incompleteReason == nil { report.incompleteReason = message }
    }

    /// What a check learned, kept for repair.
    struct Analysis {
        var header: ImageHeader
        var fileClusters: UInt64
        /// References per host cluster (inside the file) and past its end.
        var expected: [UInt32]
        var beyond: [UInt64: UInt32]
        var stored: [UInt16]
        var storedBeyond: [UInt64: UInt16]
        /// Existing refcount block per table index.
        var blockOffsets: [UInt64?]
        /// Entries to rewrite for `-r all`: host offset of a big-endian u64 and its trusted value.
        var entryFixes: [(offset: UInt64, value: UInt64)] = []
        /// The snapshot table cannot be trusted: `-r all` drops it.
        var dropSnapshots = false
        /// Clusters of the refcount structure itself (table and blocks).
        var refcountStructure: [UInt64] = []
    }

    @discardableResult
    static func run(host: any BlockDevice, report: inout CheckReport) throws -> Analysis {
        let fileSize = host.size
        let header = try ImageHeader.decode(try readHeaderCluster(host, fileSize: fileSize))
        try header.validate(fileSize: fileSize)
        let g = header.geometry
        let cs = UInt64(g.clusterSize)
        let fileClusters = g.clusters(covering: fileSize)
        guard fileClusters <= maxClusters else {
            throw VImageError(.limitExceeded, message: "file is too large to check (\(fileClusters) clusters)")
        }
        report.isDirty = header.incompatibleFeatures.contains(.dirty)
        report.isMarkedCorrupt = header.incompatibleFeatures.contains(.corrupt)
        report.totalClusters = g.clusters(covering: header.virtualSize)
        report.imageEndOffset = fileSize
        if report.isDirty {
            report.add(.info, "dirty", "the image was not closed cleanly (dirty bit set); leaked clusters are possible")
        }
        if report.isMarkedCorrupt {
            report.add(.info, "marked-corrupt", "the image is marked corrupt")
        }

        var expected = [UInt32](repeating: 0, count: Int(fileClusters))
        var beyond: [UInt64: UInt32] = [:]  // data clusters past the end of the file (unwritten when a writer crashed)
        func reference(_ cluster: UInt64) {
            if cluster < fileClusters {
                expected[Int(cluster)] &+= 1
            } else {
                beyond[cluster, default: 0] &+= 1
            }
        }
        // Marks per cluster of the file: metadata (the header, refcount structure, L1 tables and snapshot
        // table: "structural"; L2 tables), data referenced by an L2 entry, and data claimed exclusive by
        // an active COPIED L2 entry. Data on metadata and COPIED on a shared cluster are rare: the marks
        // tell whether any exists, and only then are the L2 tables read again to name the entries, so
        // the common case keeps no per-reference list (memory stays one counter and one byte per cluster).
        let structuralMark: UInt8 = 1
        let l2Mark: UInt8 = 2
        let dataMark: UInt8 = 4
        let copiedMark: UInt8 = 8
        var marks = [UInt8](repeating: 0, count: Int(fileClusters))
        if fileClusters > 0 { marks[0] = structuralMark }
        func isMarked(_ cluster: UInt64, _ mark: UInt8) -> Bool {
            cluster < fileClusters && marks[Int(cluster)] & mark != 0
        }
        // Where each reference was found, as indices: the text is built only for a finding.
        var walkNames: [String] = []
        func describe(_ site: Site) -> String {
            switch site.l2 {
            case Site.l1Entry: return "\(walkNames[Int(site.walk)]) L1 entry \(site.l1)"
            case Site.activeL1Entry: return "L1 entry \(site.l1)"
            default: return "\(walkNames[Int(site.walk)]) L2 table \(site.l1) entry \(site.l2)"
            }
        }
        var l2References: [(entry: UInt64, cluster: UInt64, site: Site)] = []
        /// References a metadata area, which must be cluster aligned and inside the file.
        func referenceMetadata(
            _ offset: UInt64,
            bytes: UInt64,
            _ what: String,
            isL2: Bool = false,
            report: inout CheckReport
        ) -> Bool {
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
                marks[Int(c)] |= isL2 ? l2Mark : structuralMark
            }
            return true
        }

        reference(0)
        let rtBytes = UInt64(header.refcountTableClusters) * cs
        var entryFixes: [(offset: UInt64, value: UInt64)] = []
        var dropSnapshots = false
        var refcountStructure: [UInt64] = []
        if referenceMetadata(header.refcountTableOffset.rawValue, bytes: rtBytes, "refcount table", report: &report) {
            refcountStructure += Array(
                g.clusterIndex(
                    header.refcountTableOffset.rawValue
                )..<g.clusters(covering: header.refcountTableOffset.rawValue + rtBytes)
            )
        }
        let table = try host.read(count: Int(rtBytes), at: header.refcountTableOffset.rawValue).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
        var blockOffsets = [UInt64?](repeating: nil, count: table.count)
        for (i, raw) in table.enumerated() where raw != 0 {
            if raw & ~hostOffsetMask != 0 {
                report.add(
                    .corruption,
                    "reserved-bits",
                    "refcount table entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))"
                )
            }
            let offset = raw & hostOffsetMask
            if referenceMetadata(offset, bytes: cs, "refcount block \(i)", report: &report) {
                blockOffsets[i] = offset
                refcountStructure.append(g.clusterIndex(offset))
            }
        }

        // The L1 tables: the active one, then each snapshot's.
        var visitedL2 = Set<UInt64>()
        /// Each distinct L2 table, where it was first reached, and whether its COPIED flags are promises
        /// (reached through an active L1 entry with COPIED).
        var l2Walked: [(offset: UInt64, walk: Int32, l1: Int, copiedScan: Bool)] = []
        var l1CopiedChecks: [(cluster: UInt64, site: Site, entry: UInt64, raw: UInt64)] = []
        /// An active COPIED entry points past the end of the file (its references are known only at the end).
        var copiedBeyond = false
        var lastHost: UInt64? = nil
        func walk(l1Offset: UInt64, l1Size: UInt32, active: Bool, name: String, report: inout CheckReport) throws {
            // An empty L1 table may still own the cluster reserved for it (a 0-byte image).
            guard l1Size > 0 || l1Offset != 0 else { return }
            guard referenceMetadata(l1Offset, bytes: max(8, UInt64(l1Size) * 8), "\(name) L1 table", report: &report)
            else {
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
                guard referenceMetadata(l2, bytes: cs, "\(name) L2 table \(i)", isL2: true, report: &report) else {
                    entryFixes.append((entryOffset, 0))
                    continue
                }
                l2References.append((entryOffset, g.clusterIndex(l2), Site(walk: walkIndex, l1: i, l2: Site.l1Entry)))
                if active && entry.isCopied {
                    l1CopiedChecks.append(
                        (g.clusterIndex(l2), Site(walk: walkIndex, l1: i, l2: Site.activeL1Entry), entryOffset, raw)
                    )
                }
                guard visitedL2.insert(l2).inserted else { continue }
                let copiedScan = active && entry.isCopied
                l2Walked.append((l2, walkIndex, i, copiedScan))
                let entries = try host.read(count: Int(cs), at: l2).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
                for (j, raw) in entries.enumerated() where raw != 0 {
                    let site = Site(walk: walkIndex, l1: i, l2: j)
                    let entryOffset = l2 + UInt64(j * 8)
                    if L2Entry.reservedBits(raw) != 0 {
                        report.add(
                            .corruption,
                            "reserved-bits",
                            "\(describe(site)) has reserved bits set (0x\(String(raw, radix: 16)))",
                            at: entryOffset
                        )
                        entryFixes.append((entryOffset, raw & ~L2Entry.reservedBits(raw)))
                    }
                    let e = L2Entry(raw: raw & ~L2Entry.reservedBits(raw))
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
                            marks[Int(c)] |= claimsCopied ? dataMark | copiedMark : dataMark
                        } else if claimsCopied {
                            copiedBeyond = true
                        }
                    }
                    if case .compressed(let d) = e {
                        let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
                        if overflow || end > fileSize || d.hostOffset == 0 {
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
                                marks[Int(c)] |= dataMark
                            }
                        }
                    }
                    guard active else { continue }
                    switch e {
                    case .normal(let host, _):
                        report.allocatedClusters += 1
                        if let lastHost, host.rawValue != lastHost + cs { report.fragmentedClusters += 1 }
                        lastHost = host.rawValue
                    case .compressed:
                        report.allocatedClusters += 1
                        report.compressedClusters += 1
                    default: break
                    }
                }
            }
        }
        try walk(
            l1Offset: header.l1TableOffset.rawValue,
            l1Size: header.l1Size,
            active: true,
            name: "active",
            report: &report
        )

        if header.snapshotCount > 0 {
            if referenceMetadata(
                header.snapshotTableOffset.rawValue,
                bytes: UInt64(header.snapshotTableSize),
                "snapshot table",
                report: &report
            ) {
                let bytes = try host.read(count: Int(header.snapshotTableSize), at: header.snapshotTableOffset.rawValue)
                do {
                    let snapshots = try SnapshotTable.decode(
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
                            name: "snapshot '\(s.name)'",
                            report: &report
                        )
                    }
                } catch let error as VImageError {
                    report.add(.corruption, "snapshot-table", error.message, at: header.snapshotTableOffset.rawValue)
                    dropSnapshots = true
                }
            } else {
                dropSnapshots = true
            }
        }

        // Tables or data placed on metadata: whatever is written through them overwrites the metadata.
        for r in l2References where isMarked(r.cluster, structuralMark) {
            report.add(
                .corruption,
                "metadata-overlap",
                "\(describe(r.site)) points at metadata (cluster \(r.cluster))",
                at: r.entry
            )
            entryFixes.append((r.entry, 0))
        }
        /// The entries of a walked L2 table, decoded as the walk decoded them (reserved bits ignored).
        func rereadTable(_ t: (offset: UInt64, walk: Int32, l1: Int, copiedScan: Bool)) throws -> [UInt64] {
            try host.read(count: Int(cs), at: t.offset).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
        }
        let metadataMarks = structuralMark | l2Mark
        if marks.contains(where: { $0 & dataMark != 0 && $0 & metadataMarks != 0 }) {
            for t in l2Walked {
                for (j, raw) in try rereadTable(t).enumerated() where raw != 0 {
                    let site = Site(walk: t.walk, l1: t.l1, l2: j)
                    let entryOffset = t.offset + UInt64(j * 8)
                    var clusters: [UInt64] = []
                    switch L2Entry(raw: raw & ~L2Entry.reservedBits(raw)) {
                    case .normal(let host, _), .zero(.some(let host), _): clusters = [g.clusterIndex(host.rawValue)]
                    case .compressed(let d):
                        let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
                        if !overflow && end <= fileSize && d.hostOffset != 0 {
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

        // Compare with the stored refcounts.
        let perBlock = UInt64(g.refcountBlockEntries)
        var stored = [UInt16](repeating: 0, count: Int(fileClusters))
        var storedBeyond: [UInt64: UInt16] = [:]
        var covered = [Bool](repeating: false, count: table.count)
        for (i, offset) in blockOffsets.enumerated() {
            guard let offset else { continue }
            covered[i] = true
            let block = try host.read(count: Int(cs), at: offset).withUnsafeBytes { decodeTable($0, as: UInt16.self) }
            for (j, count) in block.enumerated() where count != 0 {
                let cluster = UInt64(i) * perBlock + UInt64(j)
                if cluster < fileClusters { stored[Int(cluster)] = count } else { storedBeyond[cluster] = count }
            }
        }
        func compare(_ cluster: UInt64, stored: UInt16, expected: UInt32, report: inout CheckReport) {
            guard UInt32(stored) != expected else { return }
            let offset = cluster * cs
            if UInt32(stored) > expected {
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
        for c in 0..<Int(fileClusters) where UInt32(stored[c]) != expected[c] {
            compare(UInt64(c), stored: stored[c], expected: expected[c], report: &report)
        }
        for cluster in Set(beyond.keys).union(storedBeyond.keys).sorted() {
            compare(cluster, stored: storedBeyond[cluster] ?? 0, expected: beyond[cluster] ?? 0, report: &report)
        }

        // A COPIED flag promises the cluster has one reference, so writing it in place is safe. A set flag
        // on a shared cluster would let a write change a snapshot: corruption. A clear flag on an owned
        // cluster only costs a needless copy later (a crash between the refcount and flag updates of a
        // snapshot operation can leave one), so it is not reported.
        func checkCopied(cluster: UInt64, site: Site, entry: UInt64, raw: UInt64, report: inout CheckReport) {
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
        for check in l1CopiedChecks {
            checkCopied(cluster: check.cluster, site: check.site, entry: check.entry, raw: check.raw, report: &report)
        }
        var copiedSuspect = copiedBeyond
        for c in 0..<Int(fileClusters) where marks[c] & copiedMark != 0 && expected[c] != 1 {
            copiedSuspect = true
            break
        }
        if copiedSuspect {
            for t in l2Walked where t.copiedScan {
                for (j, raw) in try rereadTable(t).enumerated() where raw & copiedFlag != 0 {
                    guard let host = L2Entry(raw: raw & ~L2Entry.reservedBits(raw)).hostCluster?.rawValue else {
                        continue
                    }
                    checkCopied(
                        cluster: g.clusterIndex(host),
                        site: Site(walk: t.walk, l1: t.l1, l2: j),
                        entry: t.offset + UInt64(j * 8),
                        raw: raw,
                        report: &report
                    )
                }
            }
        }
        return Analysis(
            header: header,
            fileClusters: fileClusters,
            expected: expected,
            beyond: beyond,
            stored: stored,
            storedBeyond: storedBeyond,
            blockOffsets: blockOffsets,
            entryFixes: entryFixes,
            dropSnapshots: dropSnapshots,
            refcountStructure: refcountStructure
        )
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
    /// Checks and repairs the image file at `path` (opened read-write with an exclusive lock).
    /// - Parameters:
    ///   - mode: `.leaks` or `.all`.
    ///   - dryRun: report what would be done, change nothing.
    public static func repair(path: String, mode: RepairMode, dryRun: Bool = false) throws -> RepairResult {
        let host = try wrapIO(path) {
            try FileDevice.open(path: path, readOnly: dryRun, growable: true, lock: dryRun ? .shared : .exclusive)
        }
        defer { try? host.close() }
        var result = try wrapIO(path) { try repair(host: host, mode: mode, dryRun: dryRun) }
        checkBackingChain(host: host, path: path, report: &result.before)
        checkBackingChain(host: host, path: path, report: &result.after)
        return result
    }

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
        let g = header.geometry
        let cs = UInt64(g.clusterSize)
        switch mode {
        case .leaks:
            let perBlock = g.refcountBlockEntries
            var changes: [Int: [(Int, UInt16)]] = [:]
            for c in 0..<Int(analysis.fileClusters) where UInt32(analysis.stored[c]) > analysis.expected[c] {
                let tableIndex = c / perBlock
                guard tableIndex < analysis.blockOffsets.count, analysis.blockOffsets[tableIndex] != nil else {
                    continue
                }
                actions.append("cluster \(c): refcount \(analysis.stored[c]) -> \(analysis.expected[c])")
                changes[tableIndex, default: []].append((c % perBlock, UInt16(analysis.expected[c])))
            }
            for (cluster, count) in analysis.storedBeyond where UInt32(count) > analysis.beyond[cluster] ?? 0 {
                let tableIndex = Int(cluster / UInt64(perBlock))
                guard tableIndex < analysis.blockOffsets.count, analysis.blockOffsets[tableIndex] != nil else {
                    continue
                }
                actions.append("cluster \(cluster): refcount \(count) -> \(analysis.beyond[cluster] ?? 0)")
                changes[tableIndex, default: []].append(
                    (Int(cluster % UInt64(perBlock)), UInt16(analysis.beyond[cluster] ?? 0))
                )
            }
            if dryRun { return RepairResult(before: before, actions: actions, after: before) }
            for (tableIndex, updates) in changes {
                let offset = analysis.blockOffsets[tableIndex]!
                var block = try host.read(count: Int(cs), at: offset).withUnsafeBytes {
                    decodeTable($0, as: UInt16.self)
                }
                for (index, value) in updates { block[index] = value }
                try host.write(encodeTable(block[...]), at: offset)
            }
            try host.flush()
            if before.corruptions == 0 && header.incompatibleFeatures.contains(.dirty) {
                header.incompatibleFeatures.remove(.dirty)
                try host.write(header.encodeFixed(), at: 0)
                try host.flush()
                actions.append("cleared the dirty bit")
            }
        case .all:
            // Each round drops or mends what cannot be trusted, then rebuilds the refcounts; a mended
            // entry can expose the next problem, so a few rounds run until the image checks clean.
            var analysis = analysis
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
                    try host.write(header.encodeFixed(), at: 0)
                }
                try host.flush()
                var scratch = CheckReport()
                let fixed = try run(host: host, report: &scratch)
                header = fixed.header
                try rebuildRefcounts(host: host, analysis: fixed, header: &header)
                var next = CheckReport()
                analysis = try run(host: host, report: &next)
                if next.isClean { break }
            }
        }
        let after = check(host: host)
        return RepairResult(before: before, actions: actions, after: after)
    }

    /// Writes a new refcount table and blocks at the end of the file holding exactly the references
    /// found, syncs, switches the header to them (clearing the corrupt and dirty bits), and syncs.
    /// The old refcount structure becomes free space.
    private static func rebuildRefcounts(host: any BlockDevice, analysis: Analysis, header: inout ImageHeader) throws {
        let g = header.geometry
        let cs = UInt64(g.clusterSize)
        let perBlock = UInt64(g.refcountBlockEntries)
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
            var block = [UInt16](repeating: 0, count: Int(perBlock))
            for i in 0..<perBlock {
                let c = b * perBlock + i
                if c < start {
                    block[Int(i)] = UInt16(min(counts[Int(c)], UInt32(UInt16.max)))
                } else if c < end {
                    block[Int(i)] = 1
                }
            }
            try host.write(encodeTable(block[...]), at: (start + b) * cs)
        }
        try host.write(encodeTable(table[...]), at: (start + blocks) * cs)
        try host.flush()
        header.refcountTableOffset = HostOffset((start + blocks) * cs)
        header.refcountTableClusters = UInt32(tableClusters)
        header.incompatibleFeatures.remove(.corrupt)
        header.incompatibleFeatures.remove(.dirty)
        try host.write(header.encodeFixed(), at: 0)
        try host.flush()
    }
}
