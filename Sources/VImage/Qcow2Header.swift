// Design notes
// ------------
// The qcow2 header, as QEMU writes versions 2 and 3 (qemu/qemu docs/interop/qcow2.txt, "Header"):
//
//   0        4        8                 16       20       24                32       36       40
//   | magic  | version| backing offset  | b.size | c.bits | virtual size    | crypt  | l1 size|
//   40                48                56       60       64                72
//   | l1 table offset | refcount table  | rt.cl. | nb.sn. | snapshots offset|   (v2 ends here)
//   72                80                88                96       100      104  105     header_length
//   | incompatible    | compatible      | autoclear       | rc.ord.| hdr.len| ct | padding |
//
//   then header extensions (u32 type, u32 length, data padded to 8) up to a zero type, and the backing
//   file name (not NUL-terminated) somewhere in the rest of the first cluster.
//
// Every field is untrusted. `decode` checks what a reader needs before anything is read through it:
// sizes against limits, offsets against alignment and the file's size, and the incompatible feature
// bits against the ones handled here (dirty, corrupt, compression type). Unknown incompatible features
// are refused by name when the image's feature name table names them.

import BlockIO

/// The compression algorithm of an image's compressed clusters (header byte 104).
public enum Qcow2CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
}

/// A decoded and validated qcow2 header.
public struct Qcow2Header: Sendable, Hashable {
    public static let magic: [UInt8] = [0x51, 0x46, 0x49, 0xFB]  // "QFI\xfb"

    /// Incompatible feature bits.
    public static let dirtyBit: UInt64 = 1 << 0
    public static let corruptBit: UInt64 = 1 << 1
    public static let externalDataFileBit: UInt64 = 1 << 2
    public static let compressionTypeBit: UInt64 = 1 << 3
    public static let extendedL2Bit: UInt64 = 1 << 4
    /// The incompatible features this reader handles.
    public static let handledIncompatible: UInt64 = dirtyBit | corruptBit | compressionTypeBit

    /// Header extension types.
    public static let endOfExtensions: UInt32 = 0
    public static let backingFormatExtension: UInt32 = 0xE279_2ACA
    public static let featureTableExtension: UInt32 = 0x6803_F857
    public static let bitmapsExtension: UInt32 = 0x2385_2875
    /// The compatible feature bit that lets a writer update refcounts lazily (the dirty bit then means the
    /// refcounts may be wrong in either direction).
    public static let lazyRefcountsBit: UInt64 = 1 << 0

    /// Limits of this implementation (QEMU's are the same or larger, except as noted).
    public static let minClusterBits: UInt32 = 9
    public static let maxClusterBits: UInt32 = 21
    /// 32 MiB of L1 table, as QEMU.
    public static let maxL1Entries: UInt32 = 4 << 20
    /// 8 MiB of refcount table, as QEMU.
    public static let maxRefcountTableBytes: UInt64 = 8 << 20
    public static let maxSnapshots: UInt32 = 65536
    public static let maxBackingNameLength: UInt32 = 1023
    /// Virtual sizes above 2^62 bytes are refused so offset arithmetic has room.
    public static let maxVirtualSize: UInt64 = 1 << 62

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var virtualSize: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64 = 0
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var refcountOrder: UInt32 = 4
    public var headerLength: UInt32
    public var compressionType: Qcow2CompressionType = .zlib

    /// The backing file name as stored (relative names are relative to the image's folder).
    public var backingFile: String? = nil
    /// The backing format from its header extension.
    public var backingFormat: String? = nil
    /// Feature names from the feature name table: (type, bit) -> name.
    public var featureNames: [UInt16: String] = [:]
    /// Every header extension but the backing format, in file order, kept byte for byte so that a header
    /// rewrite (snapshot, resize, rebase) loses none of them.
    public var otherExtensions: [HeaderExtension] = []
    /// Header bytes 104 ..< header_length of a version 3 header (the compression type byte, its padding,
    /// and any field a later version adds), kept for the same reason.
    public var headerTail: [UInt8] = []

