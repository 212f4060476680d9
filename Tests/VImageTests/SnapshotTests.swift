import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

@Suite struct SnapshotTests {
    static let cs = 4096

    func makeImage(size: Int = 64 * cs) throws -> (MemoryDevice, VImage) {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: UInt64(size), options: .init(clusterBits: 12))
        return (host, try VImage.open(host: host, readOnly: false))
    }

    func expectClean(_ host: MemoryDevice, _ image: inout VImage, _ context: String) throws {
        try image.close()
        let report = ImageCheck.check(host: host)
        #expect(report.isClean, "\(context): \(report.findings)")
        image = try VImage.open(host: host, readOnly: false)
    }

    /// Invariant: a snapshot reads back exactly the content at its creation, whatever is written after,
    /// and applying it restores that content; check is clean (refcounts of shared clusters exact) after
    /// every step.
    @Test func writeSnapshotOverwriteApply() throws {
        var (host, image) = try makeImage()
        let size = 64 * Self.cs
        let a = Pattern.bytes(count: size, offset: 0, seed: 1)
        try image.write(a, at: 0)
        try image.createSnapshot(named: "a")
        try expectClean(host, &image, "after snapshot a")
        let b = Pattern.bytes(count: size / 2, offset: 1000, seed: 2)
        try image.write(b, at: 1000)
        var expectedB = a
        expectedB.replaceSubrange(1000..<1000 + b.count, with: b)
        try image.createSnapshot(named: "b")
        try image.writeZeroes(at: 0, count: UInt64(size), mayUnmap: true, fast: false)
        try expectClean(host, &image, "after zeroing")
        #expect(try image.read(count: size, at: 0) == [UInt8](repeating: 0, count: size))
        try image.applySnapshot(named: "a")
        #expect(firstDifference(try image.read(count: size, at: 0)[...], a[...]) == nil)
        try expectClean(host, &image, "after apply a")
        try image.applySnapshot(named: "b")
        #expect(firstDifference(try image.read(count: size, at: 0)[...], expectedB[...]) == nil)
        try expectClean(host, &image, "after apply b")
        #expect(image.snapshotList.map(\.name) == ["a", "b"])
        try image.close()
    }

    /// Invariant: deleting snapshots in every order frees exactly the clusters nothing else uses (check
    /// finds no leak and no corruption after each delete) and never changes the other snapshots or the disk.
    @Test func deleteInEveryOrder() throws {
        let names = ["s0", "s1", "s2"]
        let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]]
        let size = 64 * Self.cs
        for order in orders {
            var (host, image) = try makeImage()
            var contents: [String: [UInt8]] = [:]
            var model = [UInt8](repeating: 0, count: size)
            for (i, name) in names.enumerated() {
                let data = Pattern.bytes(count: 20 * Self.cs + 77, offset: UInt64(i * 9000), seed: UInt64(i))
                try image.write(data, at: UInt64(i * 9000))
                model.replaceSubrange(i * 9000..<i * 9000 + data.count, with: data)
                try image.createSnapshot(named: name)
                contents[name] = model
            }
            let final = Pattern.bytes(count: 5000, offset: 3, seed: 99)
            try image.write(final, at: 3)
            model.replaceSubrange(3..<5003, with: final)
            for index in order {
                try image.deleteSnapshot(named: names[index])
                contents[names[index]] = nil
                try expectClean(host, &image, "order \(order) after deleting \(names[index])")
                #expect(firstDifference(try image.read(count: size, at: 0)[...], model[...]) == nil)
                for (name, content) in contents {
                    let view = try VImage.open(host: host, readOnly: true)
                    try view.selectSnapshot(named: name)
                    #expect(
                        firstDifference(try view.read(count: size, at: 0)[...], content[...]) == nil,
                        "snapshot \(name)"
                    )
                    try view.close()
                }
            }
            try image.close()
            // Everything back to one owner: the disk's clusters are written in place again.
            let report = ImageCheck.check(host: host)
            #expect(report.isClean)
        }
    }

    /// Invariant: random writes, zeroes, discards, snapshot create/apply/delete, reopen and clone creation
    /// always read like a reference model that keeps every snapshot's content; check is clean at every
    /// reopen (leaks included).
    @Test func randomOperationsWithSnapshotsAndClones() throws {
        for seed in 0..<UInt64(120) {
            try runSequence(seed: seed)
        }
    }

    func runSequence(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed ^ 0x5A5A)
        let cs = Self.cs
        let size = cs * Int.random(in: 8...48, using: &rng)
        var hosts: [MemoryDevice] = [MemoryDevice(size: 0, growable: true)]
        try VImage.create(on: hosts[0], virtualSize: UInt64(size), options: .init(clusterBits: 12))
        let options = VImage.OpenOptions(l2CacheBytes: cs * 4, refcountCacheBytes: cs * 4)
        var backing: VImage? = nil
        var image = try VImage.open(host: hosts[0], readOnly: false, options: options)
        var model = ReferenceDisk(size: size)
        var snapshots: [String: [UInt8]] = [:]
        var log: [String] = []
        var nextName = 0
        for step in 0..<40 {
            let offset = Int.random(in: 0..<size, using: &rng)
            let length = Int.random(in: 1...min(size - offset, cs * 3), using: &rng)
            switch Int.random(in: 0..<12, using: &rng) {
            case 0..<4:
                log.append("write \(offset)+\(length)")
                let data = Pattern.bytes(count: length, offset: UInt64(offset), seed: seed &+ UInt64(step))
                try image.write(data, at: UInt64(offset))
                model.write(data, at: offset)
            case 4:
                log.append("zero \(offset)+\(length)")
                try image.writeZeroes(
                    at: UInt64(offset),
                    count: UInt64(length),
                    mayUnmap: Bool.random(using: &rng),
                    fast: false
                )
                model.zero(at: offset, count: length)
            case 5:
                log.append("discard \(offset)+\(length)")
                try image.discard(at: UInt64(offset), count: UInt64(length))
                let start = (offset + cs - 1) / cs * cs
                let end = offset + length == size ? size : (offset + length) / cs * cs
                if start < end { model.zero(at: start, count: end - start) }
                // A partial cluster the image owns is punched (zeroes); any other keeps its data.
                for (partStart, partEnd) in [
                    (offset, min(offset + length, max(start, offset))), (max(end, offset), offset + length),
                ] where partStart < partEnd {
                    let actual = try image.read(count: partEnd - partStart, at: UInt64(partStart))
                    #expect(
                        actual[...] == model.read(at: partStart, count: partEnd - partStart)
                            || actual.allSatisfy { $0 == 0 },
                        "seed \(seed) step \(step): a partial discard changed data to something else"
                    )
                    model.write(actual, at: partStart)
                }
            case 6, 7:
                let name = "snap\(nextName)"
                nextName += 1
                log.append("snapshot \(name)")
                try image.createSnapshot(named: name)
                snapshots[name] = model.bytes
            case 8:
                guard let name = snapshots.keys.sorted().randomElement(using: &rng) else { continue }
                log.append("apply \(name)")
                try image.applySnapshot(named: name)
                model = ReferenceDisk(size: size)
                model.write(snapshots[name]!, at: 0)
            case 9:
                guard let name = snapshots.keys.sorted().randomElement(using: &rng) else { continue }
                log.append("delete \(name)")
                try image.deleteSnapshot(named: name)
                snapshots[name] = nil
            case 10:
                log.append("reopen")
                try image.close()
                let report = ImageCheck.check(host: hosts.last!)
                try #require(report.isClean, "seed \(seed): \(report.findings) \(log)")
                image = try VImage.open(host: hosts.last!, readOnly: false, backing: backing, options: options)
            default:
                guard hosts.count < 4 else { continue }
                log.append("clone")
                try image.close()
                let base = try VImage.open(host: hosts.last!, readOnly: true, backing: backing, options: options)
                let child = MemoryDevice(size: 0, growable: true)
                try VImage.create(
                    on: child,
                    virtualSize: UInt64(size),
                    options: .init(clusterBits: 12, backingFile: "base\(hosts.count)")
                )
                hosts.append(child)
                backing = base
                image = try VImage.open(host: child, readOnly: false, backing: base, options: options)
                snapshots = [:]
            }
            let all = try image.read(count: size, at: 0)
            let diff = firstDifference(all[...], model.bytes[...])
            try #require(diff == nil, "seed \(seed) step \(step): differs at \(diff ?? 0): \(log)")
        }
        for (name, content) in snapshots {
            let view = try VImage.open(host: hosts.last!, readOnly: true, backing: backing, options: options)
            try view.selectSnapshot(named: name)
            #expect(
                firstDifference(try view.read(count: size, at: 0)[...], content[...]) == nil,
                "seed \(seed) snapshot \(name)"
            )
            try view.close()
        }
        try image.close()
        let report = ImageCheck.check(host: hosts.last!)
        #expect(report.isClean, "seed \(seed): \(report.findings) \(log)")
    }
}
