import BlockIO
import Glibc
import Synchronization
import Testing
import VImageTestSupport

@testable import VImage

/// Forced interleavings of requests with the operations that change what a running request relies on.
/// A `HoldingDevice` under the engine stops one chosen host I/O until the test releases it, so each race
/// happens every run instead of now and then.
@Suite struct RaceTests {
    static let clusterBits = 16
    static let cs = 1 << clusterBits

    /// An image with guest cluster 0 written (owned, so later writes to it go in place), flushed.
    func setUp(options: VImage.OpenOptions = .init()) throws -> (HoldingDevice, VImage, host: UInt64, [UInt8]) {
        let device = HoldingDevice(MemoryDevice(size: 0, growable: true))
        try VImage.create(on: device, virtualSize: 16 * UInt64(Self.cs), options: .init(clusterBits: Self.clusterBits))
        let image = try VImage.open(host: device, readOnly: false, options: options)
        let original = Pattern.bytes(count: Self.cs, offset: 0, seed: 1)
        try image.write(original, at: 0)
        try image.flush()
        guard case .data(let host) = try image.mapping(at: 0, count: UInt64(Self.cs))[0].kind else {
            throw VImageError(.corrupt, message: "cluster 0 is not data")
        }
        return (device, image, host, original)
    }

    /// Invariant: a write planned in place is not lost when a snapshot makes its cluster shared while the
    /// write is still in flight (the snapshot waits for it).
    @Test func inPlaceWriteSurvivesConcurrentSnapshot() throws {
        let (device, image, host, original) = try setUp()
        let hold = device.hold(.write) { $0.overlaps(host..<host + 4096) }
        let a = Pattern.bytes(count: 4096, offset: 0, seed: 2)
        let writer = TestThread { try image.write(a, at: 0) }
        #expect(hold.waitUntilReached())
        let b = Pattern.bytes(count: 4096, offset: 8192, seed: 3)
        let racer = TestThread {
            try image.createSnapshot(named: "s")
            try image.write(b, at: 8192)
        }
        #expect(waitUntil { racer.isFinished || image.drainWaiters > 0 })
        hold.release()
        try writer.join()
        try racer.join()

        var expected = original
        expected.replaceSubrange(0..<4096, with: a)
        expected.replaceSubrange(8192..<12288, with: b)
        #expect(try image.read(count: Self.cs, at: 0) == expected, "the acknowledged in-place write was lost")
        try image.close()
        #expect(ImageCheck.check(host: device).isClean)
        // The write ran concurrently with the snapshot: the snapshot may hold it or not, but nothing else.
        let snapshot = try VImage.open(host: device, readOnly: true)
        try snapshot.selectSnapshot(named: "s")
        let content = try snapshot.read(count: Self.cs, at: 0)
        #expect(content[0..<4096] == original[0..<4096] || content[0..<4096] == a[...])
        #expect(content[4096...] == original[4096...])
        try snapshot.close()
    }

    /// Invariant: `close()` waits for a request in flight; its final flush comes after the request's
    /// host write, so an acknowledged write is never left behind a closed image.
    @Test func closeWaitsForInFlightWrite() throws {
        let (device, image, host, _) = try setUp()
        let hold = device.hold(.write) { $0.overlaps(host..<host + 4096) }
        let a = Pattern.bytes(count: 4096, offset: 0, seed: 2)
        let writer = TestThread { try image.write(a, at: 0) }
        #expect(hold.waitUntilReached())
        let closer = TestThread { try image.close() }
        #expect(waitUntil { closer.isFinished || image.drainWaiters > 0 })
        hold.release()
        try writer.join()
        try closer.join()

        let log = device.log
        let writeDone = log.lastIndex { $0.kind == .write && $0.completed && $0.overlaps(host..<host + 4096) }
        let lastFlush = log.lastIndex { $0.kind == .flush && $0.completed }
        #expect(writeDone != nil && lastFlush != nil && writeDone! < lastFlush!, "\(log.suffix(8))")
        let reopened = try VImage.open(host: device, readOnly: true)
        #expect(try reopened.read(count: 4096, at: 0) == a)
        try reopened.close()
    }

    /// Invariant: a cluster freed while a write to it is in flight is not handed out again until that
    /// write has completed, so the late write cannot land in another guest cluster's data. A flush does
    /// not wait for the write (the gate defers the reuse, it does not drain).
    @Test func freedClusterIsNotReusedWhileAWriteToItIsInFlight() throws {
        let (device, image, host, _) = try setUp()
        let hold = device.hold(.write) { $0.overlaps(host..<host + 4096) }
        let a = Pattern.bytes(count: 4096, offset: 0, seed: 2)
        let writer = TestThread { try image.write(a, at: 0) }
        #expect(hold.waitUntilReached())
        let x = Pattern.bytes(count: Self.cs, offset: 5 * UInt64(Self.cs), seed: 4)
        let racer = TestThread {
            try image.discard(at: 0, count: UInt64(Self.cs))
            try image.flush()
            try image.write(x, at: 5 * UInt64(Self.cs))
        }
        #expect(waitUntil { racer.isFinished }, "discard, flush and an allocating write must not wait")
        hold.release()
        try writer.join()
        try racer.join()

        #expect(try image.read(count: Self.cs, at: 5 * UInt64(Self.cs)) == x, "a late write landed in reused storage")
        let first = try image.read(count: Self.cs, at: 0)
        #expect(first.allSatisfy { $0 == 0 } || first[0..<4096] == a[...])
        try image.close()
        let report = ImageCheck.check(host: device)
        #expect(report.isClean, "\(report.findings)")
    }

