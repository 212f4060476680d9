import BlockIO
import Synchronization
import Testing
import VImageTestSupport

@testable import VImage

#if canImport(Glibc)
import Glibc
#endif

/// End-to-end checksums (docs/FORMAT.md, "End-to-end checksums"): every block verified on read, by check
/// or by scrub; repairs only from a copy that matches.
@Suite struct ChecksumTests {
    static let size = 4 << 20

    /// A checksummed image with every kind of cluster: data, a compressed cluster, zero clusters, a
    /// snapshot (its table and L1 copy), a bitmap (directory, table, bits), and the checksum structures.
    /// Returns the host and the disk's content.
    func populatedImage(clusterBits: Int = 12, seed: UInt64) throws -> (MemoryDevice, [UInt8]) {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(
            on: host,
            virtualSize: UInt64(Self.size),
            options: .init(clusterBits: clusterBits, checksums: true)
        )
        let image = try VImage.open(host: host, readOnly: false)
        var disk = ReferenceDisk(size: Self.size)
        let cs = 1 << clusterBits
        let first = Pattern.bytes(count: 256 << 10, offset: 0, seed: seed)
        try image.write(first, at: 0)
        disk.write(first, at: 0)
        let compressible = [UInt8](repeating: 0x5A, count: cs)
        let last = Self.size / cs - 1
        try compressible.withUnsafeBytes { try image.writeCompressed(cluster: UInt64(last), data: $0) }
        disk.write(compressible, at: last * cs)
        try image.createSnapshot(named: "s1")
        try image.addBitmap(named: "b1", granularity: 65536)
        let second = Pattern.bytes(count: 64 << 10, offset: 4096, seed: seed + 1)
        try image.write(second, at: 4096)  // copies on write from the snapshot
        disk.write(second, at: 4096)
        try image.writeZeroes(at: 1 << 20, count: UInt64(4 * cs), mayUnmap: false, fast: false)
        try image.close()
        return (host, disk.bytes)
    }

    func copy(_ device: MemoryDevice) throws -> MemoryDevice {
        let result = MemoryDevice(size: 0, growable: true)
        try result.write(device.snapshotBytes(), at: 0)
        return result
    }

    /// Whether a flipped byte is noticed: the header or metadata refused at open, a check finding, a
    /// scrub finding, or a read of the disk or of the snapshot failing.
    func detected(_ host: MemoryDevice) -> Bool {
        let report = ImageCheck.check(host: host)
        if report.corruptions > 0 || report.checkErrors > 0 { return true }
        do {
            let image = try VImage.open(host: host, readOnly: true)
            defer { try? image.close() }
            if try !image.scrub().isClean { return true }
            _ = try image.read(count: Self.size, at: 0)
            try image.selectSnapshot(named: "s1")
            _ = try image.read(count: Self.size, at: 0)
        } catch {
            return true
        }
        return false
    }

