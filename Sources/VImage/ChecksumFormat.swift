// Design notes
// ------------
// The on-disk structures of end-to-end checksums (docs/FORMAT.md, "End-to-end checksums"):
//
//   header extension 4       | table offset u64 | table clusters u32 | 0 u32 |
//   checksum table, blocks   clusters of protected sectors:
//                            | 63 values u64 (little-endian) | 0 u32 | CRC32C(offset LE ++ bytes 0-507) u32 |
//   table value i            bits 9-55: the checksum block covering host blocks i*N ..< (i+1)*N
//   block value j            the u32 checksums of host blocks 2j and 2j+1 of its range (low half first)
//
// Every 4 KiB host block's checksum is CRC32C(host offset as 8 bytes LE ++ the block), so a block written
// to the wrong place does not verify. All fields here are little-endian, unlike the rest of the format:
// they are CRC32C values and the sectors' own checksums, computed and checked in one byte order.

import BlockIO

/// Layout of checksum sectors, blocks and the table for one cluster size.
struct ChecksumGeometry: Sendable, Hashable {
    static let blockSize = 4096
    static let sectorSize = 512
    static let valuesPerSector = 63

    let clusterSize: Int

    var sectorsPerCluster: Int { clusterSize / Self.sectorSize }
    /// u64 values one cluster of protected sectors holds.
    var valuesPerCluster: Int { sectorsPerCluster * Self.valuesPerSector }
    /// Host blocks one checksum block covers (two checksums per value).
    var blocksPerChecksumBlock: UInt64 { UInt64(valuesPerCluster * 2) }

    /// The first host block with a checksum: cluster 0 (the header) protects itself (header bytes 92 - 95).
    var firstCoveredBlock: UInt64 { UInt64(clusterSize / Self.blockSize) }

    /// The checksum of a 4 KiB block at host offset `offset`.
    static func checksum(of block: UnsafeRawBufferPointer, at offset: UInt64) -> UInt32 {
        var seed = offset.littleEndian
        let prefix = withUnsafeBytes(of: &seed) { CRC32C.checksum($0) }
        return CRC32C.checksum(block, continuing: prefix)
    }

    /// Encodes `values` into clusters of protected sectors starting at host offset `offset`.
    func encode(_ values: [UInt64], at offset: UInt64) -> [UInt8] {
        let sectors = (values.count + Self.valuesPerSector - 1) / Self.valuesPerSector
        let clusters = max(1, (sectors + sectorsPerCluster - 1) / sectorsPerCluster)
        var bytes = [UInt8](repeating: 0, count: clusters * clusterSize)
        bytes.withUnsafeMutableBytes { raw in
            for s in 0..<clusters * sectorsPerCluster {
                let base = s * Self.sectorSize
                for v in 0..<Self.valuesPerSector {
                    let index = s * Self.valuesPerSector + v
                    guard index < values.count else { break }
                    raw.storeBytes(of: values[index].littleEndian, toByteOffset: base + v * 8, as: UInt64.self)
                }
                let crc = Self.sectorChecksum(
                    UnsafeRawBufferPointer(rebasing: raw[base..<base + 508]),
                    at: offset + UInt64(base)
                )
                raw.storeBytes(of: crc.littleEndian, toByteOffset: base + 508, as: UInt32.self)
            }
        }
        return bytes
    }