    public init(
        version: UInt32,
        backingFileOffset: UInt64,
        backingFileSize: UInt32,
        clusterBits: UInt32,
        virtualSize: UInt64,
        cryptMethod: UInt32,
        l1Size: UInt32,
        l1TableOffset: UInt64,
        refcountTableOffset: UInt64,
        refcountTableClusters: UInt32,
        snapshotCount: UInt32,
        snapshotsOffset: UInt64,
        headerLength: UInt32
    ) {
        self.version = version
        self.backingFileOffset = backingFileOffset
        self.backingFileSize = backingFileSize
        self.clusterBits = clusterBits
        self.virtualSize = virtualSize
        self.cryptMethod = cryptMethod
        self.l1Size = l1Size
        self.l1TableOffset = l1TableOffset
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableClusters = refcountTableClusters
        self.snapshotCount = snapshotCount
        self.snapshotsOffset = snapshotsOffset
        self.headerLength = headerLength
    }

    /// A new, empty version 3 header as qemu 7.2 writes it (112 bytes, zlib, 16-bit refcounts); the
    /// writer fills in the table fields.
    public static func empty(clusterBits: UInt32, virtualSize: UInt64) -> Qcow2Header {
        Qcow2Header(
            version: 3,
            backingFileOffset: 0,
            backingFileSize: 0,
            clusterBits: clusterBits,
            virtualSize: virtualSize,
            cryptMethod: 0,
            l1Size: 0,
            l1TableOffset: 0,
            refcountTableOffset: 0,
            refcountTableClusters: 0,
            snapshotCount: 0,
            snapshotsOffset: 0,
            headerLength: 112
        )
    }

    public var clusterSize: Int { 1 << Int(clusterBits) }
    /// Entries in one L2 table (standard 64-bit entries).
    public var l2Entries: Int { clusterSize / 8 }
    /// Bytes of guest address space one L2 table maps.
    public var bytesPerL2: UInt64 { UInt64(clusterSize) * UInt64(l2Entries) }
    public var isDirty: Bool { incompatibleFeatures & Self.dirtyBit != 0 }
    public var isCorrupt: Bool { incompatibleFeatures & Self.corruptBit != 0 }

    /// L1 entries needed to map `virtualSize` bytes with clusters of `1 << clusterBits`.
    public static func l1Entries(virtualSize: UInt64, clusterBits: UInt32) -> UInt64 {
        let perL2 = UInt64(1) << (2 * UInt64(clusterBits) - 3)
        return virtualSize / perL2 + (virtualSize % perL2 == 0 ? 0 : 1)
    }

    /// Reads and validates the header of the qcow2 file on `file`.
    /// - Throws: `ImageFormatError` naming the field and offset at fault.
    public static func read(from file: any BlockDevice, path: String?) throws -> Qcow2Header {
        let fileSize = file.size
        guard fileSize >= 72 else {
            throw VImageError(
                .invalidImage,
                path: path,
                message: "file is too short (\(fileSize) bytes) for a qcow2 header"
            )
        }
        let peek = try wrapIO(path) { try file.read(count: Int(min(fileSize, 512)), at: 0) }
        var cursor = ByteReader(peek, at: 20)
        let bits = cursor.readInteger(as: UInt32.self) ?? 0
        guard bits >= minClusterBits && bits <= maxClusterBits else {
            throw VImageError(
                .unsupportedFeature,
                path: path,
                offset: 20,
                message: "cluster_bits \(bits) is outside 9...21 (512 B to 2 MiB clusters)"
            )
        }
        let clusterBytes = Int(min(fileSize, UInt64(1) << UInt64(bits)))
        let first = clusterBytes <= peek.count ? peek : try wrapIO(path) { try file.read(count: clusterBytes, at: 0) }
        do {
            return try decode(first, fileSize: fileSize)
        } catch var error as VImageError {
            error.path = path
            throw error
        }
    }

