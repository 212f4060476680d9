import BlockIO
import Glibc
import Testing
import VImageTestSupport

@testable import VImage

/// Random operation sequences against a flat reference disk.
@Suite struct ModelTests {
    enum Op: CaseIterable { case write, writeZeroes, discard, flush, reopen, read, compressedWrite }

    /// Invariant: after every operation the image reads exactly like the reference disk, and after every
    /// close-and-reopen `check` is clean. Sizes and offsets are random: unaligned and cluster-crossing.
    @Test(arguments: [12, 16])
    func randomSequencesMatchReference(clusterBits: Int) throws {
        let sequences = clusterBits == 12 ? 400 : 200
        for seed in TestSeeds.seeds(0..<UInt64(sequences), test: "model test, cluster_bits \(clusterBits)") {
            try runSequence(seed: seed, clusterBits: clusterBits, steps: 30)
        }
    }

    /// The same on qcow2, written by the same engine: versions 2 and 3, and refcount widths from 1 to 64
    /// bits (qcow2 version 2 has no zero entries; 1-bit refcounts cannot share a cluster).
    @Test(arguments: [(3, 16), (2, 16), (3, 1), (3, 8), (3, 64)])
    func randomSequencesMatchReferenceOnQcow2(version: Int, refcountBits: Int) throws {
        let test = "qcow2 model test, version \(version), refcount_bits \(refcountBits)"
        for seed in TestSeeds.seeds(0..<120, test: test) {
            try runSequence(
                seed: seed,
                clusterBits: seed % 2 == 0 ? 12 : 16,
                steps: 30,
                format: .qcow2(version: version, refcountBits: refcountBits)
            )
        }
    }

