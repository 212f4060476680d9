import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// `check` findings, `check -r`, and hostile metadata.
@Suite struct RepairTests {
    static let cs = 4096
    static let size = 64 * 4096

    /// An image with data in every other cluster and one snapshot; returns the host and the content.
    func makeImage(snapshot: Bool = true) throws -> (MemoryDevice, [UInt8]) {
        let host = MemoryDevice(size: 0, growable: true)
        try VImage.create(on: host, virtualSize: UInt64(Self.size), options: .init(clusterBits: 12))
        let image = try VImage.open(host: host, readOnly: false)
        var content = [UInt8](repeating: 0, count: Self.size)
        for c in stride(from: 0, to: 64, by: 2) {
            let data = Pattern.bytes(count: Self.cs, offset: UInt64(c * Self.cs), seed: 9)
            try image.write(data, at: UInt64(c * Self.cs))
            content.replaceSubrange(c * Self.cs..<(c + 1) * Self.cs, with: data)
        }
        if snapshot { try image.createSnapshot(named: "s") }
        try image.close()
        return (host, content)
    }

    func u64(_ host: MemoryDevice, _ offset: UInt64) throws -> UInt64 {
        try host.read(count: 8, at: offset).reduce(0) { $0 << 8 | UInt64($1) }
    }

    func put(_ host: MemoryDevice, _ offset: UInt64, _ value: UInt64) throws {
        try host.write((0..<8).map { UInt8(truncatingIfNeeded: value >> (56 - 8 * $0)) }, at: offset)
    }

    func put16(_ host: MemoryDevice, _ offset: UInt64, _ value: UInt16) throws {
        try host.write([UInt8(value >> 8), UInt8(value & 0xff)], at: offset)
    }

    /// Offsets of the first refcount block, the active L1 table and its first L2 table.
    func layout(_ host: MemoryDevice) throws -> (refcountBlock: UInt64, l1: UInt64, l2: UInt64) {
        let header = try ImageHeader.decode(try host.read(count: Self.cs, at: 0))
        let block = try u64(host, header.refcountTableOffset.rawValue) & hostOffsetMask
        let l2 = try u64(host, header.l1TableOffset.rawValue) & hostOffsetMask
        return (block, header.l1TableOffset.rawValue, l2)
    }

    /// Invariant: each kind of damage is reported with its kind and qemu-img's exit code, and `-r all`
    /// (or `-r leaks` for a leak) leaves an image that checks clean and reads the same guest data
    /// wherever the data was recoverable.
    @Test(arguments: [
        "leaked-cluster", "refcount-too-low", "copied-flag", "outside-file", "reserved-bits", "snapshot-table",
        "compressed-out-of-range",
    ])
    func damageIsFoundAndRepaired(kind: String) throws {
        let (host, content) = try makeImage(snapshot: kind == "snapshot-table")
        let (block, l1, l2) = try layout(host)
        var expectExit: Int32 = 2
        var lostClusters: Set<Int> = []
        switch kind {
        case "leaked-cluster":
            let end = host.size / UInt64(Self.cs)
            try put16(host, block + 2 * end, 1)
            try host.write([0], at: (end + 1) * UInt64(Self.cs) - 1)
            expectExit = 3
        case "refcount-too-low":
            let data = try u64(host, l2) & hostOffsetMask
            try put16(host, block + 2 * (data / UInt64(Self.cs)), 0)
        case "copied-flag":
            // Point guest cluster 2 at cluster 0's data, keeping COPIED: two owners, neither exclusive.
            try put(host, l2 + 16, try u64(host, l2))
            lostClusters = [2]
        case "outside-file":
            try put(host, l1, copiedFlag | (1 << 40))  // the L2 table far past the end of the file: all is lost
            lostClusters = Set(0..<64)
        case "reserved-bits":
            try put(host, l2, try u64(host, l2) | 0x2)
        case "snapshot-table":
            let header = try ImageHeader.decode(try host.read(count: Self.cs, at: 0))
            try host.write([0xFF, 0xFF], at: header.snapshotTableOffset.rawValue + 36)  // name length 65535
        case "compressed-out-of-range":
            try put(host, l2 + 16, compressedFlag | (3 << 47) | (1 << 40))
            lostClusters = [2]
        default: Issue.record("unknown kind")
        }
        _ = l1
        let report = ImageCheck.check(host: host)
        #expect(report.exitCode == expectExit, "\(kind): \(report.findings)")
        #expect(
            report.findings.contains {
                $0.kind == kind || (kind == "leaked-cluster" && $0.kind == "refcount-too-high")
            },
            "\(kind): \(report.findings)"
        )

