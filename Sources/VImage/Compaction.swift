// Design notes
// ------------
// Compaction moves clusters from the end of the file into free clusters nearer the start, updates every
// reference to them, and truncates the file (`vimg compact`). It runs drained, with the image's metadata
// written back first, and patches tables on disk directly (the L2 cache is emptied first).
//
// Moving a unit (a data cluster, a run of clusters holding compressed records, an L2 table) from X to Y is
// crash-safe in three durable steps, done for a batch of units at a time:
//
//   1. refcount(Y) = refcount(X)          (sync)   Y counted before anything points at it
//   2. copy X's bytes to Y                (sync)
//   3. patch every reference X -> Y       (sync)   a torn table write leaves each entry X or Y
//   4. refcount(X) = 0                             X's references are durably gone
//
// After a crash between 1 and 4 each reference points at X or at Y, and each has a refcount at least as
// high as its references: leaks at worst, never corruption. Then the small structures still in the tail
// (active L1, snapshot L1 tables and table, bitmap structures, refcount table and blocks) are rewritten
// lower down with the same switches their normal updates use, refcount blocks that only describe free
// space past the new end are dropped from the refcount table, and the file is truncated after its last
// used cluster.

import BlockIO

/// What `vimg compact` did.
public struct CompactionResult: Sendable, Hashable {
    /// Clusters moved from the end of the file into free space nearer the start.
    public var clustersMoved: UInt64
    /// The file's length before and after.
    public var bytesBefore: UInt64
    public var bytesAfter: UInt64
}

extension VImage {
    /// Moves clusters from the end of the file into free space nearer its start and truncates it.
    /// Snapshots, clones and compressed clusters are kept; guest content is unchanged.
    /// - Parameter progress: called with the clusters handled so far and the number to handle.
    @discardableResult
    public func compact(progress: ((UInt64, UInt64) -> Void)? = nil) throws -> CompactionResult {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try requireVIMG("compaction runs")
        return try drained { m in try m.compact(progress: progress) }
    }
}

extension Metadata {
    /// Where a reference to a moved cluster is kept.
    enum Place: Hashable {
        /// Entry `index` of the L2 table at `table`.
        case l2(table: HostOffset, index: Int)
        /// Entry `index` of the active L1 table (in memory and on disk).
        case activeL1(index: Int)
        /// Entry `index` of a snapshot's L1 table at `table`.
        case snapshotL1(table: HostOffset, index: Int)
    }

    /// A run of clusters moved as one: a data cluster, clusters of compressed records, or an L2 table.
    struct Unit {
        var from: HostCluster
        var length: UInt64
        var places: [Place]
    }

    mutating func compact(progress: ((UInt64, UInt64) -> Void)?) throws -> CompactionResult {
        let bytesBefore = host.size
        try writeBack()
        try writeBackRefcounts()
        try setDirtyBit()
        try punchFreedClusters()
        l2Cache.removeAll()  // every table is clean now; patches below go to disk
        freeHint = HostCluster(0)

        // The ideal end: as many clusters as are in use.
        var used: UInt64 = 0
        for c in HostCluster(0)..<hostEnd where try refcount(c) > 0 { used += 1 }
        let target = HostCluster(used)
        var (units, tablesInTail) = try tailUnits(target: target)
        let total = UInt64(units.count + tablesInTail.count)
        var moved: UInt64 = 0
        var handled: UInt64 = 0

        // Data and compressed clusters first (their references are in L2 tables), then the L2 tables
        // (whose references are in L1 tables), so a table is copied after its entries were patched.
        for phase in 0..<2 {
            var holeCursor = HostCluster(1)
            var batch: [(unit: Unit, to: HostCluster)] = []
            for unit in units {
                handled += 1
                guard let to = try lowestFreeRun(unit.length, from: &holeCursor, below: unit.from) else { continue }
                try reserve(to, like: unit.from, count: unit.length)
                batch.append((unit, to))
                if batch.count >= 1024 {
                    moved += try moveBatch(batch)
                    batch.removeAll()
                    progress?(handled, total)
                }
            }
            moved += try moveBatch(batch)
            progress?(handled, total)
            if phase == 0 { units = tablesInTail }
            tablesInTail = []
        }

        try relocateStructures(below: target)
        let newEnd = try dropFreeRefcountBlocks()
        if let file = host as? any TruncatableDevice, newEnd < hostEnd {
            try writeBackRefcounts()
            try host.flush()
            try file.truncate(to: geometry.offset(of: newEnd).rawValue)
            hostEnd = newEnd
        }
        freeHint = HostCluster(0)
        try writeBack()
        try writeBackRefcounts()
        return CompactionResult(clustersMoved: moved, bytesBefore: bytesBefore, bytesAfter: host.size)
    }

