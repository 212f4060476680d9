import BlockIO
import Glibc
import ImageFormats
import Testing
import VImage
import VImageTestSupport

/// qemu-img and qemu-io make the fixtures during the run; the tests skip without them.
let hasQemu = TestEnvironment.which("qemu-img") != nil && TestEnvironment.which("qemu-io") != nil

/// Writes a raw source of `size` bytes: pattern data, repetitive text and zero runs.
func writeMixedRaw(_ path: String, size: Int = 4 << 20, seed: UInt64 = 1) throws {
    let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
    defer { try? file.close() }
    try file.truncate(to: UInt64(size))
    let text = Array("the quick brown fox jumps over the lazy dog\n".utf8)
    var offset = 0
    var piece = 0
    while offset < size {
        let length = min(size - offset, [192 << 10, 128 << 10, 320 << 10][piece % 3])
        switch piece % 3 {
        case 0: try file.write(Pattern.bytes(count: length, offset: UInt64(offset), seed: seed), at: UInt64(offset))
        case 1: try file.write((0..<length).map { text[$0 % text.count] }, at: UInt64(offset))
        default: break  // zeroes (a hole)
        }
        offset += length
        piece += 1
    }
}

/// The whole file's bytes.
func fileBytes(_ path: String) throws -> [UInt8] {
    let file = try FileDevice.open(path: path, readOnly: true)
    defer { try? file.close() }
    return try file.read(count: Int(file.size), at: 0)
}

/// Runs a program and expects success.
@discardableResult
func must(_ program: String, _ arguments: [String]) -> ProcessResult {
    let r = run(program, arguments)
    #expect(r.status == 0, "\(program) \(arguments.joined(separator: " ")): \(r.stderr)")
    return r
}

/// Every guest byte of `device`.
func deviceBytes(_ device: any BlockDevice) throws -> [UInt8] {
    try device.read(count: Int(device.size), at: 0)
}