        let result = try ImageCheck.repair(host: host, mode: kind == "leaked-cluster" ? .leaks : .all)
        #expect(result.after.exitCode == 0, "\(kind) after repair: \(result.after.findings)")
        let image = try VImage.open(host: host, readOnly: false)
        let all = try image.read(count: Self.size, at: 0)
        for c in 0..<64 where !lostClusters.contains(c) {
            let range = c * Self.cs..<(c + 1) * Self.cs
            #expect(all[range] == content[range], "\(kind): cluster \(c) not recovered")
        }
        // The repaired image is fully usable.
        try image.write(Pattern.bytes(count: Self.size, offset: 0, seed: 77), at: 0)
        try image.close()
        #expect(ImageCheck.check(host: host).isClean, "\(kind): not clean after writing to the repaired image")
    }

    /// Invariant: random byte flips in the metadata of random images never make open, read or check trap
    /// or hang; each trial ends in a clear error, a clean image, or findings that `-r all` repairs.
    @Test func randomCorruptionNeverTraps() throws {
        var rng = SeededRandom(seed: 2024)
        var outcomes: [String: Int] = [:]
        for trial in 0..<1500 {
            let (host, _) = try makeImage(snapshot: trial % 2 == 0)
            let header = try ImageHeader.decode(try host.read(count: Self.cs, at: 0))
            // Metadata regions: header, refcount table and block, L1, L2 tables, snapshot table.
            var regions: [(UInt64, Int)] = [
                (0, 128), (header.refcountTableOffset.rawValue, 64), (header.l1TableOffset.rawValue, 64),
            ]
            let (block, _, l2) = try layout(host)
            regions += [(block, 256), (l2, Self.cs)]
            if header.snapshotCount > 0 {
                regions.append((header.snapshotTableOffset.rawValue, Int(header.snapshotTableSize)))
            }
            for _ in 0..<Int.random(in: 1...6, using: &rng) {
                let (start, length) = regions.randomElement(using: &rng)!
                let at = start + UInt64.random(in: 0..<UInt64(length), using: &rng)
                var byte = try host.read(count: 1, at: at)
                byte[0] ^= UInt8.random(in: 1...255, using: &rng)
                try host.write(byte, at: at)
            }
            let report = ImageCheck.check(host: host)
            do {
                let image = try VImage.open(host: host, readOnly: true)
                _ = try? image.read(count: Self.size, at: 0)
                _ = try? image.extents(at: 0, count: UInt64(Self.size))
                try image.close()
            } catch is VImageError {
                // A clear error: fine.
            }
            if report.exitCode == 1 {
                outcomes["clear error", default: 0] += 1
                continue
            }
            let result = try ImageCheck.repair(host: host, mode: .all)
            let settled = result.after.exitCode == 0 || result.after.exitCode == 1
            #expect(
                settled,
                "trial \(trial): \(report.findings.map(\.message)) => \(result.actions) => \(result.after.findings.map(\.message))"
            )
            outcomes[
                result.after.exitCode == 0 ? (report.isClean ? "clean" : "repaired") : "clear error",
                default: 0
            ] += 1
            if result.after.exitCode == 0 {
                let image = try VImage.open(host: host, readOnly: false)
                try image.write(Pattern.bytes(count: Self.size, offset: 0, seed: 1), at: 0)
                try image.close()
                let again = ImageCheck.check(host: host)
                let clean = again.isClean
                #expect(
                    clean,
                    "trial \(trial): writing to the repaired image broke it: \(report.findings.map(\.message)) => \(result.actions) => \(again.findings.prefix(3).map(\.message))"
                )
            }
        }
        #expect(outcomes["repaired", default: 0] > 0)
    }
}
