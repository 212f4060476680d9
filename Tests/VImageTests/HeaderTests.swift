import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// Round trips of every on-disk structure, and one test per hostile header the reader must refuse.
@Suite struct HeaderTests {
    // MARK: Round trips

    /// Invariant: encode then decode gives back every header field and every extension, unknown ones included.
    @Test func headerRoundTrip() throws {
        var h = ImageHeader(
            clusterBits: 16,
            virtualSize: 10 << 30,
            l1TableOffset: HostOffset(3 << 16),
            l1Size: 20,
            refcountTableOffset: HostOffset(1 << 16),
            refcountTableClusters: 1
        )
        h.incompatibleFeatures = [.dirty]
        h.compatibleFeatures = 0x5
        h.autoclearFeatures = 0x2
        h.snapshotCount = 2
        h.snapshotTableOffset = HostOffset(9 << 16)
        h.snapshotTableSize = 200
        h.backingFileName = "../base image.vimg"
        h.backingFileFormat = "vimg"
        h.extensions.append(HeaderExtension(type: 0x7000_0001, data: [1, 2, 3, 4, 5]))
        let bytes = h.encode()
        #expect(bytes.count % 8 == 0)
        #expect(Array(bytes[0..<4]) == ImageHeader.magicBytes)
        let back = try ImageHeader.decode(bytes + [UInt8](repeating: 0, count: 64))
        #expect(back == h)
        #expect(back.backingFileName == "../base image.vimg")
        #expect(back.extensions.contains(HeaderExtension(type: 0x7000_0001, data: [1, 2, 3, 4, 5])))
        #expect(h.encodeFixed().count == ImageHeader.fixedSize)
    }

