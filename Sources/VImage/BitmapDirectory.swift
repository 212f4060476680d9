// Design notes
// ------------
// The on-disk structures of persistent dirty bitmaps (docs/FORMAT.md, "Persistent dirty bitmaps"):
//
//   header extension 3 (bytes 96-127, in the first sector with the fixed header)
//     | count u32 | reserved u32 | directory offset u64 | directory size u64 |
//   directory: one entry per bitmap, each a multiple of 8 bytes
//     | table offset u64 | table size u32 | flags u32 | granularity bits u8 | 0 | name size u16 | 0 u32 | name |
//   table: one u64 per cluster's worth of bits: 0 all clean, 1 all dirty, else a bits cluster's offset
//
// Everything here is parsed as hostile: a bad directory makes the bitmaps unusable, never the image
// unreadable, so decoding reports problems instead of throwing.

import BlockIO

/// The bitmap directory extension's data (type 3).
public struct BitmapDirectoryPointer: Sendable, Hashable {
    public var count: UInt32
    public var offset: HostOffset
    public var size: UInt64

    public static let length = 24
    public static let maxCount: UInt32 = 1024
    public static let maxSize: UInt64 = 1 << 20

    public static let empty = BitmapDirectoryPointer(count: 0, offset: .zero, size: 0)

    public init(count: UInt32, offset: HostOffset, size: UInt64) {
        self.count = count
        self.offset = offset
        self.size = size
    }

    func encode() -> [UInt8] {
        var w = ByteWriter(capacity: Self.length)
        w.write(count)
        w.write(UInt32(0))
        w.write(offset.rawValue)
        w.write(size)
        return w.bytes
    }

    /// The pointer, or why it is unusable.
    static func decode(
        _ data: [UInt8],
        clusterSize: Int,
        fileSize: UInt64
    ) -> Result<BitmapDirectoryPointer, BitmapProblem> {
        var r = ByteReader(data)
        guard data.count == length, let count = r.readInteger(as: UInt32.self), r.readInteger(as: UInt32.self) != nil,
            let offset = r.readInteger(as: UInt64.self), let size = r.readInteger(as: UInt64.self)
        else {
            return .failure(BitmapProblem("bitmap directory extension of \(data.count) bytes is not \(length) bytes"))
        }
        let pointer = BitmapDirectoryPointer(count: count, offset: HostOffset(offset), size: size)
        if count == 0 {
            guard offset == 0, size == 0 else {
                return .failure(BitmapProblem("an empty bitmap directory has an offset or a size"))
            }
            return .success(pointer)
        }
        let (end, overflow) = offset.addingReportingOverflow(size)
        guard count <= maxCount, size <= maxSize, size >= UInt64(count) * 32, offset != 0,
            offset % UInt64(clusterSize) == 0, !overflow, end <= fileSize
        else {
            return .failure(
                BitmapProblem(
                    "bitmap directory (\(count) entries, \(size) bytes at 0x\(String(offset, radix: 16))) is invalid"
                )
            )
        }
        return .success(pointer)
    }
}

/// Why a bitmap structure cannot be used (a `bitmap-directory` finding).
public struct BitmapProblem: Error, Sendable, Hashable {
    public var message: String
    init(_ message: String) { self.message = message }
}

