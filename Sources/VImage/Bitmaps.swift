// Design notes
// ------------
// Persistent dirty bitmaps (docs/FORMAT.md, "Persistent dirty bitmaps"): which granules of the disk may
// have changed since a bitmap was created or cleared, for incremental backup.
//
// In memory each bitmap is a flat array of bits, one per granule, loaded at open. Every change of guest
// content passes `guestWillChange` under the engine lock while the request is planned (so a bitmap
// created by a drained operation either sees a request or the request completed before it existed).
// The first change of a session first marks the enabled bitmaps `in_use` on disk, durably: an overwrite
// in place changes no metadata, so without that a crash could leave a bitmap that looks clean but
// misses writes. The bits reach the disk on a clean close (or a bitmap command), which clears `in_use`.
//
//   open ─► load ─► first change: in_use on disk ─► changes recorded in memory ─► close: bits + clear
//                                                     crash here: in_use stays set = inconsistent
//
// On disk nothing is changed in place: a directory switch writes new bits clusters, tables and
// directory, makes them durable, then switches the header (fixed header and extension 3 in one
// write of the first 128 bytes), and only then frees the old ones.

import BlockIO

/// What `vimg info` and `vimg bitmap` show about one bitmap.
public struct BitmapInfo: Sendable, Hashable {
    public var name: String
    public var granularity: UInt64
    public var enabled: Bool
    /// False for a bitmap known to be stale (after a crash, or a writer that did not maintain it).
    public var consistent: Bool
    /// Bytes of the disk marked dirty (granules times granularity); nil when the bits were not read.
    public var dirtyBytes: UInt64?
}

/// One dirty bitmap in memory.
struct DirtyBitmap {
    var name: String
    var granularityBits: UInt8
    var enabled: Bool
    /// The bits can be trusted: it was consistent at open, or was created or cleared since.
    var consistent: Bool
    /// `in_use` was set on disk for it in this session (cleared again at close).
    var markedInUse = false
    /// One bit per granule, least significant first (empty for an inconsistent bitmap).
    var words: [UInt64]
    var granules: UInt64
    /// Where its table and bits are on disk (nil: never written).
    var onDisk: Stored?
    /// `words` (or the table size) changed since `onDisk` was written.
    var changed = false

    struct Stored {
        var table: HostOffset
        var tableClusters: UInt64
        var bitsClusters: [HostCluster]
    }

    /// The most granules a bitmap may have in memory (128 MiB of bits).
    static let maxGranules: UInt64 = 1 << 30

