// Design notes
// ------------
// Write-back: how metadata changed in memory reaches disk, in the order that makes a crash harmless
// (docs/FORMAT.md, "Write ordering"):
//
//   1. dirty bit set durably            (before the first metadata write of the session)
//   2. refcount blocks ─sync─► refcount table ─sync─    (new references counted before anything uses them)
//   3. guest data ─sync─► L2 tables ─sync─              (an entry never reaches disk before its data)
//   4. L1 sectors, fixed header ─sync─                  (the flush's promise: everything above is durable)
//   5. frees applied                                    (references are durably gone; see IOGate.swift
//                                                        for why some wait for requests still in flight)
//
// A crash between any two steps leaves references to clusters that are counted (leaks at worst), never a
// reference to a free cluster.

import BlockIO

extension Metadata {
    /// Writes all dirty metadata in the order the format requires, syncs, then applies the frees that
    /// are safe (durable, and no request planned before them still in flight).
    mutating func writeBack() throws {
        let metadataDirty =
            !dirtyL1Sectors.isEmpty || !pendingTableFrees.isEmpty || headerChanged || l2Cache.hasDirty
            || refcountCache.hasDirty || !dirtyRefcountTableSectors.isEmpty
        if metadataDirty { try setDirtyBit() }
        try writeBackRefcounts()
        let dirtyL2 = l2Cache.dirtyTables()
        if !dirtyL2.isEmpty {
            // Guest data first: an L2 entry must never reach disk ahead of the data it maps.
            try host.flush()
            for table in dirtyL2 { try writeTable(table) }
            try host.flush()  // L2 tables durable before L1 entries point at them
        }
        try writeL1Sectors()
        if headerChanged {
            try writeFixedHeader()
            headerChanged = false
        }
        try host.flush()  // guest data and everything above durable: the flush's promise
        try applyDurableFrees()
        try punchFreedClusters()
    }

    /// Counts down the references whose drop is durable (everything queued before the last sync) and
    /// whose requests have drained from the I/O gate.
    mutating func applyDurableFrees() throws {
        // A cluster of compressed records may be freed now: never append to it again.
        compressedCursor = nil
        freesKeptAtLastWriteBack = 0
        guard !pendingFrees.isEmpty || !pendingTableFrees.isEmpty else { return }
        gate.advance(&gateEpoch)
        let safe = gateEpoch
        var kept: [PendingFree] = []
        for free in pendingFrees {
            if free.epoch &+ 2 <= safe { try decrementRefcount(free.cluster) } else { kept.append(free) }
        }
        pendingFrees = kept
        var keptTables: [PendingFree] = []
        for free in pendingTableFrees {
            if free.epoch &+ 2 <= safe {
                try releaseL2Table(geometry.offset(of: free.cluster))
            } else {
                keptTables.append(free)
            }
        }
        pendingTableFrees = keptTables
        freesKeptAtLastWriteBack = pendingFrees.count
    }

    /// Refcount blocks, then the refcount table, each made durable: both must be on disk before any L2
    /// entry that relies on them.
    /// - Parameter sync: false when the caller syncs itself before pointing at anything new (saves one
    ///   flush); a new block is still made durable before the refcount table points at it.
    mutating func writeBackRefcounts(sync: Bool = true) throws {
        let dirtyBlocks = refcountCache.dirtyTables()
        if dirtyBlocks.isEmpty && dirtyRefcountTableSectors.isEmpty { return }
        try setDirtyBit()
        for block in dirtyBlocks { try writeRefcountBlock(block) }
        if !dirtyRefcountTableSectors.isEmpty {
            if !dirtyBlocks.isEmpty { try host.flush() }
            for sector in dirtyRefcountTableSectors.sorted() {
                let first = sector * 64
                try host.write(
                    encodeTable(refcountTable[first..<first + 64]),
                    at: header.refcountTableOffset.rawValue + UInt64(sector * 512)
                )
            }
            dirtyRefcountTableSectors.removeAll()
        }
        if sync { try host.flush() }
    }

    /// Writes an L2 table (or any table of u64 entries) and marks it clean.
    func writeTable(_ table: CachedTable<UInt64>) throws {
        try host.write(encodeTable(table.entries[...]), at: table.offset)
        table.isDirty = false
    }

    /// Writes a refcount block at its width and marks it clean.
    func writeRefcountBlock(_ block: CachedTable<UInt64>) throws {
        try host.write(refcountWidth.encode(block.entries), at: block.offset)
        block.isDirty = false
    }
}