/// One bitmap directory entry.
public struct BitmapEntry: Sendable, Hashable {
    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt32
        public init(rawValue: UInt32) { self.rawValue = rawValue }
        /// A writer may have changed guest data without updating the bits on disk.
        public static let inUse = Flags(rawValue: 1 << 0)
        /// Guest changes are recorded.
        public static let enabled = Flags(rawValue: 1 << 1)
        public static let known: Flags = [.inUse, .enabled]
    }

    public var tableOffset: HostOffset
    public var tableSize: UInt32
    public var flags: Flags
    public var granularityBits: UInt8
    public var name: String

    public static let minGranularityBits: UInt8 = 9
    public static let maxGranularityBits: UInt8 = 31
    public static let maxNameLength = 1023

    /// Granules of `granularityBits` covering `virtualSize`.
    public static func granules(virtualSize: UInt64, granularityBits: UInt8) -> UInt64 {
        let g = UInt64(1) << UInt64(granularityBits)
        return virtualSize / g + (virtualSize % g == 0 ? 0 : 1)
    }

    /// Table entries needed for `virtualSize` (one per cluster's worth of bits).
    public static func tableSize(virtualSize: UInt64, granularityBits: UInt8, clusterSize: Int) -> UInt64 {
        let granules = granules(virtualSize: virtualSize, granularityBits: granularityBits)
        let perCluster = UInt64(clusterSize) * 8
        return (granules + perCluster - 1) / perCluster
    }

    func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: 24 + name.utf8.count + 7)
        w.write(tableOffset.rawValue)
        w.write(tableSize)
        w.write(flags.rawValue)
        w.write(granularityBits)
        w.write(UInt8(0))
        w.write(UInt16(name.utf8.count))
        w.write(UInt32(0))
        w.write(Array(name.utf8))
        w.pad(toMultipleOf: 8)
        return w.bytes
    }

    static func encode(_ entries: [BitmapEntry]) -> [UInt8] { entries.flatMap { $0.encoded() } }

    /// A decoded entry and whether it can be used (the whole directory is unusable when `decode` fails).
    struct Decoded: Sendable {
        var entry: BitmapEntry
        var problem: BitmapProblem?
    }

    /// Decodes `count` entries, checking each against the image (its virtual size, cluster size and file
    /// size). Throws when the directory as a whole cannot be trusted.
    static func decode(
        _ bytes: [UInt8],
        count: Int,
        virtualSize: UInt64,
        clusterSize: Int,
        fileSize: UInt64
    ) throws(BitmapProblem) -> [Decoded] {
        var result: [Decoded] = []
        var names = Set<String>()
        var position = 0
        for index in 0..<count {
            var r = ByteReader(bytes, at: position)
            guard let tableOffset = r.readInteger(as: UInt64.self), let tableSize = r.readInteger(as: UInt32.self),
                let flags = r.readInteger(as: UInt32.self), let bits = r.readInteger(as: UInt8.self),
                r.readInteger(as: UInt8.self) != nil, let nameSize = r.readInteger(as: UInt16.self),
                r.readInteger(as: UInt32.self) != nil, nameSize >= 1, Int(nameSize) <= maxNameLength,
                let nameBytes = r.readBytes(Int(nameSize)), !nameBytes.contains(0),
                let name = String(validating: nameBytes, as: UTF8.self)
            else { throw BitmapProblem("bitmap directory entry \(index) is truncated or has a bad name") }
            guard names.insert(name).inserted else { throw BitmapProblem("bitmap name '\(name)' appears twice") }
            position += (24 + Int(nameSize) + 7) & ~7
            let entry = BitmapEntry(
                tableOffset: HostOffset(tableOffset),
                tableSize: tableSize,
                flags: Flags(rawValue: flags),
                granularityBits: bits,
                name: name
            )
            var problem: BitmapProblem? = nil
            let tableBytes = UInt64(tableSize) * 8
            let (tableEnd, overflow) = tableOffset.addingReportingOverflow(tableBytes)
            if !Flags.known.isSuperset(of: entry.flags) {
                problem = BitmapProblem("bitmap '\(name)' has unknown flags 0x\(String(flags, radix: 16))")
            } else if bits < minGranularityBits || bits > maxGranularityBits {
                problem = BitmapProblem("bitmap '\(name)' has granularity bits \(bits), outside 9...31")
            } else if UInt64(tableSize) != tableSizeFor(entry, virtualSize: virtualSize, clusterSize: clusterSize) {
                problem = BitmapProblem(
                    "bitmap '\(name)' has a table of \(tableSize) entries, not what the disk size needs"
                )
            } else if tableOffset == 0 || tableOffset % UInt64(clusterSize) != 0 || overflow || tableEnd > fileSize {
                problem = BitmapProblem("bitmap '\(name)' has its table outside the file")
            }
            result.append(Decoded(entry: entry, problem: problem))
        }
        guard position <= bytes.count else { throw BitmapProblem("bitmap directory entries run past its size") }
        return result
    }

    private static func tableSizeFor(_ entry: BitmapEntry, virtualSize: UInt64, clusterSize: Int) -> UInt64 {
        tableSize(virtualSize: virtualSize, granularityBits: entry.granularityBits, clusterSize: clusterSize)
    }
}

/// A bitmap table entry (docs/FORMAT.md, "Bitmap table and bits").
enum BitmapTableEntry: Sendable, Hashable {
    case allClean
    case allDirty
    case stored(HostOffset)

    init(raw: UInt64) throws(BitmapProblem) {
        switch raw {
        case 0: self = .allClean
        case 1: self = .allDirty
        default:
            guard raw & ~hostOffsetMask == 0 else {
                throw BitmapProblem("bitmap table entry 0x\(String(raw, radix: 16)) has reserved bits set")
            }
            self = .stored(HostOffset(raw))
        }
    }

    var rawValue: UInt64 {
        switch self {
        case .allClean: return 0
        case .allDirty: return 1
        case .stored(let offset): return offset.rawValue
        }
    }
}

extension ImageHeader {
    /// The bitmap directory extension, if present (its data, not yet validated).
    var bitmapDirectoryData: [UInt8]? {
        extensions.first { $0.type == HeaderExtension.bitmapDirectory }?.data
    }

    /// Puts the bitmap directory extension first in the extension area (docs/FORMAT.md: at byte 96, so
    /// that one write of the first 128 bytes switches it).
    mutating func setBitmapDirectory(_ pointer: BitmapDirectoryPointer) {
        extensions.removeAll { $0.type == HeaderExtension.bitmapDirectory }
        extensions.insert(HeaderExtension(type: HeaderExtension.bitmapDirectory, data: pointer.encode()), at: 0)
    }

    /// Whether the bitmap directory extension is the first extension (so a directory switch is one
    /// write of the first 128 bytes).
    var bitmapDirectoryIsFirst: Bool { extensions.first?.type == HeaderExtension.bitmapDirectory }
}
