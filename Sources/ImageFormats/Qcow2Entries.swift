// Entry layouts (qemu/qemu docs/interop/qcow2.txt, "Cluster mapping"), standard 64-bit entries only:
//
//   L1 entry                                      L2 entry, standard
//   63 62   56 55                  9 8     0      63 62 61  56 55                 9 8    1 0
//   |C| res  |  L2 table offset     |  res  |     |C |0 | res |  host cluster      | res  |Z|
//
//   L2 entry, compressed (x = 62 - (cluster_bits - 8))
//   63 62 61              x x-1                0
//   |0 |1 | extra sectors  |  host byte offset  |
//
// A compressed cluster's data starts at the byte offset and runs to the end of the sector holding it
// plus `extra sectors` more sectors.

import BlockIO
import VImage

/// Bits 9...55 of an L1/L2/refcount table entry: a cluster-aligned host offset.
let qcow2OffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
let qcow2CopiedFlag: UInt64 = 1 << 63
let qcow2CompressedFlag: UInt64 = 1 << 62
let qcow2ZeroFlag: UInt64 = 1

/// How one guest cluster of a qcow2 image reads.
public enum Qcow2Cluster: Hashable, Sendable {
    /// Not in this image: from the backing file, or zeroes without one.
    case unallocated
    /// Reads as zeroes (the zero flag); `allocated` if a host cluster is preallocated for it.
    case zero(allocated: Bool)
    /// Data at a cluster-aligned host offset.
    case normal(host: UInt64)
    /// Compressed data: `length` bytes at host byte offset `host` (the span may include the start of
    /// the next compressed cluster).
    case compressed(host: UInt64, length: UInt64)

    /// Decodes a standard L2 entry of an image with clusters of `1 << clusterBits` bytes.
    public init(l2Entry raw: UInt64, clusterBits: UInt32) {
        if raw & qcow2CompressedFlag != 0 {
            let x = UInt64(62 - (clusterBits - 8))
            let host = raw & ((1 << x) - 1)
            let extraSectors = (raw >> x) & ((1 << (62 - x)) - 1)
            self = .compressed(host: host, length: (extraSectors + 1) * 512 - (host & 511))
            return
        }
        let host = raw & qcow2OffsetMask
        if raw & qcow2ZeroFlag != 0 {
            self = .zero(allocated: host != 0)
        } else if host == 0 {
            self = .unallocated
        } else {
            self = .normal(host: host)
        }
    }
}

/// One entry of a qcow2 snapshot table.
public struct Qcow2Snapshot: Sendable, Hashable {
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var id: String
    public var name: String
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt64
    /// The snapshot's virtual size (from the extra data; the image's size when absent).
    public var virtualSize: UInt64

    /// QEMU's limit on a snapshot entry's extra data.
    static let maxExtraData: UInt32 = 1024
    /// The whole table may not exceed this many bytes.
    static let maxTableBytes: UInt64 = 64 << 20

    /// Reads `header.snapshotCount` entries from the snapshot table, one field group at a time (the
    /// table's size is not stored, so nothing is read before it is known to be needed).
    static func readTable(
        from file: any BlockDevice,
        header: Qcow2Header,
        path: String?
    ) throws -> (entries: [Qcow2Snapshot], bytes: UInt64) {
        let fileSize = file.size
        let cs = UInt64(header.clusterSize)
        var position = header.snapshotsOffset
        var result: [Qcow2Snapshot] = []
        result.reserveCapacity(Int(header.snapshotCount))
        func bytes(_ count: UInt64) throws -> [UInt8] {
            let (end, overflow) = position.addingReportingOverflow(count)
            guard !overflow, end <= fileSize, end - header.snapshotsOffset <= maxTableBytes else {
                throw ImageFormatError(
                    .invalidImage,
                    path: path,
                    offset: position,
                    message: "snapshot table runs past the end of the file or 64 MiB"
                )
            }
            let data = try withPath(path) { try file.read(count: Int(count), at: position) }
            position = end
            return data
        }
        for index in 0..<Int(header.snapshotCount) {
            let entryStart = position
            var f = ByteReader(try bytes(40))
            let l1Offset = f.readInteger(as: UInt64.self)!
            let l1Size = f.readInteger(as: UInt32.self)!
            let idLength = f.readInteger(as: UInt16.self)!
            let nameLength = f.readInteger(as: UInt16.self)!
            let seconds = f.readInteger(as: UInt32.self)!
            let nanoseconds = f.readInteger(as: UInt32.self)!
            let clock = f.readInteger(as: UInt64.self)!
            let state32 = f.readInteger(as: UInt32.self)!
            let extraSize = f.readInteger(as: UInt32.self)!
            guard extraSize <= maxExtraData else {
                throw ImageFormatError(
                    .invalidImage,
                    path: path,
                    offset: entryStart + 36,
                    message: "snapshot \(index) has \(extraSize) bytes of extra data (limit 1024)"
                )
            }
            var e = ByteReader(try bytes(UInt64(extraSize)))
            var vmState = UInt64(state32)
            var size = header.virtualSize
            if extraSize >= 8 { vmState = e.readInteger(as: UInt64.self)! }
            if extraSize >= 16 { size = e.readInteger(as: UInt64.self)! }
            let id = String(decoding: try bytes(UInt64(idLength)), as: UTF8.self)
            let name = String(decoding: try bytes(UInt64(nameLength)), as: UTF8.self)
            let used = position - entryStart
            position += (8 - used % 8) % 8  // padding; the last entry's may be cut by the end of the file
            guard l1Size <= Qcow2Header.maxL1Entries else {
                throw ImageFormatError(
                    .limitExceeded,
                    path: path,
                    offset: entryStart + 8,
                    message: "snapshot '\(name)' has an L1 table of \(l1Size) entries (limit 4 Mi)"
                )
            }
            if l1Size > 0 {
                let (end, overflow) = l1Offset.addingReportingOverflow(UInt64(l1Size) * 8)
                guard l1Offset % cs == 0, l1Offset != 0, !overflow, end <= fileSize else {
                    throw ImageFormatError(
                        .invalidImage,
                        path: path,
                        offset: entryStart,
                        message: "snapshot '\(name)' has its L1 table at \(l1Offset), outside the file or unaligned"
                    )
                }
            }
            guard size <= Qcow2Header.maxVirtualSize else {
                throw ImageFormatError(
                    .limitExceeded,
                    path: path,
                    offset: entryStart + 48,
                    message: "snapshot '\(name)' has a virtual size larger than 2^62"
                )
            }
            result.append(
                Qcow2Snapshot(
                    l1TableOffset: l1Offset,
                    l1Size: l1Size,
                    id: id,
                    name: name,
                    dateSeconds: seconds,
                    dateNanoseconds: nanoseconds,
                    vmClockNanoseconds: clock,
                    vmStateSize: vmState,
                    virtualSize: size
                )
            )
        }
        return (result, min(position, fileSize) - header.snapshotsOffset)
    }
}
