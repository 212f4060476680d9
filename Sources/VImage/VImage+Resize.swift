// Design notes
// ------------
// Changes to the image's shape: virtual size (resize) and backing file (rebase), plus dropping
// allocations (commit empties the top image). Each follows the write order of docs/FORMAT.md: new
// structures durable first, then the header switch, then frees.

import BlockIO

extension VImage {
    /// Changes the virtual size.
    /// - Parameters:
    ///   - newSize: the new size in bytes (rounded up to a multiple of 512).
    ///   - allowShrink: shrinking discards everything past the new end; it must be asked for explicitly.
    /// - Returns: the number of bytes of allocated clusters that shrinking dropped.
    @discardableResult
    public func resize(to newSize: UInt64, allowShrink: Bool = false) throws -> UInt64 {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        let (rounded, overflow) = newSize.addingReportingOverflow(511)
        guard !overflow, rounded & ~511 <= ImageHeader.maxVirtualSize else {
            throw VImageError(.invalidArgument, path: path, message: "size \(newSize) exceeds the format's limit")
        }
        let target = rounded & ~511
        let current = size
        if target < current && allowShrink && target % UInt64(geometry.clusterSize) != 0 {
            // The rest of the new last cluster must read as zero if the disk grows again.
            let clusterEnd = (target / UInt64(geometry.clusterSize) + 1) * UInt64(geometry.clusterSize)
            try writeZeroes(at: target, count: min(current, clusterEnd) - target, mayUnmap: false, fast: false)
        }
        return try drained { m in try m.resize(to: target, allowShrink: allowShrink) }
    }

    /// Drops every allocation of this image so all reads go to the backing file again (after `commit`).
    public func unallocateAll() throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try drained { m in
            _ = try m.dropClusters(from: GuestCluster(0), unallocate: true)
            try m.writeBack()
        }
    }

    /// Points the image at a new backing file (or none), rewriting the header's extension area.
    ///
    /// This changes names only: guest content changes unless the caller made the image independent of
    /// the difference first (what `vimg rebase` without `-u` does).
    public func setBacking(name: String?, format: String?) throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        if let name {
            let limit =
                self.format is VIMGFormat ? ImageHeader.maxBackingNameLength : Int(Qcow2Header.maxBackingNameLength)
            guard !name.isEmpty, name.utf8.count <= limit, !name.utf8.contains(0) else {
                throw VImageError(
                    .invalidArgument,
                    path: path,
                    message: "backing file name must be 1 to \(limit) bytes"
                )
            }
        }
        try drained { m in
            try m.writeBack()
            var updated = m.header
            updated.backingFileName = name
            updated.backingFileFormat = name == nil ? nil : format
            let bytes = m.format.encodeHeader(updated)
            guard bytes.count <= geometry.clusterSize else {
                throw VImageError(.invalidArgument, path: path, message: "the header does not fit in one cluster")
            }
            try m.setDirtyBit()
            // setDirtyBit changed the dirty and autoclear fields; keep its values, not the copy's.
            updated.incompatibleFeatures = m.header.incompatibleFeatures
            updated.autoclearFeatures = m.header.autoclearFeatures
            try m.host.write(m.format.encodeHeader(updated), at: 0)
            try m.host.flush()
            m.header = updated
        }
    }
}

extension VImage {
    /// Writes every range allocated in this image (data or zeroes) into `target` at the same offsets:
    /// the data movement of `vimg commit`. The caller empties this image afterwards if it wants to.
    /// - Parameter progress: called with the bytes handled so far and the total.
    public func commit(into target: any BlockDevice, progress: ((UInt64, UInt64) -> Void)? = nil) throws {
        let extents = try mapping(at: 0, count: size).filter { $0.kind != .unallocated }
        let total = extents.reduce(0) { $0 + $1.length }
        var done: UInt64 = 0
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        for m in extents {
            let end = min(m.offset + m.length, target.size)
            if end > m.offset {
                if case .zero = m.kind {
                    try target.writeZeroes(at: m.offset, count: end - m.offset, mayUnmap: false, fast: false)
                } else {
                    var position = m.offset
                    while position < end {
                        let n = Int(min(UInt64(chunk), end - position))
                        try buffer.withUnsafeMutableBytes {
                            try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: position)
                        }
                        try buffer.withUnsafeBytes {
                            try target.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: position, fua: false)
                        }
                        position += UInt64(n)
                    }
                }
            }
            done += m.length
            progress?(done, total)
        }
        try target.flush()
    }

    /// Makes this image independent of the difference between its current backing chain and `newBase`
    /// (nil: no backing file), then records the new backing file: the data movement of a safe
    /// `vimg rebase`. Guest content is unchanged.
    public func rebase(
        onto newBase: (any BlockDevice)?,
        name: String?,
        format: String?,
        progress: ((UInt64, UInt64) -> Void)? = nil
    ) throws {
        let cs = geometry.clusterSize
        let unallocated = try mapping(at: 0, count: size).filter { $0.kind == .unallocated }
        let total = unallocated.reduce(0) { $0 + $1.length }
        var done: UInt64 = 0
        var old = [UInt8](repeating: 0, count: cs)
        var new = [UInt8](repeating: 0, count: cs)
        for m in unallocated {
            var position = m.offset
            while position < m.offset + m.length {
                let n = Int(min(UInt64(cs) - position % UInt64(cs), m.offset + m.length - position))
                try old.withUnsafeMutableBytes {
                    try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: position)
                }
                for i in 0..<n { new[i] = 0 }
                if let newBase, position < newBase.size {
                    let available = Int(min(UInt64(n), newBase.size - position))
                    try new.withUnsafeMutableBytes {
                        try newBase.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<available]), at: position)
                    }
                }
                if old[0..<n] != new[0..<n] {
                    try old.withUnsafeBytes {
                        try write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: position, fua: false)
                    }
                }
                position += UInt64(n)
                done += UInt64(n)
                progress?(done, total)
            }
        }
        try flush()
        try setBacking(name: name, format: format)
    }
}