    /// Units past `target` (highest first): data and compressed runs, and separately the L2 tables.
    private mutating func tailUnits(target: HostCluster) throws -> (data: [Unit], tables: [Unit]) {
        var tablePlaces: [HostCluster: [Place]] = [:]
        var tables: [HostOffset] = []
        var seen = Set<HostOffset>()
        func visit(_ table: HostOffset, _ place: Place) {
            if geometry.cluster(containing: table) >= target {
                tablePlaces[geometry.cluster(containing: table), default: []].append(place)
            }
            if seen.insert(table).inserted { tables.append(table) }
        }
        for (i, raw) in l1.enumerated() {
            if let table = L1Entry(rawValue: raw).l2Table { visit(table, .activeL1(index: i)) }
        }
        for s in snapshots {
            for (i, raw) in try readSnapshotL1(s).enumerated() {
                if let table = L1Entry(rawValue: raw).l2Table {
                    visit(table, .snapshotL1(table: s.l1TableOffset, index: i))
                }
            }
        }
        var dataPlaces: [HostCluster: [Place]] = [:]
        // Compressed records touching the tail, grouped into runs of clusters that must move together.
        var compressedRuns: [(range: ClosedRange<HostCluster>, places: [Place])] = []
        for table in tables {
            let entries = try host.read(count: geometry.clusterSize, at: table.rawValue).withUnsafeBytes {
                decodeTable($0, as: UInt64.self)
            }
            for (j, raw) in entries.enumerated() where raw != 0 {
                let entry = self.entries.decode(raw)
                if let c = entry.hostCluster.map({ geometry.cluster(containing: $0) }), c >= target {
                    dataPlaces[c, default: []].append(.l2(table: table, index: j))
                }
                if case .compressed(let d) = entry, clusters(of: d).upperBound >= target {
                    compressedRuns.append((clusters(of: d), [.l2(table: table, index: j)]))
                }
            }
        }
        // Merge overlapping record spans: clusters shared by records move as one run.
        compressedRuns.sort { $0.range.lowerBound < $1.range.lowerBound }
        var merged: [(range: ClosedRange<HostCluster>, places: [Place])] = []
        for run in compressedRuns {
            if let last = merged.last, run.range.lowerBound <= last.range.upperBound {
                merged[merged.count - 1] = (
                    last.range.lowerBound...max(last.range.upperBound, run.range.upperBound), last.places + run.places
                )
            } else {
                merged.append(run)
            }
        }
        var data = dataPlaces.map { Unit(from: $0.key, length: 1, places: $0.value) }
        data += merged.map {
            Unit(
                from: $0.range.lowerBound,
                length: $0.range.upperBound.rawValue - $0.range.lowerBound.rawValue + 1,
                places: $0.places
            )
        }
        let tableUnits = tablePlaces.map { Unit(from: $0.key, length: 1, places: $0.value) }
        return (data.sorted { $0.from > $1.from }, tableUnits.sorted { $0.from > $1.from })
    }

