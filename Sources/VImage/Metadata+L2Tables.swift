// Design notes
// ------------
// L1 and L2 tables (docs/FORMAT.md, "L1 entries", "L2 entries"). The active L1 table is held decoded in
// memory; L2 tables go through an LRU cache and reach disk only in write-back, or when a dirty table is
// evicted on the write path (after the refcounts it depends on are durable). The read path never writes:
// when the cache is full of dirty tables, a read evicts a clean one or lets the cache run over its budget
// until the next writer or flush, so a read never syncs under the lock.
//
// A table referenced by more than one L1 table (shared with a snapshot; its L1 entry lacks COPIED) is
// copied before its first change; in VIMG the copy adds a reference to every cluster it maps (qcow2 counts
// data references per L1 table instead: FormatCodec.swift).

import BlockIO

extension Metadata {
    /// The L2 table at `offset`, loaded through the cache.
    /// - Parameter mayWrite: false on the read path (see the design notes).
    mutating func l2Table(at offset: HostOffset, mayWrite: Bool = true) throws -> CachedTable<UInt64> {
        if let table = l2Cache.lookup(offset.rawValue) { return table }
        guard geometry.isAligned(offset.rawValue), offset.rawValue + UInt64(geometry.clusterSize) <= host.size else {
            throw corruption(
                "L2 table offset 0x\(String(offset.rawValue, radix: 16)) is misaligned or outside the file",
                offset: offset.rawValue
            )
        }
        let bytes = try readMetadata(count: geometry.clusterSize, at: offset.rawValue, "L2 table")
        let table = CachedTable(
            offset: offset.rawValue,
            entries: bytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
        )
        try makeRoomInL2Cache(mayWrite: mayWrite)
        l2Cache.insert(table)
        return table
    }

    mutating func makeRoomInL2Cache(mayWrite: Bool = true) throws {
        // With checksums a dirty table is never written early: it may point at clusters still being written
        // in place, whose checksums only a (drained) flush makes durable.
        guard mayWrite, checked == nil else {
            if l2Cache.isFull, let victim = l2Cache.leastRecentlyUsed(where: { !$0.isDirty }) {
                l2Cache.remove(victim.offset)
            }
            return
        }
        while l2Cache.isFull, let victim = l2Cache.leastRecentlyUsed() {
            if victim.isDirty {
                // The table may point at clusters counted only in the cache, or at data not yet durable:
                // both reach the disk, with one sync, before it.
                try setDirtyBit()
                try writeBackRefcounts(sync: false)
                try host.flush()
                try writeTable(victim)
            }
            l2Cache.remove(victim.offset)
        }
    }

    /// The L2 entry of a guest cluster (`.unallocated` when its range has no L2 table).
    ///
    /// In a table shared with a snapshot (its L1 entry lacks COPIED) no cluster is owned, whatever the
    /// entry's own COPIED bit says, so the entry is returned without it.
    mutating func l2Entry(_ cluster: GuestCluster, mayWrite: Bool = true) throws -> L2Entry {
        let l1Index = geometry.l1Index(of: cluster)
        guard l1Index < l1.count else { return .unallocated }
        let l1Entry = L1Entry(rawValue: l1[l1Index])
        guard let tableOffset = l1Entry.l2Table else { return .unallocated }
        let table = try l2Table(at: tableOffset, mayWrite: mayWrite)
        let raw = table.entries[geometry.l2Index(of: cluster)]
        return entries.decode(l1Entry.isCopied ? raw : raw & ~copiedFlag)
    }

    /// The writable L2 table for a guest cluster, allocating or copying it as needed.
    mutating func writableL2Table(_ cluster: GuestCluster) throws -> CachedTable<UInt64> {
        let l1Index = geometry.l1Index(of: cluster)
        guard l1Index < l1.count else {
            throw VImageError(.outOfRange, path: path, message: "cluster beyond the L1 table")
        }
        let entry = L1Entry(rawValue: l1[l1Index])
        if let offset = entry.l2Table {
            if entry.isCopied { return try l2Table(at: offset) }
            // Shared with a snapshot: copy the table. In VIMG every cluster it maps gains a reference (the
            // copy holds its own); in qcow2 the active L1's references just move to the copy.
            let old = try l2Table(at: offset)
            let mapped = old.entries
            let newCluster = try allocateCluster()
            if format.tablesHoldDataReferences { try addDataReferences(of: mapped) }
            // The copies are shared now: nothing in them is "copied" (refcount one) any more.
            let table = CachedTable(
                offset: geometry.offset(of: newCluster).rawValue,
                entries: mapped.map { $0 & ~copiedFlag }
            )
            table.isDirty = true
            try makeRoomInL2Cache()
            l2Cache.insert(table)
            setL1(l1Index, L1Entry(l2Table: HostOffset(table.offset), copied: true))
            pendingTableFrees.append(PendingFree(cluster: geometry.cluster(containing: offset), epoch: gateEpoch))
            return table
        }
        let newCluster = try allocateCluster()
        let table = CachedTable(
            offset: geometry.offset(of: newCluster).rawValue,
            entries: [UInt64](repeating: 0, count: geometry.l2Entries)
        )
        table.isDirty = true
        try makeRoomInL2Cache()
        l2Cache.insert(table)
        setL1(l1Index, L1Entry(l2Table: HostOffset(table.offset), copied: true))
        return table
    }