    var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }

    init(name: String, granularityBits: UInt8, enabled: Bool, virtualSize: UInt64) {
        self.name = name
        self.granularityBits = granularityBits
        self.enabled = enabled
        self.consistent = true
        self.granules = BitmapEntry.granules(virtualSize: virtualSize, granularityBits: granularityBits)
        self.words = [UInt64](repeating: 0, count: Int((granules + 63) / 64))
    }

    /// Marks every granule that `offset ..< offset + count` touches.
    mutating func mark(offset: UInt64, count: UInt64) {
        guard count > 0, consistent else { return }
        let first = offset >> UInt64(granularityBits)
        let last = min(granules, (offset + count - 1) >> UInt64(granularityBits) + 1)
        guard first < last else { return }
        setRange(first..<last)
    }

    mutating func setRange(_ range: Range<UInt64>) {
        var g = range.lowerBound
        while g < range.upperBound {
            let word = Int(g / 64)
            let bit = g % 64
            let n = min(64 - bit, range.upperBound - g)
            let mask = n == 64 ? UInt64.max : ((UInt64(1) << n) - 1) << bit
            if words[word] & mask != mask {
                words[word] |= mask
                changed = true
            }
            g += n
        }
    }

    func isDirty(_ granule: UInt64) -> Bool { words[Int(granule / 64)] & (1 << (granule % 64)) != 0 }

    var dirtyGranules: UInt64 { words.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }

    /// Changes the number of granules for a new disk size: a grown part is dirty, a dropped part forgotten.
    mutating func resize(to virtualSize: UInt64) {
        let newGranules = BitmapEntry.granules(virtualSize: virtualSize, granularityBits: granularityBits)
        guard newGranules != granules else { return }
        changed = true
        guard consistent else {
            granules = newGranules
            return
        }
        let old = granules
        granules = newGranules
        words = Array(words.prefix(Int((newGranules + 63) / 64)))
        words += [UInt64](repeating: 0, count: Int((newGranules + 63) / 64) - words.count)
        if newGranules > old {
            setRange(old..<newGranules)
        } else if newGranules % 64 != 0 {
            words[words.count - 1] &= (UInt64(1) << (newGranules % 64)) - 1
        }
    }

    /// Merges another bitmap's dirty granules in (any granularities: a source granule marks every byte it
    /// covers).
    mutating func merge(_ other: DirtyBitmap, virtualSize: UInt64) {
        for g in 0..<min(other.granules, UInt64(other.words.count) * 64) where other.isDirty(g) {
            let start = g << UInt64(other.granularityBits)
            guard start < virtualSize else { break }
            mark(offset: start, count: min(other.granularity, virtualSize - start))
        }
    }

    /// Runs of clean and dirty bytes in `offset ..< offset + count` (a disk of `virtualSize`).
    func runs(at offset: UInt64, count: UInt64, virtualSize: UInt64) -> [(offset: UInt64, length: UInt64, dirty: Bool)]
    {
        var result: [(offset: UInt64, length: UInt64, dirty: Bool)] = []
        var position = offset
        let end = min(offset + count, virtualSize)
        let bits = UInt64(granularityBits)
        // Granules up to here are looked at; past the disk's last granule nothing is dirty.
        let lastGranule = end == 0 ? 0 : min(granules, (end - 1) >> bits + 1)
        while position < end {
            let g = position >> bits
            let dirty = g < granules && isDirty(g)
            // The run goes on while the bits agree, a whole word at a time where the word is uniform: this
            // runs under the engine lock, and a fine bitmap of a large disk has millions of granules.
            var h = g + 1
            let uniform: UInt64 = dirty ? .max : 0
            while h < lastGranule {
                if h % 64 == 0 && h + 64 <= lastGranule && words[Int(h / 64)] == uniform {
                    h += 64
                } else if isDirty(h) == dirty {
                    h += 1
                } else {
                    break
                }
            }
            let next = min(end, h << bits)
            if var last = result.last, last.dirty == dirty {
                last.length += next - position
                result[result.count - 1] = last
            } else {
                result.append((position, next - position, dirty))
            }
            position = next
        }
        return result
    }

    /// The bits of table entry `index` (one cluster's worth), as stored: little-endian words.
    func clusterBits(_ index: Int, clusterSize: Int) -> (entry: BitmapTableEntry?, bytes: [UInt8]) {
        let wordsPerCluster = clusterSize / 8
        let start = index * wordsPerCluster
        let slice = words[min(start, words.count)..<min(start + wordsPerCluster, words.count)]
        if slice.allSatisfy({ $0 == 0 }) { return (.allClean, []) }
        let granulesHere = min(UInt64(wordsPerCluster * 64), granules - UInt64(start) * 64)
        let full = UInt64(slice.count) * 64 == granulesHere && slice.count == wordsPerCluster
        if full && slice.allSatisfy({ $0 == .max }) { return (.allDirty, []) }
        var bytes = [UInt8](repeating: 0, count: clusterSize)
        for (i, word) in slice.enumerated() {
            for b in 0..<8 { bytes[i * 8 + b] = UInt8(truncatingIfNeeded: word >> (8 * b)) }
        }
        return (nil, bytes)
    }

    var info: BitmapInfo {
        BitmapInfo(
            name: name,
            granularity: granularity,
            enabled: enabled,
            consistent: consistent,
            dirtyBytes: consistent ? dirtyGranules << UInt64(granularityBits) : 0
        )
    }
}

extension Metadata {
    // MARK: Loading

