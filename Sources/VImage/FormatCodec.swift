// Design notes
// ------------
// VIMG and qcow2 share their structure (docs/FORMAT.md, "Differences from qcow2"): a header, two-level
// L1/L2 tables of u64 entries, a refcount table of u64 block offsets, refcount blocks, a snapshot table.
// They differ in a few encodings, which the engine takes as parameters instead of hard-coding VIMG's:
//
//   what                      VIMG                              qcow2
//   L2 entry, compressed      sector offset + sector count      byte offset + sector count, split at a
//                             at fixed bits                     position that depends on cluster_bits
//   refcount width            16 bits                           1 to 64 bits (refcount_order 0...6)
//   header bytes              96 fixed bytes + TLV extensions   72 or 104+ bytes + extensions
//
//   snapshot table            VIMG entries                      qcow2 entries (VM state fields kept)
//   compressed data           u32 length + LZ4 block            raw deflate or zstd, no length
//   dirty bit                 set while a writer has the image  only with lazy_refcounts (never set here)
//   zero entries              always                            version 3 only
//   data cluster references   one per L2 table mapping it       one per L1 table reaching it
//
// The engine calls these codecs wherever it turns bytes into entries or back, so qcow2 (Qcow2Format.swift)
// plugs into the same allocator, write path and write ordering as VIMG.

import BlockIO

/// Decodes and encodes L2 entries (the layout of compressed entries differs between formats).
///
/// qcow2 stores a compressed cluster as a byte offset (not sector aligned) in bits 0 ..< x and, in bits
/// x ..< 62, how many 512-byte sectors it spans beyond the one holding that offset, where
/// x = 62 - (cluster_bits - 8); every other kind of entry has the same bits as VIMG's.
struct EntryCodec: Sendable, Hashable {
    enum Layout: Sendable, Hashable {
        case vimg
        /// qcow2, with x = 62 - (cluster_bits - 8).
        case qcow2(compressedShift: UInt64)
    }
    let layout: Layout

    static let vimg = EntryCodec(layout: .vimg)
    static func qcow2(clusterBits: Int) -> EntryCodec {
        EntryCodec(layout: .qcow2(compressedShift: UInt64(62 - (clusterBits - 8))))
    }

    @inline(__always)
    func decode(_ raw: UInt64) -> L2Entry {
        switch layout {
        case .vimg: return L2Entry(raw: raw)
        case .qcow2(let shift):
            guard raw & compressedFlag != 0 else { return L2Entry(raw: raw) }
            let offset = raw & ((1 << shift) - 1)
            let sectors = ((raw & ~(compressedFlag | copiedFlag)) >> shift) + 1
            return .compressed(CompressedDescriptor(hostOffset: offset, sectors: sectors))
        }
    }

    @inline(__always)
    func encode(_ entry: L2Entry) -> UInt64 {
        switch layout {
        case .vimg: return entry.rawValue
        case .qcow2(let shift):
            guard case .compressed(let d) = entry else { return entry.rawValue }
            return compressedFlag | ((d.sectors - 1) << shift) | d.hostOffset
        }
    }

    /// The largest sector count a compressed entry can hold.
    var maxCompressedSectors: UInt64 {
        switch layout {
        case .vimg: return CompressedDescriptor.maxSectors
        case .qcow2(let shift): return 1 << (62 - shift)
        }
    }
}

/// The width of a refcount on disk (`refcount_order`: 2^order bits). In memory every refcount is a `UInt64`.
struct RefcountWidth: Sendable, Hashable {
    /// log2 of the width in bits, 0...6.
    let order: Int

    static let sixteenBits = RefcountWidth(order: 4)

    var bits: Int { 1 << order }
    /// The largest refcount the width can hold.
    var maxValue: UInt64 { bits == 64 ? .max : (1 << UInt64(bits)) - 1 }
    /// Refcounts in one block of `clusterSize` bytes.
    func entriesPerBlock(clusterSize: Int) -> Int { clusterSize * 8 / bits }

    /// Decodes a refcount block (big-endian; for sub-byte widths, the first refcount in the least
    /// significant bits of its byte, as qemu packs them).
    func decode(_ bytes: UnsafeRawBufferPointer) -> [UInt64] {
        switch bits {
        case 8: return bytes.map { UInt64($0) }
        case 16: return decodeTable(bytes, as: UInt16.self).map { UInt64($0) }
        case 32: return decodeTable(bytes, as: UInt32.self).map { UInt64($0) }
        case 64: return decodeTable(bytes, as: UInt64.self)
        default:
            let perByte = 8 / bits
            let mask = UInt8((1 << bits) - 1)
            var out = [UInt64](repeating: 0, count: bytes.count * perByte)
            for (i, byte) in bytes.enumerated() {
                for j in 0..<perByte {
                    out[i * perByte + j] = UInt64((byte >> UInt8(bits * j)) & mask)
                }
            }
            return out
        }
    }

