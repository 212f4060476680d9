// Design notes
// ------------
// `Qcow2Image` reads a qcow2 image (version 2 or 3, standard L2 entries) as a read-only `BlockDevice`:
//
//   guest offset ─► L1[cluster / l2_entries] ─► L2 table (cached) ─► entry ─► unallocated: backing or zeroes
//                                                                          ├► zero flag:   zeroes
//                                                                          ├► normal:      pread at host offset
//                                                                          └► compressed:  pread span, inflate
//
// Runs of normal clusters that are contiguous on the host are read with one pread. The active L1 table
// (or a snapshot's, chosen at open) is read once; L2 tables are read on first use and kept in a bounded
// cache under a mutex, so the device is safe to use from many threads. Every offset taken from the file
// is checked (alignment, end of file) before it is used, and a bad one is an error naming the entry and
// the offset, never a trap; no loop runs longer than the guest range it was asked about.
//
// Backing files are opened by `ImageFormats.open` (which bounds the chain's depth and detects loops) and
// handed in; reads of unallocated clusters fall through to them, and past the backing file's end read
// as zeroes.
//
// This is the read-only path: `ImageFormats.open` gives readers this device and writers the engine
// (`VImage`, which writes qcow2 as it writes VIMG: Sources/VImage/Qcow2Format.swift). It also reads
// images the engine does not write: clusters of 512 B to 2 KiB, persistent bitmaps.

import BlockIO
import Synchronization
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// A read-only qcow2 image.
public final class Qcow2Image: BlockDevice, @unchecked Sendable {
    public let path: String?
    public let header: Qcow2Header
    /// The image's internal snapshots.
    public let snapshots: [Qcow2Snapshot]
    /// The snapshot table's length in bytes.
    public let snapshotTableBytes: UInt64
    /// The snapshot being read, if one was chosen at open.
    public let snapshot: Qcow2Snapshot?
    /// The backing device, if the image has one.
    public let backing: (any BlockDevice)?
    /// The backing file's path as resolved against the image's folder.
    public let backingPath: String?
    /// The host file.
    public let file: any BlockDevice
    let fileSize: UInt64
    /// The L1 table being read (the active one, or the chosen snapshot's).
    let l1: [UInt64]
    public let size: UInt64
    private let cache = Mutex<[UInt64: [UInt64]]>([:])
    private let cacheLimit: Int
    private let closed = Atomic<Bool>(false)

    public var capabilities: BlockDeviceCapabilities { [.readOnly, .extents, .multiConnection] }
    public var clusterSize: Int { header.clusterSize }

    /// Opens the image stored on `file`.
    /// - Parameters:
    ///   - file: the image file (read-only).
    ///   - path: the file's path, for messages and for resolving a relative backing file name.
    ///   - snapshot: read this internal snapshot (by name, or by id) instead of the active state.
    ///   - backing: the already-open backing device (nil when the image has none, or to read without it).
    ///     The image closes it when it is closed.
    /// - Throws: `ImageFormatError` for invalid or unsupported images.
    public init(file: any BlockDevice, path: String?, snapshot: String? = nil, backing: (any BlockDevice)?) throws {
        let header = try Qcow2Header.read(from: file, path: path)
        self.file = file
        self.path = path
        self.header = header
        self.fileSize = file.size
        self.backing = backing
        backingPath = header.backingFile.map { BackingReference.resolve($0, relativeTo: path) }
        let table: (entries: [Qcow2Snapshot], bytes: UInt64) =
            header.snapshotCount > 0 ? try Qcow2Snapshot.readTable(from: file, header: header, path: path) : ([], 0)
        snapshots = table.entries
        snapshotTableBytes = table.bytes
        var l1Offset = header.l1TableOffset
        var l1Size = header.l1Size
        var size = header.virtualSize
        if let snapshot {
            guard
                let chosen = snapshots.first(where: { $0.name == snapshot })
                    ?? snapshots.first(where: { $0.id == snapshot })
            else {
                throw ImageFormatError(
                    .notFound,
                    path: path,
                    message: "no snapshot named '\(snapshot)' (\(snapshots.count) snapshots)"
                )
            }
            guard
                UInt64(chosen.l1Size)
                    >= Qcow2Header.l1Entries(virtualSize: chosen.virtualSize, clusterBits: header.clusterBits)
            else {
                throw ImageFormatError(
                    .invalidImage,
                    path: path,
                    offset: chosen.l1TableOffset,
                    message: "snapshot '\(chosen.name)' has an L1 table too small for its size"
                )
            }
            self.snapshot = chosen
            l1Offset = chosen.l1TableOffset
            l1Size = chosen.l1Size
            size = chosen.virtualSize
        } else {
            self.snapshot = nil
        }
        self.size = size
        let bytes = l1Size == 0 ? [] : try withPath(path) { try file.read(count: Int(l1Size) * 8, at: l1Offset) }
        l1 = bytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
        cacheLimit = max(16, (64 << 20) / header.clusterSize)
    }

