// Design notes
// ------------
// The header is the first 96 bytes of cluster 0, followed by type-length-value extensions that must end
// inside cluster 0. See docs/FORMAT.md, "Header". Decoding only parses; `validate(fileSize:)` applies the
// limits, so a hostile header is rejected with a precise message and never drives an allocation.
//
//   0        8        16       24        32       40        48       56    60    64
//   | magic  |version |hdr_size|clus_bits| virtual_size     | incompatible_features | ...
//
// Fixed fields are rewritten in place with one 96-byte write (inside one sector, so it cannot tear);
// the extension area is rewritten only when it changes (create, rebase).

import BlockIO

/// Incompatible feature bits: a reader that does not know a set bit must refuse the image.
public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    /// Not closed cleanly: refcounts may be too high (leaked clusters), never too low.
    public static let dirty = IncompatibleFeatures(rawValue: 1 << 0)
    /// Metadata was found inconsistent; writes are refused until `vimg check -r all`.
    public static let corrupt = IncompatibleFeatures(rawValue: 1 << 1)
    /// Reserved for a metadata journal (not implemented in v1: refused).
    public static let journal = IncompatibleFeatures(rawValue: 1 << 2)
    /// End-to-end checksums of every 4 KiB block (docs/FORMAT.md, "End-to-end checksums").
    public static let checksums = IncompatibleFeatures(rawValue: 1 << 3)
    /// The bits this implementation understands.
    public static let known: IncompatibleFeatures = [.dirty, .corrupt, .checksums]
}

/// Autoclear feature bits: a writer that does not maintain a set bit's data clears it.
public enum AutoclearFeatures {
    /// The persistent dirty bitmaps were maintained by the last writer.
    public static let bitmaps: UInt64 = 1 << 0
    /// The bits this implementation maintains (kept when it writes metadata).
    public static let maintained: UInt64 = bitmaps
}

/// A header extension, kept as raw bytes so unknown types survive a header rewrite.
public struct HeaderExtension: Sendable, Hashable {
    public var type: UInt32
    public var data: [UInt8]

    public static let backingFileName: UInt32 = 1
    public static let backingFileFormat: UInt32 = 2
    public static let bitmapDirectory: UInt32 = 3
    public static let featureNameTable: UInt32 = 6
    public static let imageUUID: UInt32 = 7

    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

/// The VIMG header: fixed fields and extensions.
public struct ImageHeader: Sendable, Hashable {
    public static let magicBytes: [UInt8] = [0x56, 0x49, 0x4D, 0x47]  // "VIMG"
    public static let magic: UInt32 = 0x5649_4D47
    public static let currentVersion: UInt32 = 1
    public static let fixedSize = 96

    // Limits a reader enforces (docs/FORMAT.md, "Limits").
    public static let minClusterBits: UInt32 = 12
    public static let maxClusterBits: UInt32 = 21
    public static let maxVirtualSize: UInt64 = 1 << 56
    public static let maxL1Entries: UInt32 = 1 << 22
    public static let maxRefcountTableEntries: UInt64 = 1 << 22
    public static let maxSnapshots: UInt32 = 65536
    public static let maxSnapshotTableSize: UInt32 = 64 << 20
    public static let maxBackingNameLength = 4095

    public var version: UInt32 = currentVersion
    public var headerSize: UInt32 = UInt32(fixedSize)
    public var clusterBits: UInt32
    public var virtualSize: UInt64
    public var incompatibleFeatures: IncompatibleFeatures = []
    public var compatibleFeatures: UInt64 = 0
    public var autoclearFeatures: UInt64 = 0
    public var l1TableOffset: HostOffset
    public var l1Size: UInt32
    public var refcountOrder: UInt32 = 4
    public var refcountTableOffset: HostOffset
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32 = 0
    public var snapshotTableOffset: HostOffset = .zero
    public var snapshotTableSize: UInt32 = 0
    public var extensions: [HeaderExtension] = []

    public init(
        clusterBits: UInt32,
        virtualSize: UInt64,
        l1TableOffset: HostOffset,
        l1Size: UInt32,
        refcountTableOffset: HostOffset,
        refcountTableClusters: UInt32
    ) {
        self.clusterBits = clusterBits
        self.virtualSize = virtualSize
        self.l1TableOffset = l1TableOffset
        self.l1Size = l1Size
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableClusters = refcountTableClusters
    }

    public var geometry: ClusterGeometry { ClusterGeometry(clusterBits: Int(clusterBits)) }
    public var clusterSize: Int { 1 << Int(clusterBits) }

    /// The backing file name from its extension, if the image is a clone.
    public var backingFileName: String? {
        get {
            extensions.first { $0.type == HeaderExtension.backingFileName }.map {
                String(decoding: $0.data, as: UTF8.self)
            }
        }
        set { replaceExtension(HeaderExtension.backingFileName, newValue.map { Array($0.utf8) }) }
    }