    /// Reads the bitmap directory, tables and bits (at open). Structural problems make bitmaps (or the
    /// whole directory) unusable, never the image: they are recorded for `check`.
    mutating func loadBitmaps(fileSize: UInt64) throws {
        guard let data = header.bitmapDirectoryData else { return }
        let pointer: BitmapDirectoryPointer
        switch BitmapDirectoryPointer.decode(data, clusterSize: geometry.clusterSize, fileSize: fileSize) {
        case .success(let p): pointer = p
        case .failure(let problem):
            bitmapDirectoryProblem = problem.message
            return
        }
        bitmapDirectory = pointer
        guard pointer.count > 0 else { return }
        let bytes = try host.read(count: Int(pointer.size), at: pointer.offset.rawValue)
        let decoded: [BitmapEntry.Decoded]
        do {
            decoded = try BitmapEntry.decode(
                bytes,
                count: Int(pointer.count),
                virtualSize: header.virtualSize,
                clusterSize: geometry.clusterSize,
                fileSize: fileSize
            )
        } catch {
            bitmapDirectoryProblem = error.message
            bitmapDirectory = nil
            return
        }
        // A writer that did not maintain bitmaps cleared the autoclear bit: every bitmap is stale.
        let maintained = header.autoclearFeatures & AutoclearFeatures.bitmaps != 0
        for d in decoded {
            var bitmap = DirtyBitmap(
                name: d.entry.name,
                granularityBits: min(max(d.entry.granularityBits, BitmapEntry.minGranularityBits), 63),
                enabled: d.entry.flags.contains(.enabled),
                virtualSize: 0
            )
            bitmap.granules = BitmapEntry.granules(
                virtualSize: header.virtualSize,
                granularityBits: bitmap.granularityBits
            )
            bitmap.consistent =
                maintained && d.problem == nil && !d.entry.flags.contains(.inUse)
                && bitmap.granules <= DirtyBitmap.maxGranules
            if d.problem == nil,
                let stored = try readTable(d.entry, into: &bitmap, bits: bitmap.consistent, fileSize: fileSize)
            {
                bitmap.onDisk = stored
            } else {
                // Not trusted: rewritten (all dirty) at the next switch; what its old table held leaks at worst.
                bitmap.consistent = false
            }
            if !bitmap.consistent { bitmap.words = [] }
            bitmaps.append(bitmap)
        }
    }

    /// Reads a usable entry's table (and with `bits`, its bits into `bitmap`); nil when a table entry is bad.
    private func readTable(
        _ entry: BitmapEntry,
        into bitmap: inout DirtyBitmap,
        bits: Bool,
        fileSize: UInt64
    ) throws
        -> DirtyBitmap.Stored?
    {
        let raw = try host.read(count: Int(entry.tableSize) * 8, at: entry.tableOffset.rawValue).withUnsafeBytes {
            decodeTable($0, as: UInt64.self)
        }
        let wordsPerCluster = geometry.clusterSize / 8
        var words = [UInt64](repeating: 0, count: Int((bitmap.granules + 63) / 64))
        var bitsClusters: [HostCluster] = []
        for (i, value) in raw.enumerated() {
            guard let tableEntry = try? BitmapTableEntry(raw: value) else { return nil }
            let start = i * wordsPerCluster
            let end = min(start + wordsPerCluster, words.count)
            guard start < end else { continue }
            switch tableEntry {
            case .allClean: continue
            case .allDirty:
                for w in start..<end { words[w] = .max }
            case .stored(let offset):
                guard geometry.isAligned(offset.rawValue), offset.rawValue + UInt64(geometry.clusterSize) <= fileSize
                else {
                    return nil
                }
                bitsClusters.append(geometry.cluster(containing: offset))
                guard bits else { continue }
                let bytes = try host.read(count: geometry.clusterSize, at: offset.rawValue)
                for w in start..<end {
                    var word: UInt64 = 0
                    for b in 0..<8 { word |= UInt64(bytes[(w - start) * 8 + b]) << (8 * b) }
                    words[w] = word
                }
            }
        }
        if bitmap.granules % 64 != 0, !words.isEmpty {
            words[words.count - 1] &= (UInt64(1) << (bitmap.granules % 64)) - 1
        }
        bitmap.words = words
        return DirtyBitmap.Stored(
            table: entry.tableOffset,
            tableClusters: geometry.clusters(covering: UInt64(entry.tableSize) * 8),
            bitsClusters: bitsClusters
        )
    }

    // MARK: Recording changes

    /// The one place every change of guest content passes, under the lock while its request is planned.
    /// The first change of a session marks the enabled bitmaps in use on disk first (see the design notes).
    mutating func guestWillChange(offset: UInt64, count: UInt64) throws {
        guard !bitmaps.isEmpty, maintainsBitmaps else { return }
        try markBitmapsInUse()
        for i in bitmaps.indices where bitmaps[i].enabled { bitmaps[i].mark(offset: offset, count: count) }
    }

    /// Before the first change of guest content in a session: `in_use` on every consistent enabled bitmap,
    /// durably (docs/FORMAT.md, "Consistency", rule 1).
    mutating func markBitmapsInUse() throws {
        guard !bitmaps.isEmpty, maintainsBitmaps, !bitmapsMarkedInUse else { return }
        for i in bitmaps.indices where bitmaps[i].consistent && bitmaps[i].enabled { bitmaps[i].markedInUse = true }
        try switchBitmapDirectory()
        bitmapsMarkedInUse = true
    }