    func runSequence(
        seed: UInt64,
        clusterBits: Int,
        steps: Int,
        format: VImage.CreateOptions.FileFormat = .vimg
    ) throws {
        var rng = SeededRandom(seed: seed)
        let cs = 1 << clusterBits
        let size =
            cs * Int.random(in: 8...40, using: &rng)
            + (Bool.random(using: &rng) ? 0 : 512 * Int.random(in: 1...7, using: &rng))
        let host = MemoryDevice(size: 0, growable: true)
        var createOptions = VImage.CreateOptions(clusterBits: clusterBits)
        createOptions.format = format
        try VImage.create(on: host, virtualSize: UInt64(size), options: createOptions)
        let options = VImage.OpenOptions(l2CacheBytes: cs * 4, refcountCacheBytes: cs * 4)
        var image = try VImage.open(host: host, readOnly: false, options: options)
        #expect(image.formatName == (format == .vimg ? "vimg" : "qcow2"))
        var model = ReferenceDisk(size: size)
        func randomRange() -> (Int, Int) {
            let offset = Int.random(in: 0..<size, using: &rng)
            let maxLength = min(size - offset, cs * 3 + 100)
            return (offset, Int.random(in: 1...maxLength, using: &rng))
        }
        var log: [String] = ["size \(size)"]
        for step in 0..<steps {
            let op = Op.allCases.randomElement(using: &rng)!
            let context = "seed \(seed) step \(step) op \(op)"
            switch op {
            case .write:
                let (offset, length) = randomRange()
                log.append("write \(offset)+\(length)")
                let data = Pattern.bytes(count: length, offset: UInt64(offset), seed: seed &+ UInt64(step))
                try image.write(data, at: UInt64(offset))
                model.write(data, at: offset)
            case .writeZeroes:
                let (offset, length) = randomRange()
                let unmap = Bool.random(using: &rng)
                log.append("zero \(offset)+\(length) unmap \(unmap)")
                try image.writeZeroes(at: UInt64(offset), count: UInt64(length), mayUnmap: unmap, fast: false)
                model.zero(at: offset, count: length)
            case .discard:
                let (offset, length) = randomRange()
                log.append("discard \(offset)+\(length)")
                try image.discard(at: UInt64(offset), count: UInt64(length))
                // Discard drops whole clusters (a partial cluster at the very end of the disk counts); a
                // partial cluster the image owns is punched (reads zeroes), any other keeps its data.
                let start = (offset + cs - 1) / cs * cs
                let end = offset + length == size ? size : (offset + length) / cs * cs
                if start < end { model.zero(at: start, count: end - start) }
                for (partStart, partEnd) in [
                    (offset, min(offset + length, max(start, offset))), (max(end, offset), offset + length),
                ]
                where partStart < partEnd {
                    let actual = try image.read(count: partEnd - partStart, at: UInt64(partStart))
                    let zeroes = [UInt8](repeating: 0, count: partEnd - partStart)
                    #expect(
                        actual[...] == model.read(at: partStart, count: partEnd - partStart) || actual == zeroes,
                        "\(context): a partial discard changed data to something else"
                    )
                    model.write(actual, at: partStart)
                }
            case .compressedWrite:
                let cluster = Int.random(in: 0..<size / cs, using: &rng)
                let data = compressible(cs, seed: seed &+ UInt64(step), rng: &rng)
                log.append("compressed \(cluster)")
                try data.withUnsafeBytes { try image.writeCompressed(cluster: UInt64(cluster), data: $0) }
                model.write(data, at: cluster * cs)
            case .flush:
                log.append("flush")
                try image.flush()
            case .reopen:
                log.append("reopen")
                try image.close()
                let report = ImageCheck.check(host: host)
                #expect(report.isClean, "\(context): \(report.findings) \(log)")
                image = try VImage.open(host: host, readOnly: false, options: options)
            case .read:
                let (offset, length) = randomRange()
                let got = try image.read(count: length, at: UInt64(offset))
                #expect(firstDifference(got[...], model.read(at: offset, count: length)) == nil, "\(context)")
            }
            if step % 10 == 9 || step == steps - 1 {
                let all = try image.read(count: size, at: 0)
                let diff = firstDifference(all[...], model.bytes[...])
                try #require(diff == nil, "\(context): full read differs at \(diff ?? 0): \(log)")
            }
        }
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "seed \(seed): \(report.findings)")
    }

    /// Invariant: concurrent writers to disjoint ranges (and to different parts of the same new clusters)
    /// never lose each other's data.
    @Test func concurrentWritersDoNotLoseData() throws {
        let host = MemoryDevice(size: 0, growable: true)
        let cs = 4096
        let size = cs * 256
        try VImage.create(on: host, virtualSize: UInt64(size), options: .init(clusterBits: 12))
        let image = try VImage.open(host: host, readOnly: false)
        let threads = 8
        let chunk = 512
        // Thread t writes every 512-byte sector whose index % threads == t: all threads share every cluster.
        try TestThread.run(threads) { t in
            var sector = t
            while sector * chunk < size {
                let data = Pattern.bytes(count: chunk, offset: UInt64(sector * chunk), seed: 7)
                try image.write(data, at: UInt64(sector * chunk))
                sector += threads
            }
        }
        let all = try image.read(count: size, at: 0)
        #expect(firstDifference(all[...], Pattern.bytes(count: size, offset: 0, seed: 7)[...]) == nil)
        try image.close()
        #expect(ImageCheck.check(host: host).isClean)
    }

    /// Invariant: the refcount table grows (relocates) correctly when the file outgrows it, in VIMG and in
    /// qcow2 (whose header then points at the new table).
    @Test(arguments: [false, true]) func refcountTableGrows(qcow2: Bool) throws {
        let host = MemoryDevice(size: 0, growable: true)
        var createOptions = VImage.CreateOptions(clusterBits: 12)
        if qcow2 { createOptions.format = .qcow2() }
        try VImage.create(on: host, virtualSize: 64 << 20, options: createOptions)
        var image = try VImage.open(host: host, readOnly: false)
        let oldTable = image.currentHeader.refcountTableOffset
        // One table cluster covers 512 blocks x 2048 clusters; jump the allocator close to that edge.
        image.state.withLock {
            $0.hostEnd = HostCluster(512 * 2048 - 3)
            $0.freeHint = $0.hostEnd
        }
        var model = ReferenceDisk(size: 64 << 20)
        for i in 0..<40 {
            let data = Pattern.bytes(count: 4096, offset: UInt64(i) * 65536, seed: 3)
            try image.write(data, at: UInt64(i) * 65536)
            model.write(data, at: i * 65536)
        }
        #expect(image.currentHeader.refcountTableOffset != oldTable)
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(report.findings)")
        image = try VImage.open(host: host, readOnly: true)
        #expect(firstDifference(try image.read(count: 64 << 20, at: 0)[...], model.bytes[...]) == nil)
        try image.close()
    }
}

/// A cluster of data LZ4 can shrink (runs of repeated bytes), or now and then one it cannot.
func compressible<R: RandomNumberGenerator>(_ count: Int, seed: UInt64, rng: inout R) -> [UInt8] {
    if Int.random(in: 0..<5, using: &rng) == 0 { return Pattern.bytes(count: count, offset: 0, seed: seed) }
    var out: [UInt8] = []
    out.reserveCapacity(count)
    while out.count < count {
        let byte = UInt8.random(in: 0...255, using: &rng)
        out += repeatElement(byte, count: min(count - out.count, Int.random(in: 1...64, using: &rng)))
    }
    return out
}

#if canImport(Glibc)
import Glibc
#endif
