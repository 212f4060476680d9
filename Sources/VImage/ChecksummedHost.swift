// Design notes
// ------------
// The device between the engine and the image file of a checksummed image: it keeps the CRC32C of every
// 4 KiB host block, verifies each block it reads, and computes the checksum of each block it writes, so the
// engine's code paths (data, tables, headers) stay the same with checksums on or off.
//
//   engine ──► ChecksummedHost ──► file
//                 │  read:  whole 4 KiB blocks, each checked against its checksum (mismatch: an error)
//                 │  write: checksum from the buffer (whole blocks) or by reading the block back (parts)
//                 └─ store: table + checksum blocks, cached; dirty ones written by the engine's write-back
//
// A per-block lock (striped) makes a partial write, its read-back and the checksum update one step, and a
// read and its check another, so concurrent requests on one block never see data and checksum disagree.
// Checksums of blocks whose checksum block does not exist yet wait in memory (`pending`) until write-back
// allocates the block (the engine passes its allocator). Crash ordering is the engine's (FORMAT.md rules):
// data checksums reach the disk before the sync that precedes the L2 tables pointing at the data; this
// device only keeps the values.

import BlockIO
import Synchronization

/// A checksum that does not match its block.
struct ChecksumMismatch: Error, Sendable {
    var hostOffset: UInt64
}

final class ChecksummedHost: TruncatableDevice, @unchecked Sendable {
    let raw: any BlockDevice
    let geometry: ChecksumGeometry
    private let store: Mutex<ChecksumStore>
    private let stripes: [Monitor] = (0..<64).map { _ in Monitor() }
    /// Blocks that failed verification, for counters and `vdisk list`.
    let mismatches = Atomic<UInt64>(0)

    init(
        raw: any BlockDevice,
        clusterSize: Int,
        table: ChecksumTablePointer,
        tableValues: [UInt64],
        newTable: Bool = false
    ) {
        self.raw = raw
        self.geometry = ChecksumGeometry(clusterSize: clusterSize)
        var store = ChecksumStore(geometry: geometry, table: table, tableValues: tableValues)
        store.tableMoved = newTable
        self.store = Mutex(store)
    }

    /// Whether checksums wait for a checksum block to be allocated.
    var hasPending: Bool { store.withLock { !$0.pending.isEmpty } }

    /// The checksummed device for an image on `raw`, or nil when the image has no checksums.
    static func open(raw: any BlockDevice, header: ImageHeader, fileSize: UInt64) throws -> ChecksummedHost? {
        guard header.incompatibleFeatures.contains(.checksums), let data = header.checksumTableData else { return nil }
        switch ChecksumTablePointer.decode(data, clusterSize: header.clusterSize, fileSize: fileSize) {
        case .failure(let error): throw error
        case .success(let pointer): return try open(raw: raw, clusterSize: header.clusterSize, pointer: pointer)
        }
    }

    /// Computes the checksums of every metadata block again from its content, in memory (a reader of an
    /// image that was not closed cleanly; FORMAT.md, "Writing and crashes", rule 4). Data blocks keep theirs.
    func rehashMetadata(of raw: any BlockDevice) throws {
        let cs = UInt64(geometry.clusterSize)
        for cluster in try ImageCheck.metadataClusters(host: raw) {
            try rehash(range: cluster * cs..<(cluster + 1) * cs)
        }
    }

    /// Opens the checksum table of an image on `raw`.
    static func open(raw: any BlockDevice, clusterSize: Int, pointer: ChecksumTablePointer) throws -> ChecksummedHost {
        let geometry = ChecksumGeometry(clusterSize: clusterSize)
        let bytes = try raw.read(count: Int(pointer.clusters) * clusterSize, at: pointer.offset.rawValue)
        let values: [UInt64]
        do {
            values = try geometry.decode(bytes, at: pointer.offset.rawValue)
        } catch {
            throw VImageError(.corrupt, offset: error.offset, message: "checksum table sector fails its own checksum")
        }
        return ChecksummedHost(raw: raw, clusterSize: clusterSize, table: pointer, tableValues: values)
    }

    var size: UInt64 { raw.size }
    var capabilities: BlockDeviceCapabilities { raw.capabilities }

    private func stripe(_ block: UInt64) -> Monitor { stripes[Int(block % UInt64(stripes.count))] }