    /// Writes a header whose virtual size changed and, when the image has bitmaps, their tables refitted to
    /// that size, in the same header write: a crash leaves the old size and directory, or the new ones.
    mutating func commitSizeChange() throws {
        guard !bitmaps.isEmpty, maintainsBitmaps else {
            try writeFixedHeader()
            try host.flush()
            return
        }
        resizeBitmaps(to: header.virtualSize)
        try switchBitmapDirectory()
    }

    /// Writes what the bitmaps hold and clears `in_use` on those this session set it on (a clean close).
    mutating func persistBitmaps() throws {
        guard maintainsBitmaps, !isReadOnly else { return }
        guard bitmaps.contains(where: { $0.markedInUse || $0.changed || $0.onDisk == nil }) else { return }
        for i in bitmaps.indices { bitmaps[i].markedInUse = false }
        try switchBitmapDirectory()
        bitmapsMarkedInUse = false
    }

    // MARK: Directory switch

    /// Writes every bitmap that changed since it was last written, a new directory, switches the header
    /// to it, and frees what the old directory alone referenced (docs/FORMAT.md, "Directory switch").
    mutating func switchBitmapDirectory() throws {
        try setDirtyBit()
        var oldClusters: [HostCluster] = []
        if let old = bitmapDirectory, old.count > 0 {
            oldClusters += (0..<geometry.clusters(covering: old.size)).map {
                geometry.cluster(containing: old.offset) + $0
            }
        }
        oldClusters += replacedBitmapClusters
        replacedBitmapClusters = []
        var entries: [BitmapEntry] = []
        for i in bitmaps.indices {
            if bitmaps[i].onDisk == nil || bitmaps[i].changed {
                if let stored = bitmaps[i].onDisk { oldClusters += storedClusters(stored) }
                bitmaps[i].onDisk = try writeBits(bitmaps[i])
                bitmaps[i].changed = false
            }
            var flags: BitmapEntry.Flags = []
            if bitmaps[i].enabled { flags.insert(.enabled) }
            if !bitmaps[i].consistent || bitmaps[i].markedInUse { flags.insert(.inUse) }
            entries.append(
                BitmapEntry(
                    tableOffset: bitmaps[i].onDisk!.table,
                    tableSize: UInt32(
                        BitmapEntry.tableSize(
                            virtualSize: header.virtualSize,
                            granularityBits: bitmaps[i].granularityBits,
                            clusterSize: geometry.clusterSize
                        )
                    ),
                    flags: flags,
                    granularityBits: bitmaps[i].granularityBits,
                    name: bitmaps[i].name
                )
            )
        }
        var pointer = BitmapDirectoryPointer.empty
        if !entries.isEmpty {
            let bytes = BitmapEntry.encode(entries)
            let start = try allocateRun(geometry.clusters(covering: UInt64(bytes.count)))
            try host.write(bytes, at: geometry.offset(of: start).rawValue)
            pointer = BitmapDirectoryPointer(
                count: UInt32(entries.count),
                offset: geometry.offset(of: start),
                size: UInt64(bytes.count)
            )
        }
        // Everything new, and its refcounts, durable before the header points at it.
        try writeBackRefcounts()
        var updated = header
        updated.setBitmapDirectory(pointer)
        updated.autoclearFeatures |= AutoclearFeatures.bitmaps
        if header.bitmapDirectoryIsFirst {
            header = updated
            try writeFixedHeader()
        } else {
            // The extension is added (or moved first): the whole extension area is rewritten, once.
            let bytes = format.encodeHeader(updated)
            guard bytes.count <= geometry.clusterSize else {
                throw VImageError(.limitExceeded, path: path, message: "the header does not fit in one cluster")
            }
            try host.write(bytes, at: 0)
            header = updated
        }
        try host.flush()
        bitmapDirectory = pointer
        bitmapDirectoryProblem = nil
        for c in oldClusters { try decrementRefcount(c) }
    }

    /// Clusters a stored bitmap holds (its table and bits).
    func storedClusters(_ stored: DirtyBitmap.Stored) -> [HostCluster] {
        (0..<stored.tableClusters).map { geometry.cluster(containing: stored.table) + $0 } + stored.bitsClusters
    }

