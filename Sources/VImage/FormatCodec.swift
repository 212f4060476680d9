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
// The engine calls these codecs wherever it turns bytes into entries or back, so a second on-disk format
// plugs into the same allocator, write path and write ordering. Only VIMG's codecs exist today.

import BlockIO

/// Decodes and encodes L2 entries (the layout of compressed entries differs between formats).
struct EntryCodec: Sendable, Hashable {
    enum Layout: Sendable, Hashable { case vimg }
    let layout: Layout

    static let vimg = EntryCodec(layout: .vimg)

    @inline(__always)
    func decode(_ raw: UInt64) -> L2Entry {
        switch layout {
        case .vimg: return L2Entry(raw: raw)
        }
    }

    @inline(__always)
    func encode(_ entry: L2Entry) -> UInt64 {
        switch layout {
        case .vimg: return entry.rawValue
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

    /// Decodes a refcount block (big-endian, most significant bits first within a byte for sub-byte widths).
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
                    out[i * perByte + j] = UInt64((byte >> UInt8(8 - bits * (j + 1))) & mask)
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
                out[i / perByte] |= UInt8(value) << UInt8(8 - bits * (i % perByte + 1))
            }
            return out
        }
    }
}

/// The encodings of one on-disk format, as the engine uses them.
protocol OnDiskFormat: Sendable {
    var entries: EntryCodec { get }
    var refcounts: RefcountWidth { get }
    /// The header bytes written in place at offset 0 when fixed fields change (one sector at most).
    func encodeFixedHeader(_ header: ImageHeader) -> [UInt8]
    /// The whole header with its extensions (written at create and when the extension area changes).
    func encodeHeader(_ header: ImageHeader) -> [UInt8]
}

/// VIMG version 1 (docs/FORMAT.md).
struct VIMGFormat: OnDiskFormat {
    var entries: EntryCodec { .vimg }
    var refcounts: RefcountWidth { .sixteenBits }
    func encodeFixedHeader(_ header: ImageHeader) -> [UInt8] { header.encodeFixed() }
    func encodeHeader(_ header: ImageHeader) -> [UInt8] { header.encode() }
}