    // MARK: Reads

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        let bs = UInt64(ChecksumGeometry.blockSize)
        let first = offset / bs
        let last = (offset + UInt64(buffer.count) - 1) / bs
        // Whole-block reads go straight into the caller's buffer; parts through a block-sized bounce.
        var scratch: [UInt8] = []
        for block in first...last {
            let blockStart = block * bs
            let from = max(offset, blockStart)
            let to = min(offset + UInt64(buffer.count), blockStart + bs)
            try stripe(block).withLock {
                let expected = try store.withLock { try $0.checksum(ofBlock: block, raw: raw) }
                if from == blockStart && to == blockStart + bs {
                    let target = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
                    try raw.read(into: target, at: blockStart)
                    try verify(UnsafeRawBufferPointer(target), block: block, expected: expected)
                } else {
                    if scratch.isEmpty { scratch = [UInt8](repeating: 0, count: Int(bs)) }
                    try scratch.withUnsafeMutableBytes { try raw.read(into: $0, at: blockStart) }
                    try scratch.withUnsafeBytes { try verify($0, block: block, expected: expected) }
                    scratch.withUnsafeBytes {
                        UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
                            .copyMemory(
                                from: UnsafeRawBufferPointer(
                                    rebasing: $0[Int(from - blockStart)..<Int(to - blockStart)]
                                )
                            )
                    }
                }
            }
        }
    }

    private func verify(_ bytes: UnsafeRawBufferPointer, block: UInt64, expected: UInt32?) throws {
        // A block never written since its checksum block was created has no checksum to check.
        guard let expected else { return }
        let offset = block * UInt64(ChecksumGeometry.blockSize)
        if ChecksumGeometry.checksum(of: bytes, at: offset) != expected {
            mismatches.add(1, ordering: .relaxed)
            throw ChecksumMismatch(hostOffset: offset)
        }
    }

    // MARK: Writes

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        guard buffer.count > 0 else { return }
        let bs = UInt64(ChecksumGeometry.blockSize)
        let first = offset / bs
        let last = (offset + UInt64(buffer.count) - 1) / bs
        if offset % bs == 0 && buffer.count % Int(bs) == 0 {
            // Whole blocks: checksums from the buffer, one write, under the blocks' locks in order.
            try withStripes(first...last) {
                try raw.write(buffer, at: offset, fua: fua)
                var sums: [(UInt64, UInt32)] = []
                for block in first...last {
                    let at = Int((block - first) * bs)
                    sums.append(
                        (
                            block,
                            ChecksumGeometry.checksum(
                                of: UnsafeRawBufferPointer(rebasing: buffer[at..<at + Int(bs)]),
                                at: block * bs
                            )
                        )
                    )
                }
                try store.withLock { for (block, sum) in sums { try $0.set(block, sum, raw: raw) } }
            }
            return
        }
        // Parts of blocks: write, then read the whole blocks back for their checksums.
        try withStripes(first...last) {
            try raw.write(buffer, at: offset, fua: fua)
            try rehash(first...last)
        }
    }

    /// Computes the checksums of blocks from what the file holds now (caller holds their stripes, or
    /// nothing else can write them).
    private func rehash(_ blocks: ClosedRange<UInt64>) throws {
        let bs = UInt64(ChecksumGeometry.blockSize)
        let bytes = try raw.read(count: Int(UInt64(blocks.count) * bs), at: blocks.lowerBound * bs)
        var sums: [(UInt64, UInt32)] = []
        bytes.withUnsafeBytes { all in
            for (i, block) in blocks.enumerated() {
                let piece = UnsafeRawBufferPointer(rebasing: all[i * Int(bs)..<(i + 1) * Int(bs)])
                sums.append((block, ChecksumGeometry.checksum(of: piece, at: block * bs)))
            }
        }
        try store.withLock { for (block, sum) in sums { try $0.set(block, sum, raw: raw) } }
    }

    /// Recomputes the checksums of every block of a host range from its content (recovery after a crash,
    /// and enabling checksums on an image).
    func rehash(range: Range<UInt64>) throws {
        guard range.count > 0 else { return }
        let bs = UInt64(ChecksumGeometry.blockSize)
        var block = range.lowerBound / bs
        let end = (range.upperBound + bs - 1) / bs
        while block < end {
            let n = min(end - block, 256)
            try withStripes(block...(block + n - 1)) { try rehash(block...(block + n - 1)) }
            block += n
        }
    }

    func withStripes<R>(_ blocks: ClosedRange<UInt64>, _ body: () throws -> R) throws -> R {
        // Lock each distinct stripe once, in stripe order (deadlock free).
        let indices = Set(blocks.prefix(stripes.count).map { Int($0 % UInt64(stripes.count)) }).sorted()
        return try lockStripes(indices[...], body)
    }

    private func lockStripes<R>(_ indices: ArraySlice<Int>, _ body: () throws -> R) throws -> R {
        guard let first = indices.first else { return try body() }
        return try stripes[first].withLock { try lockStripes(indices.dropFirst(), body) }
    }

    /// Records the checksums of zero blocks for a host range the engine knows reads as zeroes without
    /// writing it (clusters taken from the end of the file, written only in part: the rest stays a hole).
    func assumeZeroes(_ range: Range<UInt64>) throws {
        let bs = UInt64(ChecksumGeometry.blockSize)
        let zeroes = [UInt8](repeating: 0, count: Int(bs))
        try withStripes(range.lowerBound / bs...(range.upperBound - 1) / bs) {
            try store.withLock { store in
                for block in range.lowerBound / bs..<(range.upperBound + bs - 1) / bs {
                    let sum = zeroes.withUnsafeBytes { ChecksumGeometry.checksum(of: $0, at: block * bs) }
                    try store.set(block, sum, raw: raw)
                }
            }
        }
    }

    func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try raw.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
        try rehash(range: offset..<offset + count)
    }

    /// Punches freed clusters: their blocks read as zeroes afterwards, and their checksums say so.
    func discard(at offset: UInt64, count: UInt64) throws {
        try raw.discard(at: offset, count: count)
        try rehash(range: offset..<offset + count)
    }

    func flush() throws { try raw.flush() }

    func extents(at offset: UInt64, count: UInt64) throws -> [Extent] { try raw.extents(at: offset, count: count) }

    func close() throws { try raw.close() }

    /// Truncates the file; blocks past the new end read as zeroes if the file grows again, so their
    /// checksums become those of zero blocks (where a checksum block exists; others are forgotten).
    func truncate(to length: UInt64) throws {
        guard let file = raw as? any TruncatableDevice else {
            throw BlockIOError(.notSupported, operation: .truncate, message: "the image's storage cannot be truncated")
        }
        try withStripes(0...UInt64(stripes.count - 1)) {
            try file.truncate(to: length)
            try store.withLock {
                try $0.forgetContent(
                    from: (length + UInt64(ChecksumGeometry.blockSize) - 1) / UInt64(ChecksumGeometry.blockSize),
                    raw: raw
                )
            }
        }
    }

    /// Moves checksum blocks and the table that lie at or past `target` into clusters from `allocate`
    /// (compaction). Returns the old blocks' offsets, freed by the caller once the table no longer points
    /// at them, and the old table when it moved.
    func relocate(
        below target: UInt64,
        allocate: (UInt64) throws -> HostCluster,
        clusterOffset: (HostCluster) -> UInt64
    ) throws
        -> (oldBlocks: [UInt64], oldTable: ChecksumTablePointer?)
    {
        try store.withLock {
            try $0.relocate(below: target, allocate: allocate, clusterOffset: clusterOffset, raw: raw)
        }
    }

    // MARK: Write-back (engine lock held)

    /// Allocates the checksum blocks (and a bigger table) that pending checksums need, with `allocate`
    /// (contiguous clusters, counted). The caller writes the refcounts of what it allocated before `write`.
    /// Returns the old table when the table moved (the caller switches the header, then frees it).
    func prepare(
        allocate: (UInt64) throws -> HostCluster,
        clusterOffset: (HostCluster) -> UInt64
    ) throws
        -> ChecksumTablePointer?
    {
        // Allocation runs outside the store's lock: allocating can write refcount structures (a bigger
        // refcount table) through this device, which takes the lock.
        let (tableClusters, missing) = store.withLock { $0.missingStructures() }
        var newTable: ChecksumTablePointer? = nil
        if let tableClusters {
            newTable = ChecksumTablePointer(
                offset: HostOffset(clusterOffset(try allocate(tableClusters))),
                clusters: UInt32(tableClusters)
            )
        }
        var newBlocks: [(index: Int, offset: UInt64)] = []
        for index in missing { newBlocks.append((index, clusterOffset(try allocate(1)))) }
        return try store.withLock { try $0.install(table: newTable, blocks: newBlocks, raw: raw) }
    }

    /// Writes dirty checksum blocks, then (after a sync, so new blocks are durable first) the table sectors
    /// that point at new blocks, or the whole new table.
    func write() throws {
        try store.withLock { try $0.write(raw: raw) }
    }

    /// Writes the dirty checksum blocks that exist (a repair, which cannot allocate). Returns false when
    /// some checksums had no block to go to: the caller leaves the image dirty, so the next open computes
    /// them again and a writer allocates their blocks (a block created later must not start at zero for
    /// blocks in use).
    func writeExisting() throws -> Bool {
        try store.withLock {
            let complete = $0.pending.isEmpty
            $0.pending = [:]
            try $0.write(raw: raw)
            return complete
        }
    }

    /// The sectors of the checksum table and blocks, as they are on disk, that fail their own checksum
    /// (engine lock held, so no write-back changes them meanwhile).
    func verifyStructures() throws -> [UInt64] {
        let (table, blockOffsets) = store.withLock { s in
            (s.table, s.tableValues.map { $0 & hostOffsetMask }.filter { $0 != 0 })
        }
        let cs = geometry.clusterSize
        var bad = geometry.badSectors(
            try raw.read(count: Int(table.clusters) * cs, at: table.offset.rawValue),
            at: table.offset.rawValue
        )
        for offset in blockOffsets {
            bad += geometry.badSectors(try raw.read(count: cs, at: offset), at: offset)
        }
        return bad
    }

    /// The clusters of the checksum table and blocks (for check and compaction).
    var structureClusters: [HostOffset] { store.withLock { $0.structureOffsets } }

    var tablePointer: ChecksumTablePointer { store.withLock { $0.table } }

    /// The stored checksum of a host block, if any (for check and repair).
    func storedChecksum(ofBlock block: UInt64) throws -> UInt32? {
        try store.withLock { try $0.checksum(ofBlock: block, raw: raw) }
    }
}