    /// Writes a bitmap's bits clusters and table into new clusters (an inconsistent bitmap is written
    /// all dirty, with no bits clusters).
    private mutating func writeBits(_ bitmap: DirtyBitmap) throws -> DirtyBitmap.Stored {
        let cs = geometry.clusterSize
        let count = Int(
            BitmapEntry.tableSize(
                virtualSize: header.virtualSize,
                granularityBits: bitmap.granularityBits,
                clusterSize: cs
            )
        )
        var table = [UInt64](repeating: BitmapTableEntry.allDirty.rawValue, count: count)
        var bitsClusters: [HostCluster] = []
        if bitmap.consistent {
            for i in 0..<count {
                let (entry, bytes) = bitmap.clusterBits(i, clusterSize: cs)
                if let entry {
                    table[i] = entry.rawValue
                } else {
                    let cluster = try allocateCluster()
                    try host.write(bytes, at: geometry.offset(of: cluster).rawValue)
                    bitsClusters.append(cluster)
                    table[i] = geometry.offset(of: cluster).rawValue
                }
            }
        }
        let tableClusters = max(1, geometry.clusters(covering: UInt64(count) * 8))
        let start = try allocateRun(tableClusters)
        var bytes = encodeTable(table[...])
        bytes += [UInt8](repeating: 0, count: Int(tableClusters) * cs - bytes.count)
        try host.write(bytes, at: geometry.offset(of: start).rawValue)
        return DirtyBitmap.Stored(
            table: geometry.offset(of: start),
            tableClusters: tableClusters,
            bitsClusters: bitsClusters
        )
    }

    // MARK: Operations

    func bitmapIndex(_ name: String) throws -> Int {
        guard let index = bitmaps.firstIndex(where: { $0.name == name }) else {
            throw VImageError(.notFound, path: path, message: "bitmap '\(name)' not found")
        }
        return index
    }

    /// Removes a bitmap; what it stored is freed at the next switch.
    mutating func removeBitmap(at index: Int) {
        if let stored = bitmaps[index].onDisk { replacedBitmapClusters += storedClusters(stored) }
        bitmaps.remove(at: index)
    }

    /// Fits every bitmap to a new virtual size (before the header switch that changes it).
    mutating func resizeBitmaps(to virtualSize: UInt64) {
        for i in bitmaps.indices { bitmaps[i].resize(to: virtualSize) }
    }
}

extension VImage {
    /// The bitmaps an image's directory lists, from its header and directory alone (no bits read, no
    /// engine): what `vimg info` shows. A directory that cannot be used lists nothing.
    public static func listBitmaps(host: any BlockDevice, header: ImageHeader) -> [BitmapInfo] {
        guard let data = header.bitmapDirectoryData,
            case .success(let pointer) = BitmapDirectoryPointer.decode(
                data,
                clusterSize: header.clusterSize,
                fileSize: host.size
            ), pointer.count > 0,
            let bytes = try? host.read(count: Int(pointer.size), at: pointer.offset.rawValue),
            let decoded = try? BitmapEntry.decode(
                bytes,
                count: Int(pointer.count),
                virtualSize: header.virtualSize,
                clusterSize: header.clusterSize,
                fileSize: host.size
            )
        else { return [] }
        let maintained = header.autoclearFeatures & AutoclearFeatures.bitmaps != 0
        return decoded.map { d in
            BitmapInfo(
                name: d.entry.name,
                granularity: UInt64(1) << UInt64(min(d.entry.granularityBits, 63)),
                enabled: d.entry.flags.contains(.enabled),
                consistent: maintained && d.problem == nil && !d.entry.flags.contains(.inUse),
                dirtyBytes: nil
            )
        }
    }

    /// The image's dirty bitmaps.
    public var bitmapList: [BitmapInfo] { state.withLock { m in m.bitmaps.map(\.info) } }

    /// Why the image's bitmap directory cannot be used, if it cannot.
    public var bitmapDirectoryProblem: String? { state.withLock { $0.bitmapDirectoryProblem } }