    /// Invariant: a read planned before its cluster was freed never returns another guest cluster's data.
    @Test func readNeverSeesReusedStorage() throws {
        let (device, image, host, original) = try setUp()
        let hold = device.hold(.read) { $0.overlaps(host..<host + 4096) }
        let result = Mutex<[UInt8]>([])
        let reader = TestThread {
            let bytes = try image.read(count: 4096, at: 0)
            result.withLock { $0 = bytes }
        }
        #expect(hold.waitUntilReached())
        let x = Pattern.bytes(count: Self.cs, offset: 5 * UInt64(Self.cs), seed: 4)
        let racer = TestThread {
            try image.discard(at: 0, count: UInt64(Self.cs))
            try image.flush()
            try image.write(x, at: 5 * UInt64(Self.cs))
        }
        #expect(waitUntil { racer.isFinished })
        hold.release()
        try reader.join()
        try racer.join()
        let bytes = result.withLock { $0 }
        #expect(bytes == Array(original[0..<4096]) || bytes.allSatisfy { $0 == 0 }, "read returned reused storage")
        try image.close()
    }

    /// Invariant: a shrinking resize waits for a write in flight to the part it drops, so the dropped
    /// cluster is not reused under the write.
    @Test func resizeWaitsForInFlightWrite() throws {
        let (device, image, host, _) = try setUp()
        let hold = device.hold(.write) { $0.overlaps(host..<host + 4096) }
        let a = Pattern.bytes(count: 4096, offset: 0, seed: 2)
        let writer = TestThread { try image.write(a, at: 0) }
        #expect(hold.waitUntilReached())
        let x = Pattern.bytes(count: Self.cs, offset: 0, seed: 5)
        let racer = TestThread {
            try image.resize(to: 0, allowShrink: true)
            try image.resize(to: 16 * UInt64(Self.cs))
            try image.write(x, at: 3 * UInt64(Self.cs))
        }
        #expect(waitUntil { racer.isFinished || image.drainWaiters > 0 })
        hold.release()
        try writer.join()
        try racer.join()
        #expect(try image.read(count: Self.cs, at: 3 * UInt64(Self.cs)) == x, "a late write landed in reused storage")
        try image.close()
        #expect(ImageCheck.check(host: device).isClean)
    }

    /// Invariant: a read never syncs the host file (no flush under the engine's lock on the read path),
    /// even when the L2 cache is full of dirty tables and the read needs another table.
    @Test func readDoesNotSyncWhenEvictingDirtyTables() throws {
        let cs = 4096
        let device = HoldingDevice(MemoryDevice(size: 0, growable: true))
        // 4 KiB clusters: one L2 table maps 2 MiB; the cache holds 4 tables.
        try VImage.create(on: device, virtualSize: 64 << 20, options: .init(clusterBits: 12))
        let image = try VImage.open(host: device, readOnly: false, options: .init(l2CacheBytes: 4 * cs))
        for table in 0..<8 { try image.write(Pattern.bytes(count: cs, offset: 0, seed: 1), at: UInt64(table) << 21) }
        try image.flush()
        // Tables 4...7 dirty (new allocations) and most recently used; table 0 is on disk only.
        for table in 4..<8 {
            try image.write(Pattern.bytes(count: cs, offset: 0, seed: 2), at: UInt64(table) << 21 + UInt64(cs))
        }
        let flushesBefore = device.log.filter { $0.kind == .flush }.count
        _ = try image.read(count: cs, at: 0)
        _ = try image.read(count: cs, at: 1 << 21)
        #expect(device.log.filter { $0.kind == .flush }.count == flushesBefore)
        try image.close()
        #expect(ImageCheck.check(host: device).isClean)
    }
}

/// Writers against snapshots, resizes and a close, all at once; the history of every block decides what
/// each snapshot and the final disk may hold.
@Suite struct ConcurrentModelTests {
    /// One block's versions: when each write started and when it was acknowledged (global sequence).
    final class History: @unchecked Sendable {
        let lock = Mutex<[[(version: UInt64, start: UInt64, ack: UInt64?)]]>([])
        let clock = Atomic<UInt64>(1)
        init(blocks: Int) { lock.withLock { $0 = Array(repeating: [], count: blocks) } }
        func tick() -> UInt64 { clock.add(1, ordering: .sequentiallyConsistent).newValue }
    }

    static let block = 4096

