import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// `vimg compact`: clusters move from the end of the file into holes, every reference follows, the file is
/// truncated; and a power cut anywhere in it loses nothing.
@Suite struct CompactionTests {
    static let cs = 4096

    /// Builds an image with holes near its start and used clusters at its end: data, compressed clusters,
    /// a snapshot (whose L1 copy and table land late), a bitmap; returns the active and snapshot content.
    func fragmentedImage(_ host: any BlockDevice, seed: UInt64) throws -> (active: [UInt8], snapshot: [UInt8]) {
        let size = 2 << 20
        try VImage.create(on: host, virtualSize: UInt64(size), options: .init(clusterBits: 12))
        let image = try VImage.open(host: host, readOnly: false)
        try image.write(Pattern.bytes(count: size, offset: 0, seed: seed), at: 0)
        try image.createSnapshot(named: "old")
        try image.write(Pattern.bytes(count: size / 2, offset: 0, seed: seed + 1), at: 0)  // copies: new clusters
        try image.deleteSnapshot(named: "old")  // frees the first half's original clusters: holes
        var compressed = [UInt8](repeating: 7, count: Self.cs)
        compressed[100] = 1
        for cluster in [3, 300, 400] {
            try compressed.withUnsafeBytes { try image.writeCompressed(cluster: UInt64(cluster), data: $0) }
        }
        try image.addBitmap(named: "b")
        try image.write(Pattern.bytes(count: 8192, offset: 1 << 20, seed: seed + 2), at: 1 << 20)
        try image.createSnapshot(named: "keep")
        let snapshot = try image.read(count: size, at: 0)
        try image.write(Pattern.bytes(count: 65536, offset: 0, seed: seed + 3), at: 0)
        try image.discard(at: 1536 << 10, count: 256 << 10)
        let active = try image.read(count: size, at: 0)
        try image.close()
        return (active, snapshot)
    }

    func contents(_ host: any BlockDevice) throws -> (active: [UInt8], snapshot: [UInt8], dirty: [(UInt64, UInt64)]) {
        let image = try VImage.open(host: host, readOnly: true)
        let active = try image.read(count: Int(image.size), at: 0)
        let dirty = try image.bitmapRuns(named: "b", at: 0, count: image.size).filter(\.dirty).map {
            ($0.offset, $0.length)
        }
        try image.close()
        let view = try VImage.open(host: host, readOnly: true)
        try view.selectSnapshot(named: "keep")
        let snapshot = try view.read(count: Int(view.size), at: 0)
        try view.close()
        return (active, snapshot, dirty)
    }

    /// Invariant: compaction moves clusters down and truncates the file; the active state, the snapshot
    /// and the bitmap read exactly as before, and the image checks clean.
    @Test func compactionShrinksAndKeepsEverything() throws {
        let host = MemoryDevice(size: 0, growable: true)
        let expected = try fragmentedImage(host, seed: 1)
        let before = try contents(host)
        let lengthBefore = host.size
        let image = try VImage.open(host: host, readOnly: false)
        let result = try image.compact()
        try image.close()
        #expect(result.clustersMoved > 0)
        #expect(host.size < lengthBefore, "\(host.size) of \(lengthBefore)")
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(report.findings)")
        let after = try contents(host)
        #expect(after.active == expected.active && after.snapshot == expected.snapshot)
        #expect(after.dirty.map(\.0) == before.dirty.map(\.0) && after.dirty.map(\.1) == before.dirty.map(\.1))
        // Compacting a compact image moves nothing.
        let again = try VImage.open(host: host, readOnly: false)
        #expect(try again.compact().clustersMoved == 0)
        try again.close()
    }

    /// Invariant: a power cut at any point of a compaction (unflushed writes dropped, kept or torn) leaves
    /// an image with no corruption whose active state and snapshot read as before.
    @Test(arguments: CrashMode.allCases)
    func powerCutDuringCompaction(mode: CrashMode) throws {
        let base = MemoryDevice(size: 0, growable: true)
        let expected = try fragmentedImage(base, seed: 5)
        let image0 = base.snapshotBytes()
        for seed in TestSeeds.seeds(0..<40, test: "compaction crash \(mode)") {
            var rng = SeededRandom(seed: seed)
            let device = FaultInjectingDevice(initial: image0)
            device.cutPower(afterOperations: Int.random(in: 0...400, using: &rng))
            if let image = try? VImage.open(host: device, readOnly: false) {
                _ = try? image.compact()
                _ = try? image.close()
            }
            device.powerCut()
            let crashed = device.crashImage(mode, using: &rng)
            let report = ImageCheck.check(host: crashed)
            #expect(report.corruptions == 0 && report.checkErrors == 0, "seed \(seed) \(mode): \(report.findings)")
            let after = try contents(crashed)
            #expect(after.active == expected.active, "seed \(seed) \(mode): active state changed")
            #expect(after.snapshot == expected.snapshot, "seed \(seed) \(mode): snapshot changed")
        }
    }
}
