// Design notes
// ------------
// `Qcow2Writer` writes a new qcow2 version 3 image (refcount_order 4, standard L2 entries) in one
// sequential pass, as `convert` needs: clusters are handed out in order and every count is 1, so the
// refcount structures are computed once, at the end, instead of being maintained.
//
//   cluster 0        header, backing format extension, end marker, backing file name
//   1 ... L          L1 table (zeroes until finish)
//   L+1 ...          data clusters, in the order they were written
//   then             L2 tables (kept in memory until finish)
//   then             refcount table (T clusters), then refcount blocks (B clusters)
//
// `T` and `B` are the smallest numbers for which the blocks cover every cluster of the file including
// themselves and the table holds an entry per block. The header is written last, after a flush of
// everything it points at, so an interrupted convert never leaves a valid-looking image (and `convert`
// writes under a temporary name anyway). Unwritten guest clusters stay unallocated (sparse); with a
// backing file, `writeZeroCluster` marks a cluster as reading zeroes instead of falling through.
//
// Data writes may come from several threads: host clusters are handed out under a mutex and written
// outside it.

import BlockIO
import Synchronization
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Writes a qcow2 version 3 image.
public final class Qcow2Writer: @unchecked Sendable {
    public let path: String?
    public let virtualSize: UInt64
    public let clusterBits: UInt32
    public let backingFile: String?
    public let backingFormat: String?
    private let file: any BlockDevice
    private let l1Entries: UInt64
    private let l1Clusters: UInt64

    private struct State {
        var next: UInt64
        var tables: [UInt64: [UInt64]] = [:]
        var finished = false
    }
    private let state: Mutex<State>

    public var clusterSize: Int { 1 << Int(clusterBits) }

    /// Starts an image on `file` (empty and growable).
    /// - Parameters:
    ///   - virtualSize: the guest size, rounded up to a multiple of 512.
    ///   - clusterBits: 9...21 (512 B to 2 MiB clusters); 16 by default.
    ///   - backingFile: the backing file name to store (relative names are relative to the image's folder).
    ///   - backingFormat: the backing file's format, stored in a header extension.
    public init(
        file: any BlockDevice,
        path: String?,
        virtualSize: UInt64,
        clusterBits: Int = 16,
        backingFile: String? = nil,
        backingFormat: String? = nil
    ) throws {
        guard clusterBits >= 9 && clusterBits <= 21 else {
            throw ImageFormatError(
                .invalidArgument,
                path: path,
                message: "qcow2 cluster size must be a power of two from 512 B to 2 MiB"
            )
        }
        guard virtualSize <= Qcow2Header.maxVirtualSize - 511 else {
            throw ImageFormatError(.invalidArgument, path: path, message: "virtual size \(virtualSize) is too large")
        }
        let size = (virtualSize + 511) & ~511
        let entries = Qcow2Header.l1Entries(virtualSize: size, clusterBits: UInt32(clusterBits))
        guard entries <= UInt64(Qcow2Header.maxL1Entries) else {
            throw ImageFormatError(
                .invalidArgument,
                path: path,
                message: "virtual size \(size) needs a larger cluster size (the L1 table would exceed 32 MiB)"
            )
        }
        if let backingFile, backingFile.utf8.count > Int(Qcow2Header.maxBackingNameLength) || backingFile.isEmpty {
            throw ImageFormatError(.invalidArgument, path: path, message: "backing file name must be 1 to 1023 bytes")
        }
        self.file = file
        self.path = path
        self.virtualSize = size
        self.clusterBits = UInt32(clusterBits)
        self.backingFile = backingFile
        self.backingFormat = backingFormat
        self.l1Entries = entries
        let cs = UInt64(1) << UInt64(clusterBits)
        self.l1Clusters = (entries * 8 + cs - 1) / cs
        self.state = Mutex(State(next: 1 + l1Clusters))
        guard headerTemplate().encode().count <= clusterSize else {
            throw ImageFormatError(
                .invalidArgument,
                path: path,
                message: "header and backing file name do not fit in one cluster"
            )
        }
    }

    /// Writes guest cluster `index` (exactly one cluster of data; the last cluster is zero-padded).
    /// Each guest cluster may be written once. Thread-safe.
    public func writeCluster(_ index: UInt64, data: UnsafeRawBufferPointer) throws {
        precondition(data.count == clusterSize, "writeCluster takes exactly one cluster")
        let host = try assign(index) { state in
            let host = state.next
            state.next += 1
            return (host << UInt64(clusterBits)) | qcow2CopiedFlag
        }
        try withPath(path) { try file.write(data, at: (host & qcow2OffsetMask), fua: false) }
    }

    /// Makes guest cluster `index` read as zeroes without allocating it (for images with a backing file,
    /// where an unallocated cluster would show the backing file's data).
    public func writeZeroCluster(_ index: UInt64) throws {
        _ = try assign(index) { _ in qcow2ZeroFlag }
    }

