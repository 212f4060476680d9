import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// Space goes back to the host: freed clusters and discarded parts of owned clusters are punched out of
/// the file, and sparsify turns zero-filled clusters into zero clusters.
@Suite(.serialized) struct SpaceTests {
    func withImage(
        policy: VImage.DiscardPolicy = .punch,
        _ body: (VImage, FileDevice, String) throws -> Void
    ) throws {
        let dir = TestEnvironment.temporaryDirectory("vimg-space")
        defer { TestEnvironment.remove(dir) }
        let path = dir + "/disk.vimg"
        try VImage.create(path: path, virtualSize: 64 << 20, options: .init(clusterBits: 16))
        let image = try VImage.open(path: path, readOnly: false, options: .init(discard: policy))
        let observer = try FileDevice.open(path: path, readOnly: true)
        defer { try? observer.close() }
        try body(image, observer, path)
        try image.close()
        let report = try ImageCheck.check(host: FileDevice.open(path: path, readOnly: true))
        #expect(report.isClean, "\(report.findings)")
    }

    /// Invariant: a discard of whole clusters gives their space back to the host once the change is
    /// flushed, and the data that remains reads back unchanged.
    @Test func discardPunchesFreedClusters() throws {
        try withImage { image, file, _ in
            try image.write(Pattern.bytes(count: 16 << 20, offset: 0, seed: 1), at: 0)
            try image.flush()
            let full = file.allocatedBytes()
            try image.discard(at: 1 << 20, count: 12 << 20)
            try image.flush()
            #expect(file.allocatedBytes() + (11 << 20) < full, "\(file.allocatedBytes()) of \(full)")
            #expect(try image.read(count: 1 << 20, at: 0) == Pattern.bytes(count: 1 << 20, offset: 0, seed: 1))
            #expect(try image.read(count: 4096, at: 2 << 20) == [UInt8](repeating: 0, count: 4096))
        }
    }

    /// Invariant: a discard of part of a cluster this image owns punches that part (space comes back at
    /// 4 KiB granularity); the rest of the cluster keeps its data.
    @Test func partialDiscardPunchesOwnedClusters() throws {
        try withImage { image, file, _ in
            let data = Pattern.bytes(count: 1 << 20, offset: 0, seed: 2)
            try image.write(data, at: 0)
            try image.flush()
            let before = file.allocatedBytes()
            try image.discard(at: 4096, count: 32768)  // inside cluster 0 (64 KiB)
            #expect(file.allocatedBytes() <= before - 32768, "\(file.allocatedBytes()) vs \(before)")
            #expect(try image.read(count: 4096, at: 0) == Array(data[0..<4096]))
            #expect(try image.read(count: 32768, at: 4096) == [UInt8](repeating: 0, count: 32768))
            #expect(try image.read(count: 4096, at: 36864) == Array(data[36864..<40960]))
        }
    }

    /// Invariant: clusters a deleted snapshot alone held are punched too; with the `free` policy nothing
    /// is punched (the earlier behaviour) and with `ignore` a discard does nothing.
    @Test func snapshotDeleteAndPolicies() throws {
        try withImage { image, file, _ in
            try image.write(Pattern.bytes(count: 8 << 20, offset: 0, seed: 3), at: 0)
            try image.createSnapshot(named: "s")
            try image.write(Pattern.bytes(count: 8 << 20, offset: 0, seed: 4), at: 0)
            try image.flush()
            let both = file.allocatedBytes()
            try image.deleteSnapshot(named: "s")
            #expect(file.allocatedBytes() + (7 << 20) < both)
        }
        try withImage(policy: .free) { image, file, _ in
            try image.write(Pattern.bytes(count: 8 << 20, offset: 0, seed: 5), at: 0)
            try image.flush()
            let full = file.allocatedBytes()
            try image.discard(at: 0, count: 8 << 20)
            try image.flush()
            #expect(file.allocatedBytes() >= full)
        }
        try withImage(policy: .ignore) { image, _, _ in
            try image.write(Pattern.bytes(count: 65536, offset: 0, seed: 6), at: 0)
            try image.discard(at: 0, count: 65536)
            #expect(try image.read(count: 65536, at: 0) == Pattern.bytes(count: 65536, offset: 0, seed: 6))
        }
    }

    /// Invariant: sparsify turns clusters written with zeroes into zero clusters and punches them, keeps
    /// every other byte, and leaves a clean image.
    @Test func sparsifyFreesZeroClusters() throws {
        try withImage { image, file, _ in
            try image.write([UInt8](repeating: 0, count: 8 << 20), at: 0)
            try image.write(Pattern.bytes(count: 100, offset: 3 << 20, seed: 7), at: 3 << 20)
            try image.flush()
            let before = file.allocatedBytes()
            let zeroed = try image.sparsify()
            #expect(zeroed == 127)
            #expect(file.allocatedBytes() + (7 << 20) < before)
            #expect(try image.read(count: 100, at: 3 << 20) == Pattern.bytes(count: 100, offset: 3 << 20, seed: 7))
            #expect(try image.mapping(at: 0, count: 8 << 20).filter { $0.kind != .unallocated }.count == 1)
        }
    }
}
