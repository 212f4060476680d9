// Design notes
// ------------
// Refcounts and the cluster allocator (docs/FORMAT.md, "Refcount table", "Allocation"). Refcount blocks
// are cached decoded, one `UInt64` per cluster whatever the width on disk (`RefcountWidth`). A cluster is
// free when its refcount is zero; allocation takes the cluster after the previous one when it can (to
// keep runs contiguous), then the lowest free cluster, then the end of the file, where a new refcount
// block (and a bigger refcount table) is created first when the new cluster has none.
//
//   refcount table ──► block 0: clusters 0 ..< N      N = cluster_size * 8 / refcount width
//                  ──► block 1: clusters N ..< 2N
//                  ──► 0      : no block: every cluster in range is free and beyond the file's end

import BlockIO

extension Metadata {
    mutating func refcountBlock(tableIndex: Int) throws -> CachedTable<UInt64> {
        let raw = refcountTable[tableIndex]
        let offset = raw & hostOffsetMask
        if let block = refcountCache.lookup(offset) { return block }
        guard raw & ~hostOffsetMask == 0, offset != 0, offset + UInt64(geometry.clusterSize) <= host.size else {
            throw corruption("refcount block offset 0x\(String(raw, radix: 16)) is invalid", offset: offset)
        }
        let bytes = try host.read(count: geometry.clusterSize, at: offset)
        let block = CachedTable(offset: offset, entries: bytes.withUnsafeBytes { refcountWidth.decode($0) })
        try makeRoomInRefcountCache()
        refcountCache.insert(block)
        return block
    }

    mutating func makeRoomInRefcountCache() throws {
        while refcountCache.isFull, let victim = refcountCache.leastRecentlyUsed() {
            // Any refcount state may reach disk early: increments are always safe, and decrements are
            // applied only once the dropped reference is durable.
            if victim.isDirty {
                try setDirtyBit()
                try writeRefcountBlock(victim)
            }
            refcountCache.remove(victim.offset)
        }
    }

    /// The block and index holding `cluster`'s refcount, or nil if no block covers it (refcount 0).
    mutating func refcountSlot(_ cluster: HostCluster) throws -> (CachedTable<UInt64>, Int)? {
        let perBlock = UInt64(refcountsPerBlock)
        let tableIndex = cluster.rawValue / perBlock
        guard tableIndex < UInt64(refcountTable.count), refcountTable[Int(tableIndex)] & hostOffsetMask != 0 else {
            return nil
        }
        return (try refcountBlock(tableIndex: Int(tableIndex)), Int(cluster.rawValue % perBlock))
    }

    mutating func refcount(_ cluster: HostCluster) throws -> UInt64 {
        guard let (block, index) = try refcountSlot(cluster) else { return 0 }
        return block.entries[index]
    }

    mutating func incrementRefcount(_ cluster: HostCluster) throws {
        guard let (block, index) = try refcountSlot(cluster) else {
            throw corruption(
                "cluster \(cluster.rawValue) has no refcount block",
                offset: geometry.offset(of: cluster).rawValue
            )
        }
        guard block.entries[index] < refcountWidth.maxValue else {
            throw VImageError(
                .limitExceeded,
                path: path,
                message: "refcount of cluster \(cluster.rawValue) would overflow"
            )
        }
        block.entries[index] += 1
        block.isDirty = true
    }

    mutating func decrementRefcount(_ cluster: HostCluster) throws {
        guard let (block, index) = try refcountSlot(cluster), block.entries[index] > 0 else {
            throw corruption(
                "refcount of cluster \(cluster.rawValue) would drop below zero",
                offset: geometry.offset(of: cluster).rawValue
            )
        }
        block.entries[index] -= 1
        block.isDirty = true
        if block.entries[index] == 0 {
            freeHint = min(freeHint, cluster)
            // Every decrement to zero happens once the references are durably gone (the engine's write
            // order), so the cluster's bytes are no longer needed by anything on disk.
            if discardPolicy == .punch { punchQueue.append(cluster) }
        }
    }

