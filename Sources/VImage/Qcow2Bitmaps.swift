// Design notes
// ------------
// qcow2's persistent dirty bitmaps (the bitmaps extension of qemu's docs/interop/qcow2.txt), read only to
// find the clusters they hold. vdisk does not maintain them (a writer refuses such an image), but a check
// must count those clusters as referenced: otherwise it reports them as leaks and `check -r` frees them,
// destroying a user's backup chain.
//
//   extension (24 bytes): nb_bitmaps u32 | reserved u32 | directory_size u64 | directory_offset u64
//   directory entry:      table_offset u64 | table_size u32 (entries) | flags u32 | type u8 |
//                         granularity_bits u8 | name_size u16 | extra_data_size u32 | extra | name | pad to 8
//   table entry:          bits 9-55 the host offset of a cluster of bits (0: all zeroes or all ones)
//
// Every field is untrusted: counts, sizes and offsets are checked against qemu's limits and the file.

import BlockIO

/// The host clusters a qcow2 image's persistent bitmaps hold.
public struct Qcow2BitmapClusters: Sendable {
    /// The directory and each bitmap table: host offset and length in bytes.
    public var tables: [(offset: UInt64, length: UInt64, what: String)] = []
    /// The clusters of bits the tables name.
    public var data: [(offset: UInt64, what: String)] = []

    static let maxBitmaps = 65535
    static let maxDirectorySize: UInt64 = 64 << 20
    static let maxTableEntries: UInt32 = 0x800_0000
    static let maxNameLength = 1023

    /// Reads the directory and tables the bitmaps extension `data` names.
    /// - Throws: `VImageError.invalidImage` naming the first field that breaks a limit or leaves the file.
    public static func read(
        extension data: [UInt8],
        host: any BlockDevice,
        clusterSize: Int
    ) throws -> Qcow2BitmapClusters {
        let fileSize = host.size
        let cs = UInt64(clusterSize)
        func invalid(_ message: String) -> VImageError {
            VImageError(.invalidImage, message: "qcow2 bitmaps: \(message)")
        }
        func inside(_ offset: UInt64, _ length: UInt64) -> Bool {
            let (end, overflow) = offset.addingReportingOverflow(length)
            return !overflow && offset % cs == 0 && offset != 0 && end <= fileSize
        }
        var r = ByteReader(data)
        guard let count = r.readInteger(as: UInt32.self), r.skip(4),
            let directorySize = r.readInteger(as: UInt64.self), let directoryOffset = r.readInteger(as: UInt64.self)
        else { throw invalid("the extension is shorter than 24 bytes") }
        var result = Qcow2BitmapClusters()
        guard count > 0 else { return result }
        guard count <= maxBitmaps, directorySize <= maxDirectorySize else {
            throw invalid("\(count) bitmaps in a \(directorySize)-byte directory exceed qemu's limits")
        }
        guard inside(directoryOffset, directorySize) else {
            throw invalid("the directory at 0x\(String(directoryOffset, radix: 16)) is misaligned or outside the file")
        }
        result.tables.append((directoryOffset, directorySize, "bitmap directory"))
        let directory = try host.read(count: Int(directorySize), at: directoryOffset)
        var d = ByteReader(directory)
        for i in 0..<Int(count) {
            guard let tableOffset = d.readInteger(as: UInt64.self), let tableSize = d.readInteger(as: UInt32.self),
                d.skip(6), let nameSize = d.readInteger(as: UInt16.self),
                let extraSize = d.readInteger(as: UInt32.self), Int(nameSize) <= maxNameLength,
                extraSize <= UInt32(maxDirectorySize), d.skip(Int(extraSize) + Int(nameSize))
            else { throw invalid("directory entry \(i) runs past the directory or breaks a limit") }
            _ = d.skip((8 - d.index % 8) % 8)
            guard tableSize <= maxTableEntries else { throw invalid("bitmap \(i): a table of \(tableSize) entries") }
            guard tableSize > 0 else { continue }
            let tableBytes = UInt64(tableSize) * 8
            guard inside(tableOffset, tableBytes) else {
                throw invalid(
                    "bitmap \(i): the table at 0x\(String(tableOffset, radix: 16)) is misaligned or outside the file"
                )
            }
            result.tables.append((tableOffset, tableBytes, "bitmap \(i) table"))
            let table = try host.read(count: Int(tableBytes), at: tableOffset).withUnsafeBytes {
                decodeTable($0, as: UInt64.self)
            }
            for (j, entry) in table.enumerated() {
                let offset = entry & 0x00FF_FFFF_FFFF_FE00
                if offset != 0 { result.data.append((offset, "bitmap \(i) data cluster \(j)")) }
            }
        }
        return result
    }
}