extension Metadata {
    /// Changes the virtual size (the caller has validated and rounded `target`, and drained the gate).
    mutating func resize(to target: UInt64, allowShrink: Bool) throws -> UInt64 {
        try writeBack()
        try setDirtyBit()  // before the header changes in memory: no header write may carry them early
        try markBitmapsInUse()
        let old = header.virtualSize
        var dropped: UInt64 = 0
        if target < old {
            guard allowShrink else {
                throw VImageError(
                    .invalidArgument,
                    path: path,
                    message:
                        "shrinking from \(old) to \(target) bytes discards data past the new end; use --shrink to confirm"
                )
            }
            dropped = try dropClusters(from: GuestCluster(geometry.clusters(covering: target)))
            try writeBack()
        }
        let needed = geometry.l1Entries(forVirtualSize: target)
        guard needed <= UInt64(ImageHeader.maxL1Entries) else {
            throw VImageError(.invalidArgument, path: path, message: "size \(target) needs a larger cluster size")
        }
        if needed > UInt64(l1.count) {
            // A bigger L1 table elsewhere: written and synced before the header points at it.
            let clusters = geometry.clusters(covering: needed * 8)
            let start = try allocateRun(clusters)
            try writeBackRefcounts()
            var table = l1
            table += [UInt64](repeating: 0, count: Int(needed) - l1.count)
            var bytes = encodeTable(table[...])
            bytes += [UInt8](repeating: 0, count: Int(clusters) * geometry.clusterSize - bytes.count)
            try host.write(bytes, at: geometry.offset(of: start).rawValue)
            try host.flush()
            let oldOffset = header.l1TableOffset
            let oldClusters = max(1, geometry.clusters(covering: UInt64(l1.count) * 8))
            header.l1TableOffset = geometry.offset(of: start)
            header.l1Size = UInt32(needed)
            header.virtualSize = target
            try commitSizeChange()
            l1 = table
            for c in 0..<oldClusters { try decrementRefcount(geometry.cluster(containing: oldOffset) + c) }
        } else {
            header.virtualSize = target
            try commitSizeChange()
        }
        try writeBack()
        return dropped
    }

    /// Makes every guest cluster from `firstCluster` on read as nothing-allocated-here (zero without a
    /// backing file, zero-flagged with one), queueing frees. Returns the bytes of data clusters dropped.
    mutating func dropClusters(from firstCluster: GuestCluster, unallocate: Bool = false) throws -> UInt64 {
        var dropped: UInt64 = 0
        let perTable = UInt64(geometry.l2Entries)
        let end = GuestCluster(UInt64(l1.count) * perTable)
        var cluster = firstCluster
        while cluster < end {
            let l1Index = geometry.l1Index(of: cluster)
            let tableLast = min(end, GuestCluster(UInt64(l1Index + 1) * perTable))
            guard L1Entry(rawValue: l1[l1Index]).l2Table != nil else {
                cluster = tableLast
                continue
            }
            let table = try writableL2Table(cluster)
            let replacement: L2Entry =
                unallocate || !hasBacking || !format.hasZeroEntries
                ? .unallocated : .zero(preallocated: nil, copied: false)
            for c in cluster..<tableLast {
                let index = geometry.l2Index(of: c)
                let old = entries.decode(table.entries[index])
                guard old.isAllocated, old != replacement else { continue }
                if old.hostCluster != nil || old.isCompressed {
                    dropped += UInt64(geometry.clusterSize)
                }
                queueFree(old)
                table.entries[index] = entries.encode(replacement)
                table.isDirty = true
            }
            cluster = tableLast
        }
        return dropped
    }
}

extension VImage {
    /// Makes every cluster that holds data reading as zeroes a zero cluster, so its storage is freed (and,
    /// with the `.punch` discard policy, punched out of the file): what `vimg sparsify` does.
    /// - Returns: the number of clusters made zero.
    @discardableResult
    public func sparsify(progress: ((UInt64, UInt64) -> Void)? = nil) throws -> UInt64 {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        let cs = UInt64(geometry.clusterSize)
        let extents = try mapping(at: 0, count: size).filter {
            switch $0.kind {
            case .data, .compressed: return true
            default: return false
            }
        }
        let total = extents.reduce(0) { $0 + $1.length }
        var done: UInt64 = 0
        var zeroed: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: Int(cs))
        for e in extents {
            var position = e.offset
            while position < e.offset + e.length {
                let n = min(cs - position % cs, e.offset + e.length - position)
                try buffer.withUnsafeMutableBytes {
                    try read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<Int(n)]), at: position)
                }
                // Only whole clusters (or the disk's last, partial one) can become zero clusters.
                let whole = position % cs == 0 && (n == cs || position + n == size)
                if whole && buffer[0..<Int(n)].allSatisfy({ $0 == 0 }) {
                    try writeZeroes(at: position, count: n, mayUnmap: true, fast: false)
                    zeroed += 1
                }
                position += n
                done += n
                progress?(done, total)
            }
        }
        try flush()
        return zeroed
    }
}