    deinit {
        if !closed.load(ordering: .relaxed) { try? close() }
    }

    // MARK: Mapping

    /// How guest cluster `index` reads in this image (not its backing chain).
    /// - Throws: `ImageFormatError.corrupt` when the L1 entry or L2 table it goes through is invalid.
    public func cluster(_ index: UInt64) throws -> Qcow2Cluster {
        let perTable = UInt64(header.l2Entries)
        let l1Index = index / perTable
        guard l1Index < UInt64(l1.count) else { return .unallocated }
        guard let table = try l2Table(l1Index: Int(l1Index)) else { return .unallocated }
        let raw = table[Int(index % perTable)]
        let entry = Qcow2Cluster(l2Entry: raw, clusterBits: header.clusterBits)
        let cs = UInt64(header.clusterSize)
        switch entry {
        case .normal(let host):
            guard host % cs == 0, host < fileSize else {
                throw ImageFormatError(
                    .corrupt,
                    path: path,
                    offset: host,
                    message:
                        "L2 entry for guest cluster \(index) points at host offset \(host), which is \(host % cs != 0 ? "not cluster aligned" : "past the end of the file (\(fileSize) bytes)")"
                )
            }
        case .compressed(let host, let length):
            guard host < fileSize, length <= 2 * cs + 512 else {
                throw ImageFormatError(
                    .corrupt,
                    path: path,
                    offset: host,
                    message:
                        "compressed cluster for guest cluster \(index) (\(length) bytes at \(host)) lies outside the file"
                )
            }
        case .unallocated, .zero:
            break
        }
        return entry
    }

    /// The L2 table that L1 entry `l1Index` points at, or nil if it has none.
    private func l2Table(l1Index: Int) throws -> [UInt64]? {
        let offset = l1[l1Index] & qcow2OffsetMask
        if offset == 0 { return nil }
        if let table = cache.withLock({ $0[offset] }) { return table }
        let cs = UInt64(header.clusterSize)
        guard offset % cs == 0, offset <= fileSize, fileSize - offset >= cs else {
            throw ImageFormatError(
                .corrupt,
                path: path,
                offset: offset,
                message:
                    "L1 entry \(l1Index) points at an L2 table at \(offset), which is unaligned or past the end of the file (\(fileSize) bytes)"
            )
        }
        let bytes = try withPath(path) { try file.read(count: header.clusterSize, at: offset) }
        let table = bytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
        cache.withLock {
            if $0.count >= cacheLimit { $0.removeAll(keepingCapacity: true) }
            $0[offset] = table
        }
        return table
    }

    /// Decodes one compressed cluster into `output` (exactly one cluster).
    func decompress(host: UInt64, length: UInt64, into output: UnsafeMutableRawBufferPointer) throws {
        let available = min(length, fileSize - host)
        let input = try withPath(path) { try file.read(count: Int(available), at: host) }
        let ok = input.withUnsafeBytes { Qcow2Decompressor.decompress(header.compressionType, $0, into: output) }
        guard ok else {
            throw ImageFormatError(
                .corrupt,
                path: path,
                offset: host,
                message:
                    "compressed cluster (\(header.compressionType), \(length) bytes) does not decompress to \(header.clusterSize) bytes"
            )
        }
    }