/// The table and the checksum blocks in memory.
struct ChecksumStore {
    let geometry: ChecksumGeometry
    var table: ChecksumTablePointer
    var tableValues: [UInt64]
    var dirtyTableSectors: Set<Int> = []
    /// Checksum blocks read or written, by host offset: decoded values and whether they changed.
    var blocks: [UInt64: (values: [UInt64], dirty: Bool)] = [:]
    /// Checksums of blocks whose checksum block does not exist yet.
    var pending: [UInt64: UInt32] = [:]

    init(geometry: ChecksumGeometry, table: ChecksumTablePointer, tableValues: [UInt64]) {
        self.geometry = geometry
        self.table = table
        self.tableValues = tableValues
    }

    var structureOffsets: [HostOffset] {
        let cs = UInt64(geometry.clusterSize)
        return (0..<UInt64(table.clusters)).map { HostOffset(table.offset.rawValue + $0 * cs) }
            + tableValues.filter { $0 & hostOffsetMask != 0 }.map { HostOffset($0 & hostOffsetMask) }
    }

    private mutating func blockValues(_ index: Int, raw: any BlockDevice) throws -> [UInt64]? {
        guard index < tableValues.count, tableValues[index] & hostOffsetMask != 0 else { return nil }
        let offset = tableValues[index] & hostOffsetMask
        if let cached = blocks[offset] { return cached.values }
        let bytes = try raw.read(count: geometry.clusterSize, at: offset)
        let values: [UInt64]
        do {
            values = try geometry.decode(bytes, at: offset)
        } catch {
            throw VImageError(.corrupt, offset: error.offset, message: "checksum block sector fails its own checksum")
        }
        blocks[offset] = (values, false)
        return values
    }