    mutating func setL1(_ index: Int, _ entry: L1Entry) {
        l1[index] = entry.rawValue
        dirtyL1Sectors.insert(index / 64)
    }

    /// Writes the active L1's dirty sectors now.
    mutating func writeL1Sectors() throws {
        for sector in dirtyL1Sectors.sorted() {
            let first = sector * 64
            let last = min(l1.count, first + 64)
            try host.write(encodeTable(l1[first..<last]), at: header.l1TableOffset.rawValue + UInt64(sector * 512))
        }
        dirtyL1Sectors.removeAll()
    }

    /// One more reference on every cluster the entries map (data, preallocated zeroes, compressed records).
    mutating func addDataReferences(of mapped: [UInt64]) throws {
        for raw in mapped where raw != 0 {
            let e = entries.decode(raw)
            if let host = e.hostCluster { try incrementRefcount(geometry.cluster(containing: host)) }
            if case .compressed(let d) = e { try incrementRefcounts(of: d) }
        }
    }

    /// One reference less on every cluster the entries map.
    mutating func dropDataReferences(of mapped: [UInt64]) throws {
        for raw in mapped where raw != 0 {
            let e = entries.decode(raw)
            if let host = e.hostCluster { try decrementRefcount(geometry.cluster(containing: host)) }
            if case .compressed(let d) = e { for c in clusters(of: d) { try decrementRefcount(c) } }
        }
    }

    /// Drops one L1 table's reference to an L2 table, with the references it held through the table: in
    /// VIMG those are the table's own (released with its last reference); in qcow2 they belong to the L1
    /// table and go now, unless they `moved` to a copy of the table. Only called once the reference is
    /// durably gone.
    mutating func releaseL2Table(_ offset: HostOffset, moved: Bool = false) throws {
        let cluster = geometry.cluster(containing: offset)
        let last = try refcount(cluster) == 1
        if format.tablesHoldDataReferences ? last : !moved {
            try dropDataReferences(of: try l2Table(at: offset).entries)
        }
        if last {
            if let table = l2Cache.lookup(offset.rawValue) { table.isDirty = false }
            l2Cache.remove(offset.rawValue)
        }
        try decrementRefcount(cluster)
    }

    /// Clears COPIED on every entry of an L2 table about to be shared (its clusters gain references).
    /// qcow2 only: the table is changed in place, flags only, as qemu does.
    mutating func clearCopiedFlags(inL2Table offset: HostOffset) throws {
        let table = try l2Table(at: offset)
        for (i, raw) in table.entries.enumerated() where raw & copiedFlag != 0 {
            table.entries[i] = raw & ~copiedFlag
            table.isDirty = true
        }
    }

    /// Sets COPIED again on active L1 and L2 entries whose cluster is referenced exactly once, so writes go
    /// back to updating in place. Refcounts are written (and synced) before these flags by `writeBack`.
    mutating func restoreCopiedFlags() throws {
        for (index, raw) in l1.enumerated() {
            let entry = L1Entry(rawValue: raw)
            guard let table = entry.l2Table else { continue }
            guard try refcount(geometry.cluster(containing: table)) == 1 else {
                // Shared: nothing in it is owned (qcow2 says so in every entry).
                if format.exactCopiedFlags { try clearCopiedFlags(inL2Table: table) }
                if entry.isCopied { setL1(index, L1Entry(l2Table: table, copied: false)) }
                continue
            }
            if !entry.isCopied { setL1(index, L1Entry(l2Table: table, copied: true)) }
            let l2 = try l2Table(at: table)
            for (i, raw) in l2.entries.enumerated() {
                let e = entries.decode(raw)
                guard let host = e.hostCluster else { continue }
                let owned = try refcount(geometry.cluster(containing: host)) == 1
                let flagged = raw & copiedFlag != 0
                if owned != flagged {
                    l2.entries[i] = owned ? raw | copiedFlag : raw & ~copiedFlag
                    l2.isDirty = true
                }
            }
        }
    }
}
