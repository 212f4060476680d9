// Design notes
// ------------
// A scrub reads every 4 KiB block of every cluster in use (refcount above zero, so data of the active
// disk, of snapshots and of bitmaps, and all metadata) and checks it against its checksum, while the image
// stays in use:
//
//   under the engine lock: the next batch of clusters in use (and, once, the checksum structures, re-read
//                          from disk and checked sector by sector)
//   unlocked:              ChecksummedHost.verify, which holds the blocks' stripe locks, so a block being
//                          written and its checksum are never seen half updated
//
// A cluster freed and reused between the two steps is still consistent under its stripe locks (a punch
// or write updates the checksum in the same step), so no I/O gate ticket is needed. Mismatches are then
// located (which guest offsets of which snapshot use the block) for the report and for
// `vimg check --repair-from`.

import BlockIO

/// One block that failed its checksum.
public struct ScrubFinding: Sendable, Hashable {
    public enum Kind: String, Sendable {
        /// Guest data of an uncompressed cluster (repairable from another copy of the disk).
        case data
        /// Part of a compressed cluster's record.
        case compressed
        /// A metadata block (L1, L2, refcount, snapshot, bitmap structures).
        case metadata
        /// A sector of the checksum table or a checksum block (fails its own checksum).
        case checksumStructure = "checksum-structure"
    }

    public var kind: Kind
    /// Host offset of the 4 KiB block (or the 512-byte sector of a checksum structure).
    public var hostOffset: UInt64
    /// Where the guest sees the block: the active disk (`snapshot` nil) or a snapshot, when it is data.
    public var guestOffsets: [(snapshot: String?, offset: UInt64)]
    /// The image the block belongs to (its path, for findings in a backing image).
    public var image: String?

    public static func == (a: ScrubFinding, b: ScrubFinding) -> Bool {
        a.kind == b.kind && a.hostOffset == b.hostOffset && a.image == b.image
    }

    public func hash(into hasher: inout Hasher) {
        hasher.combine(kind)
        hasher.combine(hostOffset)
        hasher.combine(image)
    }
}

/// What a scrub read and found.
public struct ScrubReport: Sendable {
    /// Blocks read and compared with their checksum.
    public var blocksVerified: UInt64 = 0
    /// Blocks in use without a checksum yet (written by no one since the checksum block was created).
    public var blocksUnverified: UInt64 = 0
    public var findings: [ScrubFinding] = []
    /// Images scrubbed (the image, then its backing images with `backingChain`).
    public var images: [String] = []

    public var isClean: Bool { findings.isEmpty }
}

