import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// Power cuts at random points of random workloads, on a device that drops or tears unflushed writes.
@Suite struct CrashTests {
    /// Invariant: after a crash at any point, with unflushed writes dropped, kept, partly kept or torn,
    /// the image opens, `check` finds no corruption (leaks are allowed), every byte acknowledged by a
    /// flush and not written since reads back as written, and the image stays writable and checks clean
    /// after a clean close.
    @Test(arguments: CrashMode.allCases)
    func crashKeepsFlushedDataAndMetadataConsistent(mode: CrashMode) throws {
        // The seed alone decides the run (the mode is an argument), so a failure reruns from its message.
        for seed in TestSeeds.seeds(0..<150, test: "crash test \(mode)") {
            do { try crashOnce(seed: seed, mode: mode) } catch { Issue.record("seed \(seed) \(mode): \(error)") }
        }
    }

    /// Invariant: the same with end-to-end checksums, and more: no block reads as a checksum error after
    /// the crash (every referenced block verifies), and recovery hides nothing: a bit flipped in a data
    /// block that was durable at the crash is still an error after the recovery.
    @Test(arguments: CrashMode.allCases)
    func crashWithChecksumsKeepsEveryBlockVerifiable(mode: CrashMode) throws {
        for seed in TestSeeds.seeds(0..<60, test: "checksum crash test \(mode)") {
            do {
                try crashOnce(seed: seed, mode: mode, checksums: true)
            } catch {
                Issue.record("seed \(seed) \(mode): \(error)")
            }
        }
    }

    /// Invariant: the same on qcow2, written by the same engine (versions 2 and 3).
    @Test(arguments: CrashMode.allCases)
    func crashOnQcow2KeepsFlushedDataAndMetadataConsistent(mode: CrashMode) throws {
        for seed in TestSeeds.seeds(0..<80, test: "qcow2 crash test \(mode)") {
            do {
                try crashOnce(seed: seed, mode: mode, format: .qcow2(version: seed % 3 == 0 ? 2 : 3))
            } catch {
                Issue.record("seed \(seed) \(mode): \(error)")
            }
        }
    }