    /// The backing file format from its extension ("vimg", "raw", "qcow2"), if given.
    public var backingFileFormat: String? {
        get {
            extensions.first { $0.type == HeaderExtension.backingFileFormat }.map {
                String(decoding: $0.data, as: UTF8.self)
            }
        }
        set { replaceExtension(HeaderExtension.backingFileFormat, newValue.map { Array($0.utf8) }) }
    }

    /// The 96 fixed bytes: what an in-place header update writes.
    public func encodeFixed() -> [UInt8] {
        var bytes = encodeFixedFields()
        if incompatibleFeatures.contains(.checksums) {
            let sum = checksum(fixed: bytes, extensionArea: encodeExtensions())
            bytes.replaceSubrange(
                92..<96,
                with: [UInt8(sum >> 24), UInt8((sum >> 16) & 0xFF), UInt8((sum >> 8) & 0xFF), UInt8(sum & 0xFF)]
            )
        }
        return bytes
    }

    /// The header's own checksum (bytes 92 - 95 with checksums on): CRC32C of bytes 0 - 91 and of the
    /// extension area through its end marker, so the header protects itself and cluster 0 needs no entry
    /// in the checksum table.
    func checksum(fixed: [UInt8], extensionArea: [UInt8]) -> UInt32 {
        CRC32C.checksum(extensionArea, continuing: CRC32C.checksum(Array(fixed[0..<92])))
    }

    private func encodeFixedFields() -> [UInt8] {
        var w = ByteWriter(capacity: Self.fixedSize)
        w.write(Self.magic)
        w.write(version)
        w.write(UInt32(Self.fixedSize))
        w.write(clusterBits)
        w.write(virtualSize)
        w.write(incompatibleFeatures.rawValue)
        w.write(compatibleFeatures)
        w.write(autoclearFeatures)
        w.write(l1TableOffset.rawValue)
        w.write(l1Size)
        w.write(refcountOrder)
        w.write(refcountTableOffset.rawValue)
        w.write(refcountTableClusters)
        w.write(snapshotCount)
        w.write(snapshotTableOffset.rawValue)
        w.write(snapshotTableSize)
        w.write(UInt32(0))
        return w.bytes
    }

    /// Fixed fields plus the extension list and its end marker.
    public func encode() -> [UInt8] { encodeFixed() + encodeExtensions() }

    /// The extension list and its end marker (what follows the fixed header).
    func encodeExtensions() -> [UInt8] {
        var w = ByteWriter(capacity: 512)
        for ext in extensions {
            w.write(ext.type)
            w.write(UInt32(ext.data.count))
            w.write(ext.data)
            w.pad(toMultipleOf: 8)
        }
        w.write(UInt32(0))
        w.write(UInt32(0))
        return w.bytes
    }

