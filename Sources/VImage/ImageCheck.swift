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

    /// qemu-img check's exit codes: 0 clean, 1 check not completed, 2 corruptions, 3 leaks only.
    public var exitCode: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }

    public var isClean: Bool { exitCode == 0 }

    mutating func add(_ severity: Severity, _ kind: String, _ message: String, at offset: UInt64? = nil) {
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
        return check(host: file)
    }

    private static func run(host: any BlockDevice, report: inout CheckReport) throws {
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
        /// References a metadata area, which must be cluster aligned and inside the file.
        func referenceMetadata(_ offset: UInt64, bytes: UInt64, _ what: String, report: inout CheckReport) -> Bool {
            let (end, overflow) = offset.addingReportingOverflow(bytes)
            guard g.isAligned(offset), offset != 0, !overflow, end <= fileSize else {
                report.add(.corruption, "outside-file", "\(what) at 0x\(String(offset, radix: 16)) is misaligned or outside the file", at: offset)
                return false
            }
            for c in g.clusterIndex(offset)..<g.clusters(covering: end) { reference(c) }
            return true
        }

        reference(0)
        let rtBytes = UInt64(header.refcountTableClusters) * cs
        _ = referenceMetadata(header.refcountTableOffset.rawValue, bytes: rtBytes, "refcount table", report: &report)
        let table = try host.read(count: Int(rtBytes), at: header.refcountTableOffset.rawValue).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
        var blockOffsets = [UInt64?](repeating: nil, count: table.count)
        for (i, raw) in table.enumerated() where raw != 0 {
            if raw & ~hostOffsetMask != 0 {
                report.add(.corruption, "reserved-bits", "refcount table entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))")
            }
            let offset = raw & hostOffsetMask
            if referenceMetadata(offset, bytes: cs, "refcount block \(i)", report: &report) { blockOffsets[i] = offset }
        }

        // The L1 tables: the active one, then each snapshot's.
        var visitedL2 = Set<UInt64>()
        var copiedChecks: [(cluster: UInt64, copied: Bool, what: String)] = []
        var lastHost: UInt64? = nil
        func walk(l1Offset: UInt64, l1Size: UInt32, active: Bool, name: String, report: inout CheckReport) throws {
            guard l1Size > 0 else { return }
            guard referenceMetadata(l1Offset, bytes: UInt64(l1Size) * 8, "\(name) L1 table", report: &report) else { return }
            let l1 = try host.read(count: Int(l1Size) * 8, at: l1Offset).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            for (i, raw) in l1.enumerated() where raw != 0 {
                let entry = L1Entry(rawValue: raw)
                if entry.reservedBits != 0 {
                    report.add(.corruption, "reserved-bits", "\(name) L1 entry \(i) has reserved bits set (0x\(String(raw, radix: 16)))")
                }
                guard let l2 = entry.l2Table?.rawValue else { continue }
                guard referenceMetadata(l2, bytes: cs, "\(name) L2 table \(i)", report: &report) else { continue }
                if active { copiedChecks.append((g.clusterIndex(l2), entry.isCopied, "L1 entry \(i)")) }
                guard visitedL2.insert(l2).inserted else { continue }
                let entries = try host.read(count: Int(cs), at: l2).withUnsafeBytes { decodeTable($0, as: UInt64.self) }
                for (j, raw) in entries.enumerated() where raw != 0 {
                    let where_ = "\(name) L2 table \(i) entry \(j)"
                    if L2Entry.reservedBits(raw) != 0 {
                        report.add(.corruption, "reserved-bits", "\(where_) has reserved bits set (0x\(String(raw, radix: 16)))", at: l2 + UInt64(j * 8))
                    }
                    let e = L2Entry(raw: raw)
                    if let host = e.hostCluster?.rawValue {
                        reference(g.clusterIndex(host))
                        if active && entry.isCopied {
                            copiedChecks.append((g.clusterIndex(host), raw & copiedFlag != 0, where_))
                        }
                    }
                    guard active else { continue }
                    switch e {
                    case .normal(let host, _):
                        report.allocatedClusters += 1
                        if let lastHost, host.rawValue != lastHost + cs { report.fragmentedClusters += 1 }
                        lastHost = host.rawValue
                    case .compressed(let d):
                        report.allocatedClusters += 1
                        report.compressedClusters += 1
                        let (end, overflow) = d.hostOffset.addingReportingOverflow(d.byteLength)
                        if overflow || end > fileSize || d.hostOffset == 0 {
                            report.add(.corruption, "compressed-out-of-range", "\(where_): compressed record at 0x\(String(d.hostOffset, radix: 16)) (\(d.byteLength) bytes) is outside the file", at: d.hostOffset)
                        } else {
                            for c in g.clusterIndex(d.hostOffset)...g.clusterIndex(end - 1) { reference(c) }
                        }
                    default: break
                    }
                }
            }
        }
        try walk(l1Offset: header.l1TableOffset.rawValue, l1Size: header.l1Size, active: true, name: "active", report: &report)

        if header.snapshotCount > 0 {
            if referenceMetadata(header.snapshotTableOffset.rawValue, bytes: UInt64(header.snapshotTableSize), "snapshot table", report: &report) {
                let bytes = try host.read(count: Int(header.snapshotTableSize), at: header.snapshotTableOffset.rawValue)
                do {
                    let snapshots = try SnapshotTable.decode(bytes, count: Int(header.snapshotCount), geometry: g, fileSize: fileSize)
                    for s in snapshots {
                        try walk(l1Offset: s.l1TableOffset.rawValue, l1Size: s.l1Size, active: false, name: "snapshot '\(s.name)'", report: &report)
                    }
                } catch let error as VImageError {
                    report.add(.corruption, "snapshot-table", error.message, at: header.snapshotTableOffset.rawValue)
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
                report.add(.leak, expected == 0 ? "leaked-cluster" : "refcount-too-high",
                    "cluster \(cluster) has refcount \(stored) but \(expected) references", at: offset)
            } else {
                let tableIndex = cluster / perBlock
                let hasBlock = tableIndex < UInt64(covered.count) && covered[Int(tableIndex)]
                report.add(.corruption, "refcount-too-low",
                    hasBlock ? "cluster \(cluster) has refcount \(stored) but \(expected) references"
                        : "cluster \(cluster) is referenced \(expected) times but has no refcount block", at: offset)
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
        for check in copiedChecks where check.copied {
            let references = check.cluster < fileClusters ? expected[Int(check.cluster)] : beyond[check.cluster] ?? 0
            if references != 1 {
                report.add(.corruption, "copied-flag",
                    "\(check.what): COPIED flag is set but the cluster has \(references) references",
                    at: check.cluster * cs)
            }
        }
    }
}