extension VImage {
    /// Reads and verifies every block in use against its checksum (`vimg scrub`, `vdisk scrub`); the image
    /// may be in use meanwhile. `progress` gets (bytes done, bytes total).
    /// - Throws: when the image has no checksums, or on I/O errors.
    public func scrub(backingChain: Bool = false, progress: ((UInt64, UInt64) -> Void)? = nil) throws -> ScrubReport {
        guard let checked = host as? ChecksummedHost else {
            throw VImageError(
                .unsupportedFeature,
                path: path,
                message: "the image has no checksums (create it with -o checksums=on)"
            )
        }
        var report = ScrubReport()
        report.images.append(path ?? "image")
        let cs = UInt64(geometry.clusterSize)
        let bs = UInt64(ChecksumGeometry.blockSize)

        // The checksum structures, sector by sector, as they are on disk.
        let badSectors = try state.withLock { m in
            try m.checkOpen()
            return try wrapIO(path) { try checked.verifyStructures() }
        }
        for sector in badSectors {
            report.findings.append(
                ScrubFinding(kind: .checksumStructure, hostOffset: sector, guestOffsets: [], image: path)
            )
        }

        // Every cluster in use, in batches of up to 1 MiB runs.
        let (end, total) = try state.withLock { m -> (HostCluster, UInt64) in
            try m.checkOpen()
            let fileEnd = HostCluster(checked.size / cs)
            let end = min(m.hostEnd, fileEnd)
            var total: UInt64 = 0
            for c in HostCluster(1)..<end where try wrapIO(path, { try m.refcount(c) }) > 0 { total += cs }
            return (end, total)
        }
        let structures = Set(checked.structureClusters.map { geometry.cluster(containing: $0) })
        var bad: [UInt64] = []
        var done: UInt64 = 0
        var next = HostCluster(1)
        let batchClusters = max(1, (1 << 20) / cs)
        while next < end {
            let runs = try state.withLock { m -> [Range<HostCluster>] in
                try m.checkOpen()
                var runs: [Range<HostCluster>] = []
                var scanned: UInt64 = 0
                while next < end, scanned < batchClusters * 16 {
                    let c = next
                    next = next + 1
                    scanned += 1
                    guard !structures.contains(c), try wrapIO(path, { try m.refcount(c) }) > 0 else { continue }
                    if let last = runs.last, last.upperBound == c, UInt64(last.count) < batchClusters {
                        runs[runs.count - 1] = last.lowerBound..<(c + 1)
                    } else {
                        runs.append(c..<(c + 1))
                    }
                }
                return runs
            }
            for run in runs {
                let range = run.lowerBound.rawValue * cs..<run.upperBound.rawValue * cs
                let result = try wrapIO(path) { try checked.verify(range: range) }
                bad += result.bad
                report.blocksVerified += result.verified
                report.blocksUnverified += UInt64(range.count) / bs - result.verified
                done += UInt64(range.count)
                progress?(done, total)
            }
        }
        if !bad.isEmpty { report.findings += try locate(blocks: bad) }

        if backingChain, let backing = backingImage {
            if backing.hasChecksums {
                let inner = try backing.scrub(backingChain: true)
                report.blocksVerified += inner.blocksVerified
                report.blocksUnverified += inner.blocksUnverified
                report.findings += inner.findings
                report.images += inner.images
            } else {
                report.images += ["\(backing.path ?? "backing image") (no checksums)"]
            }
        }
        return report
    }

    /// Which guest offsets (active disk and snapshots) use each host block: data, compressed or metadata.
    func locate(blocks: [UInt64]) throws -> [ScrubFinding] {
        let cs = UInt64(geometry.clusterSize)
        let bs = UInt64(ChecksumGeometry.blockSize)
        return try state.withLock { m in
            try wrapIO(path) {
                var owners: [UInt64: (kind: ScrubFinding.Kind, guest: [(String?, UInt64)])] = [:]
                let wanted = Set(blocks)
                let wantedClusters = Set(blocks.map { $0 / cs })
                var l1s: [(String?, [UInt64])] = [(nil, m.l1)]
                for s in m.snapshots { l1s.append((s.name, try m.readSnapshotL1(s))) }
                let entriesPerTable = UInt64(geometry.clusterSize / 8)
                for (name, l1) in l1s {
                    for (i, raw) in l1.enumerated() {
                        guard let table = L1Entry(rawValue: raw).l2Table else { continue }
                        let entries = try m.l2Table(at: table, mayWrite: false).entries
                        for (j, rawEntry) in entries.enumerated() {
                            let guestBase = (UInt64(i) * entriesPerTable + UInt64(j)) * cs
                            switch L2Entry(raw: rawEntry) {
                            case .normal(let host, _) where wantedClusters.contains(host.rawValue / cs):
                                for block in wanted where block / cs == host.rawValue / cs {
                                    owners[block, default: (.data, [])].guest.append((name, guestBase + block % cs))
                                }
                            case .compressed(let d):
                                for block in wanted
                                where block + bs > d.hostOffset && block < d.hostOffset + d.byteLength {
                                    owners[block, default: (.compressed, [])].kind = .compressed
                                    owners[block, default: (.compressed, [])].guest.append((name, guestBase))
                                }
                            default: break
                            }
                        }
                    }
                }
                return blocks.sorted().map { block in
                    let owner = owners[block]
                    return ScrubFinding(
                        kind: owner?.kind ?? .metadata,
                        hostOffset: block,
                        guestOffsets: owner?.guest.map { (snapshot: $0.0, offset: $0.1) } ?? [],
                        image: path
                    )
                }
            }
        }
    }
}

