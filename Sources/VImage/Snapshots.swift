// Design notes
// ------------
// Internal snapshots (docs/FORMAT.md, "Snapshot table"). A snapshot is a frozen copy of the active L1
// table; it shares every L2 table and data cluster with the active state, which is why creating one
// costs metadata only:
//
//   create: +1 on each L2 table the active L1 maps, copy L1, clear COPIED in the active L1
//           (so the next write copies the table, then the cluster), new snapshot table, switch header
//   delete: new snapshot table without it, switch header, then -1 on each of its L2 tables (a table
//           that reaches 0 releases its data clusters), then restore COPIED where refcounts are 1 again
//   apply:  +1 on the snapshot's tables, overwrite the active L1 with its L1, then -1 on the old tables
//
// Every step writes and syncs the new structures and their refcount increments before the header or L1
// points at them, and decrements only after the old references are durably gone, so a crash at any
// point leaves either the old or the new state (plus leaked clusters at worst).

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
        monitor.withLock {
            snapshots.map {
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
        try mutateSnapshots(operation: "create snapshot") {
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
                try incrementRefcount(geometry.clusterIndex(table.rawValue))
                if entry.isCopied { setL1(index, L1Entry(l2Table: table, copied: false)) }
            }
            let copy = try allocateRun(geometry.clusters(covering: UInt64(l1.count) * 8))
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            let entry = SnapshotEntry(
                l1TableOffset: HostOffset(geometry.offset(ofCluster: copy)),
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
            try switchSnapshotTable(to: snapshots + [entry], beforeSwitch: { try self.writeL1Sectors() })
        }
    }

    /// Deletes snapshot `name`, freeing exactly the clusters nothing else references.
    public func deleteSnapshot(named name: String) throws {
        try mutateSnapshots(operation: "delete snapshot") {
            guard let victim = snapshots.first(where: { $0.name == name }) else {
                throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
            }
            let victimL1 = try readSnapshotL1(victim)
            try switchSnapshotTable(to: snapshots.filter { $0.name != name }, beforeSwitch: {})
            // The header no longer reaches the snapshot (durably): release what it held.
            for raw in victimL1 {
                if let table = L1Entry(rawValue: raw).l2Table { try releaseL2Table(table.rawValue) }
            }
            for c in 0..<geometry.clusters(covering: UInt64(victim.l1Size) * 8) {
                try decrementRefcount(geometry.clusterIndex(victim.l1TableOffset.rawValue) + c)
            }
            try restoreCopiedFlags()
        }
    }

    /// Reverts the disk to snapshot `name` (the snapshot itself stays).
    public func applySnapshot(named name: String) throws {
        try mutateSnapshots(operation: "apply snapshot") {
            guard let target = snapshots.first(where: { $0.name == name }) else {
                throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
            }
            var newL1 = try readSnapshotL1(target)
            for raw in newL1 {
                if let table = L1Entry(rawValue: raw).l2Table {
                    try incrementRefcount(geometry.clusterIndex(table.rawValue))
                }
            }
            newL1 = newL1.map { $0 & ~copiedFlag }
            let oldL1 = l1
            let oldOffset = header.l1TableOffset.rawValue
            let oldClusters = geometry.clusters(covering: UInt64(oldL1.count) * 8)
            let newClusters = geometry.clusters(covering: UInt64(newL1.count) * 8)
            try writeBackRefcounts()
            if newClusters == oldClusters && newL1.count == oldL1.count {
                // Same shape: overwrite in place; a torn write leaves each entry old or new, both counted.
                if !newL1.isEmpty { try host.write(encodeTable(newL1[...]), at: oldOffset) }
                try host.flush()
                if header.virtualSize != target.virtualSize {
                    header.virtualSize = target.virtualSize
                    try host.write(header.encodeFixed(), at: 0)
                    try host.flush()
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
                    at: geometry.offset(ofCluster: start)
                )
                try host.flush()
                header.l1TableOffset = HostOffset(geometry.offset(ofCluster: start))
                header.l1Size = UInt32(newL1.count)
                header.virtualSize = target.virtualSize
                try host.write(header.encodeFixed(), at: 0)
                try host.flush()
                for c in 0..<max(1, oldClusters) { try decrementRefcount(geometry.clusterIndex(oldOffset) + c) }
            }
            l1 = newL1
            dirtyL1Sectors.removeAll()
            for raw in oldL1 {
                if let table = L1Entry(rawValue: raw).l2Table { try releaseL2Table(table.rawValue) }
            }
            try restoreCopiedFlags()
        }
    }

    /// Opens a read-only view of internal snapshot `snapshot` without taking the image's lock, so that a
    /// snapshot can be read while a writer has the image open (the bus plugs snapshots of plugged disks).
    ///
    /// A snapshot's L2 tables and data clusters are shared (refcount above one), so the writer never
    /// changes them in place and the view stays stable, as long as nobody deletes the snapshot meanwhile.
    public static func openSnapshotAlongsideWriter(
        path: String,
        snapshot: String,
        options: OpenOptions = .init()
    ) throws -> VImage {
        try open(
            path: path,
            readOnly: true,
            backing: nil,
            resolveBacking: true,
            options: options,
            snapshot: snapshot,
            lock: FileDevice.LockMode.none
        )
    }

    /// Shows snapshot `name` instead of the active state (read-only images only; used by --snapshot).
    func selectSnapshot(named name: String) throws {
        try monitor.withLock {
            guard isReadOnly else {
                throw VImageError(.invalidArgument, path: path, message: "a snapshot can only be opened read-only")
            }
            guard let entry = snapshots.first(where: { $0.name == name }) else {
                throw VImageError(.notFound, path: path, message: "snapshot '\(name)' not found")
            }
            l1 = try readSnapshotL1(entry)
            header.virtualSize = entry.virtualSize
        }
    }

    // MARK: Helpers (lock held)

    /// Runs a snapshot-table change: drains in-flight writes, makes everything durable first, and again
    /// after (so refcount decrements and restored COPIED flags reach disk in order).
    private func mutateSnapshots(operation: String, _ body: () throws -> Void) throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try monitor.withLock {
            try checkOpen()
            while !inflight.isEmpty { monitor.wait() }
            try wrapIO(path) {
                try writeBack()
                try setDirtyBit()  // rule 4: before any metadata write, even when nothing else is pending
                try body()
                try writeBack()
            }
        }
    }

    func readSnapshotL1(_ entry: SnapshotEntry) throws -> [UInt64] {
        guard entry.l1Size > 0 else { return [] }
        return try host.read(count: Int(entry.l1Size) * 8, at: entry.l1TableOffset.rawValue).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
    }

    /// Writes the active L1's dirty sectors now.
    func writeL1Sectors() throws {
        for sector in dirtyL1Sectors.sorted() {
            let first = sector * 64
            let last = min(l1.count, first + 64)
            try host.write(encodeTable(l1[first..<last]), at: header.l1TableOffset.rawValue + UInt64(sector * 512))
        }
        dirtyL1Sectors.removeAll()
    }

    /// Writes a new snapshot table, syncs, switches the header to it, syncs, and frees the old table.
    private func switchSnapshotTable(to entries: [SnapshotEntry], beforeSwitch: () throws -> Void) throws {
        let bytes = SnapshotTable.encode(entries)
        guard bytes.count <= Int(ImageHeader.maxSnapshotTableSize) else {
            throw VImageError(.limitExceeded, path: path, message: "the snapshot table would exceed its size limit")
        }
        var newOffset: UInt64 = 0
        if !entries.isEmpty {
            let start = try allocateRun(geometry.clusters(covering: UInt64(bytes.count)))
            newOffset = geometry.offset(ofCluster: start)
            try writeBackRefcounts(sync: false)  // the flush below covers it: all before the header switch
            try host.write(bytes, at: newOffset)
        }
        try beforeSwitch()
        try host.flush()
        let oldOffset = header.snapshotTableOffset.rawValue
        let oldSize = UInt64(header.snapshotTableSize)
        header.snapshotCount = UInt32(entries.count)
        header.snapshotTableOffset = HostOffset(newOffset)
        header.snapshotTableSize = UInt32(bytes.count)
        try setDirtyBit()
        try host.write(header.encodeFixed(), at: 0)
        try host.flush()
        snapshots = entries
        if oldSize > 0 {
            for c in 0..<geometry.clusters(covering: oldSize) {
                try decrementRefcount(geometry.clusterIndex(oldOffset) + c)
            }
        }
    }

    /// Allocates `count` contiguous clusters at the end of the file.
    func allocateRun(_ count: UInt64) throws -> UInt64 {
        guard count > 0 else { return 0 }
        while true {
            let first = try allocateAtEnd()
            var last = first
            var contiguous = true
            while last - first + 1 < count {
                let next = try allocateAtEnd()
                if next != last + 1 {
                    // A refcount block landed in between: give the partial run back and start after it.
                    for c in first...last { try decrementRefcount(c) }
                    try decrementRefcount(next)
                    contiguous = false
                    break
                }
                last = next
            }
            if contiguous { return first }
        }
    }

    /// Drops one reference to an L2 table; when it was the last, releases the clusters the table maps.
    /// Only called once the reference is durably gone.
    func releaseL2Table(_ offset: UInt64) throws {
        let cluster = geometry.clusterIndex(offset)
        if try refcount(cluster) == 1 {
            let entries = try l2Table(at: offset).entries
            for raw in entries {
                let entry = L2Entry(raw: raw)
                if let host = entry.hostCluster { try decrementRefcount(geometry.clusterIndex(host.rawValue)) }
                if case .compressed(let d) = entry { for c in clusters(of: d) { try decrementRefcount(c) } }
            }
            if let table = l2Cache.lookup(offset) { table.isDirty = false }
            l2Cache.remove(offset)
        }
        try decrementRefcount(cluster)
    }

    /// Sets COPIED again on active L1 and L2 entries whose cluster is referenced exactly once, so writes go
    /// back to updating in place. Refcounts are written (and synced) before these flags by `writeBack`.
    func restoreCopiedFlags() throws {
        for (index, raw) in l1.enumerated() {
            let entry = L1Entry(rawValue: raw)
            guard let table = entry.l2Table else { continue }
            guard try refcount(geometry.clusterIndex(table.rawValue)) == 1 else { continue }
            if !entry.isCopied { setL1(index, L1Entry(l2Table: table, copied: true)) }
            let l2 = try l2Table(at: table.rawValue)
            for (i, raw) in l2.entries.enumerated() {
                let e = L2Entry(raw: raw)
                guard let host = e.hostCluster else { continue }
                let owned = try refcount(geometry.clusterIndex(host.rawValue)) == 1
                let flagged = raw & copiedFlag != 0
                if owned != flagged {
                    l2.entries[i] = owned ? raw | copiedFlag : raw & ~copiedFlag
                    l2.isDirty = true
                }
            }
        }
    }
}