    /// Decodes clusters of protected sectors read at host offset `offset`.
    /// - Throws: the offset of the first sector whose own checksum does not match.
    func decode(_ bytes: [UInt8], at offset: UInt64) throws(ChecksumSectorError) -> [UInt64] {
        var values = [UInt64](repeating: 0, count: bytes.count / Self.sectorSize * Self.valuesPerSector)
        let bad: UInt64? = bytes.withUnsafeBytes { raw in
            for s in 0..<bytes.count / Self.sectorSize {
                let base = s * Self.sectorSize
                let stored = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: base + 508, as: UInt32.self))
                let computed = Self.sectorChecksum(
                    UnsafeRawBufferPointer(rebasing: raw[base..<base + 508]),
                    at: offset + UInt64(base)
                )
                guard stored == computed else { return offset + UInt64(base) }
                for v in 0..<Self.valuesPerSector {
                    values[s * Self.valuesPerSector + v] = UInt64(
                        littleEndian: raw.loadUnaligned(fromByteOffset: base + v * 8, as: UInt64.self)
                    )
                }
            }
            return nil
        }
        if let bad { throw ChecksumSectorError(offset: bad) }
        return values
    }

    /// The host offsets of the sectors in `bytes` (read at `offset`) whose own checksum does not match.
    func badSectors(_ bytes: [UInt8], at offset: UInt64) -> [UInt64] {
        bytes.withUnsafeBytes { raw in
            (0..<bytes.count / Self.sectorSize).compactMap { s -> UInt64? in
                let base = s * Self.sectorSize
                let stored = UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: base + 508, as: UInt32.self))
                let computed = Self.sectorChecksum(
                    UnsafeRawBufferPointer(rebasing: raw[base..<base + 508]),
                    at: offset + UInt64(base)
                )
                return stored == computed ? nil : offset + UInt64(base)
            }
        }
    }

    static func sectorChecksum(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> UInt32 {
        var seed = offset.littleEndian
        let prefix = withUnsafeBytes(of: &seed) { CRC32C.checksum($0) }
        return CRC32C.checksum(bytes, continuing: prefix)
    }
}

/// A protected sector whose own checksum does not match.
struct ChecksumSectorError: Error, Sendable {
    var offset: UInt64
}

/// The checksum table extension's data (type 4).
public struct ChecksumTablePointer: Sendable, Hashable {
    public var offset: HostOffset
    public var clusters: UInt32

    public static let length = 16

    public init(offset: HostOffset, clusters: UInt32) {
        self.offset = offset
        self.clusters = clusters
    }

    func encode() -> [UInt8] {
        var w = ByteWriter(capacity: Self.length)
        w.write(offset.rawValue)
        w.write(clusters)
        w.write(UInt32(0))
        return w.bytes
    }

    /// The pointer, checked against the file; nil with a message when it cannot be used.
    static func decode(_ data: [UInt8], clusterSize: Int, fileSize: UInt64) -> Result<ChecksumTablePointer, VImageError>
    {
        var r = ByteReader(data)
        guard data.count == length, let offset = r.readInteger(as: UInt64.self),
            let clusters = r.readInteger(as: UInt32.self)
        else {
            return .failure(
                VImageError(
                    .invalidImage,
                    message: "checksum table extension of \(data.count) bytes is not \(length) bytes"
                )
            )
        }
        let bytes = UInt64(clusters) * UInt64(clusterSize)
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        guard clusters >= 1, clusters <= 1 << 20, offset != 0, offset % UInt64(clusterSize) == 0, !overflow,
            end <= fileSize
        else {
            return .failure(
                VImageError(
                    .invalidImage,
                    offset: offset,
                    message:
                        "checksum table (\(clusters) clusters at 0x\(String(offset, radix: 16))) is outside the file"
                )
            )
        }
        return .success(ChecksumTablePointer(offset: HostOffset(offset), clusters: clusters))
    }
}

extension HeaderExtension {
    public static let checksumTable: UInt32 = 4
}

extension ImageHeader {
    /// The checksum table extension, if present (its data, not yet validated).
    var checksumTableData: [UInt8]? { extensions.first { $0.type == HeaderExtension.checksumTable }?.data }

    /// Puts the checksum table extension right after the bitmap directory extension (or first), so that
    /// switching it is one write of the header's first sector.
    mutating func setChecksumTable(_ pointer: ChecksumTablePointer) {
        extensions.removeAll { $0.type == HeaderExtension.checksumTable }
        let at = bitmapDirectoryIsFirst ? 1 : 0
        extensions.insert(HeaderExtension(type: HeaderExtension.checksumTable, data: pointer.encode()), at: at)
    }
}