    /// Decodes a header from the image's first cluster (or the whole file if shorter) and validates it
    /// against the file's size.
    public static func decode(_ bytes: [UInt8], fileSize: UInt64) throws -> Qcow2Header {
        func invalid(_ offset: UInt64, _ message: String) -> VImageError {
            VImageError(.invalidImage, offset: offset, message: message)
        }
        var r = ByteReader(bytes)
        guard let magic = r.readBytes(4), magic == Self.magic else { throw invalid(0, "not a qcow2 image (bad magic)") }
        guard let version = r.readInteger(as: UInt32.self), let backingOffset = r.readInteger(as: UInt64.self),
            let backingSize = r.readInteger(as: UInt32.self),
            let clusterBits = r.readInteger(as: UInt32.self), let size = r.readInteger(as: UInt64.self),
            let crypt = r.readInteger(as: UInt32.self),
            let l1Size = r.readInteger(as: UInt32.self), let l1Offset = r.readInteger(as: UInt64.self),
            let rtOffset = r.readInteger(as: UInt64.self),
            let rtClusters = r.readInteger(as: UInt32.self), let snapshotCount = r.readInteger(as: UInt32.self),
            let snapshotsOffset = r.readInteger(as: UInt64.self)
        else { throw invalid(0, "header is truncated") }
        guard version == 2 || version == 3 else {
            throw VImageError(
                .unsupportedFeature,
                offset: 4,
                message: "qcow2 version \(version) is not supported (only 2 and 3)"
            )
        }
        guard clusterBits >= minClusterBits && clusterBits <= maxClusterBits else {
            throw VImageError(
                .unsupportedFeature,
                offset: 20,
                message: "cluster_bits \(clusterBits) is outside 9...21"
            )
        }
        var h = Qcow2Header(
            version: version,
            backingFileOffset: backingOffset,
            backingFileSize: backingSize,
            clusterBits: clusterBits,
            virtualSize: size,
            cryptMethod: crypt,
            l1Size: l1Size,
            l1TableOffset: l1Offset,
            refcountTableOffset: rtOffset,
            refcountTableClusters: rtClusters,
            snapshotCount: snapshotCount,
            snapshotsOffset: snapshotsOffset,
            headerLength: 72
        )
        let cs = UInt64(h.clusterSize)
        if version >= 3 {
            guard let incompatible = r.readInteger(as: UInt64.self), let compatible = r.readInteger(as: UInt64.self),
                let autoclear = r.readInteger(as: UInt64.self),
                let order = r.readInteger(as: UInt32.self), let length = r.readInteger(as: UInt32.self)
            else { throw invalid(72, "version 3 header is truncated") }
            h.incompatibleFeatures = incompatible
            h.compatibleFeatures = compatible
            h.autoclearFeatures = autoclear
            h.refcountOrder = order
            h.headerLength = length
            guard length >= 104, length % 8 == 0, UInt64(length) <= cs, Int(length) <= bytes.count else {
                throw invalid(100, "header_length \(length) must be a multiple of 8 from 104 to the cluster size")
            }
            guard order <= 6 else { throw invalid(96, "refcount_order \(order) is larger than 6") }
            if length > 104 {
                h.headerTail = Array(bytes[104..<Int(length)])
                let raw = bytes[104]
                guard let type = Qcow2CompressionType(rawValue: raw) else {
                    throw VImageError(.unsupportedFeature, offset: 104, message: "unknown compression type \(raw)")
                }
                h.compressionType = type
            }
        }
        // Header extensions: bounded by the first cluster (every extension takes at least 8 bytes).
        var position = Int(h.headerLength)
        var seen = Set<UInt32>()
        while true {
            var e = ByteReader(bytes, at: position)
            guard let type = e.readInteger(as: UInt32.self), let length = e.readInteger(as: UInt32.self) else {
                if version >= 3 { throw invalid(UInt64(position), "header extensions run past the first cluster") }
                break  // a version 2 header may end without an end marker
            }
            if type == endOfExtensions { break }
            guard UInt64(length) <= cs, let data = e.readBytes(Int(length)) else {
                throw invalid(
                    UInt64(position),
                    "header extension 0x\(String(type, radix: 16)) of \(length) bytes runs past the first cluster"
                )
            }
            guard seen.insert(type).inserted else {
                throw invalid(UInt64(position), "header extension 0x\(String(type, radix: 16)) appears twice")
            }
            switch type {
            case backingFormatExtension:
                h.backingFormat = String(decoding: data, as: UTF8.self)
            case featureTableExtension:
                var t = ByteReader(data)
                while t.remaining >= 48, let kind = t.readInteger(as: UInt8.self),
                    let bit = t.readInteger(as: UInt8.self), let name = t.readBytes(46)
                {
                    let text = String(decoding: name.prefix { $0 != 0 }, as: UTF8.self)
                    h.featureNames[UInt16(kind) << 8 | UInt16(bit)] = text
                }
            default:
                break  // unknown extensions may be ignored (encryption is refused by crypt_method)
            }
            if type != backingFormatExtension { h.otherExtensions.append(HeaderExtension(type: type, data: data)) }
            position += 8 + (Int(length) + 7) / 8 * 8
        }
        try h.validate(fileSize: fileSize, firstCluster: bytes)
        return h
    }

