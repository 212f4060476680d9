// Design notes
// ------------
// Write-back: how metadata changed in memory reaches disk, in the order that makes a crash harmless
// (docs/FORMAT.md, "Write ordering"):
//
//   1. dirty bit set durably            (before the first metadata write of the session)
//   2. refcount blocks [─sync─► refcount table]         (a new block durable before the table points at it)
//   3. ─sync─                                           (guest data and refcounts durable before any entry
//                                                        points at them, or any COPIED flag relies on them)
//   4. L2 tables [─sync─► L1 sectors, fixed header]     (new tables durable before L1 entries point at them)
//   5. ─sync─                                           (the flush's promise: everything above is durable)
//   6. frees applied                                    (references are durably gone; see IOGate.swift
//                                                        for why some wait for requests still in flight)
//
// The bracketed syncs happen only when their second half has something to write, so a flush after
// allocating writes costs two syncs, and one after writes in place one. A crash between any two steps
// leaves references to clusters that are counted (leaks at worst), never a reference to a free cluster.

import BlockIO

extension Metadata {
    /// Writes all dirty metadata in the order the format requires, syncs, then applies the frees that
    /// are safe (durable, and no request planned before them still in flight).
    mutating func writeBack() throws {
        let metadataDirty =
            !dirtyL1Sectors.isEmpty || !pendingTableFrees.isEmpty || headerChanged || l2Cache.hasDirty
            || refcountCache.hasDirty || !dirtyRefcountTableSectors.isEmpty
        if metadataDirty { try setDirtyBit() }
        // The data clusters written so far become durable below: from now on they are copied on write.
        freshClusters.removeAll()
        var wroteRefcounts = try writeBackRefcounts(sync: false)
        // Checksums of new data before the sync that precedes the L2 tables pointing at it.
        if checked != nil { wroteRefcounts = try writeBackChecksums() || wroteRefcounts }
        let dirtyL2 = l2Cache.dirtyTables()
        let tailDirty = !dirtyL1Sectors.isEmpty || headerChanged
        if !dirtyL2.isEmpty || (tailDirty && wroteRefcounts) {
            // Guest data and refcounts first: an entry must never reach disk ahead of the data it maps or
            // the refcounts it relies on (a COPIED flag claims a refcount of one).
            try host.flush()
        }
        for table in dirtyL2 { try writeTable(table) }
        if !dirtyL2.isEmpty && tailDirty {
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
                try releaseL2Table(geometry.offset(of: free.cluster), moved: true)
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
    /// - Returns: whether anything was written.
    @discardableResult
    mutating func writeBackRefcounts(sync: Bool = true) throws -> Bool {
        let dirtyBlocks = refcountCache.dirtyTables()
        if dirtyBlocks.isEmpty && dirtyRefcountTableSectors.isEmpty { return false }
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
        return true
    }

    /// Writes the checksums known so far: allocates checksum blocks (and a bigger table) as needed, writes
    /// the refcounts of those allocations, then the blocks and table (FORMAT.md "Writing and crashes",
    /// rule 5), and switches the header when the table moved. Returns whether anything was written.
    @discardableResult
    mutating func writeBackChecksums() throws -> Bool {
        guard let checked else { return false }
        let geometry = self.geometry
        // Rounds: writing the refcounts of new checksum blocks changes refcount blocks (maybe in a range
        // with no checksum block yet), and freeing a moved table changes them again; their checksums need
        // another round, until nothing is left over.
        repeat {
            let oldTable = try checked.prepare(
                allocate: { try allocateChecksumStructure($0) },
                clusterOffset: { geometry.offset(of: $0).rawValue }
            )
            try writeChecksumStructures(checked, oldTable: oldTable)
        } while checked.hasPending || refcountCache.hasDirty || !dirtyRefcountTableSectors.isEmpty
        return true
    }

    /// Writes the refcounts of new checksum structures, the dirty blocks and table sectors, and switches
    /// the header to a table that moved (then frees the old one).
    mutating func writeChecksumStructures(_ checked: ChecksummedHost, oldTable: ChecksumTablePointer?) throws {
        try writeBackRefcounts(sync: false)
        try checked.write()
        if let oldTable {
            try host.flush()  // the new table durable before the header points at it
            header.setChecksumTable(checked.tablePointer)
            try writeFixedHeader()
            try host.flush()
            for c in 0..<UInt64(oldTable.clusters) {
                try decrementRefcount(geometry.cluster(containing: oldTable.offset) + c)
            }
        }
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