    /// Parses a header from the start of cluster 0 (pass at least the first cluster, or the whole file if
    /// shorter). Checks structure only; call `validate(fileSize:)` before trusting any field.
    /// - Throws: `VImageError.invalidImage` / `.unsupportedFeature`.
    public static func decode(_ bytes: [UInt8]) throws -> ImageHeader {
        var r = ByteReader(bytes)
        guard let magic = r.readInteger(as: UInt32.self) else {
            throw VImageError(.invalidImage, offset: 0, message: "file too short for a VIMG header")
        }
        guard magic == Self.magic else {
            throw VImageError(.invalidImage, offset: 0, message: "not a VIMG image (bad magic)")
        }
        guard let version = r.readInteger(as: UInt32.self), let headerSize = r.readInteger(as: UInt32.self),
            let clusterBits = r.readInteger(as: UInt32.self), let virtualSize = r.readInteger(as: UInt64.self),
            let incompatible = r.readInteger(as: UInt64.self), let compatible = r.readInteger(as: UInt64.self),
            let autoclear = r.readInteger(as: UInt64.self), let l1Offset = r.readInteger(as: UInt64.self),
            let l1Size = r.readInteger(as: UInt32.self), let refcountOrder = r.readInteger(as: UInt32.self),
            let rtOffset = r.readInteger(as: UInt64.self), let rtClusters = r.readInteger(as: UInt32.self),
            let snapshotCount = r.readInteger(as: UInt32.self), let snapshotOffset = r.readInteger(as: UInt64.self),
            let snapshotSize = r.readInteger(as: UInt32.self), r.readInteger(as: UInt32.self) != nil
        else {
            throw VImageError(.invalidImage, offset: 0, message: "truncated VIMG header")
        }
        guard version == currentVersion else {
            throw VImageError(
                .unsupportedFeature,
                offset: 4,
                message: "unsupported VIMG version \(version) (this build reads version 1)"
            )
        }
        guard clusterBits >= minClusterBits, clusterBits <= maxClusterBits else {
            throw VImageError(.invalidImage, offset: 12, message: "cluster_bits \(clusterBits) is outside 12...21")
        }
        let clusterSize = 1 << Int(clusterBits)
        // Version 1 has exactly 96 fixed bytes; new fields come as extensions or with a new version.
        guard headerSize == UInt32(fixedSize) else {
            throw VImageError(.invalidImage, offset: 8, message: "header_size \(headerSize) is not \(fixedSize)")
        }
        let unknown = IncompatibleFeatures(rawValue: incompatible).subtracting(.known)
        guard unknown.isEmpty else {
            // Name the bits from the image's own feature name table when it has one (best effort).
            var named = ImageHeader(
                clusterBits: clusterBits,
                virtualSize: 0,
                l1TableOffset: .zero,
                l1Size: 0,
                refcountTableOffset: .zero,
                refcountTableClusters: 0
            )
            let parsed = try? parseExtensions(bytes, from: Int(headerSize), clusterSize: clusterSize)
            named.extensions = parsed?.records ?? []
            let names = (0..<64).filter { unknown.rawValue & (1 << UInt64($0)) != 0 }.map { bit in
                let name = named.featureNames.first { $0.kind == .incompatible && Int($0.bit) == bit }?.name
                return "bit \(bit)" + (name.map { " (\($0))" } ?? "")
            }
            throw VImageError(
                .unsupportedFeature,
                offset: 24,
                message: "image uses unsupported incompatible features: \(names.joined(separator: ", "))"
            )
        }
        var header = ImageHeader(
            clusterBits: clusterBits,
            virtualSize: virtualSize,
            l1TableOffset: HostOffset(l1Offset),
            l1Size: l1Size,
            refcountTableOffset: HostOffset(rtOffset),
            refcountTableClusters: rtClusters
        )
        header.version = version
        header.headerSize = headerSize
        header.incompatibleFeatures = IncompatibleFeatures(rawValue: incompatible)
        header.compatibleFeatures = compatible
        header.autoclearFeatures = autoclear
        header.refcountOrder = refcountOrder
        header.snapshotCount = snapshotCount
        header.snapshotTableOffset = HostOffset(snapshotOffset)
        header.snapshotTableSize = snapshotSize

        let (extensions, extensionEnd) = try parseExtensions(bytes, from: Int(headerSize), clusterSize: clusterSize)
        header.extensions = extensions
        if header.incompatibleFeatures.contains(.checksums) {
            guard header.checksumTableData != nil else {
                throw VImageError(
                    .invalidImage,
                    offset: 24,
                    message: "the checksums bit is set but there is no checksum table extension"
                )
            }
            let stored = UInt32(bytes[92]) << 24 | UInt32(bytes[93]) << 16 | UInt32(bytes[94]) << 8 | UInt32(bytes[95])
            // The bytes as stored, not a re-encoding: a flip in a byte the parser skips (the end marker's
            // length, padding) must still fail the checksum.
            let area = Array(bytes[(Int(headerSize) + 7) & ~7..<extensionEnd])
            guard stored == header.checksum(fixed: Array(bytes[0..<96]), extensionArea: area)
            else {
                throw VImageError(.corrupt, offset: 92, message: "the header fails its own checksum")
            }
        }
        return header
    }

    /// Extensions: type-length-value records from `headerSize` (rounded up to 8) to the end marker; `end` is
    /// the offset just past the end marker.
    static func parseExtensions(
        _ bytes: [UInt8],
        from headerSize: Int,
        clusterSize: Int
    ) throws -> (records: [HeaderExtension], end: Int) {
        var extensions: [HeaderExtension] = []
        let limit = min(bytes.count, clusterSize)
        var position = (headerSize + 7) & ~7
        while true {
            guard position + 8 <= limit else {
                throw VImageError(
                    .invalidImage,
                    offset: UInt64(position),
                    message: "header extensions run past cluster 0"
                )
            }
            var er = ByteReader(bytes, at: position)
            let type = er.readInteger(as: UInt32.self)!
            let length = Int(er.readInteger(as: UInt32.self)!)
            if type == 0 { return (extensions, position + 8) }
            let padded = (length + 7) & ~7
            guard length <= limit, position + 8 + padded <= limit, let data = er.readBytes(length) else {
                throw VImageError(
                    .invalidImage,
                    offset: UInt64(position),
                    message: "header extension \(type) of \(length) bytes runs past cluster 0"
                )
            }
            if type == HeaderExtension.backingFileName {
                guard length > 0, length <= maxBackingNameLength, !data.contains(0) else {
                    throw VImageError(
                        .invalidImage,
                        offset: UInt64(position),
                        message: "backing file name of \(length) bytes is invalid"
                    )
                }
            }
            extensions.append(HeaderExtension(type: type, data: data))
            position += 8 + padded
        }
    }