    /// Invariant: a power cut anywhere in a qcow2 amend (`vimg amend -o compat=...,lazy_refcounts=...`)
    /// leaves an image that opens at the old or the new version, checks free of corruption, and reads the
    /// disk and every snapshot as before.
    @Test(arguments: CrashMode.allCases)
    func crashDuringQcow2AmendKeepsTheImage(mode: CrashMode) throws {
        for seed in TestSeeds.seeds(0..<40, test: "qcow2 amend crash \(mode)") {
            var rng = SeededRandom(seed: seed)
            let cs = 4096
            let size = cs * Int.random(in: 16...300, using: &rng)
            let from: UInt32 = Bool.random(using: &rng) ? 2 : 3
            let device = FaultInjectingDevice()
            var options = VImage.CreateOptions(clusterBits: 12)
            options.format = .qcow2(version: Int(from), refcountBits: 16)
            try VImage.create(on: device, virtualSize: UInt64(size), options: options)
            let image = try VImage.open(host: device, readOnly: false)
            var snapshots: [String: [UInt8]] = [:]
            for i in 0..<Int.random(in: 0...3, using: &rng) {
                let offset = Int.random(in: 0..<size - cs, using: &rng)
                try image.write(
                    Pattern.bytes(count: cs, offset: UInt64(offset), seed: seed &+ UInt64(i)),
                    at: UInt64(offset)
                )
                try image.createSnapshot(named: "s\(i)")
                snapshots["s\(i)"] = try image.read(count: size, at: 0)
            }
            try image.write(Pattern.bytes(count: 2 * cs, offset: 0, seed: seed), at: 0)
            let content = try image.read(count: size, at: 0)
            try image.close()
            try device.flush()

            device.cutPower(afterOperations: Int.random(in: 0...40, using: &rng))
            let amendment = Qcow2Amendment(version: 5 - from, lazyRefcounts: from == 2 && Bool.random(using: &rng))
            do {
                try VImage.amendQcow2(host: device, path: nil, amendment)
            } catch  where device.isOff {}
            device.powerCut()
            let crashed = device.crashImage(mode, using: &rng)
            let report = ImageCheck.check(host: crashed)
            #expect(
                report.corruptions == 0 && report.checkErrors == 0,
                "seed \(seed) \(mode): \(report.findings) \(report.incompleteReason ?? "")"
            )
            let version = try Qcow2Header.read(from: crashed, path: nil).version
            #expect(version == from || version == 5 - from, "seed \(seed) \(mode): version \(version)")
            let after = try VImage.open(host: crashed, readOnly: true)
            #expect(try after.read(count: size, at: 0) == content, "seed \(seed) \(mode): the disk changed")
            #expect(Set(after.snapshotList.map(\.name)) == Set(snapshots.keys), "seed \(seed) \(mode)")
            try after.close()
            for (name, bytes) in snapshots {
                let view = try VImage.open(host: crashed, readOnly: true)
                try view.selectSnapshot(named: name)
                #expect(try view.read(count: size, at: 0) == bytes, "seed \(seed) \(mode): snapshot \(name) changed")
                try view.close()
            }
        }
    }

    /// Corruptions other than a clear COPIED flag on an owned qcow2 cluster, which a crash in the middle of
    /// a snapshot change may leave (harmless: the cluster is copied on its next write; docs/FORMAT.md,
    /// "qcow2 written by the same engine").
    static func harmfulCorruptions(_ report: CheckReport) -> Int {
        report.corruptions - report.findings.filter { $0.kind == "copied-flag-clear" }.count
    }

    func crashOnce(
        seed: UInt64,
        mode: CrashMode,
        checksums: Bool = false,
        format: VImage.CreateOptions.FileFormat = .vimg
    ) throws {
        var rng = SeededRandom(seed: seed)
        let clusterBits = Bool.random(using: &rng) ? 12 : 13
        let cs = 1 << clusterBits
        let size = cs * Int.random(in: 16...600, using: &rng)
        let device = FaultInjectingDevice()
        try VImage.create(
            on: device,
            virtualSize: UInt64(size),
            options: {
                var o = VImage.CreateOptions(clusterBits: clusterBits, checksums: checksums)
                o.format = format
                return o
            }()
        )
        try device.flush()
        // Small caches so evictions (early metadata writes) happen too.
        let options = VImage.OpenOptions(l2CacheBytes: cs * 4, refcountCacheBytes: cs * 4)
        var image = try VImage.open(host: device, readOnly: false, options: options)
        var current = ReferenceDisk(size: size)
        var durable = current
        // 512-byte sectors changed since the last acknowledged flush: their content is unspecified.
        var touched = Set<Int>()
        // Snapshots whose creation was acknowledged and whose deletion was not started, and their content.
        var snapshots: [String: [UInt8]] = [:]
        // Snapshots that may or may not exist after the crash (an operation on them was cut short).
        var uncertain = Set<String>()
        var nextSnapshot = 0
        func touch(_ offset: Int, _ length: Int) {
            for s in (offset / 512)...((offset + length - 1) / 512) { touched.insert(s) }
        }
        let steps = Int.random(in: 1...60, using: &rng)
        // Half the runs cut the power at a random device operation, often inside a flush or an eviction.
        if Bool.random(using: &rng) { device.cutPower(afterOperations: Int.random(in: 0...(steps * 4), using: &rng)) }
        for step in 0..<steps where !device.isOff {
            do {
                let offset = Int.random(in: 0..<size, using: &rng)
                let length = Int.random(in: 1...min(size - offset, cs * 3), using: &rng)
                switch Int.random(in: 0..<14, using: &rng) {
                case 13:
                    let cluster = Int.random(in: 0..<size / cs, using: &rng)
                    let data = compressible(cs, seed: seed &+ UInt64(step), rng: &rng)
                    touch(cluster * cs, cs)
                    try data.withUnsafeBytes { try image.writeCompressed(cluster: UInt64(cluster), data: $0) }
                    current.write(data, at: cluster * cs)
                case 10:
                    let name = "s\(nextSnapshot)"
                    nextSnapshot += 1
                    uncertain.insert(name)
                    try image.createSnapshot(named: name)  // includes a flush
                    uncertain.remove(name)
                    snapshots[name] = current.bytes
                    durable = current
                    touched.removeAll()
                case 11:
                    guard let name = snapshots.keys.sorted().randomElement(using: &rng) else { continue }
                    snapshots[name] = nil
                    uncertain.insert(name)
                    try image.deleteSnapshot(named: name)
                    uncertain.remove(name)
                    durable = current
                    touched.removeAll()
                case 12:
                    guard let name = snapshots.keys.sorted().randomElement(using: &rng) else { continue }
                    touch(0, size)
                    try image.applySnapshot(named: name)
                    current = ReferenceDisk(size: size)
                    current.write(snapshots[name]!, at: 0)
                    durable = current
                    touched.removeAll()
                case 0..<6:
                    let data = Pattern.bytes(count: length, offset: UInt64(offset), seed: seed &+ UInt64(step))
                    touch(offset, length)  // before the call: a write cut short leaves its range unspecified
                    try image.write(data, at: UInt64(offset))
                    current.write(data, at: offset)
                case 6:
                    touch(offset, length)
                    try image.writeZeroes(
                        at: UInt64(offset),
                        count: UInt64(length),
                        mayUnmap: Bool.random(using: &rng),
                        fast: false
                    )
                    current.zero(at: offset, count: length)
                case 7:
                    let start = (offset + cs - 1) / cs * cs
                    let end = offset + length == size ? size : (offset + length) / cs * cs
                    // Partial clusters may be punched (zeroes) or kept: the whole range is unspecified until
                    // read back below.
                    touch(offset, length)
                    try image.discard(at: UInt64(offset), count: UInt64(length))
                    if start < end { current.zero(at: start, count: end - start) }
                    current.write(try image.read(count: length, at: UInt64(offset)), at: offset)
                default:
                    try image.flush()
                    durable = current
                    touched.removeAll()
                }
            } catch  where device.isOff {
                break  // the operation in progress was never acknowledged
            }
        }
        // Power cut: the abandoned engine can no longer write anything.
        device.powerCut()
        let crashed = device.crashImage(mode, using: &rng)
        let report = ImageCheck.check(host: crashed)
        try #require(
            Self.harmfulCorruptions(report) == 0 && report.checkErrors == 0,
            "seed \(seed) \(mode): \(report.findings) \(report.incompleteReason ?? "")"
        )
        withExtendedLifetime(image) {}
        if checksums { try flipDurableData(crashed, seed: seed, mode: mode, options: options, rng: &rng) }

        image = try VImage.open(host: crashed, readOnly: false, options: options)
        let all = try image.read(count: size, at: 0)
        for sector in 0..<(size + 511) / 512 where !touched.contains(sector) {
            let range = sector * 512..<min(size, sector * 512 + 512)
            if all[range] != durable.bytes[range] {
                Issue.record("seed \(seed) \(mode): flushed sector \(sector) differs after the crash")
                break
            }
        }
        // Each snapshot reads entirely as it was created; acknowledged ones all exist.
        let present = Set(image.snapshotList.map(\.name))
        for name in snapshots.keys {
            #expect(present.contains(name), "seed \(seed) \(mode): snapshot \(name) lost")
        }
        for name in present {
            #expect(
                snapshots[name] != nil || uncertain.contains(name),
                "seed \(seed) \(mode): unexpected snapshot \(name)"
            )
            guard let content = snapshots[name] else { continue }
            let view = try VImage.open(host: crashed, readOnly: true, options: options)
            try view.selectSnapshot(named: name)
            #expect(
                firstDifference(try view.read(count: size, at: 0)[...], content[...]) == nil,
                "seed \(seed) \(mode): snapshot \(name) differs"
            )
            try view.close()
        }
        // Still fully usable: write everywhere touched, close, check.
        let data = Pattern.bytes(count: size, offset: 0, seed: seed ^ 0xABCD)
        try image.write(data, at: 0)
        try image.close()
        let after = ImageCheck.check(host: crashed)
        #expect(
            after.corruptions == 0 && after.checkErrors == 0,
            "seed \(seed) \(mode) after rewrite: \(after.findings)"
        )
        image = try VImage.open(host: crashed, readOnly: true)
        #expect(firstDifference(try image.read(count: size, at: 0)[...], data[...]) == nil)
        try image.close()
    }

    /// Flips one bit of a data block referenced by the crashed image (so durable before the crash), in a
    /// copy, and expects the recovering open and the read to report it.
    func flipDurableData<R: RandomNumberGenerator>(
        _ crashed: MemoryDevice,
        seed: UInt64,
        mode: CrashMode,
        options: VImage.OpenOptions,
        rng: inout R
    ) throws {
        let copy = MemoryDevice(size: 0, growable: true)
        try copy.write(crashed.snapshotBytes(), at: 0)
        let view = try VImage.open(host: copy, readOnly: true, options: options)
        let data = try view.mapping(at: 0, count: view.size).compactMap { extent -> (UInt64, UInt64, UInt64)? in
            if case .data(let host) = extent.kind { return (extent.offset, host, extent.length) }
            return nil
        }
        try view.close()
        guard let (guest, host, length) = data.randomElement(using: &rng) else { return }
        let within = UInt64.random(in: 0..<length, using: &rng)
        var byte = try copy.read(count: 1, at: host + within)
        byte[0] ^= 0x10
        try copy.write(byte, at: host + within)
        let image = try VImage.open(host: copy, readOnly: false, options: options)
        defer { try? image.close() }
        #expect(
            throws: VImageError.self,
            "seed \(seed) \(mode): a flipped bit in durable data at guest \(guest + within) read without an error"
        ) { _ = try image.read(count: 1, at: guest + within) }
    }
}