    mutating func checksum(ofBlock block: UInt64, raw: any BlockDevice) throws -> UInt32? {
        guard block >= geometry.firstCoveredBlock else { return nil }
        if let sum = pending[block] { return sum }
        let n = geometry.blocksPerChecksumBlock
        guard let values = try blockValues(Int(block / n), raw: raw) else { return nil }
        let within = block % n
        let value = values[Int(within / 2)]
        return UInt32(truncatingIfNeeded: within % 2 == 0 ? value : value >> 32)
    }

    /// Records the checksum of a block: in its checksum block (read first if it is not cached: a stored
    /// block must never be shadowed by a pending value, which write-back would not write), or in `pending`
    /// when the checksum block does not exist yet.
    mutating func set(_ block: UInt64, _ sum: UInt32, raw: any BlockDevice) throws {
        guard block >= geometry.firstCoveredBlock else { return }
        let n = geometry.blocksPerChecksumBlock
        let index = Int(block / n)
        guard try blockValues(index, raw: raw) != nil, var entry = blocks[tableValues[index] & hostOffsetMask] else {
            pending[block] = sum
            return
        }
        pending[block] = nil
        let within = block % n
        let i = Int(within / 2)
        entry.values[i] =
            within % 2 == 0
            ? (entry.values[i] & 0xFFFF_FFFF_0000_0000) | UInt64(sum)
            : (entry.values[i] & 0x0000_0000_FFFF_FFFF) | UInt64(sum) << 32
        entry.dirty = true
        blocks[tableValues[index] & hostOffsetMask] = entry
    }