@Suite(.serialized, .enabled(if: hasQemu)) struct Qcow2ReaderTests {
    func inTemporaryDirectory(_ body: (String) throws -> Void) rethrows {
        let dir = TestEnvironment.temporaryDirectory("qcow2-reader")
        defer { TestEnvironment.remove(dir) }
        try body(dir)
    }

    /// Opens `path` with ImageFormats and expects the guest bytes qemu-img convert -O raw produces.
    func expectSameAsQemu(_ path: String, snapshot: String? = nil, dir: String) throws {
        let reference = dir + "/reference.raw"
        unlink(reference)
        must("qemu-img", ["convert", "-O", "raw"] + (snapshot.map { ["-l", $0] } ?? []) + [path, reference])
        let device = try ImageFormats.open(path: path, readOnly: true, snapshot: snapshot)
        defer { try? device.close() }
        let ours = try deviceBytes(device)
        let theirs = try fileBytes(reference)
        #expect(firstDifference(ours[...], theirs[...]) == nil, "\(path) \(snapshot ?? ""): first difference")
        // Extents cover the disk in order, and data extents hold all the non-zero bytes.
        var position: UInt64 = 0
        while position < device.size {
            let extents = try device.extents(at: position, count: device.size - position)
            #expect(extents.first?.offset == position)
            for e in extents where e.flags.contains(.zero) {
                #expect(
                    ours[Int(e.offset)..<Int(e.end)].allSatisfy { $0 == 0 },
                    "zero extent \(e) of \(path) holds data"
                )
            }
            position = extents.last!.end
        }
    }

    /// Invariant: zlib and zstd compressed clusters, 512 B and 2 MiB clusters and version 2 images read
    /// exactly as qemu-img reads them.
    @Test func compressedAndClusterSizes() throws {
        try inTemporaryDirectory { dir in
            try writeMixedRaw(dir + "/src.raw")
            let variants: [(String, [String])] = [
                ("zlib", ["-c"]), ("zstd", ["-c", "-o", "compression_type=zstd"]),
                ("c512", ["-o", "cluster_size=512"]),
                ("c2m", ["-o", "cluster_size=2M"]), ("v2", ["-o", "compat=0.10"]),
                ("zstd512", ["-c", "-o", "compression_type=zstd,cluster_size=512"]),
            ]
            for (name, options) in variants {
                let path = dir + "/\(name).qcow2"
                must("qemu-img", ["convert", "-O", "qcow2"] + options + [dir + "/src.raw", path])
                try expectSameAsQemu(path, dir: dir)
                let image = try ImageFormats.openQcow2(path: path)
                #expect(image.header.compressionType == (name.hasPrefix("zstd") ? .zstd : .zlib))
                #expect(try Qcow2Check.check(image).isClean, "\(name)")
                try image.close()
            }
        }
    }

    /// Invariant: zero clusters read as zeroes and show as zero extents; snapshots read their own L1.
    @Test func zeroClustersAndSnapshots() throws {
        try inTemporaryDirectory { dir in
            let path = dir + "/z.qcow2"
            must("qemu-img", ["create", "-q", "-f", "qcow2", path, "4M"])
            must("qemu-io", ["-c", "write -P 0xaa 0 2M", "-c", "write -z 512k 128k", path])
            must("qemu-img", ["snapshot", "-c", "first", path])
            must("qemu-io", ["-c", "write -P 0xbb 256k 1M", "-c", "write -z 1536k 64k", path])
            must("qemu-img", ["snapshot", "-c", "second", path])
            must("qemu-io", ["-c", "write -P 0xcc 3M 4k", path])
            try expectSameAsQemu(path, dir: dir)
            try expectSameAsQemu(path, snapshot: "first", dir: dir)
            try expectSameAsQemu(path, snapshot: "2", dir: dir)  // by id
            let image = try ImageFormats.openQcow2(path: path)
            #expect(image.snapshots.map(\.name) == ["first", "second"])
            let extents = try image.extents(at: 1536 << 10, count: 64 << 10)
            #expect(extents.count == 1 && extents[0].flags.contains(.zero))
            #expect(try Qcow2Check.check(image).isClean)
            try image.close()
            #expect(throws: ImageFormatError.self) {
                try ImageFormats.open(path: path, readOnly: true, snapshot: "none")
            }
            // Read-write opens go to the engine, which writes qcow2 as it writes VIMG.
            let writer = try ImageFormats.open(path: path, readOnly: false)
            #expect((writer as? VImage)?.formatName == "qcow2")
            try writer.close()
        }
    }

    /// Invariant: reads fall through a two-deep chain (qcow2 over qcow2 over raw, and over VIMG), with
    /// relative backing names resolved against each image's folder; loops are refused.
    @Test func backingChains() throws {
        try inTemporaryDirectory { dir in
            try writeMixedRaw(dir + "/base.raw", size: 2 << 20)
            must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir + "/mid.qcow2", "3M"])
            must("qemu-io", ["-c", "write -P 0x11 64k 64k", "-c", "write -z 256k 64k", dir + "/mid.qcow2"])
            must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", dir + "/top.qcow2"])
            must("qemu-io", ["-c", "write -P 0x22 100k 8k", "-c", "write -P 0x33 2560k 64k", dir + "/top.qcow2"])
            try expectSameAsQemu(dir + "/top.qcow2", dir: dir)
            // A VIMG base under a qcow2 image.
            try VImage.create(path: dir + "/base.vimg", virtualSize: 2 << 20)
            let base = try VImage.open(path: dir + "/base.vimg", readOnly: false)
            try base.write(Pattern.bytes(count: 1 << 20, offset: 0, seed: 9), at: 512 << 10)
            try base.close()
            must(
                "qemu-img",
                ["create", "-q", "-f", "qcow2", "-b", "base.vimg", "-F", "raw", dir + "/onvimg.qcow2", "2M"]
            )
            let image = try ImageFormats.openQcow2(path: dir + "/onvimg.qcow2")
            #expect(image.backing is FileDevice)  // named raw: read as raw bytes, as qemu would
            try image.close()
            // A loop: a.qcow2 -> b.qcow2 -> a.qcow2.
            must("qemu-img", ["create", "-q", "-f", "qcow2", dir + "/a.qcow2", "1M"])
            must("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", dir + "/b.qcow2"])
            must("qemu-img", ["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", dir + "/a.qcow2"])
            #expect(throws: ImageFormatError.self) { try ImageFormats.openQcow2(path: dir + "/b.qcow2") }
        }
    }

    /// Invariant: Qcow2Writer's images are clean for qemu-img check, equal to their source for qemu-img
    /// compare, and read back by Qcow2Image; its sizes are what measure predicts.
    @Test func writerRoundTrip() throws {
        try inTemporaryDirectory { dir in
            try writeMixedRaw(dir + "/src.raw", size: 3 << 20 + 4096)
            for bits in [9, 16, 21] {
                let path = dir + "/w\(bits).qcow2"
                var options = ConvertOptions()
                options.outputFormat = .qcow2
                options.clusterBits = bits
                try ImageConverter.convert(source: dir + "/src.raw", destination: path, options: options)
                must("qemu-img", ["check", path])
                must("qemu-img", ["compare", "-f", "raw", "-F", "qcow2", dir + "/src.raw", path])
                let image = try ImageFormats.openQcow2(path: path)
                #expect(try Qcow2Check.check(image).isClean)
                let source = try ImageFormats.open(path: dir + "/src.raw", readOnly: true)
                #expect(try deviceBytes(image) == deviceBytes(source))
                let measured = try ImageMeasure.measure(source: source, size: nil, format: .qcow2, clusterBits: bits)
                #expect(measured.required == (try FileDevice.open(path: path, readOnly: true)).size)
                try source.close()
                try image.close()
            }
        }
    }
}