    /// The lowest run of `count` free clusters at or after `cursor` and below `limit` (which advances the
    /// cursor past what it scanned), or nil.
    mutating func lowestFreeRun(
        _ count: UInt64,
        from cursor: inout HostCluster,
        below limit: HostCluster
    ) throws
        -> HostCluster?
    {
        var start = cursor
        while start + count <= limit {
            var length: UInt64 = 0
            while length < count, try isFreeWithBlock(start + length) { length += 1 }
            if length == count {
                if count == 1 { cursor = start + 1 }
                return start
            }
            start = start + (length + 1)
            if count == 1 { cursor = start }
        }
        return nil
    }

    /// Whether a cluster is free and has a refcount block (only such clusters can be handed out).
    private mutating func isFreeWithBlock(_ c: HostCluster) throws -> Bool {
        guard let (block, index) = try refcountSlot(c) else { return false }
        return block.entries[index] == 0
    }

    mutating func setRefcount(_ cluster: HostCluster, _ value: UInt64) throws {
        guard let (block, index) = try refcountSlot(cluster) else {
            throw corruption(
                "cluster \(cluster.rawValue) has no refcount block",
                offset: geometry.offset(of: cluster).rawValue
            )
        }
        block.entries[index] = value
        block.isDirty = true
    }

    /// Gives the clusters `to ..< to + count` the refcounts of `from ..< from + count`.
    private mutating func reserve(_ to: HostCluster, like from: HostCluster, count: UInt64) throws {
        for i in 0..<count { try setRefcount(to + i, try refcount(from + i)) }
    }

    /// Moves a batch of units whose targets are already counted: steps 1 to 4 of the design notes.
    private mutating func moveBatch(_ batch: [(unit: Unit, to: HostCluster)]) throws -> UInt64 {
        guard !batch.isEmpty else { return 0 }
        try writeBackRefcounts()  // step 1, synced
        for (unit, to) in batch {
            let bytes = try host.read(
                count: Int(unit.length) * geometry.clusterSize,
                at: geometry.offset(of: unit.from).rawValue
            )
            try host.write(bytes, at: geometry.offset(of: to).rawValue)
        }
        // With checksums the copies' checksums are durable before anything points at them (the reads above
        // verified the originals, so a bad block stops the compaction instead of moving).
        if checked != nil { try writeBackChecksums() }
        try host.flush()  // step 2
        // Step 3: group the patches by table, so each table is read and written once.
        var byTable: [HostOffset: [(index: Int, from: HostCluster, to: HostCluster)]] = [:]
        for (unit, to) in batch {
            for place in unit.places {
                switch place {
                case .l2(let table, let index): byTable[table, default: []].append((index, unit.from, to))
                case .snapshotL1(let table, let index): byTable[table, default: []].append((index, unit.from, to))
                case .activeL1(let index):
                    let entry = L1Entry(rawValue: l1[index])
                    setL1(index, L1Entry(l2Table: geometry.offset(of: to), copied: entry.isCopied))
                }
            }
        }
        try writeL1Sectors()
        for (table, patches) in byTable {
            // An L1 table of a snapshot may span several clusters; an L2 table is one.
            let entriesCount = (patches.map(\.index).max() ?? 0) + 1
            let clusters = geometry.clusters(covering: UInt64(entriesCount) * 8)
            var entries = try host.read(count: Int(clusters) * geometry.clusterSize, at: table.rawValue).withUnsafeBytes
            {
                decodeTable($0, as: UInt64.self)
            }
            for p in patches { entries[p.index] = relocated(entries[p.index], from: p.from, to: p.to) }
            try host.write(encodeTable(entries[...]), at: table.rawValue)
        }
        try host.flush()  // step 3 durable
        for (unit, _) in batch {
            for i in 0..<unit.length { try setRefcount(unit.from + i, 0) }  // step 4
        }
        return batch.reduce(0) { $0 + $1.unit.length }
    }

    /// An L1 or L2 entry pointing into `from`'s run, moved to the same place in `to`'s run.
    private func relocated(_ raw: UInt64, from: HostCluster, to: HostCluster) -> UInt64 {
        let delta = geometry.offset(of: to).rawValue &- geometry.offset(of: from).rawValue
        if raw & compressedFlag != 0, case .compressed(var d) = entries.decode(raw) {
            d.hostOffset &+= delta
            return entries.encode(.compressed(d))
        }
        return (raw & ~hostOffsetMask) | ((raw & hostOffsetMask) &+ delta)
    }