    static func content(block: Int, version: UInt64) -> [UInt8] {
        version == 0
            ? [UInt8](repeating: 0, count: Self.block)
            : Pattern.bytes(count: Self.block, offset: UInt64(block * Self.block), seed: version)
    }

    /// Invariant: with writers running, snapshots are created and deleted, the disk grows and shrinks
    /// past the writers' range, and the image is closed under them; afterwards every acknowledged write
    /// reads back, and each snapshot holds, for every block, a version acknowledged before the snapshot
    /// began or one started before it ended (never a torn or foreign block).
    @Test func writersSnapshotsResizesAndClose() throws {
        for seed in TestSeeds.seeds(0..<6, test: "concurrent model") { try runOnce(seed: seed) }
    }

    func runOnce(seed: UInt64) throws {
        let blocks = 96
        let writers = 4
        let host = MemoryDevice(size: 0, growable: true)
        let baseSize = UInt64(blocks * Self.block)
        try VImage.create(on: host, virtualSize: baseSize, options: .init(clusterBits: 12))
        let image = try VImage.open(host: host, readOnly: false, options: .init(l2CacheBytes: 4 * 4096))
        let history = History(blocks: blocks)
        let snapshots = Mutex<[String: (start: UInt64, end: UInt64)]>([:])

        let writerThreads = (0..<writers).map { w in
            TestThread {
                var rng = SeededRandom(seed: seed &* 131 &+ UInt64(w))
                var version = UInt64(w + 1)
                while true {
                    let b = Int.random(in: 0..<(blocks / writers), using: &rng) * writers + w
                    version += UInt64(writers)
                    let start = history.tick()
                    let index = history.lock.withLock { h -> Int in
                        h[b].append((version, start, nil))
                        return h[b].count - 1
                    }
                    do {
                        try image.write(Self.content(block: b, version: version), at: UInt64(b * Self.block))
                    } catch let error as VImageError where error.code == .closed {
                        history.lock.withLock { _ = $0[b].remove(at: index) }  // never planned: nothing written
                        return
                    }
                    let ack = history.tick()
                    history.lock.withLock { $0[b][index].ack = ack }
                }
            }
        }
        var rng = SeededRandom(seed: seed)
        var live: [String] = []
        // Each step waits until the writers have started a few more writes, so the steps and the writes
        // interleave however loaded the machine is (no step sequence can finish before the writers run).
        func writesStarted() -> Int { history.lock.withLock { $0.reduce(0) { $0 + $1.count } } }
        for step in 0..<40 {
            while writesStarted() < 3 * step { usleep(200) }
            switch Int.random(in: 0..<5, using: &rng) {
            case 0, 1:
                let name = "s\(step)"
                let start = history.tick()
                try image.createSnapshot(named: name)
                let end = history.tick()
                snapshots.withLock { $0[name] = (start, end) }
                live.append(name)
            case 2:
                guard let name = live.randomElement(using: &rng), live.count > 2 else { continue }
                try image.deleteSnapshot(named: name)
                live.removeAll { $0 == name }
                snapshots.withLock { $0[name] = nil }
            case 3:
                try image.resize(
                    to: baseSize + UInt64(Int.random(in: 0...64, using: &rng) * Self.block),
                    allowShrink: true
                )
            default:
                try image.flush()
            }
        }
        try image.close()
        for t in writerThreads { try t.join() }

        #expect(ImageCheck.check(host: host).isClean, "seed \(seed)")
        let reopened = try VImage.open(host: host, readOnly: true)
        let final = try reopened.read(count: Int(baseSize), at: 0)
        try reopened.close()
        let h = history.lock.withLock { $0 }
        #expect(h.reduce(0) { $0 + $1.count } > 100, "seed \(seed): the writers hardly ran")
        for b in 0..<blocks {
            let last = h[b].last { $0.ack != nil }?.version ?? 0
            let got = Array(final[b * Self.block..<(b + 1) * Self.block])
            #expect(got == Self.content(block: b, version: last), "seed \(seed): block \(b) lost its last write")
        }
        for (name, window) in snapshots.withLock({ $0 }) {
            let view = try VImage.open(host: host, readOnly: true)
            try view.selectSnapshot(named: name)
            let content = try view.read(count: Int(baseSize), at: 0)
            try view.close()
            for b in 0..<blocks {
                let floor = h[b].last { ($0.ack ?? .max) < window.start }?.version ?? 0
                let allowed = [floor] + h[b].filter { $0.version > floor && $0.start < window.end }.map(\.version)
                let got = Array(content[b * Self.block..<(b + 1) * Self.block])
                let actual = ([0] + h[b].map(\.version)).first { Self.content(block: b, version: $0) == got }
                #expect(
                    allowed.contains { Self.content(block: b, version: $0) == got },
                    "seed \(seed): snapshot \(name) \(window) block \(b) holds version \(actual.map { "\($0)" } ?? "none"), not one of \(allowed); history \(h[b].map { ($0.version, $0.start, $0.ack ?? 0) })"
                )
            }
        }
    }
}