    /// Invariant: a new image carries the feature name table and its own random version-4 UUID
    /// (docs/FORMAT.md, extension types 6 and 7); a clone gets a UUID of its own.
    @Test func newImagesHaveFeatureNamesAndAUUID() throws {
        let a = MemoryDevice(size: 0, growable: true)
        let b = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: a, virtualSize: 1 << 20)
        try VImage.create(on: b, virtualSize: 1 << 20, options: .init(backingFile: "a.vimg"))
        let ha = try ImageHeader.read(from: a)
        let hb = try ImageHeader.read(from: b)
        #expect(ha.featureNames == FeatureName.all)
        let uuid = try #require(ha.uuid)
        #expect(uuid.bytes[6] >> 4 == 4 && uuid.bytes[8] >> 6 == 2, "\(uuid)")
        #expect(hb.uuid != nil && hb.uuid != ha.uuid)
        #expect(ha.informationalExtensionProblems.isEmpty)
    }

    /// Invariant: an unknown incompatible bit is refused with its name from the image's own feature name
    /// table, so a newer image tells an older reader what it lacks.
    @Test func unknownIncompatibleBitIsRefusedByName() throws {
        var h = ImageHeader(
            clusterBits: 16,
            virtualSize: 1 << 20,
            l1TableOffset: HostOffset(3 << 16),
            l1Size: 1,
            refcountTableOffset: HostOffset(1 << 16),
            refcountTableClusters: 1
        )
        h.featureNames = FeatureName.all + [FeatureName(kind: .incompatible, bit: 9, name: "future thing")]
        h.incompatibleFeatures = IncompatibleFeatures(rawValue: 1 << 2 | 1 << 9 | 1 << 12)
        #expect {
            try ImageHeader.decode(h.encode() + [UInt8](repeating: 0, count: 64))
        } throws: { error in
            let message = (error as? VImageError)?.message ?? ""
            return (error as? VImageError)?.code == .unsupportedFeature && message.contains("bit 2 (journal)")
                && message.contains("bit 9 (future thing)") && message.contains("bit 12")
        }
    }

    /// Invariant: malformed informational extensions (feature names, UUID) never stop an image from
    /// opening; they read as absent, and `check` reports them as warnings only.
    @Test func malformedInformationalExtensionsAreIgnored() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 20)
        var h = try ImageHeader.read(from: host)
        h.replaceExtension(HeaderExtension.featureNameTable, [0, 1, 2])
        h.replaceExtension(HeaderExtension.imageUUID, [1, 2, 3])
        try host.write(h.encode(), at: 0)
        let image = try VImage.open(host: host, readOnly: true)
        #expect(image.currentHeader.uuid == nil && image.currentHeader.featureNames.isEmpty)
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean)
        #expect(report.findings.filter { $0.kind == "header-extension" }.count == 2, "\(report.findings)")
    }

    /// Invariant: every L1 and L2 entry kind survives raw encoding, and decoding a raw value is stable.
    @Test func tableEntriesRoundTrip() {
        let l1 = L1Entry(l2Table: HostOffset(0x12_3456_0000), copied: true)
        #expect(L1Entry(rawValue: l1.rawValue) == l1)
        #expect(l1.l2Table == HostOffset(0x12_3456_0000) && l1.isCopied && l1.reservedBits == 0)
        #expect(L1Entry.empty.l2Table == nil)
        let entries: [L2Entry] = [
            .unallocated,
            .zero(preallocated: nil, copied: false),
            .zero(preallocated: HostOffset(0x30000), copied: true),
            .normal(HostOffset(0x40000), copied: false),
            .normal(HostOffset(0xFF_FFFF_0000), copied: true),
            .compressed(CompressedDescriptor(hostOffset: 0x50200, sectors: 3)),
            .compressed(
                CompressedDescriptor(hostOffset: 512 * ((1 << 47) - 1), sectors: CompressedDescriptor.maxSectors)
            ),
        ]
        for e in entries {
            #expect(L2Entry(raw: e.rawValue) == e, "\(e)")
            #expect(L2Entry.reservedBits(e.rawValue) == 0, "\(e)")
        }
        #expect(L2Entry.reservedBits(1 << 5) != 0)  // unaligned offset bits are reserved
    }

    /// Invariant: snapshot entries (with extra data and UTF-8 names) decode to what was encoded.
    @Test func snapshotTableRoundTrip() throws {
        var a = SnapshotEntry(
            l1TableOffset: HostOffset(4 << 16),
            l1Size: 2,
            virtualSize: 1 << 30,
            createdNanoseconds: 123,
            id: 1,
            name: "before upgrade"
        )
        a.extra = [9, 8, 7]
        let b = SnapshotEntry(
            l1TableOffset: HostOffset(5 << 16),
            l1Size: 4,
            virtualSize: 2 << 30,
            createdNanoseconds: 456,
            id: 2,
            name: "épreuve"
        )
        let bytes = SnapshotTable.encode([a, b])
        #expect(bytes.count % 8 == 0)
        let back = try SnapshotTable.decode(
            bytes,
            count: 2,
            geometry: ClusterGeometry(clusterBits: 16),
            fileSize: 1 << 20
        )
        #expect(back == [a, b])
    }

    /// Invariant: a freshly created image opens, reports its geometry, and its header decodes and validates.
    @Test func createdImageHeaderValidates() throws {
        for bits in [12, 16, 21] {
            let host = MemoryDevice(size: 0, growable: true)
            try VImage.create(on: host, virtualSize: 3 << 30, options: .init(clusterBits: bits))
            let header = try ImageHeader.decode(try host.read(count: min(Int(host.size), 1 << bits), at: 0))
            try header.validate(fileSize: host.size)
            #expect(header.clusterBits == UInt32(bits) && header.virtualSize == 3 << 30)
            let image = try VImage.open(host: host, readOnly: true)
            #expect(image.size == 3 << 30)
            try image.close()
        }
    }

    // MARK: Hostile headers

    /// A fresh 1 GiB image whose header bytes `mutate` changes before it is opened.
    func openMutated(_ mutate: (inout [UInt8]) -> Void) throws -> VImageError? {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 30)
        var cluster0 = try host.read(count: 1 << 16, at: 0)
        mutate(&cluster0)
        try host.write(cluster0, at: 0)
        do {
            let image = try VImage.open(host: host, readOnly: false)
            try image.close()
            return nil
        } catch let error as VImageError {
            return error
        }
    }

    static func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        for i in 0..<MemoryLayout<T>.size {
            bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * (MemoryLayout<T>.size - 1 - i)))
        }
    }

    enum Hostile: String, CaseIterable, CustomTestStringConvertible {
        case badMagic, badVersion, unknownIncompatibleBit, reservedJournalBit, clusterBitsTooSmall, clusterBitsTooLarge
        case headerSizeTooSmall, headerSizeTooLarge, virtualSizePastLimit, virtualSizeUnaligned, l1TooSmallForSize
        case l1TooManyEntries, l1OutsideFile, l1Unaligned, l1OffsetOverflows, refcountTableOutsideFile
        case refcountTableEmpty, refcountTableTooLarge, refcountTableOverflows, refcountOrder, tooManySnapshots
        case snapshotFieldsWithoutSnapshots, snapshotTableOutsideFile, extensionPastCluster, backingNameWithNul
        case truncated

        var testDescription: String { rawValue }

        /// (mutation, expected error code, a word the message must contain)
        var mutation: ((inout [UInt8]) -> Void, VImageError.Code, String) {
            switch self {
            case .badMagic: return ({ $0[0] = 0x51 }, .invalidImage, "magic")
            case .badVersion: return ({ put(UInt32(2), at: 4, in: &$0) }, .unsupportedFeature, "version")
            case .unknownIncompatibleBit:
                return ({ put(UInt64(1 << 40), at: 24, in: &$0) }, .unsupportedFeature, "incompatible")
            case .reservedJournalBit:
                return (
                    { put(IncompatibleFeatures.journal.rawValue, at: 24, in: &$0) }, .unsupportedFeature, "incompatible"
                )
            case .clusterBitsTooSmall: return ({ put(UInt32(9), at: 12, in: &$0) }, .invalidImage, "cluster_bits")
            case .clusterBitsTooLarge: return ({ put(UInt32(22), at: 12, in: &$0) }, .invalidImage, "cluster_bits")
            case .headerSizeTooSmall: return ({ put(UInt32(64), at: 8, in: &$0) }, .invalidImage, "header_size")
            case .headerSizeTooLarge: return ({ put(UInt32(1 << 20), at: 8, in: &$0) }, .invalidImage, "header_size")
            case .virtualSizePastLimit:
                return ({ put(UInt64.max & ~511, at: 16, in: &$0) }, .invalidImage, "virtual size")
            case .virtualSizeUnaligned:
                return ({ put(UInt64((1 << 30) + 1), at: 16, in: &$0) }, .invalidImage, "multiple of 512")
            case .l1TooSmallForSize: return ({ put(UInt64(1) << 50, at: 16, in: &$0) }, .invalidImage, "L1")
            case .l1TooManyEntries: return ({ put(UInt32.max, at: 56, in: &$0) }, .invalidImage, "L1")
            case .l1OutsideFile: return ({ put(UInt64(1) << 40, at: 48, in: &$0) }, .invalidImage, "outside the file")
            case .l1Unaligned: return ({ put(UInt64(0x10200), at: 48, in: &$0) }, .invalidImage, "aligned")
            case .l1OffsetOverflows:
                return ({ put(UInt64.max & ~0xFFFF, at: 48, in: &$0) }, .invalidImage, "outside the file")
            case .refcountTableOutsideFile:
                return ({ put(UInt64(1) << 40, at: 64, in: &$0) }, .invalidImage, "refcount table")
            case .refcountTableEmpty: return ({ put(UInt32(0), at: 72, in: &$0) }, .invalidImage, "refcount table")
            case .refcountTableTooLarge: return ({ put(UInt32.max, at: 72, in: &$0) }, .invalidImage, "refcount table")
            case .refcountTableOverflows:
                return ({ put(UInt64.max & ~0xFFFF, at: 64, in: &$0) }, .invalidImage, "refcount table")
            case .refcountOrder: return ({ put(UInt32(6), at: 60, in: &$0) }, .invalidImage, "refcount_order")
            case .tooManySnapshots: return ({ put(UInt32.max, at: 76, in: &$0) }, .invalidImage, "snapshots")
            case .snapshotFieldsWithoutSnapshots:
                return ({ put(UInt64(1 << 16), at: 80, in: &$0) }, .invalidImage, "snapshot")
            case .snapshotTableOutsideFile:
                return (
                    {
                        put(UInt32(1), at: 76, in: &$0)
                        put(UInt64(1) << 40, at: 80, in: &$0)
                        put(UInt32(64), at: 88, in: &$0)
                    }, .invalidImage, "snapshot table"
                )
            case .extensionPastCluster:
                return (
                    {
                        put(UInt32(0x99), at: 96, in: &$0)
                        put(UInt32.max, at: 100, in: &$0)
                    }, .invalidImage, "extension"
                )
            case .backingNameWithNul:
                return (
                    {
                        put(UInt32(1), at: 96, in: &$0)
                        put(UInt32(3), at: 100, in: &$0)
                        $0[104] = 0x61
                        $0[105] = 0
                        $0[106] = 0x62
                    }, .invalidImage, "backing"
                )
            case .truncated: return ({ $0.removeSubrange(40...) }, .invalidImage, "")
            }
        }
    }

    /// Invariant: each hostile header is refused with its own clear error (code and message), never a trap
    /// and never a huge allocation.
    @Test(arguments: Hostile.allCases)
    func hostileHeaderIsRefused(_ hostile: Hostile) throws {
        let (mutate, code, word) = hostile.mutation
        if hostile == .truncated {
            // A file shorter than the fixed header.
            let host = MemoryDevice(size: 0, growable: true)
            try host.write([UInt8](ImageHeader.magicBytes + [0, 0, 0, 1]), at: 0)
            #expect(throws: VImageError.self) { try VImage.open(host: host, readOnly: true) }
            return
        }
        let error = try #require(try openMutated(mutate), "\(hostile) was accepted")
        #expect(error.code == code, "\(hostile): \(error)")
        #expect(error.message.lowercased().contains(word.lowercased()), "\(hostile): \(error.message)")
    }

    /// Invariant: unknown compatible bits are kept, unknown autoclear bits are cleared by the first write.
    @Test func featureBitsOnWrite() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 30)
        var cluster0 = try host.read(count: 1 << 16, at: 0)
        Self.put(UInt64(1 << 33), at: 32, in: &cluster0)  // compatible
        Self.put(UInt64(1 << 7), at: 40, in: &cluster0)  // autoclear
        try host.write(cluster0, at: 0)
        let image = try VImage.open(host: host, readOnly: false)
        try image.write([UInt8](repeating: 1, count: 4096), at: 0)
        try image.close()
        let header = try ImageHeader.decode(try host.read(count: 1 << 16, at: 0))
        #expect(header.compatibleFeatures == 1 << 33)
        #expect(header.autoclearFeatures == 0)
        #expect(!header.incompatibleFeatures.contains(.dirty))
    }

    /// Invariant: an image left dirty opens, says so, and a clean close clears the bit.
    @Test func dirtyImageOpensAndSaysSo() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 30)
        var cluster0 = try host.read(count: 1 << 16, at: 0)
        Self.put(IncompatibleFeatures.dirty.rawValue, at: 24, in: &cluster0)
        try host.write(cluster0, at: 0)
        let image = try VImage.open(host: host, readOnly: false)
        #expect(image.wasDirtyAtOpen)
        try image.close()
        let header = try ImageHeader.decode(try host.read(count: 1 << 16, at: 0))
        #expect(!header.incompatibleFeatures.contains(.dirty))
    }

    /// Invariant: an image marked corrupt opens read-only but refuses writes.
    @Test func corruptBitRefusesWrites() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 30)
        var cluster0 = try host.read(count: 1 << 16, at: 0)
        Self.put(IncompatibleFeatures.corrupt.rawValue, at: 24, in: &cluster0)
        try host.write(cluster0, at: 0)
        let ro = try VImage.open(host: host, readOnly: true)
        _ = try ro.read(count: 512, at: 0)
        try ro.close()
        do {
            let rw = try VImage.open(host: host, readOnly: false)
            #expect(throws: VImageError.self) { try rw.write([UInt8](repeating: 1, count: 512), at: 0) }
            try? rw.close()
        } catch let error as VImageError {
            #expect(error.code == .corrupt || error.code == .readOnly, "\(error)")
        }
    }

    /// Invariant: virtual sizes up to 16 TiB (and beyond) are accepted and the last sector is addressable.
    @Test func sixteenTebibytes() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 16 << 40)
        let image = try VImage.open(host: host, readOnly: false)
        try image.write([UInt8](repeating: 0xEE, count: 512), at: (16 << 40) - 512)
        #expect(try image.read(count: 512, at: (16 << 40) - 512) == [UInt8](repeating: 0xEE, count: 512))
        #expect(throws: (any Error).self) { try image.write([UInt8](repeating: 0xEE, count: 512), at: 16 << 40) }
        try image.close()
        #expect(ImageCheck.check(host: host).isClean)
    }
}