    /// Punches the clusters freed since the last call out of the file, in runs. Runs before any allocation,
    /// so a cluster is punched before it can be reused, never after new data is in it.
    mutating func punchFreedClusters() throws {
        guard !punchQueue.isEmpty else { return }
        let clusters = punchQueue.sorted()
        punchQueue.removeAll()
        var start = clusters[0]
        var end = start + 1
        for c in clusters.dropFirst() where c != end - 1 {
            if c == end {
                end = c + 1
                continue
            }
            try punch(start..<end)
            start = c
            end = c + 1
        }
        try punch(start..<end)
    }

    private func punch(_ run: Range<HostCluster>) throws {
        let offset = geometry.offset(of: run.lowerBound).rawValue
        let end = min(host.size, geometry.offset(of: run.upperBound).rawValue)
        if end > offset { try host.discard(at: offset, count: end - offset) }
    }

    /// Host clusters a compressed record's span touches.
    func clusters(of d: CompressedDescriptor) -> ClosedRange<HostCluster> {
        geometry.cluster(
            containing: HostOffset(d.hostOffset)
        )...geometry.cluster(
            containing: HostOffset(d.hostOffset + d.byteLength - 1)
        )
    }

    mutating func incrementRefcounts(of d: CompressedDescriptor) throws {
        for c in clusters(of: d) { try incrementRefcount(c) }
    }

    /// Queues the references an L2 entry held for release once the drop is durable and the requests
    /// planned before it have completed.
    mutating func queueFree(_ entry: L2Entry) {
        if let host = entry.hostCluster {
            pendingFrees.append(PendingFree(cluster: geometry.cluster(containing: host), epoch: gateEpoch))
        }
        if case .compressed(let d) = entry {
            for c in clusters(of: d) { pendingFrees.append(PendingFree(cluster: c, epoch: gateEpoch)) }
        }
    }

    // MARK: Allocation

    /// Allocates one host cluster with refcount one. Prefers `after + 1` (to keep runs contiguous), then
    /// the lowest free cluster, then the end of the file.
    mutating func allocateCluster(after previous: HostCluster? = nil) throws -> HostCluster {
        try punchFreedClusters()
        if let previous, previous + 1 < hostEnd, try refcount(previous + 1) == 0 {
            try incrementRefcount(previous + 1)
            return previous + 1
        }
        while freeHint < hostEnd {
            let candidate = freeHint
            if let (block, index) = try refcountSlot(candidate) {
                if block.entries[index] == 0 {
                    block.entries[index] = 1
                    block.isDirty = true
                    freeHint = candidate + 1
                    return candidate
                }
                // Skip the rest of a full block quickly.
                if let next = block.entries[(index + 1)...].firstIndex(of: 0) {
                    freeHint = candidate + UInt64(next - index)
                } else {
                    freeHint = candidate + UInt64(block.entries.count - index)
                }
            } else {
                // No block: skip its range (it is only reachable by allocating at the end).
                let perBlock = UInt64(refcountsPerBlock)
                freeHint = HostCluster((candidate.rawValue / perBlock + 1) * perBlock)
            }
        }
        return try allocateAtEnd()
    }

    /// Allocates the cluster at `hostEnd`, first creating the refcount block (and growing the refcount
    /// table) that covers it. A new block sits at the first free cluster of its own range, so it counts itself.
    mutating func allocateAtEnd() throws -> HostCluster {
        try punchFreedClusters()
        let perBlock = UInt64(refcountsPerBlock)
        while true {
            let cluster = hostEnd
            let tableIndex = cluster.rawValue / perBlock
            if tableIndex >= UInt64(refcountTable.count) {
                try growRefcountTable(minimumEntries: tableIndex + 1)
                continue
            }
            if refcountTable[Int(tableIndex)] & hostOffsetMask == 0 {
                var counts = [UInt64](repeating: 0, count: Int(perBlock))
                counts[Int(cluster.rawValue % perBlock)] = 1
                let block = CachedTable(offset: geometry.offset(of: cluster).rawValue, entries: counts)
                block.isDirty = true
                try makeRoomInRefcountCache()
                refcountCache.insert(block)
                refcountTable[Int(tableIndex)] = block.offset
                dirtyRefcountTableSectors.insert(Int(tableIndex) / 64)
                hostEnd = cluster + 1
                continue
            }
            hostEnd = cluster + 1
            let (block, index) = try refcountSlot(cluster)!
            if block.entries[index] != 0 { continue }  // counted already (leaked past the old end): skip it
            block.entries[index] = 1
            block.isDirty = true
            return cluster
        }
    }