    private mutating func validate(fileSize: UInt64, firstCluster bytes: [UInt8]) throws {
        func invalid(_ offset: UInt64, _ message: String) -> VImageError {
            VImageError(.invalidImage, offset: offset, message: message)
        }
        let cs = UInt64(clusterSize)
        let unknown = incompatibleFeatures & ~Self.handledIncompatible
        if unknown != 0 {
            let bit = unknown.trailingZeroBitCount
            let name: String
            switch UInt64(1) << UInt64(bit) {
            case Self.externalDataFileBit: name = "external data file"
            case Self.extendedL2Bit: name = "extended L2 entries (subclusters)"
            default: name = featureNames[UInt16(bit)].map { "'\($0)'" } ?? "bit \(bit)"
            }
            throw VImageError(
                .unsupportedFeature,
                offset: 72,
                message: "unsupported incompatible feature: \(name)"
            )
        }
        if incompatibleFeatures & Self.compressionTypeBit != 0 {
            guard headerLength > 104, compressionType != .zlib else {
                throw invalid(104, "the compression type bit is set but the compression_type field is zlib or missing")
            }
        } else if compressionType != .zlib {
            throw invalid(104, "compression_type \(compressionType.rawValue) needs the compression type feature bit")
        }
        guard cryptMethod == 0 else {
            throw VImageError(
                .unsupportedFeature,
                offset: 32,
                message: "encrypted images are not supported (crypt_method \(cryptMethod))"
            )
        }
        guard virtualSize <= Self.maxVirtualSize else {
            throw VImageError(
                .limitExceeded,
                offset: 24,
                message: "virtual size \(virtualSize) is larger than 2^62 bytes"
            )
        }
        guard l1Size <= Self.maxL1Entries else {
            throw VImageError(
                .limitExceeded,
                offset: 36,
                message: "L1 table of \(l1Size) entries is larger than 32 MiB"
            )
        }
        guard UInt64(l1Size) >= Self.l1Entries(virtualSize: virtualSize, clusterBits: clusterBits) else {
            throw invalid(36, "L1 table of \(l1Size) entries is too small for a virtual size of \(virtualSize) bytes")
        }
        if l1Size > 0 {
            guard l1TableOffset % cs == 0, l1TableOffset != 0 else {
                throw invalid(40, "L1 table offset \(l1TableOffset) is not cluster aligned")
            }
            let (end, overflow) = l1TableOffset.addingReportingOverflow(UInt64(l1Size) * 8)
            guard !overflow, end <= fileSize else {
                throw invalid(
                    40,
                    "L1 table at \(l1TableOffset) (\(l1Size) entries) lies past the end of the file (\(fileSize) bytes)"
                )
            }
        }
        guard refcountTableOffset % cs == 0 else {
            throw invalid(48, "refcount table offset \(refcountTableOffset) is not cluster aligned")
        }
        guard UInt64(refcountTableClusters) * cs <= Self.maxRefcountTableBytes else {
            throw VImageError(
                .limitExceeded,
                offset: 56,
                message: "refcount table of \(refcountTableClusters) clusters is larger than 8 MiB"
            )
        }
        let (rtEnd, rtOverflow) = refcountTableOffset.addingReportingOverflow(UInt64(refcountTableClusters) * cs)
        guard !rtOverflow, rtEnd <= fileSize else {
            throw invalid(
                48,
                "refcount table at \(refcountTableOffset) lies past the end of the file (\(fileSize) bytes)"
            )
        }
        guard snapshotCount <= Self.maxSnapshots else {
            throw VImageError(
                .limitExceeded,
                offset: 60,
                message: "\(snapshotCount) snapshots are more than \(Self.maxSnapshots)"
            )
        }
        if snapshotCount > 0 {
            guard snapshotsOffset % cs == 0, snapshotsOffset != 0, snapshotsOffset < fileSize else {
                throw invalid(64, "snapshot table offset \(snapshotsOffset) is not a cluster inside the file")
            }
        }
        if backingFileOffset != 0 {
            guard backingFileSize <= Self.maxBackingNameLength, backingFileSize > 0 else {
                throw invalid(16, "backing file name length \(backingFileSize) is not 1...1023")
            }
            let (end, overflow) = backingFileOffset.addingReportingOverflow(UInt64(backingFileSize))
            guard !overflow, end <= cs, end <= UInt64(bytes.count) else {
                throw invalid(8, "backing file name at \(backingFileOffset) lies outside the first cluster")
            }
            let start = Int(backingFileOffset)
            backingFile = String(decoding: bytes[start..<start + Int(backingFileSize)], as: UTF8.self)
        }
    }