    /// Blocks from `first` on no longer hold data: their checksums become those of zero blocks.
    mutating func forgetContent(from first: UInt64, raw: any BlockDevice) throws {
        pending = pending.filter { $0.key < first }
        let n = geometry.blocksPerChecksumBlock
        let zeroes = [UInt8](repeating: 0, count: ChecksumGeometry.blockSize)
        for index in Int(first / n)..<max(Int(first / n), tableValues.count)
        where tableValues[index] & hostOffsetMask != 0 {
            _ = try blockValues(index, raw: raw)
            for block in max(first, UInt64(index) * n)..<UInt64(index + 1) * n {
                let sum = zeroes.withUnsafeBytes {
                    ChecksumGeometry.checksum(of: $0, at: block * UInt64(ChecksumGeometry.blockSize))
                }
                try set(block, sum, raw: raw)
            }
        }
    }

    mutating func relocate(
        below target: UInt64,
        allocate: (UInt64) throws -> HostCluster,
        clusterOffset: (HostCluster) -> UInt64,
        raw: any BlockDevice
    ) throws -> (oldBlocks: [UInt64], oldTable: ChecksumTablePointer?) {
        let cs = UInt64(geometry.clusterSize)
        var oldBlocks: [UInt64] = []
        for index in tableValues.indices where tableValues[index] & hostOffsetMask >= target * cs {
            let old = tableValues[index] & hostOffsetMask
            guard let values = try blockValues(index, raw: raw) else { continue }
            let new = clusterOffset(try allocate(1))
            blocks[old] = nil
            blocks[new] = (values, true)
            tableValues[index] = new
            dirtyTableSectors.insert(index / ChecksumGeometry.valuesPerSector)
            oldBlocks.append(old)
        }
        var oldTable: ChecksumTablePointer? = nil
        if table.offset.rawValue + UInt64(table.clusters) * cs > target * cs {
            oldTable = table
            table = ChecksumTablePointer(
                offset: HostOffset(clusterOffset(try allocate(UInt64(table.clusters)))),
                clusters: table.clusters
            )
            tableMoved = true
        }
        return (oldBlocks, oldTable)
    }

    /// The table must be rewritten whole at the next `write` (it moved).
    var tableMoved = false

    /// What pending checksums need: a bigger table (its length in clusters: twice what is needed) and
    /// the indices of checksum blocks that do not exist.
    func missingStructures() -> (tableClusters: UInt64?, blocks: [Int]) {
        let n = geometry.blocksPerChecksumBlock
        let needed = Set(pending.keys.map { Int($0 / n) }).sorted()
        var tableClusters: UInt64? = nil
        if let highest = needed.last, highest >= tableValues.count {
            let perCluster = geometry.valuesPerCluster
            tableClusters = UInt64((highest + 1 + perCluster - 1) / perCluster * 2)
        }
        return (tableClusters, needed.filter { $0 >= tableValues.count || tableValues[$0] & hostOffsetMask == 0 })
    }