    // MARK: Structures

    /// Rewrites the active L1 table, the snapshot table and snapshot L1 tables, and the bitmap structures
    /// lower down when any of their clusters lie at or past `target`.
    private mutating func relocateStructures(below target: HostCluster) throws {
        func inTail(_ offset: HostOffset, bytes: UInt64) -> Bool {
            bytes > 0 && geometry.cluster(containing: HostOffset(offset.rawValue + bytes - 1)) >= target
        }
        // Active L1: a new copy lower down, the header switched to it, the old one freed.
        let l1Bytes = max(UInt64(geometry.clusterSize), UInt64(l1.count) * 8)
        if inTail(header.l1TableOffset, bytes: l1Bytes) {
            let count = geometry.clusters(covering: l1Bytes)
            let start = try allocateRun(count)
            var bytes = encodeTable(l1[...])
            bytes += [UInt8](repeating: 0, count: Int(count) * geometry.clusterSize - bytes.count)
            try host.write(bytes, at: geometry.offset(of: start).rawValue)
            try writeBackRefcounts()
            try host.flush()
            let old = header.l1TableOffset
            header.l1TableOffset = geometry.offset(of: start)
            try writeFixedHeader()
            try host.flush()
            for c in 0..<count { try decrementRefcount(geometry.cluster(containing: old) + c) }
        }
        // Snapshots: L1 copies lower down, then a new snapshot table pointing at them.
        let tableInTail = inTail(header.snapshotTableOffset, bytes: UInt64(header.snapshotTableSize))
        let l1sInTail = snapshots.contains { inTail($0.l1TableOffset, bytes: UInt64($0.l1Size) * 8) }
        if tableInTail || l1sInTail {
            var entries = snapshots
            var freed: [(HostOffset, UInt64)] = []
            for i in entries.indices where inTail(entries[i].l1TableOffset, bytes: UInt64(entries[i].l1Size) * 8) {
                let count = geometry.clusters(covering: UInt64(entries[i].l1Size) * 8)
                let bytes = try host.read(
                    count: Int(count) * geometry.clusterSize,
                    at: entries[i].l1TableOffset.rawValue
                )
                let start = try allocateRun(count)
                try host.write(bytes, at: geometry.offset(of: start).rawValue)
                freed.append((entries[i].l1TableOffset, count))
                entries[i].l1TableOffset = geometry.offset(of: start)
            }
            try writeBackRefcounts(sync: false)
            try switchSnapshotTable(to: entries, beforeSwitch: { _ in })
            for (offset, count) in freed {
                for c in 0..<count { try decrementRefcount(geometry.cluster(containing: offset) + c) }
            }
        }
        // Bitmaps: rewritten whole (bits, tables, directory) by a directory switch.
        if try bitmapStructuresReach(target) {
            for i in bitmaps.indices { bitmaps[i].changed = true }
            try switchBitmapDirectory()
        }
        // Checksum blocks and table: copies lower down, the table (or header) pointed at them, the old freed.
        if let checked {
            try writeBackChecksums()
            let geometry = self.geometry
            let (oldBlocks, oldTable) = try checked.relocate(
                below: target.rawValue,
                allocate: { try allocateChecksumStructure($0) },
                clusterOffset: { geometry.offset(of: $0).rawValue }
            )
            try writeChecksumStructures(checked, oldTable: oldTable)
            try host.flush()
            for offset in oldBlocks { try decrementRefcount(geometry.cluster(containing: HostOffset(offset))) }
        }
    }

    /// Whether the bitmap directory, a table or a bits cluster lies at or past `target`.
    private func bitmapStructuresReach(_ target: HostCluster) throws -> Bool {
        if let d = bitmapDirectory, d.count > 0,
            geometry.cluster(containing: HostOffset(d.offset.rawValue + d.size - 1)) >= target
        {
            return true
        }
        return bitmaps.contains { bitmap in
            guard let stored = bitmap.onDisk else { return false }
            return storedClusters(stored).contains { $0 >= target }
        }
    }