    /// Invariant: flipping any byte of any cluster in use (header, refcount table and blocks, L1, L2,
    /// snapshot table and L1 copy, bitmap structures, checksum table and blocks, data, compressed data)
    /// is detected on read, by check or by scrub; flipped data of the active disk is repaired from a copy of
    /// the disk, after which the image scrubs clean and reads as before.
    @Test func everyFlippedClusterIsDetected() throws {
        for seed in TestSeeds.seeds(0..<2, test: "checksum flips") {
            var rng = SeededRandom(seed: seed)
            let (pristine, content) = try populatedImage(seed: seed)
            let cs = 4096
            var analysisReport = CheckReport()
            let analysis = try ImageCheck.run(host: pristine, report: &analysisReport)
            try #require(analysisReport.isClean, "\(analysisReport.findings)")
            let headerLength = analysis.header.encode().count
            let replica = MemoryDevice(size: UInt64(Self.size))
            try replica.write(content, at: 0)
            var repaired = 0
            for cluster in 0..<Int(analysis.fileClusters) where analysis.stored[cluster] > 0 {
                let damaged = try copy(pristine)
                let within =
                    cluster == 0 ? Int.random(in: 0..<headerLength, using: &rng) : Int.random(in: 0..<cs, using: &rng)
                let offset = UInt64(cluster * cs + within)
                var byte = try damaged.read(count: 1, at: offset)
                byte[0] ^= UInt8(1 << Int.random(in: 0..<8, using: &rng))
                try damaged.write(byte, at: offset)
                #expect(
                    detected(damaged),
                    "seed \(seed): flipped byte at 0x\(String(offset, radix: 16)) (cluster \(cluster)) not detected"
                )

                // Data of the active disk comes back from the replica.
                guard let image = try? VImage.open(host: damaged, readOnly: false) else { continue }
                defer { try? image.close() }
                guard let findings = try? image.scrub().findings else { continue }
                if findings.count == 1, findings[0].kind == .data,
                    findings[0].guestOffsets.contains(where: { $0.snapshot == nil })
                {
                    let results = try image.repair(findings, from: replica)
                    #expect(results.allSatisfy { $0.failure == nil }, "seed \(seed): \(results.map(\.failure))")
                    #expect(try image.scrub().isClean)
                    #expect(try image.read(count: Self.size, at: 0) == content, "seed \(seed): content after repair")
                    repaired += 1
                }
            }
            #expect(repaired > 10, "seed \(seed): only \(repaired) data clusters repaired")
        }
    }

    /// Invariant: the header checksum covers the extension area as stored, so a flip in a byte the parser
    /// skips (the end marker's length field, padding after an extension's data) is refused like any other.
    /// Every bit of every covered byte is flipped in turn (CI once drew the end marker's length at random).
    @Test func everyHeaderBitFlipIsRefused() throws {
        let (pristine, _) = try populatedImage(seed: 1)
        let header = try ImageHeader.read(from: pristine)
        let covered = 96 + header.encodeExtensions().count
        let original = try pristine.read(count: covered, at: 0)
        for offset in 0..<covered {
            for bit in 0..<8 {
                var bytes = original
                bytes[offset] ^= UInt8(1 << bit)
                let damaged = try copy(pristine)
                try damaged.write(bytes, at: 0)
                if offset == 31 && bit == 3 {
                    // Clearing incompatible bit 3 turns the header checksum off; the checksum table left
                    // without its bit is what gives the flip away.
                    #expect(detected(damaged), "the checksums bit cleared")
                    continue
                }
                #expect(throws: VImageError.self, "byte \(offset) bit \(bit)") {
                    _ = try ImageHeader.read(from: damaged)
                }
            }
        }
    }

    /// Invariant: a repair writes only what matches the stored checksum: a replica that differs at the bad
    /// block leaves it bad and says so.
    @Test func repairRefusesAWrongCopy() throws {
        let (host, content) = try populatedImage(seed: 7)
        let image = try VImage.open(host: host, readOnly: false)
        guard case .data(let hostOffset) = try image.mapping(at: 8192, count: 4096)[0].kind else {
            Issue.record("guest 8192 is not data")
            return
        }
        var byte = try host.read(count: 1, at: hostOffset + 10)
        byte[0] ^= 0xFF
        try host.write(byte, at: hostOffset + 10)
        let wrong = MemoryDevice(size: UInt64(Self.size))
        var other = content
        other[8192 + 100] ^= 1
        try wrong.write(other, at: 0)
        let findings = try image.scrub().findings
        #expect(findings.map(\.hostOffset) == [hostOffset / 4096 * 4096])
        let results = try image.repair(findings, from: wrong)
        #expect(results.count == 1 && results[0].failure != nil)
        #expect(throws: VImageError.self) { _ = try image.read(count: 4096, at: 8192) }
        try image.close()
    }

    /// Invariant: a bad data block is an I/O error (EIO), never data; the observer hears of it with the
    /// guest offset; a partial write into the cluster (which needs its old content) fails too rather than
    /// spread the bad block into a new good-looking one.
    @Test func badDataIsAnErrorNeverData() throws {
        let (host, _) = try populatedImage(clusterBits: 16, seed: 3)
        let image = try VImage.open(host: host, readOnly: false)
        defer { try? image.close() }
        guard case .data(let hostOffset) = try image.mapping(at: 128 << 10, count: 4096)[0].kind else {
            Issue.record("guest 128 KiB is not data")
            return
        }
        try host.write([0xEE], at: hostOffset + 5)
        let heard = Mutex<[VImageError]>([])
        image.onChecksumMismatch { error in heard.withLock { $0.append(error) } }
        do {
            _ = try image.read(count: 4096, at: 128 << 10)
            Issue.record("read returned bad data")
        } catch let error as VImageError {
            #expect(error.code == .checksum && error.errnoCode == EIO)
        }
        #expect(heard.withLock { $0.count } == 1)
        #expect(heard.withLock { $0.first?.message.contains("guest offset \(128 << 10)") ?? false })
        #expect(image.checksumMismatches >= 1)
        // A write of part of the cluster after the snapshot copies the cluster: it must read the old data.
        try image.createSnapshot(named: "s2")
        #expect(throws: VImageError.self) { try image.write([1, 2, 3], at: (128 << 10) + 4096) }
    }

    /// Invariant: a cleanly closed checksummed image checks clean and scrubs clean with every block in use
    /// verified, after writes, overwrites (copy on write of durable clusters), snapshots, discards, resize,
    /// compaction and reopen; the content reads back as written.
    @Test func lifecycleStaysVerifiable() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 8 << 20, options: .init(clusterBits: 12, checksums: true))
        var disk = ReferenceDisk(size: 8 << 20)
        var rng = SeededRandom(seed: TestSeeds.seeds(0..<1, test: "checksum lifecycle")[0])
        var image = try VImage.open(host: host, readOnly: false)
        for step in 0..<300 {
            let offset = Int.random(in: 0..<(8 << 20) - 70000, using: &rng)
            let length = Int.random(in: 1...65536, using: &rng)
            switch Int.random(in: 0..<10, using: &rng) {
            case 0: try image.flush()
            case 1:
                try image.discard(at: UInt64(offset), count: UInt64(length))
                disk.write(try image.read(count: length, at: UInt64(offset)), at: offset)
            case 2 where step % 50 == 2: try image.createSnapshot(named: "s\(step)")
            default:
                let data = Pattern.bytes(count: length, offset: UInt64(offset), seed: UInt64(step))
                try image.write(data, at: UInt64(offset))
                disk.write(data, at: offset)
            }
        }
        for name in image.snapshotList.map(\.name).prefix(3) { try image.deleteSnapshot(named: name) }
        try image.resize(to: 12 << 20)
        disk.resize(12 << 20)
        try image.close()
        image = try VImage.open(host: host, readOnly: false)
        let before = host.size
        try image.compact()
        #expect(host.size < before)
        let scrub = try image.scrub()
        #expect(scrub.isClean, "\(scrub.findings)")
        #expect(try image.read(count: 12 << 20, at: 0) == disk.bytes)
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(report.findings)")
        image = try VImage.open(host: host, readOnly: true)
        let again = try image.scrub()
        #expect(again.isClean && again.blocksUnverified == 0, "\(again.findings) unverified \(again.blocksUnverified)")
        #expect(try image.read(count: 12 << 20, at: 0) == disk.bytes)
        try image.close()
    }

    /// Invariant: corrupt checksum structures are refused with a clear error or reported by check, never
    /// trap; `check -r all` computes the checksums again and the image checks clean.
    @Test func brokenChecksumTableIsRepaired() throws {
        let (host, content) = try populatedImage(seed: 11)
        var report = CheckReport()
        let analysis = try ImageCheck.run(host: host, report: &report)
        let pointer = try ChecksumTablePointer.decode(
            analysis.header.checksumTableData!,
            clusterSize: 4096,
            fileSize: host.size
        ).get()
        try host.write([UInt8](repeating: 0xFF, count: 16), at: pointer.offset.rawValue + 8)
        #expect(throws: VImageError.self) { _ = try VImage.open(host: host, readOnly: true) }
        let check = ImageCheck.check(host: host)
        #expect(check.findings.contains { $0.kind == "checksum-structure" })
        let result = try ImageCheck.repair(host: host, mode: .all)
        #expect(result.after.isClean, "\(result.after.findings) \(result.actions)")
        let image = try VImage.open(host: host, readOnly: true)
        #expect(image.hasChecksums)
        #expect(try image.scrub().isClean)
        #expect(try image.read(count: Self.size, at: 0) == content)
        try image.close()
    }

    /// Invariant: the header protects itself: a changed byte in a field that would still be valid (the
    /// virtual size, by 64 KiB) is refused at open.
    @Test func headerProtectsItself() throws {
        let (host, _) = try populatedImage(seed: 5)
        var bytes = try host.read(count: 8, at: 16)  // virtual size, big-endian
        bytes[5] ^= 0x01
        try host.write(bytes, at: 16)
        #expect(throws: VImageError.self) { _ = try VImage.open(host: host, readOnly: true) }
    }
}