    /// Takes the allocated table (written whole by `write`) and blocks, and moves pending checksums into
    /// the blocks. Returns the old table when the table moved.
    mutating func install(
        table newTable: ChecksumTablePointer?,
        blocks newBlocks: [(index: Int, offset: UInt64)],
        raw: any BlockDevice
    ) throws -> ChecksumTablePointer? {
        var oldTable: ChecksumTablePointer? = nil
        if let newTable {
            oldTable = table
            let count = Int(newTable.clusters) * geometry.valuesPerCluster
            tableValues += [UInt64](repeating: 0, count: max(0, count - tableValues.count))
            table = newTable
            tableMoved = true
        }
        for (index, offset) in newBlocks where index < tableValues.count && tableValues[index] & hostOffsetMask == 0 {
            tableValues[index] = offset
            blocks[offset] = ([UInt64](repeating: 0, count: geometry.valuesPerCluster), true)
            dirtyTableSectors.insert(index / ChecksumGeometry.valuesPerSector)
        }
        let waiting = pending
        pending = [:]
        for (block, sum) in waiting { try set(block, sum, raw: raw) }
        return oldTable
    }

    mutating func write(raw: any BlockDevice) throws {
        for (offset, entry) in blocks where entry.dirty {
            try raw.write(geometry.encode(entry.values, at: offset), at: offset)
            blocks[offset]!.dirty = false
        }
        if tableMoved {
            try raw.flush()  // new blocks durable before the new table points at them
            try raw.write(geometry.encode(tableValues, at: table.offset.rawValue), at: table.offset.rawValue)
            dirtyTableSectors.removeAll()
            tableMoved = false
        } else if !dirtyTableSectors.isEmpty {
            try raw.flush()  // new blocks durable before a table sector points at them
            for sector in dirtyTableSectors.sorted() {
                let values = Array(tableValues[sector * 63..<min(tableValues.count, (sector + 1) * 63)])
                let at = table.offset.rawValue + UInt64(sector * ChecksumGeometry.sectorSize)
                try raw.write(Array(geometry.encode(values, at: at).prefix(ChecksumGeometry.sectorSize)), at: at)
            }
            dirtyTableSectors.removeAll()
        }
        // Keep the cache bounded: clean blocks can always be read again.
        if blocks.count > 4096 { blocks = blocks.filter { $0.value.dirty } }
    }
}

extension Metadata {
    /// Computes and writes checksums for every block in use, then the checksum table extension and, last,
    /// the incompatible bit (an interrupted enable leaves an extension without the bit, which readers ignore).
    mutating func enableChecksums() throws {
        try writeBack()
        try writeBackRefcounts()
        try setDirtyBit()
        let cs = UInt64(geometry.clusterSize)
        let tableStart = try allocateRun(1)
        let checksums = ChecksummedHost(
            raw: host,
            clusterSize: geometry.clusterSize,
            table: ChecksumTablePointer(offset: geometry.offset(of: tableStart), clusters: 1),
            tableValues: [UInt64](
                repeating: 0,
                count: ChecksumGeometry(clusterSize: geometry.clusterSize).valuesPerCluster
            ),
            newTable: true
        )
        // Rounds: checksums of every cluster in use (but cluster 0 and the checksum structures), then the
        // blocks they need, whose allocation changes refcount blocks, whose checksums need another round.
        let geometry = self.geometry
        while true {
            let structures = Set(checksums.structureClusters.map { geometry.cluster(containing: $0) })
            for c in HostCluster(1)..<hostEnd where try refcount(c) > 0 && !structures.contains(c) {
                try checksums.rehash(range: c.rawValue * cs..<(c.rawValue + 1) * cs)
            }
            guard checksums.hasPending else { break }
            _ = try checksums.prepare(
                allocate: { try allocateRun($0) },
                clusterOffset: { geometry.offset(of: $0).rawValue }
            )
            try writeBackRefcounts()
        }
        try checksums.write()
        try host.flush()
        var updated = header
        updated.setChecksumTable(checksums.tablePointer)
        let bytes = format.encodeHeader(updated)
        guard bytes.count <= geometry.clusterSize else {
            throw VImageError(.limitExceeded, path: path, message: "the header does not fit in one cluster")
        }
        try host.write(bytes, at: 0)
        try host.flush()
        updated.incompatibleFeatures.insert(.checksums)
        header = updated
        try writeFixedHeader()
        try host.flush()
    }
}