    /// Encodes the header as its version lays it out: the fields (72 bytes in version 2, `header_length`
    /// bytes in version 3, with the compression type byte at 104 when the header is that long), the backing
    /// format extension, every other extension as read, the end marker and the backing file name. The
    /// backing file name offset is computed here.
    public func encode() -> [UInt8] {
        var extensions = ByteWriter()
        func write(_ type: UInt32, _ data: [UInt8]) {
            extensions.write(type)
            extensions.write(UInt32(data.count))
            extensions.write(data)
            extensions.pad(toMultipleOf: 8)
        }
        if let backingFormat { write(Self.backingFormatExtension, Array(backingFormat.utf8)) }
        for e in otherExtensions { write(e.type, e.data) }
        extensions.write(UInt32(0))
        extensions.write(UInt32(0))
        let fieldsLength = version >= 3 ? max(104, Int(headerLength)) : 72
        let name = backingFile.map { Array($0.utf8) } ?? []
        let nameOffset: UInt64 = name.isEmpty ? 0 : UInt64(fieldsLength + extensions.bytes.count)
        var w = ByteWriter()
        w.write(Self.magic)
        w.write(version)
        w.write(nameOffset)
        w.write(UInt32(name.count))
        w.write(clusterBits)
        w.write(virtualSize)
        w.write(UInt32(0))
        w.write(l1Size)
        w.write(l1TableOffset)
        w.write(refcountTableOffset)
        w.write(refcountTableClusters)
        w.write(snapshotCount)
        w.write(snapshotsOffset)
        if version >= 3 {
            w.write(incompatibleFeatures)
            w.write(compatibleFeatures)
            w.write(autoclearFeatures)
            w.write(refcountOrder)
            w.write(UInt32(fieldsLength))
            if fieldsLength > 104 {
                var tail = headerTail + [UInt8](repeating: 0, count: max(0, fieldsLength - 104 - headerTail.count))
                tail[0] = compressionType.rawValue
                w.write(Array(tail.prefix(fieldsLength - 104)))
            }
        }
        w.write(extensions.bytes)
        w.write(name)
        return w.bytes
    }
}
