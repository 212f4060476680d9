// Design notes
// ------------
// Internal snapshots (docs/FORMAT.md, "Snapshot table"). A snapshot is a frozen copy of the active L1
// table; it shares every L2 table and data cluster with the active state, which is why creating one
// costs metadata only:
//
//   create: +1 on each L2 table the active L1 maps (qcow2: and on each cluster they map), copy L1, clear
//           COPIED in the active L1
//           (so the next write copies the table, then the cluster), new snapshot table, switch header
//   delete: new snapshot table without it, switch header, then -1 on each of its L2 tables (a table
//           that reaches 0 releases its data clusters), then restore COPIED where refcounts are 1 again
//   apply:  +1 on the snapshot's tables, overwrite the active L1 with its L1, then -1 on the old tables
//
// Every step writes and syncs the new structures and their refcount increments before the header or L1
// points at them, and decrements only after the old references are durably gone, so a crash at any
// point leaves either the old or the new state (plus leaked clusters at worst). Each runs drained (no
// request in flight, none planned meanwhile): a write planned in place must not land in a cluster the
// snapshot has just made shared.

import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// What `vimg snapshot -l` shows about one snapshot.
public struct SnapshotInfo: Sendable, Hashable {
    public var id: UInt32
    public var name: String
    public var virtualSize: UInt64
    /// Nanoseconds since the Unix epoch.
    public var createdNanoseconds: UInt64
}

extension VImage {
    /// The image's internal snapshots, oldest first.
    public var snapshotList: [SnapshotInfo] {
        state.withLock { m in
            m.snapshots.map {
                SnapshotInfo(
                    id: $0.id,
                    name: $0.name,
                    virtualSize: $0.virtualSize,
                    createdNanoseconds: $0.createdNanoseconds
                )
            }
        }
    }

    /// Records the current disk content as snapshot `name`. Costs metadata only.
    /// - Throws: `.alreadyExists` if the name is taken, `.readOnly`, `.invalidArgument` for a bad name.
    public func createSnapshot(named name: String) throws {
        try mutateSnapshots { try $0.createSnapshot(named: name) }
    }

    /// Deletes snapshot `name`, freeing exactly the clusters nothing else references.
    public func deleteSnapshot(named name: String) throws {
        try mutateSnapshots { try $0.deleteSnapshot(named: name) }
    }

    /// Reverts the disk to snapshot `name` (the snapshot itself stays).
    public func applySnapshot(named name: String) throws {
        try mutateSnapshots { try $0.applySnapshot(named: name) }
    }

    /// Shows snapshot `name` instead of the active state (read-only images only; used by --snapshot).
    func selectSnapshot(named name: String) throws {
        try state.withLock { m in
            guard m.isReadOnly else {
                throw VImageError(.invalidArgument, path: path, message: "a snapshot can only be opened read-only")
            }
            guard let entry = m.snapshots.first(where: { $0.name == name }) else {
                throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
            }
            m.l1 = try m.readSnapshotL1(entry)
            m.header.virtualSize = entry.virtualSize
        }
    }

    /// Runs a snapshot-table change with no request in flight: makes everything durable first, and again
    /// after (so refcount decrements and restored COPIED flags reach disk in order).
    func mutateSnapshots(_ body: (inout Metadata) throws -> Void) throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try drained { m in
            try m.writeBack()
            try m.setDirtyBit()  // rule 4: before any metadata write, even when nothing else is pending
            try body(&m)
            try m.writeBack()
        }
    }
}