    // MARK: BlockDevice

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkOpen(.read)
        try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read)
        let cs = UInt64(header.clusterSize)
        var done = 0
        var scratch: UnsafeMutableRawBufferPointer? = nil
        defer { scratch?.deallocate() }
        while done < buffer.count {
            let position = offset + UInt64(done)
            let index = position / cs
            let inCluster = position % cs
            var length = Int(min(cs - inCluster, UInt64(buffer.count - done)))
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + length])
            switch try cluster(index) {
            case .unallocated:
                // Extend over following unallocated clusters so the backing file sees one request.
                var next = index + 1
                while done + length < buffer.count, try cluster(next) == .unallocated {
                    length += Int(min(cs, UInt64(buffer.count - done - length)))
                    next += 1
                }
                try readBacking(
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + length]),
                    at: position
                )
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .normal(let host):
                // Extend over following clusters that are contiguous on the host.
                var next = index + 1
                while done + length < buffer.count, case .normal(let h) = try cluster(next),
                    h == host + (next - index) * cs
                {
                    length += Int(min(cs, UInt64(buffer.count - done - length)))
                    next += 1
                }
                try readHost(
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + length]),
                    at: host + inCluster
                )
            case .compressed(let host, let span):
                if inCluster == 0 && length == Int(cs) {
                    try decompress(host: host, length: span, into: target)
                } else {
                    if scratch == nil { scratch = .allocate(byteCount: Int(cs), alignment: 64) }
                    try decompress(host: host, length: span, into: scratch!)
                    target.copyMemory(
                        from: UnsafeRawBufferPointer(rebasing: scratch![Int(inCluster)..<Int(inCluster) + length])
                    )
                }
            }
            done += length
        }
    }

    /// Reads host bytes; a data cluster that runs past the end of the file reads zeroes there.
    private func readHost(into buffer: UnsafeMutableRawBufferPointer, at host: UInt64) throws {
        let available = host < fileSize ? Int(min(UInt64(buffer.count), fileSize - host)) : 0
        if available > 0 {
            try withPath(path) {
                try file.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<available]), at: host)
            }
        }
        if available < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Reads from the backing device; past its end (or without one) reads zeroes.
    private func readBacking(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let backingSize = backing?.size ?? 0
        let inside = offset < backingSize ? Int(min(UInt64(buffer.count), backingSize - offset)) : 0
        if inside > 0, let backing {
            try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inside]), at: offset)
        }
        if inside < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        throw readOnlyError(.write)
    }
    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        throw readOnlyError(.writeZeroes)
    }
    public func discard(at offset: UInt64, count: UInt64) throws { throw readOnlyError(.discard) }
    public func flush() throws { try checkOpen(.flush) }

    /// Allocation status: data (normal and compressed clusters), zero (zero flag), and for unallocated
    /// clusters the backing file's extents (a hole where there is none). Stops after a bounded number of
    /// clusters; always returns at least one extent for a non-empty range.
    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try checkOpen(.extents)
        try checkRange(offset: offset, count: count, operation: .extents)
        var result: [Extent] = []
        let cs = UInt64(header.clusterSize)
        let end = offset + count
        var position = offset
        var steps = 0
        while position < end && steps < 1 << 20 {
            steps += 1
            let index = position / cs
            let l1Index = index / UInt64(header.l2Entries)
            var runEnd = min(end, (index + 1) * cs)
            var kind: Qcow2Cluster
            if l1Index >= UInt64(l1.count) || l1[Int(l1Index)] & qcow2OffsetMask == 0 {
                kind = .unallocated
                runEnd = min(end, (l1Index + 1) * header.bytesPerL2)
            } else {
                kind = try cluster(index)
            }
            switch kind {
            case .unallocated:
                if let backing {
                    let backingSize = backing.size
                    if position < backingSize {
                        let stop = min(runEnd, backingSize)
                        var p = position
                        while p < stop {
                            let chunk = try backing.extents(at: p, count: stop - p)
                            guard let last = chunk.last, last.end > p else { break }
                            for e in chunk { result.appendMerging(e) }
                            p = last.end
                        }
                        position = stop
                        continue
                    }
                }
                result.appendMerging(Extent(offset: position, length: runEnd - position, flags: [.hole, .zero]))
            case .zero(let allocated):
                result.appendMerging(
                    Extent(offset: position, length: runEnd - position, flags: allocated ? [.zero] : [.hole, .zero])
                )
            case .normal, .compressed:
                result.appendMerging(Extent(offset: position, length: runEnd - position, flags: []))
            }
            position = runEnd
        }
        return result
    }

    /// One run of guest clusters with the same kind of mapping in this image: VIMG's type, so tools
    /// walk both formats' mappings alike.
    public typealias MappingRun = VImage.MappingExtent

    /// How `offset ..< offset + count` maps onto this image's file, merged into runs.
    public func mapping(at offset: UInt64, count: UInt64) throws -> [MappingRun] {
        try checkRange(offset: offset, count: count, operation: .extents)
        var result: [MappingRun] = []
        let cs = UInt64(header.clusterSize)
        let end = offset + count
        var position = offset
        while position < end {
            let index = position / cs
            let l1Index = index / UInt64(header.l2Entries)
            var runEnd = min(end, (index + 1) * cs)
            let kind: MappingRun.Kind
            if l1Index >= UInt64(l1.count) || l1[Int(l1Index)] & qcow2OffsetMask == 0 {
                kind = .unallocated
                runEnd = min(end, (l1Index + 1) * header.bytesPerL2)
            } else {
                switch try cluster(index) {
                case .unallocated: kind = .unallocated
                case .zero(let allocated): kind = .zero(allocated: allocated)
                case .normal(let host): kind = .data(host: host + position % cs)
                case .compressed: kind = .compressed
                }
            }
            if var last = result.last, last.offset + last.length == position {
                var merge = last.kind == kind
                if case .data(let a) = last.kind, case .data(let b) = kind { merge = a + last.length == b }
                if merge {
                    last.length += runEnd - position
                    result[result.count - 1] = last
                    position = runEnd
                    continue
                }
            }
            result.append(MappingRun(offset: position, length: runEnd - position, kind: kind))
            position = runEnd
        }
        return result
    }

    public func close() throws {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        try? backing?.close()
        try file.close()
    }

    private func checkOpen(_ operation: BlockIOError.Operation) throws {
        if closed.load(ordering: .relaxed) {
            throw BlockIOError(.closed, operation: operation, path: path, message: "image is closed")
        }
    }

    private func readOnlyError(_ operation: BlockIOError.Operation) -> BlockIOError {
        BlockIOError(.readOnly, operation: operation, path: path, message: "this qcow2 image was opened read-only")
    }
}