    /// Reads, decodes and validates the header of the image stored on `host` (what `vimg info` shows).
    /// - Throws: `VImageError` naming the offending field, with `path` set.
    public static func read(from host: any BlockDevice, path: String? = nil) throws -> ImageHeader {
        try wrapIO(path) {
            do {
                let fileSize = host.size
                let header = try decode(try readHeaderCluster(host, fileSize: fileSize))
                try header.validate(fileSize: fileSize)
                return header
            } catch var error as VImageError {
                error.path = path
                throw error
            }
        }
    }

    /// Checks every field against the format's limits and the file size, with overflow-checked arithmetic.
    /// - Throws: `VImageError.invalidImage` naming the field.
    public func validate(fileSize: UInt64) throws {
        let geometry = self.geometry
        let clusterSize = UInt64(geometry.clusterSize)
        func fail(_ field: Int, _ message: String) -> VImageError {
            VImageError(.invalidImage, offset: UInt64(field), message: message)
        }
        guard refcountOrder == 4 else { throw fail(60, "refcount_order \(refcountOrder) is not supported (must be 4)") }
        guard virtualSize <= Self.maxVirtualSize else {
            throw fail(16, "virtual size \(virtualSize) exceeds the 2^56 limit")
        }
        guard virtualSize % 512 == 0 else { throw fail(16, "virtual size \(virtualSize) is not a multiple of 512") }
        guard l1Size <= Self.maxL1Entries else {
            throw fail(56, "L1 table of \(l1Size) entries exceeds the limit of \(Self.maxL1Entries)")
        }
        guard UInt64(l1Size) >= geometry.l1Entries(forVirtualSize: virtualSize) else {
            throw fail(56, "L1 table of \(l1Size) entries cannot map a virtual size of \(virtualSize)")
        }
        try checkTable(
            fileSize,
            field: 48,
            name: "L1 table",
            offset: l1TableOffset.rawValue,
            bytes: UInt64(l1Size) * 8,
            allowEmpty: true
        )
        guard refcountTableClusters >= 1,
            UInt64(refcountTableClusters) * clusterSize / 8 <= Self.maxRefcountTableEntries
        else { throw fail(72, "refcount table of \(refcountTableClusters) clusters is outside the limits") }
        try checkTable(
            fileSize,
            field: 64,
            name: "refcount table",
            offset: refcountTableOffset.rawValue,
            bytes: UInt64(refcountTableClusters) * clusterSize,
            allowEmpty: false
        )
        guard snapshotCount <= Self.maxSnapshots else {
            throw fail(76, "\(snapshotCount) snapshots exceed the limit of \(Self.maxSnapshots)")
        }
        guard snapshotTableSize <= Self.maxSnapshotTableSize else {
            throw fail(88, "snapshot table of \(snapshotTableSize) bytes exceeds the limit")
        }
        if snapshotCount == 0 {
            guard snapshotTableOffset.rawValue == 0, snapshotTableSize == 0 else {
                throw fail(80, "snapshot table fields are set but snapshot_count is 0")
            }
        } else {
            guard snapshotTableSize >= 40 * snapshotCount else {
                throw fail(88, "snapshot table is too small for \(snapshotCount) snapshots")
            }
            try checkTable(
                fileSize,
                field: 80,
                name: "snapshot table",
                offset: snapshotTableOffset.rawValue,
                bytes: UInt64(snapshotTableSize),
                allowEmpty: false
            )
        }
    }

    private func checkTable(
        _ fileSize: UInt64,
        field: Int,
        name: String,
        offset: UInt64,
        bytes: UInt64,
        allowEmpty: Bool
    ) throws {
        guard geometry.isAligned(offset) else {
            throw VImageError(
                .invalidImage,
                offset: UInt64(field),
                message: "\(name) offset 0x\(String(offset, radix: 16)) is not cluster aligned"
            )
        }
        if bytes == 0 && allowEmpty { return }
        guard offset != 0 else {
            throw VImageError(.invalidImage, offset: UInt64(field), message: "\(name) overlaps the header")
        }
        let (end, overflow) = offset.addingReportingOverflow(bytes)
        guard !overflow, end <= fileSize else {
            throw VImageError(
                .invalidImage,
                offset: UInt64(field),
                message:
                    "\(name) at 0x\(String(offset, radix: 16)) (\(bytes) bytes) lies outside the file (\(fileSize) bytes)"
            )
        }
    }
}