extension Metadata {
    mutating func createSnapshot(named name: String) throws {
        guard !name.isEmpty, name.utf8.count <= SnapshotEntry.maxNameLength else {
            throw VImageError(
                .invalidArgument,
                path: path,
                message: "snapshot names are 1 to \(SnapshotEntry.maxNameLength) bytes"
            )
        }
        guard !snapshots.contains(where: { $0.name == name }) else {
            throw VImageError(.alreadyExists, path: path, message: "snapshot '\(name)' already exists")
        }
        guard snapshots.count < Int(ImageHeader.maxSnapshots) else {
            throw VImageError(.limitExceeded, path: path, message: "the image has the maximum number of snapshots")
        }
        // The copy shares every L2 table: count the new references, and stop writing them in place.
        for (index, raw) in l1.enumerated() {
            let entry = L1Entry(rawValue: raw)
            guard let table = entry.l2Table else { continue }
            try incrementRefcount(geometry.cluster(containing: table))
            if !format.tablesHoldDataReferences { try addDataReferences(of: try l2Table(at: table).entries) }
            if format.exactCopiedFlags { try clearCopiedFlags(inL2Table: table) }
            if entry.isCopied { setL1(index, L1Entry(l2Table: table, copied: false)) }
        }
        let copy = try allocateRun(geometry.clusters(covering: UInt64(l1.count) * 8))
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let entry = SnapshotEntry(
            l1TableOffset: geometry.offset(of: copy),
            l1Size: UInt32(l1.count),
            virtualSize: header.virtualSize,
            createdNanoseconds: UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec),
            id: (snapshots.map(\.id).max() ?? 0) + 1,
            name: name
        )
        try writeBackRefcounts(sync: false)  // synced with the table below, before the header switch
        if !l1.isEmpty {
            try host.write(encodeTable(l1.map { $0 & ~copiedFlag }[...]), at: entry.l1TableOffset.rawValue)
        }
        try switchSnapshotTable(
            to: snapshots + [entry],
            beforeSwitch: { m in
                try m.writeL1Sectors()
                // qcow2: the cleared flags land before the header names the snapshot, so a crash leaves at
                // worst a clear flag on an owned cluster (copied once more), never a set flag on a shared one.
                if m.format.exactCopiedFlags { for table in m.l2Cache.dirtyTables() { try m.writeTable(table) } }
            }
        )
    }

    mutating func deleteSnapshot(named name: String) throws {
        guard let victim = snapshots.first(where: { $0.name == name }) else {
            throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
        }
        let victimL1 = try readSnapshotL1(victim)
        try switchSnapshotTable(to: snapshots.filter { $0.name != name }, beforeSwitch: { _ in })
        // The header no longer reaches the snapshot (durably): release what it held.
        for raw in victimL1 {
            if let table = L1Entry(rawValue: raw).l2Table { try releaseL2Table(table) }
        }
        for c in 0..<geometry.clusters(covering: UInt64(victim.l1Size) * 8) {
            try decrementRefcount(geometry.cluster(containing: victim.l1TableOffset) + c)
        }
        try restoreCopiedFlags()
    }

    mutating func applySnapshot(named name: String) throws {
        guard let target = snapshots.first(where: { $0.name == name }) else {
            throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
        }
        var newL1 = try readSnapshotL1(target)
        // The disk's content changes wherever the snapshot's mapping differs: bitmaps record it.
        if !bitmaps.isEmpty && maintainsBitmaps {
            try markBitmapsInUse()
            for e in try changedExtents(from: l1, to: newL1, size: max(header.virtualSize, target.virtualSize)) {
                for i in bitmaps.indices where bitmaps[i].enabled { bitmaps[i].mark(offset: e.offset, count: e.length) }
            }
        }
        for raw in newL1 {
            if let table = L1Entry(rawValue: raw).l2Table {
                try incrementRefcount(geometry.cluster(containing: table))
                if !format.tablesHoldDataReferences { try addDataReferences(of: try l2Table(at: table).entries) }
            }
        }
        newL1 = newL1.map { $0 & ~copiedFlag }
        let oldL1 = l1
        let oldOffset = header.l1TableOffset
        let oldClusters = geometry.clusters(covering: UInt64(oldL1.count) * 8)
        let newClusters = geometry.clusters(covering: UInt64(newL1.count) * 8)
        try writeBackRefcounts()
        if newClusters == oldClusters && newL1.count == oldL1.count {
            // Same shape: overwrite in place; a torn write leaves each entry old or new, both counted.
            if !newL1.isEmpty { try host.write(encodeTable(newL1[...]), at: oldOffset.rawValue) }
            try host.flush()
            if header.virtualSize != target.virtualSize {
                header.virtualSize = target.virtualSize
                try commitSizeChange()
            }
        } else {
            let start = try allocateRun(max(1, newClusters))
            try writeBackRefcounts()
            try host.write(
                encodeTable(newL1[...])
                    + [UInt8](
                        repeating: 0,
                        count: Int(max(1, newClusters) * UInt64(geometry.clusterSize)) - newL1.count * 8
                    ),
                at: geometry.offset(of: start).rawValue
            )
            try host.flush()
            header.l1TableOffset = geometry.offset(of: start)
            header.l1Size = UInt32(newL1.count)
            header.virtualSize = target.virtualSize
            try commitSizeChange()
            for c in 0..<max(1, oldClusters) { try decrementRefcount(geometry.cluster(containing: oldOffset) + c) }
        }
        l1 = newL1
        dirtyL1Sectors.removeAll()
        for raw in oldL1 {
            if let table = L1Entry(rawValue: raw).l2Table { try releaseL2Table(table) }
        }
        try restoreCopiedFlags()
    }

    func readSnapshotL1(_ entry: SnapshotEntry) throws -> [UInt64] {
        guard entry.l1Size > 0 else { return [] }
        return try host.read(count: Int(entry.l1Size) * 8, at: entry.l1TableOffset.rawValue).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
    }

    /// Writes a new snapshot table, syncs, switches the header to it, syncs, and frees the old table.
    mutating func switchSnapshotTable(
        to entries: [SnapshotEntry],
        beforeSwitch: (inout Metadata) throws -> Void
    ) throws {
        let bytes = format.encodeSnapshots(entries)
        guard bytes.count <= Int(ImageHeader.maxSnapshotTableSize) else {
            throw VImageError(.limitExceeded, path: path, message: "the snapshot table would exceed its size limit")
        }
        var newOffset = HostOffset.zero
        if !entries.isEmpty {
            let start = try allocateRun(geometry.clusters(covering: UInt64(bytes.count)))
            newOffset = geometry.offset(of: start)
            try writeBackRefcounts(sync: false)  // the flush below covers it: all before the header switch
            try host.write(bytes, at: newOffset.rawValue)
        }
        try beforeSwitch(&self)
        try host.flush()
        let oldOffset = header.snapshotTableOffset
        let oldSize = UInt64(header.snapshotTableSize)
        header.snapshotCount = UInt32(entries.count)
        header.snapshotTableOffset = newOffset
        header.snapshotTableSize = UInt32(bytes.count)
        try setDirtyBit()
        try writeFixedHeader()
        try host.flush()
        snapshots = entries
        if oldSize > 0 {
            for c in 0..<geometry.clusters(covering: oldSize) {
                try decrementRefcount(geometry.cluster(containing: oldOffset) + c)
            }
        }
    }
}