extension ChecksummedHost {
    /// Verifies every block of a host range under the blocks' stripe locks: the blocks that fail, and how
    /// many had a checksum to compare.
    func verify(range: Range<UInt64>) throws -> (bad: [UInt64], verified: UInt64) {
        let bs = UInt64(ChecksumGeometry.blockSize)
        let first = range.lowerBound / bs
        let last = (range.upperBound - 1) / bs
        return try withStripes(first...last) {
            let bytes = try raw.read(count: Int((last - first + 1) * bs), at: first * bs)
            var bad: [UInt64] = []
            var verified: UInt64 = 0
            for block in first...last {
                guard let expected = try storedChecksum(ofBlock: block) else { continue }
                verified += 1
                let at = Int((block - first) * bs)
                let sum = bytes.withUnsafeBytes {
                    ChecksumGeometry.checksum(
                        of: UnsafeRawBufferPointer(rebasing: $0[at..<at + Int(bs)]),
                        at: block * bs
                    )
                }
                if sum != expected {
                    mismatches.add(1, ordering: .relaxed)
                    bad.append(block * bs)
                }
            }
            return (bad, verified)
        }
    }
}

/// What `repair(_:from:)` did with each finding.
public struct BlockRepair: Sendable {
    public var finding: ScrubFinding
    /// Nil when repaired; otherwise why not.
    public var failure: String?
}

extension VImage {
    /// Rewrites bad data blocks from `other`, an image of the same disk (a replica or a backup): a block
    /// is rewritten only when `other`'s copy at one of its guest offsets matches the block's stored
    /// checksum, so a repair can only restore what was written (`vimg check --repair-from`).
    public func repair(_ findings: [ScrubFinding], from other: any BlockDevice) throws -> [BlockRepair] {
        guard let checked = host as? ChecksummedHost else {
            throw VImageError(.unsupportedFeature, path: path, message: "the image has no checksums")
        }
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        let bs = ChecksumGeometry.blockSize
        return try findings.map { finding in
            guard finding.kind == .data else {
                let why = finding.kind == .compressed ? "compressed cluster" : "\(finding.kind.rawValue) block"
                return BlockRepair(finding: finding, failure: "a \(why) is not repaired from another image")
            }
            let candidates = finding.guestOffsets.filter { $0.snapshot == nil }.map(\.offset)
            guard !candidates.isEmpty else {
                return BlockRepair(
                    finding: finding,
                    failure: "only snapshots use the block (the other image's snapshots are not read)"
                )
            }
            for guest in candidates where guest + UInt64(bs) <= other.size {
                let copy = try other.read(count: bs, at: guest)
                if try wrapIO(path, { try checked.restore(block: finding.hostOffset, from: copy) }) {
                    return BlockRepair(finding: finding, failure: nil)
                }
            }
            return BlockRepair(finding: finding, failure: "the other image's copy does not match the block's checksum")
        }
    }
}

extension ChecksummedHost {
    /// Writes `bytes` over the block at `hostOffset` if they match its stored checksum; false otherwise.
    func restore(block hostOffset: UInt64, from bytes: [UInt8]) throws -> Bool {
        let block = hostOffset / UInt64(ChecksumGeometry.blockSize)
        return try withStripes(block...block) {
            guard let expected = try storedChecksum(ofBlock: block),
                bytes.withUnsafeBytes({ ChecksumGeometry.checksum(of: $0, at: hostOffset) }) == expected
            else { return false }
            try raw.write(bytes, at: hostOffset)
            try raw.flush()
            return true
        }
    }
}