    /// Records the L2 entry that `make` returns for guest cluster `index`, under the lock.
    private func assign(_ index: UInt64, _ make: (inout State) -> UInt64) throws -> UInt64 {
        let cs = UInt64(clusterSize)
        guard index < (virtualSize + cs - 1) / cs else {
            throw ImageFormatError(
                .invalidArgument,
                path: path,
                message: "guest cluster \(index) is past the end of the image"
            )
        }
        let perTable = UInt64(clusterSize / 8)
        return try state.withLock { state in
            guard !state.finished else {
                throw ImageFormatError(.invalidArgument, path: path, message: "image is already finished")
            }
            let l1Index = index / perTable
            var table = state.tables.removeValue(forKey: l1Index) ?? [UInt64](repeating: 0, count: Int(perTable))
            defer { state.tables[l1Index] = table }
            guard table[Int(index % perTable)] == 0 else {
                throw ImageFormatError(
                    .invalidArgument,
                    path: path,
                    message: "guest cluster \(index) was already written"
                )
            }
            let entry = make(&state)
            table[Int(index % perTable)] = entry
            return entry
        }
    }

    /// Writes the L2 tables, the L1 table, the refcounts and finally the header, then flushes.
    /// - Returns: the image file's size in bytes.
    @discardableResult
    public func finish() throws -> UInt64 {
        let cs = UInt64(clusterSize)
        let (tables, dataEnd) = try state.withLock { state -> ([UInt64: [UInt64]], UInt64) in
            guard !state.finished else {
                throw ImageFormatError(.invalidArgument, path: path, message: "image is already finished")
            }
            state.finished = true
            return (state.tables, state.next)
        }
        var next = dataEnd
        var l1 = [UInt64](repeating: 0, count: Int(l1Entries))
        try withPath(path) {
            for l1Index in tables.keys.sorted() {
                try file.write(encodeTable(tables[l1Index]![...]), at: next * cs)
                l1[Int(l1Index)] = (next * cs) | qcow2CopiedFlag
                next += 1
            }
            if !l1.isEmpty { try file.write(encodeTable(l1[...]), at: cs) }
        }
        let (tableClusters, blocks) = Self.refcountClusters(usedClusters: next, clusterSize: cs)
        let tableStart = next
        let blocksStart = tableStart + tableClusters
        let total = blocksStart + blocks
        let perBlock = cs / 2
        try withPath(path) {
            var table = [UInt64](repeating: 0, count: Int(tableClusters * cs / 8))
            for b in 0..<blocks { table[Int(b)] = (blocksStart + b) * cs }
            try file.write(encodeTable(table[...]), at: tableStart * cs)
            // Every cluster below `total` has refcount 1 (16-bit big-endian entries).
            var block = [UInt8](repeating: 0, count: Int(cs))
            for b in 0..<blocks {
                let first = b * perBlock
                let count = Int(min(perBlock, total - first))
                for i in 0..<Int(perBlock) { block[2 * i + 1] = i < count ? 1 : 0 }
                try file.write(block, at: (blocksStart + b) * cs)
            }
            try file.flush()
            var header = headerTemplate()
            header.l1TableOffset = l1Entries == 0 ? 0 : cs
            header.refcountTableOffset = tableStart * cs
            header.refcountTableClusters = UInt32(tableClusters)
            var bytes = header.encode()
            bytes += [UInt8](repeating: 0, count: Int(cs) - bytes.count)
            try file.write(bytes, at: 0)
            try file.flush()
        }
        return total * cs
    }

    private func headerTemplate() -> Qcow2Header {
        var h = Qcow2Header.empty(clusterBits: clusterBits, virtualSize: virtualSize)
        h.l1Size = UInt32(l1Entries)
        h.backingFile = backingFile
        h.backingFormat = backingFormat
        return h
    }

    /// The refcount table and block clusters needed for a file of `usedClusters` clusters plus those
    /// clusters themselves (16-bit refcounts): the smallest fixed point.
    static func refcountClusters(usedClusters: UInt64, clusterSize cs: UInt64) -> (table: UInt64, blocks: UInt64) {
        let perBlock = cs / 2
        var table: UInt64 = 1
        var blocks: UInt64 = 1
        while true {
            let total = usedClusters + table + blocks
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = (needBlocks * 8 + cs - 1) / cs
            if needBlocks == blocks && needTable == table { return (table, blocks) }
            blocks = max(blocks, needBlocks)
            table = max(table, needTable)
        }
    }

    /// The size of the file this writer produces for `dataClusters` data clusters spread over
    /// `l2Tables` L2 tables (what `measure` reports as required).
    public static func fileSize(virtualSize: UInt64, clusterBits: Int, dataClusters: UInt64, l2Tables: UInt64) -> UInt64
    {
        let cs = UInt64(1) << UInt64(clusterBits)
        let size = (virtualSize + 511) & ~511
        let l1 = Qcow2Header.l1Entries(virtualSize: size, clusterBits: UInt32(clusterBits))
        let used = 1 + (l1 * 8 + cs - 1) / cs + dataClusters + l2Tables
        let (t, b) = refcountClusters(usedClusters: used, clusterSize: cs)
        return (used + t + b) * cs
    }
}
