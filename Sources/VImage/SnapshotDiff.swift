// Design notes
// ------------
// What changed between two states of an image (two internal snapshots, or a snapshot and the active
// state), computed from the L1 and L2 tables alone, no data read. A snapshot is an exact, crash-safe
// checkpoint, and copy on write guarantees that a cluster shared by two states was not written in
// between, so:
//
//   L1 entries equal (same L2 table, or both none)  ─► the whole table range is unchanged (not even read)
//   L2 entries equal (COPIED aside)                  ─► the cluster is unchanged
//   otherwise                                        ─► changed: zero in the target state, or data
//
// Entries that differ while the content happens to be equal (the same bytes written again) are reported
// as changed: a diff may be larger than the true difference, never smaller.

import BlockIO

/// A changed range between two states of an image.
public struct ChangedExtent: Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64
    /// The range reads as zeroes in the target state (a zero or discarded cluster).
    public var isZero: Bool

    public init(offset: UInt64, length: UInt64, isZero: Bool) {
        self.offset = offset
        self.length = length
        self.isZero = isZero
    }
}

extension Array where Element == ChangedExtent {
    /// Unchanged and changed runs of `offset ..< offset + count`, for extents sorted by offset and not
    /// overlapping (as `VImage.changes(from:to:)` returns them): the shape of `VImage.bitmapRuns`, so a diff
    /// can be read like a dirty bitmap (NBD's `qemu:dirty-bitmap:` contexts). Zero and data changes alike
    /// count as changed. Finds the first extent by binary search.
    public func runs(at offset: UInt64, count: UInt64) -> [(offset: UInt64, length: UInt64, dirty: Bool)] {
        var result: [(offset: UInt64, length: UInt64, dirty: Bool)] = []
        func add(_ start: UInt64, _ end: UInt64, _ dirty: Bool) {
            guard end > start else { return }
            if var last = result.last, last.dirty == dirty {
                last.length += end - start
                result[result.count - 1] = last
            } else {
                result.append((start, end - start, dirty))
            }
        }
        let end = offset + count
        // The first extent that ends after `offset`.
        var low = 0
        var high = self.count
        while low < high {
            let middle = (low + high) / 2
            if self[middle].offset + self[middle].length <= offset { low = middle + 1 } else { high = middle }
        }
        var position = offset
        for extent in self[low...] {
            guard extent.offset < end else { break }
            add(position, Swift.max(position, extent.offset), false)
            let changedEnd = Swift.min(end, extent.offset + extent.length)
            add(Swift.max(position, extent.offset), changedEnd, true)
            position = Swift.max(position, changedEnd)
        }
        add(position, end, false)
        return result
    }
}

extension VImage {
    /// The ranges that differ between snapshot `from` (nil: an empty disk) and snapshot `to` (nil: the
    /// state this image shows: the active state, or the snapshot it was opened at), from the tables alone.
    /// - Throws: `.notFound` for an unknown snapshot.
    public func changes(from: String?, to: String?) throws -> [ChangedExtent] {
        try state.withLock { m in
            try m.checkOpen()
            return try wrapIO(path) {
                let target = try to.map { try m.snapshotL1(named: $0) } ?? (l1: m.l1, size: m.header.virtualSize)
                let base = try from.map { try m.snapshotL1(named: $0).l1 } ?? []
                return try m.changedExtents(from: base, to: target.l1, size: target.size, fromEmpty: from == nil)
            }
        }
    }
}

extension Metadata {
    /// A snapshot's L1 table and virtual size.
    mutating func snapshotL1(named name: String) throws -> (l1: [UInt64], size: UInt64) {
        guard let entry = snapshots.first(where: { $0.name == name }) else {
            throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
        }
        return (try readSnapshotL1(entry), entry.virtualSize)
    }

    /// Guest ranges (below `size`) whose mapping differs between two L1 tables. With `fromEmpty`, the base
    /// is an empty disk, so a range the target reads from a backing image is changed data too.
    mutating func changedExtents(
        from a: [UInt64],
        to b: [UInt64],
        size: UInt64,
        fromEmpty: Bool = false
    ) throws
        -> [ChangedExtent]
    {
        var result: [ChangedExtent] = []
        let perTable = geometry.l2Entries
        let cs = UInt64(geometry.clusterSize)
        let tables = Int(min(UInt64(max(a.count, b.count)), geometry.l1Entries(forVirtualSize: size)))
        func add(_ cluster: UInt64, zero: Bool) {
            let offset = cluster * cs
            guard offset < size else { return }
            let length = min(cs, size - offset)
            if var last = result.last, last.isZero == zero, last.offset + last.length == offset {
                last.length += length
                result[result.count - 1] = last
            } else {
                result.append(ChangedExtent(offset: offset, length: length, isZero: zero))
            }
        }
        for i in 0..<tables {
            let rawA = i < a.count ? a[i] & hostOffsetMask : 0
            let rawB = i < b.count ? b[i] & hostOffsetMask : 0
            let backingCounts = fromEmpty && hasBacking
            if rawA == rawB && !(backingCounts && rawB == 0) { continue }
            let entriesA = rawA == 0 ? nil : try l2Table(at: HostOffset(rawA), mayWrite: false).entries
            let entriesB = rawB == 0 ? nil : try l2Table(at: HostOffset(rawB), mayWrite: false).entries
            for j in 0..<perTable {
                let ea = (entriesA?[j] ?? 0) & ~copiedFlag
                let eb = (entriesB?[j] ?? 0) & ~copiedFlag
                let target = entries.decode(eb)
                let fromBacking = backingCounts && target == .unallocated
                guard ea != eb || fromBacking else { continue }
                let zero: Bool
                switch target {
                case .zero: zero = true
                case .unallocated: zero = !hasBacking
                case .normal, .compressed: zero = false
                }
                add(UInt64(i * perTable + j), zero: zero)
            }
        }
        return result
    }
}