    /// Adds an empty bitmap.
    /// - Parameters:
    ///   - granularity: bytes per bit, a power of two from 512 bytes to 2 GiB (default 64 KiB).
    ///   - enabled: record guest changes from now on (a disabled bitmap stays empty until enabled).
    public func addBitmap(named name: String, granularity: UInt64 = 65536, enabled: Bool = true) throws {
        try mutateBitmaps { m in
            guard !name.isEmpty, name.utf8.count <= BitmapEntry.maxNameLength, !name.utf8.contains(0) else {
                throw VImageError(.invalidArgument, path: path, message: "bitmap names are 1 to 1023 bytes")
            }
            guard !m.bitmaps.contains(where: { $0.name == name }) else {
                throw VImageError(.alreadyExists, path: path, message: "bitmap '\(name)' already exists")
            }
            guard m.bitmaps.count < Int(BitmapDirectoryPointer.maxCount) else {
                throw VImageError(.limitExceeded, path: path, message: "the image has the maximum number of bitmaps")
            }
            guard granularity.nonzeroBitCount == 1, granularity >= 512, granularity <= 1 << 31 else {
                throw VImageError(
                    .invalidArgument,
                    path: path,
                    message: "bitmap granularity must be a power of two from 512 bytes to 2 GiB"
                )
            }
            var bitmap = DirtyBitmap(
                name: name,
                granularityBits: UInt8(granularity.trailingZeroBitCount),
                enabled: enabled,
                virtualSize: m.header.virtualSize
            )
            guard bitmap.granules <= DirtyBitmap.maxGranules else {
                throw VImageError(
                    .invalidArgument,
                    path: path,
                    message: "granularity \(granularity) is too fine for this disk; use a larger one"
                )
            }
            bitmap.markedInUse = enabled && m.bitmapsMarkedInUse
            m.bitmaps.append(bitmap)
        }
    }

    /// Removes a bitmap (consistent or not).
    public func removeBitmap(named name: String) throws {
        try mutateBitmaps { m in
            m.removeBitmap(at: try m.bitmapIndex(name))
        }
    }

    /// Clears every bit of a consistent bitmap.
    public func clearBitmap(named name: String) throws {
        try mutateBitmaps { m in
            let i = try m.consistentBitmap(name)
            m.bitmaps[i].words = m.bitmaps[i].words.map { _ in 0 }
            m.bitmaps[i].changed = true
        }
    }

    /// Starts or stops recording guest changes in a consistent bitmap.
    public func setBitmap(named name: String, enabled: Bool) throws {
        try mutateBitmaps { m in
            let i = try m.consistentBitmap(name)
            m.bitmaps[i].enabled = enabled
            m.bitmaps[i].markedInUse = enabled && m.bitmapsMarkedInUse
        }
    }

    /// Adds the dirty granules of `source` (a bitmap of this image, or of another one) to `name`.
    public func mergeBitmap(named name: String, from source: BitmapContents) throws {
        try mutateBitmaps { m in
            let i = try m.consistentBitmap(name)
            m.bitmaps[i].merge(source.bitmap, virtualSize: m.header.virtualSize)
        }
    }

    /// A consistent bitmap's content, to merge into another bitmap.
    public func bitmapContents(named name: String) throws -> BitmapContents {
        try state.withLock { m in BitmapContents(bitmap: m.bitmaps[try m.consistentBitmap(name)]) }
    }

    /// Clean and dirty runs of a consistent bitmap (what NBD's `qemu:dirty-bitmap:NAME` context reports).
    public func bitmapRuns(
        named name: String,
        at offset: UInt64,
        count: UInt64
    ) throws
        -> [(offset: UInt64, length: UInt64, dirty: Bool)]
    {
        try checkRange(offset: offset, count: count, operation: .extents)
        return try state.withLock { m in
            m.bitmaps[try m.consistentBitmap(name)].runs(at: offset, count: count, virtualSize: m.header.virtualSize)
        }
    }

    /// Runs a bitmap change with no request in flight and writes the result (a directory switch).
    private func mutateBitmaps(_ body: (inout Metadata) throws -> Void) throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try requireVIMG("persistent dirty bitmaps")
        try drained { m in
            try body(&m)
            try m.switchBitmapDirectory()
        }
    }
}

/// A copy of one bitmap's bits, to merge into another image's bitmap.
public struct BitmapContents: Sendable {
    let bitmap: DirtyBitmap
}

extension Metadata {
    func consistentBitmap(_ name: String) throws -> Int {
        let i = try bitmapIndex(name)
        guard bitmaps[i].consistent else {
            throw VImageError(
                .invalidArgument,
                path: path,
                message:
                    "bitmap '\(name)' is inconsistent (the image was not closed cleanly, or changed by a program that does not keep bitmaps); it can only be removed"
            )
        }
        return i
    }
}