/// Hostile headers: each is refused with a `VImageError`, never a trap.
@Suite struct Qcow2HeaderTests {
    /// A valid version 3 header of a 1 MiB image with 64 KiB clusters in a 4-cluster file.
    func header() -> [UInt8] {
        var h = Qcow2Header(
            version: 3,
            backingFileOffset: 0,
            backingFileSize: 0,
            clusterBits: 16,
            virtualSize: 1 << 20,
            cryptMethod: 0,
            l1Size: 1,
            l1TableOffset: 3 << 16,
            refcountTableOffset: 1 << 16,
            refcountTableClusters: 1,
            snapshotCount: 0,
            snapshotsOffset: 0,
            headerLength: 112
        )
        h.backingFormat = "raw"
        var bytes = h.encode()
        bytes += [UInt8](repeating: 0, count: (1 << 16) - bytes.count)
        return bytes
    }
    let fileSize: UInt64 = 4 << 16

    func put<T: FixedWidthInteger>(_ value: T, at offset: Int, in bytes: inout [UInt8]) {
        for i in 0..<MemoryLayout<T>.size {
            bytes[offset + i] = UInt8(truncatingIfNeeded: value >> ((MemoryLayout<T>.size - 1 - i) * 8))
        }
    }

    func refused(
        _ change: (inout [UInt8]) -> Void,
        fileSize: UInt64? = nil,
        _ code: VImageError.Code,
        _ fragment: String
    ) {
        var bytes = header()
        change(&bytes)
        do {
            _ = try Qcow2Header.decode(bytes, fileSize: fileSize ?? self.fileSize)
            Issue.record("accepted a header that should be refused (\(fragment))")
        } catch let error as VImageError {
            #expect(error.code == code, "\(error)")
            #expect(error.message.contains(fragment), "\(error)")
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    /// Invariant: the valid header decodes with its fields.
    @Test func validHeader() throws {
        let h = try Qcow2Header.decode(header(), fileSize: fileSize)
        #expect(
            h.version == 3 && h.clusterSize == 65536 && h.virtualSize == 1 << 20 && h.backingFormat == "raw"
                && h.compressionType == .zlib
        )
    }

    @Test func badMagic() { refused({ $0[0] = 0 }, .invalidImage, "bad magic") }
    @Test func badVersion() { refused({ put(UInt32(4), at: 4, in: &$0) }, .unsupportedFeature, "version 4") }
    @Test func clusterBitsTooSmall() {
        refused({ put(UInt32(8), at: 20, in: &$0) }, .unsupportedFeature, "cluster_bits 8")
    }
    @Test func clusterBitsTooLarge() {
        refused({ put(UInt32(22), at: 20, in: &$0) }, .unsupportedFeature, "cluster_bits 22")
    }
    @Test func extendedL2() { refused({ put(UInt64(1 << 4), at: 72, in: &$0) }, .unsupportedFeature, "extended L2") }
    @Test func externalDataFile() {
        refused({ put(UInt64(1 << 2), at: 72, in: &$0) }, .unsupportedFeature, "external data file")
    }
    @Test func unknownIncompatibleBit() {
        refused({ put(UInt64(1 << 40), at: 72, in: &$0) }, .unsupportedFeature, "bit 40")
    }
    @Test func zstdWithoutFeatureBit() { refused({ $0[104] = 1 }, .invalidImage, "compression type feature") }
    @Test func featureBitWithoutZstd() {
        refused({ put(UInt64(1 << 3), at: 72, in: &$0) }, .invalidImage, "compression type bit")
    }
    @Test func unknownCompressionType() { refused({ $0[104] = 7 }, .unsupportedFeature, "compression type 7") }
    @Test func encrypted() { refused({ put(UInt32(2), at: 32, in: &$0) }, .unsupportedFeature, "encrypted") }
    @Test func l1TooSmall() { refused({ put(UInt64(1 << 40), at: 24, in: &$0) }, .invalidImage, "too small") }
    @Test func l1TooLarge() { refused({ put(UInt32(1 << 30), at: 36, in: &$0) }, .limitExceeded, "larger than 32 MiB") }
    @Test func l1PastEnd() { refused({ put(UInt64(100 << 16), at: 40, in: &$0) }, .invalidImage, "past the end") }
    @Test func l1Unaligned() {
        refused({ put(UInt64(3 << 16 + 8), at: 40, in: &$0) }, .invalidImage, "not cluster aligned")
    }
    @Test func refcountTableHuge() {
        refused({ put(UInt32.max, at: 56, in: &$0) }, .limitExceeded, "larger than 8 MiB")
    }
    @Test func tooManySnapshots() { refused({ put(UInt32(1 << 20), at: 60, in: &$0) }, .limitExceeded, "snapshots") }
    @Test func snapshotTablePastEnd() {
        refused(
            {
                put(UInt32(1), at: 60, in: &$0)
                put(UInt64(1 << 40), at: 64, in: &$0)
            },
            .invalidImage,
            "snapshot table"
        )
    }
    @Test func backingNameTooLong() {
        refused(
            {
                put(UInt64(512), at: 8, in: &$0)
                put(UInt32(4096), at: 16, in: &$0)
            },
            .invalidImage,
            "1...1023"
        )
    }
    @Test func backingNameOutsideCluster() {
        refused(
            {
                put(UInt64(65530), at: 8, in: &$0)
                put(UInt32(100), at: 16, in: &$0)
            },
            .invalidImage,
            "outside the first cluster"
        )
    }
    @Test func headerLengthOdd() { refused({ put(UInt32(107), at: 100, in: &$0) }, .invalidImage, "header_length") }
    @Test func refcountOrderTooLarge() { refused({ put(UInt32(7), at: 96, in: &$0) }, .invalidImage, "refcount_order") }
    @Test func extensionPastCluster() {
        refused(
            {
                put(UInt32(0x1234), at: 112, in: &$0)
                put(UInt32(1 << 20), at: 116, in: &$0)
            },
            .invalidImage,
            "runs past"
        )
    }
    @Test func truncatedHeader() {
        #expect(throws: VImageError.self) { try Qcow2Header.decode(Array(header()[0..<50]), fileSize: 50) }
    }
}

/// Random corruption of qemu-made images: opening, reading every byte and walking extents either work
/// or throw; nothing traps or hangs.
@Suite(.enabled(if: hasQemu)) struct Qcow2FuzzTests {
    /// Invariant: any single-byte or 8-byte corruption of the metadata, and any truncation, is survived.
    @Test func randomCorruption() throws {
        let dir = TestEnvironment.temporaryDirectory("qcow2-fuzz")
        defer { TestEnvironment.remove(dir) }
        try writeMixedRaw(dir + "/src.raw", size: 1 << 20)
        let original = dir + "/orig.qcow2"
        must("qemu-img", ["convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k", dir + "/src.raw", original])
        must("qemu-img", ["snapshot", "-c", "s", original])
        let pristine = try fileBytes(original)
        let image = try ImageFormats.openQcow2(path: original)
        // Metadata lives in the header, L1, L2, refcount and snapshot clusters: corrupt those.
        var metadata: [Int] = [
            0, Int(image.header.l1TableOffset), Int(image.header.refcountTableOffset),
            Int(image.header.snapshotsOffset),
        ]
        try image.close()
        metadata += Array(stride(from: 4096, to: 64 << 10, by: 4096))
        var random = SeededRandom(seed: 42)
        let path = dir + "/fuzz.qcow2"
        for round in 0..<150 {
            var bytes = pristine
            if round % 10 == 9 {
                bytes.removeSubrange(Int(random.next() % UInt64(bytes.count))...)
            } else {
                for _ in 0..<1 + Int(random.next() % 4) {
                    let base = metadata[Int(random.next() % UInt64(metadata.count))]
                    let at = min(bytes.count - 8, base + Int(random.next() % 512))
                    if random.next() % 2 == 0 {
                        bytes[at] ^= UInt8(truncatingIfNeeded: random.next() | 1)
                    } else {
                        for k in 0..<8 { bytes[at + k] = UInt8(truncatingIfNeeded: random.next()) }
                    }
                }
            }
            unlink(path)
            let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
            try file.write(bytes, at: 0)
            try file.close()
            for snapshot in [nil, "s"] as [String?] {
                guard
                    let device = try? ImageFormats.open(path: path, format: .qcow2, readOnly: true, snapshot: snapshot)
                else { continue }
                _ = try? deviceBytes(device)
                _ = try? device.extents(at: 0, count: device.size)
                if let q = device as? Qcow2Image { _ = try? Qcow2Check.check(q) }
                try? device.close()
            }
        }
    }
}
