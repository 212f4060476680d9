import BlockIO
import ImageFormats
import Testing
import VImageTestSupport

@testable import VImage

/// Linked clones and the operations on chains: commit, rebase, resize.
@Suite struct ChainTests {
    static let cs = 4096
    static let size = 48 * 4096

    /// A chain of in-memory images: each level is a clone of the one before.
    struct Chain {
        var hosts: [MemoryDevice] = []
        var images: [VImage] = []
        var top: VImage { images.last! }

        mutating func add(size: Int = ChainTests.size, clusterBits: Int = 12) throws {
            let host = MemoryDevice(size: 0, growable: true)
            try VImage.create(
                on: host,
                virtualSize: UInt64(size),
                options: .init(clusterBits: clusterBits, backingFile: images.isEmpty ? nil : "level\(images.count - 1)")
            )
            if let previous = images.last {
                try previous.close()
                images[images.count - 1] = try VImage.open(
                    host: hosts.last!,
                    readOnly: true,
                    backing: images.count > 1 ? images[images.count - 2] : nil
                )
            }
            hosts.append(host)
            images.append(try VImage.open(host: host, readOnly: false, backing: images.last))
        }
    }

    /// Invariant: a clone reads through to its backing chain until written, a partial write to an
    /// unallocated cluster keeps the rest of the cluster from the chain, and every level checks clean.
    @Test func threeLevelsDeep() throws {
        var chain = Chain()
        var model = ReferenceDisk(size: Self.size)
        var rng = SeededRandom(seed: 42)
        for level in 0..<4 {
            try chain.add()
            for i in 0..<12 {
                let offset = Int.random(in: 0..<Self.size - 9000, using: &rng)
                let data = Pattern.bytes(
                    count: Int.random(in: 1...9000, using: &rng),
                    offset: UInt64(offset),
                    seed: UInt64(level * 100 + i)
                )
                try chain.top.write(data, at: UInt64(offset))
                model.write(data, at: offset)
            }
            #expect(
                firstDifference(try chain.top.read(count: Self.size, at: 0)[...], model.bytes[...]) == nil,
                "level \(level)"
            )
        }
        for (host, image) in zip(chain.hosts, chain.images) {
            try image.close()
            #expect(ImageCheck.check(host: host).isClean)
        }
    }

    /// Invariant: committing a clone into its base leaves the base reading exactly as the clone did,
    /// empties the clone (it reads through again), and both check clean.
    @Test func commitIntoBase() throws {
        var chain = Chain()
        try chain.add()
        let base = Pattern.bytes(count: Self.size, offset: 0, seed: 1)
        try chain.top.write(base, at: 0)
        try chain.add()
        var model = ReferenceDisk(size: Self.size)
        model.write(base, at: 0)
        let top = Pattern.bytes(count: 10000, offset: 5000, seed: 2)
        try chain.top.write(top, at: 5000)
        model.write(top, at: 5000)
        try chain.top.writeZeroes(at: 40000, count: 30000, mayUnmap: true, fast: false)
        model.zero(at: 40000, count: 30000)
        // Commit needs the base writable.
        try chain.images[0].close()
        let writableBase = try VImage.open(host: chain.hosts[0], readOnly: false)
        try chain.top.close()
        let child = try VImage.open(host: chain.hosts[1], readOnly: false, backing: writableBase)
        try child.commit(into: writableBase)
        try child.unallocateAll()
        #expect(firstDifference(try writableBase.read(count: Self.size, at: 0)[...], model.bytes[...]) == nil)
        #expect(firstDifference(try child.read(count: Self.size, at: 0)[...], model.bytes[...]) == nil)
        #expect(try child.mapping(at: 0, count: UInt64(Self.size)).allSatisfy { $0.kind == .unallocated })
        try child.close()
        try writableBase.close()
        #expect(ImageCheck.check(host: chain.hosts[0]).isClean)
        #expect(ImageCheck.check(host: chain.hosts[1]).isClean)
    }

    /// Invariant: a safe rebase (onto the grandparent, or onto nothing) never changes what the guest reads.
    @Test(arguments: [true, false])
    func rebaseKeepsGuestContent(ontoGrandparent: Bool) throws {
        var chain = Chain()
        var model = ReferenceDisk(size: Self.size)
        for level in 0..<3 {
            try chain.add()
            let data = Pattern.bytes(count: 20000, offset: UInt64(level * 30000), seed: UInt64(level))
            try chain.top.write(data, at: UInt64(level * 30000))
            model.write(data, at: level * 30000)
        }
        try chain.top.rebase(
            onto: ontoGrandparent ? chain.images[0] : nil,
            name: ontoGrandparent ? "level0" : nil,
            format: nil
        )
        #expect(chain.top.currentHeader.backingFileName == (ontoGrandparent ? "level0" : nil))
        try chain.top.close()
        let reopened = try VImage.open(
            host: chain.hosts[2],
            readOnly: true,
            backing: ontoGrandparent ? chain.images[0] : nil
        )
        #expect(firstDifference(try reopened.read(count: Self.size, at: 0)[...], model.bytes[...]) == nil)
        try reopened.close()
        #expect(ImageCheck.check(host: chain.hosts[2]).isClean)
    }

    /// Invariant: growing keeps data and reads zeroes past the old end; shrinking needs to be asked for,
    /// drops only what lies past the new end, and growing again shows zeroes there.
    @Test func resizeGrowAndShrink() throws {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: 1 << 20, options: .init(clusterBits: 12))
        let image = try VImage.open(host: host, readOnly: false)
        let data = Pattern.bytes(count: 1 << 20, offset: 0, seed: 5)
        try image.write(data, at: 0)
        // Grow past what the L1 table maps (2 MiB per entry at 4 KiB clusters), so it is reallocated.
        try image.resize(to: 5 << 30)
        #expect(image.size == 5 << 30)
        #expect(try image.read(count: 1 << 20, at: 0) == data)
        #expect(try image.read(count: 4096, at: (5 << 30) - 4096) == [UInt8](repeating: 0, count: 4096))
        try image.write(data, at: (5 << 30) - UInt64(data.count))
        #expect(throws: VImageError.self) { try image.resize(to: 1000 * 512) }
        let dropped = try image.resize(to: 1000 * 512, allowShrink: true)
        #expect(dropped > 0)
        #expect(try image.read(count: 1000 * 512, at: 0)[...] == data[0..<1000 * 512])
        try image.resize(to: 1 << 20)
        #expect(
            try image.read(count: (1 << 20) - 1000 * 512, at: 1000 * 512)
                == [UInt8](repeating: 0, count: (1 << 20) - 1000 * 512)
        )
        try image.close()
        #expect(ImageCheck.check(host: host).isClean)
    }

    /// Invariant: a missing backing file, a chain that loops, and a chain deeper than the limit are clear
    /// errors at open, never a hang or a crash.
    @Test func brokenChainsAreClearErrors() throws {
        let dir = TestEnvironment.temporaryDirectory()
        defer { TestEnvironment.remove(dir) }
        try VImage.create(path: dir + "/orphan.vimg", virtualSize: 1 << 20, options: .init(backingFile: "missing.vimg"))
        #expect { try ImageFormats.openVImage(path: dir + "/orphan.vimg", readOnly: true) } throws: {
            ($0 as? ImageFormatError)?.code == .notFound
        }

        try VImage.create(path: dir + "/a.vimg", virtualSize: 1 << 20, options: .init(backingFile: "b.vimg"))
        try VImage.create(path: dir + "/b.vimg", virtualSize: 1 << 20, options: .init(backingFile: "a.vimg"))
        #expect { try ImageFormats.openVImage(path: dir + "/a.vimg", readOnly: true) } throws: {
            ($0 as? ImageFormatError)?.code == .invalidImage
        }

        try VImage.create(path: dir + "/d0.vimg", virtualSize: 1 << 20)
        for i in 1...(VImage.maxBackingDepth + 1) {
            try VImage.create(
                path: dir + "/d\(i).vimg",
                virtualSize: 1 << 20,
                options: .init(backingFile: "d\(i - 1).vimg", backingFormat: "vimg")
            )
        }
        #expect {
            try ImageFormats.openVImage(path: dir + "/d\(VImage.maxBackingDepth + 1).vimg", readOnly: true)
        } throws: {
            ($0 as? ImageFormatError)?.code == .limitExceeded
        }
        let ok = try ImageFormats.openVImage(path: dir + "/d\(VImage.maxBackingDepth - 1).vimg", readOnly: true)
        try ok.close()
    }
}