    /// Allocates `count` contiguous clusters: the lowest free run inside the file, else at its end.
    mutating func allocateRun(_ count: UInt64) throws -> HostCluster {
        guard count > 0 else { return HostCluster(0) }
        try punchFreedClusters()
        var cursor = freeHint
        if let start = try lowestFreeRun(count, from: &cursor, below: hostEnd) {
            for i in 0..<count { try setRefcount(start + i, 1) }
            return start
        }
        while true {
            let first = try allocateAtEnd()
            var last = first
            var contiguous = true
            while last.rawValue - first.rawValue + 1 < count {
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

    /// Replaces the refcount table with a larger one written at the end of the file.
    ///
    /// Layout from `hostEnd`: the refcount blocks the new clusters need, then the (contiguous) new table.
    /// Those are written and synced, the header is switched and synced, and only then is the old table
    /// freed (format rules 1–3).
    mutating func growRefcountTable(minimumEntries: UInt64) throws {
        let perBlock = UInt64(refcountsPerBlock)
        let perCluster = UInt64(geometry.l2Entries)
        let start = hostEnd.rawValue
        var count = max(minimumEntries, UInt64(refcountTable.count) * 2)
        var newRanges: [UInt64] = []
        var tableClusters: UInt64 = 0
        while true {
            count = (count + perCluster - 1) / perCluster * perCluster
            guard count <= ImageHeader.maxRefcountTableEntries else {
                throw VImageError(
                    .limitExceeded,
                    path: path,
                    message: "the image file has reached the refcount table limit"
                )
            }
            tableClusters = count / perCluster
            // Fixed point: the ranges touched by [start, start + blocks + table) that have no block yet.
            var blockCount = 0
            while true {
                let end = start + UInt64(blockCount) + tableClusters
                newRanges = (start / perBlock...(end - 1) / perBlock).filter {
                    !($0 < UInt64(refcountTable.count) && refcountTable[Int($0)] & hostOffsetMask != 0)
                }
                if newRanges.count == blockCount { break }
                blockCount = newRanges.count
            }
            if (start + UInt64(newRanges.count) + tableClusters - 1) / perBlock < count { break }
            count *= 2
        }
        try setDirtyBit()
        let tableStart = start + UInt64(newRanges.count)
        let end = tableStart + tableClusters
        var newTable = refcountTable + [UInt64](repeating: 0, count: Int(count) - refcountTable.count)
        var blocks: [UInt64: [UInt64]] = [:]
        for (i, range) in newRanges.enumerated() {
            newTable[Int(range)] = geometry.offset(ofCluster: start + UInt64(i))
            blocks[range] = [UInt64](repeating: 0, count: Int(perBlock))
        }
        // Count every new cluster: in a new block directly, or in an existing one through the cache.
        for cluster in start..<end {
            if blocks[cluster / perBlock] != nil {
                blocks[cluster / perBlock]![Int(cluster % perBlock)] = 1
            } else {
                let (block, index) = try refcountSlot(HostCluster(cluster))!
                block.entries[index] = 1
                block.isDirty = true
            }
        }
        for (range, counts) in blocks {
            let block = CachedTable(offset: newTable[Int(range)], entries: counts)
            try writeRefcountBlock(block)
            try makeRoomInRefcountCache()
            refcountCache.insert(block)
        }
        try writeBackRefcounts()
        try host.write(encodeTable(newTable[...]), at: geometry.offset(ofCluster: tableStart))
        try host.flush()
        let oldOffset = header.refcountTableOffset
        let oldClusters = UInt64(header.refcountTableClusters)
        header.refcountTableOffset = HostOffset(geometry.offset(ofCluster: tableStart))
        header.refcountTableClusters = UInt32(tableClusters)
        try writeFixedHeader()
        try host.flush()
        refcountTable = newTable
        dirtyRefcountTableSectors.removeAll()
        hostEnd = HostCluster(end)
        // The header no longer points at the old table (durably), so it can be freed right away.
        for c in 0..<oldClusters { try decrementRefcount(geometry.cluster(containing: oldOffset) + c) }
    }
}
