import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// Persistent dirty bitmaps and snapshot diffs (docs/FORMAT.md, "Persistent dirty bitmaps").
@Suite struct BitmapTests {
    static let cs = 4096
    static let size: UInt64 = 4 << 20

    func newImage(_ host: any BlockDevice = MemoryDevice(size: 0, growable: true)) throws -> (any BlockDevice, VImage) {
        try VImage.create(on: host, virtualSize: Self.size, options: .init(clusterBits: 12))
        return (host, try VImage.open(host: host, readOnly: false))
    }

    /// The dirty byte ranges of a bitmap, merged.
    func dirty(_ image: VImage, _ name: String) throws -> [Range<UInt64>] {
        try image.bitmapRuns(named: name, at: 0, count: image.size).filter(\.dirty).map {
            $0.offset..<$0.offset + $0.length
        }
    }

    /// Invariant: a bitmap records exactly the granules that writes, write-zeroes and discards touched, and
    /// keeps them across a clean close and reopen; the image checks clean with its bitmap clusters counted.
    @Test func recordsChangesAcrossReopen() throws {
        let (host, image) = try newImage()
        try image.addBitmap(named: "b1", granularity: 64 << 10)
        try image.write([UInt8](repeating: 1, count: 100), at: 70_000)  // granule 1
        try image.writeZeroes(at: 1 << 20, count: 4096, mayUnmap: true, fast: false)  // granule 16
        try image.discard(at: 2 << 20, count: 128 << 10)  // granules 32, 33
        #expect(
            try dirty(image, "b1") == [65536..<131072, 1 << 20..<(1 << 20) + 65536, 2 << 20..<(2 << 20) + (128 << 10)]
        )
        try image.close()
        #expect(ImageCheck.check(host: host).isClean, "\(ImageCheck.check(host: host).findings)")
        let reopened = try VImage.open(host: host, readOnly: true)
        #expect(reopened.bitmapList.map(\.name) == ["b1"] && reopened.bitmapList[0].consistent)
        #expect(try dirty(reopened, "b1").count == 3)
        try reopened.close()
    }

    /// Invariant: clear, disable, enable, merge and remove do what their names say, and every step
    /// leaves an image that checks clean (no leak of old tables or bits).
    @Test func operations() throws {
        let (host, image) = try newImage()
        try image.addBitmap(named: "a")
        try image.addBitmap(named: "b", granularity: 4096, enabled: false)
        try image.write([UInt8](repeating: 2, count: 4096), at: 0)
        #expect(try dirty(image, "a") == [0..<65536])
        #expect(try dirty(image, "b").isEmpty)
        try image.setBitmap(named: "b", enabled: true)
        try image.write([UInt8](repeating: 2, count: 4096), at: 3 << 20)
        #expect(try dirty(image, "b") == [3 << 20..<(3 << 20) + 4096])
        // "a" (64 KiB granules) saw both writes; merged into "b" each of its granules marks 64 KiB.
        try image.mergeBitmap(named: "b", from: try image.bitmapContents(named: "a"))
        #expect(try dirty(image, "b") == [0..<65536, 3 << 20..<(3 << 20) + 65536])
        try image.clearBitmap(named: "a")
        #expect(try dirty(image, "a").isEmpty)
        try image.flush()
        #expect(ImageCheck.check(host: host).leaks == 0)
        try image.removeBitmap(named: "b")
        #expect(image.bitmapList.map(\.name) == ["a"])
        #expect(throws: VImageError.self) { try image.addBitmap(named: "a") }
        #expect(throws: VImageError.self) { try image.addBitmap(named: "c", granularity: 1000) }
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(report.findings)")
    }

    /// Invariant: growing the disk marks the new part dirty, shrinking drops bits past the end, applying
    /// a snapshot marks where its mapping differs; the image stays clean.
    @Test func resizeAndSnapshots() throws {
        let (host, image) = try newImage()
        try image.write([UInt8](repeating: 3, count: 65536), at: 0)
        try image.createSnapshot(named: "s")
        try image.addBitmap(named: "a")
        try image.write([UInt8](repeating: 4, count: 65536), at: 0)
        try image.clearBitmap(named: "a")
        try image.applySnapshot(named: "s")
        #expect(try dirty(image, "a") == [0..<65536])
        try image.clearBitmap(named: "a")
        try image.resize(to: Self.size + (1 << 20))
        #expect(try dirty(image, "a") == [Self.size..<Self.size + (1 << 20)])
        try image.resize(to: Self.size, allowShrink: true)
        #expect(try dirty(image, "a").isEmpty)
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(report.findings)")
    }

    /// Invariant: a writer that does not keep bitmaps (one that predates them) clears the autoclear bit
    /// with its first metadata write, and every bitmap is then reported inconsistent, never trusted.
    @Test func olderWriterMakesBitmapsInconsistent() throws {
        let (host, image) = try newImage()
        try image.addBitmap(named: "a")
        try image.close()
        let older = try VImage.open(host: host, readOnly: false, options: .init(maintainsBitmaps: false))
        try older.write([UInt8](repeating: 5, count: 4096), at: 1 << 20)  // allocates: metadata changes
        try older.close()
        #expect(try ImageHeader.read(from: host).autoclearFeatures & AutoclearFeatures.bitmaps == 0)
        let reopened = try VImage.open(host: host, readOnly: false)
        #expect(reopened.bitmapList.first?.consistent == false)
        #expect(throws: VImageError.self) { try reopened.bitmapRuns(named: "a", at: 0, count: 4096) }
        #expect(throws: VImageError.self) { try reopened.clearBitmap(named: "a") }
        try reopened.removeBitmap(named: "a")
        try reopened.close()
        #expect(ImageCheck.check(host: host).isClean)
    }

    /// Invariant: after a power cut at any point of a session that writes, a bitmap is either reported
    /// inconsistent, or consistent and marking every granule whose content differs from the start of the
    /// session (never clean but wrong), and the image checks without corruption. Includes the case the
    /// issue names: a single overwrite in place, which changes no metadata.
    @Test(arguments: CrashMode.allCases)
    func neverCleanButWrong(mode: CrashMode) throws {
        for seed in TestSeeds.seeds(0..<40, test: "bitmap crash \(mode)") {
            var rng = SeededRandom(seed: seed)
            let device = FaultInjectingDevice()
            try VImage.create(on: device, virtualSize: (256 << 10), options: .init(clusterBits: 12))
            var image = try VImage.open(host: device, readOnly: false)
            // Owned clusters: the later writes go in place and change no metadata.
            try image.write(Pattern.bytes(count: 256 << 10, offset: 0, seed: seed), at: 0)
            try image.addBitmap(named: "a", granularity: 4096)
            try image.close()
            try device.flush()
            image = try VImage.open(host: device, readOnly: false)
            let start = try image.read(count: (256 << 10), at: 0)
            device.cutPower(afterOperations: Int.random(in: 0...12, using: &rng))
            for step in 0..<Int.random(in: 1...4, using: &rng) where !device.isOff {
                let offset = UInt64.random(in: 0..<((256 << 10)) - 8192, using: &rng)
                _ = try? image.write(
                    Pattern.bytes(count: 512, offset: offset, seed: seed &+ UInt64(step) &+ 99),
                    at: offset
                )
            }
            device.powerCut()
            let crashed = device.crashImage(mode, using: &rng)
            let report = ImageCheck.check(host: crashed)
            #expect(report.corruptions == 0, "seed \(seed) \(mode): \(report.findings)")
            let after = try VImage.open(host: crashed, readOnly: true)
            let content = try after.read(count: (256 << 10), at: 0)
            if let info = after.bitmapList.first, info.consistent {
                let runs = try after.bitmapRuns(named: "a", at: 0, count: (256 << 10))
                for granule in 0..<64
                where content[granule * 4096..<(granule + 1) * 4096] != start[granule * 4096..<(granule + 1) * 4096] {
                    let marked = runs.contains {
                        $0.dirty && $0.offset <= UInt64(granule * 4096)
                            && UInt64(granule * 4096) < $0.offset + $0.length
                    }
                    #expect(
                        marked,
                        "seed \(seed) \(mode): granule \(granule) changed but the consistent bitmap says clean"
                    )
                }
            }
            try after.close()
            withExtendedLifetime(image) {}
        }
    }

    /// Invariant: a damaged bitmap directory never stops the image from opening; check reports it as a
    /// `bitmap-directory` corruption and `-r all` empties it, after which the image checks clean.
    @Test func damagedDirectoryIsReportedAndRepaired() throws {
        let (host, image) = try newImage()
        try image.addBitmap(named: "a")
        try image.close()
        var header = try ImageHeader.read(from: host)
        let pointer = try #require(
            try? BitmapDirectoryPointer.decode(header.bitmapDirectoryData!, clusterSize: 4096, fileSize: host.size)
                .get()
        )
        try host.write([UInt8](repeating: 0xFF, count: 32), at: pointer.offset.rawValue)  // garbage entry
        let opened = try VImage.open(host: host, readOnly: true)
        #expect(opened.bitmapList.isEmpty || opened.bitmapList.allSatisfy { !$0.consistent })
        try opened.close()
        #expect(ImageCheck.check(host: host).findings.contains { $0.kind == "bitmap-directory" })
        let result = try ImageCheck.repair(host: host, mode: .all)
        #expect(result.after.isClean, "\(result.after.findings)")
        header = try ImageHeader.read(from: host)
        #expect(header.bitmapDirectoryData == BitmapDirectoryPointer.empty.encode())
    }

    // MARK: Snapshot diffs

    /// Invariant: the diff between two snapshots, and between a snapshot and the active state, lists
    /// exactly the clusters written (or zeroed) in between, from the tables alone.
    @Test func snapshotDiffs() throws {
        let (_, image) = try newImage()
        try image.write([UInt8](repeating: 1, count: 8192), at: 0)
        try image.createSnapshot(named: "a")
        try image.write([UInt8](repeating: 2, count: 100), at: 1 << 20)
        try image.writeZeroes(at: 2 << 20, count: 8192, mayUnmap: true, fast: false)
        try image.createSnapshot(named: "b")
        try image.write([UInt8](repeating: 3, count: 4096), at: 4096)
        #expect(
            try image.changes(from: "a", to: "b") == [
                ChangedExtent(offset: 1 << 20, length: 4096, isZero: false)
            ]
        )
        #expect(try image.changes(from: "b", to: nil) == [ChangedExtent(offset: 4096, length: 4096, isZero: false)])
        #expect(try image.changes(from: nil, to: "a") == [ChangedExtent(offset: 0, length: 8192, isZero: false)])
        #expect(try image.changes(from: "a", to: "a").isEmpty)
        #expect(throws: VImageError.self) { try image.changes(from: "nope", to: nil) }
        try image.close()
    }

    /// Invariant: a bitmap's runs (what NBD's qemu:dirty-bitmap contexts report) match a granule-by-granule
    /// reading of its bits for any range, however the bits fall around whole words, and cover exactly the
    /// range asked for (clipped to the disk).
    @Test func runsMatchTheBits() {
        var generator = SystemRandomNumberGenerator()
        for trial in 0..<50 {
            let size = UInt64.random(in: 1...4096, using: &generator) * 512
            var bitmap = DirtyBitmap(name: "r", granularityBits: 9, enabled: true, virtualSize: size)
            for _ in 0..<Int.random(in: 0...8, using: &generator) {
                let offset = UInt64.random(in: 0..<size, using: &generator)
                bitmap.mark(offset: offset, count: UInt64.random(in: 1...(200 << 10), using: &generator))
            }
            if trial % 5 == 0 { bitmap.mark(offset: 0, count: size) }
            let offset = UInt64.random(in: 0..<size, using: &generator)
            let count = UInt64.random(in: 1...(size - offset + 4096), using: &generator)
            let runs = bitmap.runs(at: offset, count: count, virtualSize: size)
            var position = offset
            for run in runs {
                #expect(run.offset == position && run.length > 0)
                for byte in stride(from: run.offset, to: run.offset + run.length, by: 512) {
                    #expect(bitmap.isDirty(byte >> 9) == run.dirty, "trial \(trial) at \(byte)")
                }
                position += run.length
            }
            #expect(position == min(offset + count, size))
            #expect(zip(runs, runs.dropFirst()).allSatisfy { $0.dirty != $1.dirty })
        }
    }

    /// Invariant: a snapshot diff read as runs (the qemu:dirty-bitmap view of `changes(from:to:)`) marks
    /// exactly the bytes of its extents, whatever the range asked for.
    @Test func diffRuns() {
        let changes = [
            ChangedExtent(offset: 4096, length: 4096, isZero: false),
            ChangedExtent(offset: 8192, length: 8192, isZero: true),
            ChangedExtent(offset: 65536, length: 4096, isZero: false),
        ]
        func dirty(_ byte: UInt64) -> Bool { changes.contains { $0.offset <= byte && byte < $0.offset + $0.length } }
        for offset in stride(from: UInt64(0), to: 80_000, by: 1000) {
            for count in [UInt64(1), 3000, 5000, 70_000] {
                let runs = changes.runs(at: offset, count: count)
                var position = offset
                for run in runs {
                    #expect(run.offset == position && run.length > 0)
                    #expect(dirty(run.offset) == run.dirty && dirty(run.offset + run.length - 1) == run.dirty)
                    position += run.length
                }
                #expect(position == offset + count)
            }
        }
        #expect([ChangedExtent]().runs(at: 0, count: 10).map(\.dirty) == [false])
    }
}
