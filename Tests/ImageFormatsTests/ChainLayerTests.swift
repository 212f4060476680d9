import BlockIO
import ImageFormats
import Testing
import VImage

/// The chain walker behind `vimg map` and NBD's `qemu:allocation-depth`.
@Suite struct ChainLayerTests {
    /// Invariant: each range's depth is the first level of the chain that has it (zero clusters included,
    /// a raw level has everything), 0 past the end of a shorter backing device, and neighbours with equal
    /// depth are merged; a device that is not an image is depth 1 throughout.
    @Test func allocationDepth() throws {
        let k: UInt64 = 1024
        let raw = MemoryDevice(size: 512 * k)
        let middleHost = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: middleHost, virtualSize: 1024 * k, options: .init(clusterBits: 12))
        let middle = try VImage.open(host: middleHost, readOnly: false, backing: raw)
        try middle.write([UInt8](repeating: 2, count: Int(64 * k)), at: 64 * k)
        let topHost = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: topHost, virtualSize: 1024 * k, options: .init(clusterBits: 12))
        let top = try VImage.open(host: topHost, readOnly: false, backing: middle)
        try top.write([UInt8](repeating: 1, count: 4096), at: 0)
        try top.writeZeroes(at: 256 * k, count: 4 * k, mayUnmap: false, fast: false)

        let depths = try ImageFormats.allocationDepth(of: top, at: 0, count: 1024 * k)
        #expect(
            depths == [
                .init(offset: 0, length: 4 * k, depth: 1), .init(offset: 4 * k, length: 60 * k, depth: 3),
                .init(offset: 64 * k, length: 64 * k, depth: 2), .init(offset: 128 * k, length: 128 * k, depth: 3),
                .init(offset: 256 * k, length: 4 * k, depth: 1), .init(offset: 260 * k, length: 252 * k, depth: 3),
                .init(offset: 512 * k, length: 512 * k, depth: 0),
            ]
        )
        // A range inside one run, and a device that is no image.
        #expect(
            try ImageFormats.allocationDepth(of: top, at: 70 * k, count: 10) == [
                .init(offset: 70 * k, length: 10, depth: 2)
            ]
        )
        #expect(
            try ImageFormats.allocationDepth(of: raw, at: 5, count: 100) == [.init(offset: 5, length: 100, depth: 1)]
        )
        #expect(throws: BlockIOError.self) { try ImageFormats.allocationDepth(of: raw, at: 512 * k, count: 1) }
        try top.close()
        try middle.close()
    }
}