    /// Moves refcount blocks and the refcount table below the last used cluster, drops blocks that only
    /// describe free clusters past it, and returns the new end of the file (one past its last used cluster).
    private mutating func dropFreeRefcountBlocks() throws -> HostCluster {
        let perBlock = UInt64(refcountsPerBlock)
        func isRefcountStructure(_ c: HostCluster) -> Bool {
            let table = geometry.cluster(containing: header.refcountTableOffset)
            if c >= table && c < table + UInt64(header.refcountTableClusters) { return true }
            return refcountTable.contains { $0 & hostOffsetMask == geometry.offset(of: c).rawValue }
        }
        // The end of everything but the refcount structure.
        var dataEnd = HostCluster(1)
        var c = hostEnd
        while c > HostCluster(1) {
            c = c - 1
            if try refcount(c) > 0 && !isRefcountStructure(c) {
                dataEnd = c + 1
                break
            }
        }
        // The refcount table, then every block, below the data's end.
        let tableStart = geometry.cluster(containing: header.refcountTableOffset)
        let tableClusters = UInt64(header.refcountTableClusters)
        if tableStart + tableClusters > dataEnd {
            var cursor = HostCluster(1)
            if let start = try lowestFreeRun(tableClusters, from: &cursor, below: dataEnd) {
                for i in 0..<tableClusters { try setRefcount(start + i, 1) }
                try writeBackRefcounts()
                try host.write(encodeTable(refcountTable[...]), at: geometry.offset(of: start).rawValue)
                try host.flush()
                header.refcountTableOffset = geometry.offset(of: start)
                try writeFixedHeader()
                try host.flush()
                dirtyRefcountTableSectors.removeAll()
                for i in 0..<tableClusters { try setRefcount(tableStart + i, 0) }
            }
        }
        var cursor = HostCluster(1)
        for index in refcountTable.indices where refcountTable[index] & hostOffsetMask != 0 {
            let old = geometry.cluster(containing: HostOffset(refcountTable[index] & hostOffsetMask))
            let rangeStart = HostCluster(UInt64(index) * perBlock)
            if rangeStart >= dataEnd {
                // Past the data: the range holds no used cluster but (perhaps) this block itself.
                let block = try refcountBlock(tableIndex: index)
                let others = block.entries.enumerated().contains { i, count in
                    count != 0 && rangeStart + UInt64(i) != old
                }
                if !others {
                    if old < rangeStart { try setRefcount(old, 0) }
                    refcountTable[index] = 0
                    dirtyRefcountTableSectors.insert(index / 64)
                    refcountCache.remove(block.offset)
                    continue
                }
            }
            guard old >= dataEnd, let to = try lowestFreeRun(1, from: &cursor, below: dataEnd) else { continue }
            try setRefcount(to, 1)
            let block = try refcountBlock(tableIndex: index)
            let moved = CachedTable(offset: geometry.offset(of: to).rawValue, entries: block.entries)
            try writeRefcountBlock(moved)
            try writeBackRefcounts()
            try host.flush()
            refcountCache.remove(block.offset)
            try makeRoomInRefcountCache()
            refcountCache.insert(moved)
            refcountTable[index] = moved.offset
            dirtyRefcountTableSectors.insert(index / 64)
            try writeBackRefcounts()
            try setRefcount(old, 0)
        }
        try writeBackRefcounts()
        try host.flush()
        // The new end: one past the last cluster still counted.
        var end = HostCluster(1)
        for index in refcountTable.indices.reversed() where refcountTable[index] & hostOffsetMask != 0 {
            let block = try refcountBlock(tableIndex: index)
            if let last = block.entries.lastIndex(where: { $0 != 0 }) {
                end = max(end, HostCluster(UInt64(index) * perBlock + UInt64(last) + 1))
                break
            }
        }
        return end
    }
}