    /// Encodes a refcount block; every value must be at most `maxValue`.
    func encode(_ entries: [UInt64]) -> [UInt8] {
        switch bits {
        case 8: return entries.map { UInt8($0) }
        case 16: return encodeTable(entries.map { UInt16($0) }[...])
        case 32: return encodeTable(entries.map { UInt32($0) }[...])
        case 64: return encodeTable(entries[...])
        default:
            let perByte = 8 / bits
            var out = [UInt8](repeating: 0, count: entries.count / perByte)
            for (i, value) in entries.enumerated() {
                out[i / perByte] |= UInt8(value) << UInt8(bits * (i % perByte))
            }
            return out
        }
    }
}

/// How a format stores compressed clusters.
enum CompressedEncoding: Sendable, Hashable {
    /// VIMG: a u32 length, then one LZ4 block (Compression.swift).
    case lz4Record
    /// qcow2: a deflate or zstd stream of one cluster, no length.
    case qcow2(Qcow2CompressionType)
}

/// The encodings of one on-disk format, as the engine uses them.
protocol OnDiskFormat: Sendable {
    /// "vimg" or "qcow2", for messages.
    var name: String { get }
    var entries: EntryCodec { get }
    var refcounts: RefcountWidth { get }
    var compression: CompressedEncoding { get }
    /// Whether L2 entries can say "reads as zeroes" (qcow2 version 2 cannot).
    var hasZeroEntries: Bool { get }
    /// Whether a writer sets the dirty bit while it has the image open (VIMG's rule 4). A qcow2 writer
    /// sets it only with lazy refcounts, which this engine never uses: it keeps refcounts exact on disk.
    var setsDirtyBit: Bool { get }
    /// Who holds the references on data clusters. VIMG: each L2 table holds one on every cluster it maps,
    /// however many L1 tables share it (copying a shared table adds them). qcow2: each L1 table holds one
    /// on every cluster it reaches, through whichever L2 table (a snapshot adds them; copying does not).
    var tablesHoldDataReferences: Bool { get }
    /// Whether every COPIED flag reachable from the active L1 table must say exactly whether its cluster's
    /// refcount is one (qcow2, as `qemu-img check` demands), or may be clear on an owned cluster (VIMG: it
    /// only costs a needless copy).
    var exactCopiedFlags: Bool { get }
    /// The autoclear bits whose data this engine keeps up to date (every other one is cleared on write).
    var maintainedAutoclearBits: UInt64 { get }
    /// The header bytes written in place at offset 0 when fixed fields change (one sector at most).
    func encodeFixedHeader(_ header: ImageHeader) -> [UInt8]
    /// The whole header with its extensions (written at create and when the extension area changes).
    func encodeHeader(_ header: ImageHeader) -> [UInt8]
    func encodeSnapshots(_ entries: [SnapshotEntry]) -> [UInt8]
    func decodeSnapshots(
        _ bytes: [UInt8],
        count: Int,
        geometry: ClusterGeometry,
        fileSize: UInt64
    ) throws -> [SnapshotEntry]
}

/// VIMG version 1 (docs/FORMAT.md).
struct VIMGFormat: OnDiskFormat {
    var name: String { "vimg" }
    var entries: EntryCodec { .vimg }
    var refcounts: RefcountWidth { .sixteenBits }
    var compression: CompressedEncoding { .lz4Record }
    var hasZeroEntries: Bool { true }
    var setsDirtyBit: Bool { true }
    var tablesHoldDataReferences: Bool { true }
    var exactCopiedFlags: Bool { false }
    var maintainedAutoclearBits: UInt64 { AutoclearFeatures.maintained }
    /// The fixed fields, with the bitmap directory extension when it is the first extension: one write
    /// inside the first sector (docs/FORMAT.md, "Bitmap directory extension").
    func encodeFixedHeader(_ header: ImageHeader) -> [UInt8] {
        Array(header.encode().prefix(header.switchableHeaderBytes))
    }
    func encodeHeader(_ header: ImageHeader) -> [UInt8] { header.encode() }
    func encodeSnapshots(_ entries: [SnapshotEntry]) -> [UInt8] { SnapshotTable.encode(entries) }
    func decodeSnapshots(
        _ bytes: [UInt8],
        count: Int,
        geometry: ClusterGeometry,
        fileSize: UInt64
    ) throws -> [SnapshotEntry] {
        try SnapshotTable.decode(bytes, count: count, geometry: geometry, fileSize: fileSize)
    }
}
