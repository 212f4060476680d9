import BlockIO
import CrashSim
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The crash simulator's model on a RAM disk: what reads see, what reaches the medium when, and what a
/// power cut leaves, mode by mode.
struct CrashSimDeviceTests {
    static let sector = 512

    /// A fresh simulator over a RAM disk of `size` bytes, and the RAM disk (the "medium").
    func makeDisk(
        size: UInt64 = 1 << 20,
        cacheSize: UInt64 = CrashSimDevice.defaultCacheSize,
        seed: UInt64 = 1
    )
        -> (CrashSimDevice, MemoryDevice)
    {
        let medium = MemoryDevice(size: size)
        return (CrashSimDevice(medium, seed: seed, cacheSize: cacheSize), medium)
    }

    /// Invariant: a cached write is read back at once but reaches the medium only with a flush.
    @Test func cachedWritesAreReadBackAndReachTheMediumOnFlush() throws {
        let (disk, medium) = makeDisk()
        let data = Pattern.bytes(count: 10_000, offset: 3000, seed: 7)
        try disk.write(data, at: 3000)
        #expect(try disk.read(count: 10_000, at: 3000) == data)
        #expect(try medium.read(count: 10_000, at: 3000) == [UInt8](repeating: 0, count: 10_000))
        // A read straddling cached and uncached bytes gets both right.
        let around = try disk.read(count: 16_000, at: 0)
        #expect(around[0..<3000].allSatisfy { $0 == 0 } && Array(around[3000..<13_000]) == data)
        try disk.flush()
        #expect(try medium.read(count: 10_000, at: 3000) == data)
        #expect(disk.cached.writes == 0)
    }

    /// Invariant: newer writes win on read, write-zeroes and discards read as zero, in cache order.
    @Test func readsSeeTheNewestVersion() throws {
        let (disk, _) = makeDisk()
        var reference = ReferenceDisk(size: 1 << 20)
        var random = SeededRandom(seed: 11)
        for step in 0..<400 {
            let offset = Int.random(in: 0..<(1 << 20) - 70_000, using: &random)
            let count = Int.random(in: 1...70_000, using: &random)
            switch Int.random(in: 0..<10, using: &random) {
            case 0:
                try disk.writeZeroes(at: UInt64(offset), count: UInt64(count), mayUnmap: true, fast: false)
                reference.zero(at: offset, count: count)
            case 1:
                try disk.discard(at: UInt64(offset), count: UInt64(count))
                reference.zero(at: offset, count: count)
            case 2:
                try disk.flush()
            default:
                let data = Pattern.bytes(count: count, offset: UInt64(offset), seed: UInt64(step))
                try disk.write(data, at: UInt64(offset))
                reference.write(data, at: offset)
            }
            let at = Int.random(in: 0..<(1 << 20) - 100_000, using: &random)
            let read = try disk.read(count: 100_000, at: UInt64(at))
            #expect(difference(read, Array(reference.read(at: at, count: 100_000))) == nil, "step \(step)")
        }
        try disk.flush()
        let final = try disk.read(count: 1 << 20, at: 0)
        #expect(difference(final, reference.bytes) == nil)
    }

    /// Invariant: `drop` leaves exactly the state of the last completed flush.
    @Test(arguments: TestSeeds.seeds(0..<8, test: "dropKeepsTheFlushedState"))
    func dropKeepsTheFlushedState(seed: UInt64) throws {
        let (disk, medium) = makeDisk(seed: seed)
        var random = SeededRandom(seed: seed)
        var reference = ReferenceDisk(size: 1 << 20)
        var flushed = reference.bytes
        for step in 0..<200 {
            if Int.random(in: 0..<8, using: &random) == 0 {
                try disk.flush()
                flushed = reference.bytes
                continue
            }
            let offset = Int.random(in: 0..<(1 << 20) - 8192, using: &random)
            let data = Pattern.bytes(count: Int.random(in: 1...8192, using: &random), offset: 0, seed: UInt64(step))
            try disk.write(data, at: UInt64(offset))
            reference.write(data, at: offset)
        }
        let report = try disk.crash(mode: .drop)
        #expect(report.landed == 0 && report.lost == report.cachedWrites)
        #expect(difference(medium.snapshotBytes(), flushed) == nil, "seed \(seed)")
    }

    /// Invariant: in `reorder` mode each cached write lands whole or not at all, and what was flushed or
    /// written with FUA always survives.
    @Test(arguments: TestSeeds.seeds(0..<16, test: "reorderLandsWritesWhole"))
    func reorderLandsWritesWhole(seed: UInt64) throws {
        let (disk, medium) = makeDisk()
        // Durable: a flushed write and a FUA write.
        try disk.write(Pattern.bytes(count: 4096, offset: 0, seed: 1), at: 0)
        try disk.flush()
        try disk.write(Pattern.bytes(count: 4096, offset: 0, seed: 2), at: 4096, fua: true)
        // Cached: 32 writes to distinct places, of odd sizes and alignments.
        var writes: [(offset: Int, data: [UInt8])] = []
        for i in 0..<32 {
            let data = Pattern.bytes(count: 700 + i * 300, offset: 0, seed: 100 + UInt64(i))
            writes.append((16_384 + i * 16_384 + i * 7, data))
            try disk.write(data, at: UInt64(writes[i].offset))
        }
        let report = try disk.crash(seed: seed, mode: .reorder)
        let image = medium.snapshotBytes()
        #expect(Array(image[0..<4096]) == Pattern.bytes(count: 4096, offset: 0, seed: 1))
        #expect(Array(image[4096..<8192]) == Pattern.bytes(count: 4096, offset: 0, seed: 2))
        var landed = 0
        for (offset, data) in writes {
            let there = Array(image[offset..<offset + data.count])
            let whole = there == data
            let absent = there.allSatisfy { $0 == 0 }
            #expect(whole || absent, "seed \(seed): a write at \(offset) was torn in reorder mode")
            if whole { landed += 1 }
        }
        #expect(report.landed == landed && report.torn == 0 && report.lost == 32 - landed, "\(report)")
    }

    /// Invariant: after a crash each sector holds its flushed value or a version written since, and in
    /// `reorder` mode an overwritten sector may hold the older version (the writes landed out of order).
    @Test func sectorsHoldAVersionWrittenSinceTheFlush() throws {
        var olderWon = 0
        for seed in UInt64(0)..<64 {
            let (disk, medium) = makeDisk()
            let versions = (0..<3).map { Pattern.bytes(count: 8192, offset: 0, seed: UInt64($0)) }
            try disk.write(versions[0], at: 0)
            try disk.flush()
            try disk.write(versions[1], at: 0)
            try disk.write(versions[2], at: 0)
            try disk.crash(seed: seed, mode: .reorder)
            let image = Array(medium.snapshotBytes()[0..<8192])
            #expect(versions.contains(image), "seed \(seed)")
            if image == versions[1] { olderWon += 1 }
        }
        #expect(olderWon > 0, "in 64 seeds, the older of two unflushed writes never won")
    }

    /// Invariant: `tear` cuts writes at tear-size boundaries of the disk, never inside them, and does
    /// tear some.
    @Test(arguments: [512, 4096])
    func tearCutsAtTheTearSize(tearSize: Int) throws {
        var torn = 0
        for seed in UInt64(0)..<16 {
            let (disk, medium) = makeDisk()
            // A 64 KiB write starting 1 KiB into a 4 KiB block.
            let data = Pattern.bytes(count: 65_536, offset: 0, seed: seed)
            try disk.write(data, at: 1024)
            let report = try disk.crash(seed: seed, mode: .tear, tearSize: tearSize)
            torn += report.torn
            let image = medium.snapshotBytes()
            var start = 1024
            while start < 1024 + data.count {
                let end = min(1024 + data.count, (start / tearSize + 1) * tearSize)
                let there = Array(image[start..<end])
                let expected = Array(data[start - 1024..<end - 1024])
                #expect(
                    there == expected || there.allSatisfy { $0 == 0 },
                    "seed \(seed): torn inside \(start)..<\(end)"
                )
                start = end
            }
        }
        #expect(torn > 0, "16 seeds tore nothing")
    }

    /// Invariant: a full cache writes its oldest writes back to the medium, and those survive a `drop`.
    @Test func aFullCacheWritesTheOldestBack() throws {
        let (disk, medium) = makeDisk(size: 4 << 20, cacheSize: 256 << 10)
        for i in 0..<32 {
            try disk.write(Pattern.bytes(count: 65_536, offset: 0, seed: UInt64(i)), at: UInt64(i) * 65_536)
        }
        let (writes, bytes) = disk.cached
        #expect(bytes <= 256 << 10 && writes < 32, "\(writes) writes, \(bytes) bytes cached")
        try disk.crash(mode: .drop)
        let image = medium.snapshotBytes()
        // The first writes were written back; the last ones were still cached and are gone.
        #expect(Array(image[0..<65_536]) == Pattern.bytes(count: 65_536, offset: 0, seed: 0))
        #expect(image[31 * 65_536..<32 * 65_536].allSatisfy { $0 == 0 })
    }

    /// Invariant: a crash is determined by the seed and the cache: the same seed gives the same disk,
    /// different seeds give different ones.
    @Test func aCrashReplaysFromItsSeed() throws {
        func outcome(_ seed: UInt64) throws -> [UInt8] {
            let (disk, medium) = makeDisk(seed: seed)
            for i in 0..<64 {
                try disk.write(Pattern.bytes(count: 4096, offset: 0, seed: UInt64(i)), at: UInt64(i % 40) * 4096)
            }
            try disk.crash(mode: .tear)
            return medium.snapshotBytes()
        }
        #expect(try outcome(42) == outcome(42))
        #expect(try outcome(42) != outcome(43))
    }

    /// Invariant: after the power cut every call fails with EIO, and close still works.
    @Test func everyCallFailsAfterThePowerCut() throws {
        let (disk, _) = makeDisk()
        try disk.write([1, 2, 3], at: 0)
        try disk.crash(mode: .reorder)
        func expectEIO(_ body: () throws -> Void) {
            do {
                try body()
                Issue.record("a call succeeded after the power cut")
            } catch {
                #expect((error as? any ErrnoConvertible)?.errnoCode == EIO, "\(error)")
            }
        }
        expectEIO { _ = try disk.read(count: 1, at: 0) }
        expectEIO { try disk.write([1], at: 0) }
        expectEIO { try disk.writeZeroes(at: 0, count: 1, mayUnmap: false, fast: false) }
        expectEIO { try disk.discard(at: 0, count: 512) }
        expectEIO { try disk.flush() }
        #expect(throws: CrashSimError.self) { try disk.crash(mode: .drop) }
        #expect(throws: CrashSimError.self) { try makeDisk().0.crash(mode: .tear, tearSize: 1000) }
        try disk.close()
    }

    /// Invariant: a power cut armed for the N-th write comes right after that write entered the cache:
    /// the writes before it are subject to the crash, none after it reaches the disk; a cut that does
    /// not come in time is called off, and closing the disk calls it off too.
    @Test func anArmedPowerCutComesAtTheNthWrite() throws {
        let (disk, medium) = makeDisk(size: 64 << 20)
        final class Writer: @unchecked Sendable {
            let monitor = Monitor()
            var completed = 0
            var failure: (any Error)?
            var done = false
        }
        // A writer that goes on until a write fails: the cut counts the writes after it is armed.
        let writer = Writer()
        Threads.spawn {
            var completed = 0
            var failure: (any Error)?
            for i in 0..<16_384 {
                do {
                    try disk.write(Pattern.bytes(count: 4096, offset: 0, seed: UInt64(i)), at: UInt64(i) * 4096)
                    completed += 1
                } catch {
                    failure = error
                    break
                }
            }
            writer.monitor.withLock {
                (writer.completed, writer.failure, writer.done) = (completed, failure, true)
                writer.monitor.broadcast()
            }
        }
        let report = try disk.crash(afterWrites: 5, mode: .reorder, timeout: 60)
        let (completed, failure) = writer.monitor.withLock {
            while !writer.done { writer.monitor.wait() }
            return (writer.completed, writer.failure)
        }
        #expect((failure as? CrashSimError)?.code == .poweredOff, "\(String(describing: failure))")
        // Every completed write was in the cache at the cut (nothing was flushed), the next one failed.
        #expect(report.cachedWrites == completed && completed >= 5, "\(report), \(completed) writes completed")
        #expect(medium.snapshotBytes()[completed * 4096..<(completed + 1) * 4096].allSatisfy { $0 == 0 })

        // Not enough writes: called off after the timeout, the power still on.
        let (quiet, _) = makeDisk()
        #expect(throws: CrashSimError.self) { try quiet.crash(afterWrites: 1, mode: .drop, timeout: 1) }
        try quiet.write([1], at: 0)
        #expect(!quiet.hasCrashed)
        try quiet.close()
        #expect(throws: CrashSimError.self) { try quiet.crash(mode: .drop) }
    }

    /// Invariant: the canary (a record, then its commit marker, no flush between) is caught - marker
    /// there, record missing - by `reorder` in some seeds, and never by `drop`.
    @Test func canaryIsCaughtByReorderNeverByDrop() throws {
        var caught: [CrashSimDevice.Mode: Int] = [:]
        for mode in [CrashSimDevice.Mode.drop, .reorder] {
            for seed in UInt64(0)..<32 {
                let (disk, medium) = makeDisk(seed: seed)
                let record = Pattern.bytes(count: 4096, offset: 0, seed: 1)
                let marker = Pattern.bytes(count: 512, offset: 0, seed: 2)
                try disk.write(record, at: 65_536)
                try disk.write(marker, at: 0)
                try disk.crash(mode: mode)
                let image = medium.snapshotBytes()
                if Array(image[0..<512]) == marker && Array(image[65_536..<69_632]) != record {
                    caught[mode, default: 0] += 1
                }
            }
        }
        #expect(caught[.drop] == nil)
        #expect((caught[.reorder] ?? 0) > 0)
    }

    /// Invariant: with writers and flushes on several threads, a crash keeps every write that completed
    /// before a completed flush (each block holds that version or a later one of its writer).
    @Test(arguments: TestSeeds.seeds(0..<4, test: "concurrentWritersKeepFlushedWrites"))
    func concurrentWritersKeepFlushedWrites(seed: UInt64) throws {
        let threads = 4
        let blocks = 16
        let (disk, medium) = makeDisk(size: UInt64(threads * blocks * 4096), cacheSize: 64 << 10)
        final class Progress: @unchecked Sendable {
            let monitor = Monitor()
            var durable: [[Int]]
            var written: [[Int]]
            var steps = 0
            var finished = 0
            init(_ threads: Int, _ blocks: Int) {
                durable = Array(repeating: Array(repeating: 0, count: blocks), count: threads)
                written = durable
            }
        }
        let progress = Progress(threads, blocks)
        for t in 0..<threads {
            Threads.spawn {
                var random = SeededRandom(seed: seed &* 31 &+ UInt64(t))
                var version = Array(repeating: 0, count: blocks)
                do {
                    while true {
                        let block = Int.random(in: 0..<blocks, using: &random)
                        version[block] += 1
                        var data = [UInt8](repeating: UInt8(t), count: 4096)
                        withUnsafeBytes(of: UInt64(version[block]).bigEndian) { data.replaceSubrange(0..<8, with: $0) }
                        try disk.write(data, at: UInt64((t * blocks + block) * 4096))
                        progress.monitor.withLock { progress.written[t][block] = version[block] }
                        if Int.random(in: 0..<4, using: &random) == 0 {
                            try disk.flush()
                            progress.monitor.withLock {
                                progress.durable[t] = version
                                progress.steps += 1
                                progress.monitor.broadcast()
                            }
                        }
                    }
                } catch {}
                progress.monitor.withLock {
                    progress.finished += 1
                    progress.monitor.broadcast()
                }
            }
        }
        // Cut the power once every writer is well under way.
        progress.monitor.withLock { while progress.steps < 200 { progress.monitor.wait() } }
        let durable = progress.monitor.withLock { progress.durable }
        try disk.crash(seed: seed, mode: .tear)
        progress.monitor.withLock { while progress.finished < threads { progress.monitor.wait() } }
        let written = progress.monitor.withLock { progress.written }
        let image = medium.snapshotBytes()
        for t in 0..<threads {
            for block in 0..<blocks {
                let at = (t * blocks + block) * 4096
                let version = Int(image[at..<at + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
                #expect(
                    version >= durable[t][block] && version <= written[t][block] + 1,
                    "seed \(seed): thread \(t) block \(block) holds version \(version), flushed \(durable[t][block])"
                )
            }
        }
    }
}

/// Where two byte arrays first differ, nil if equal (the fast comparison first: these are megabytes).
func difference(_ a: [UInt8], _ b: [UInt8]) -> Int? { a == b ? nil : firstDifference(a[...], b[...]) }

/// Test threads without Foundation.
enum Threads {
    /// Runs `body` on a new detached thread.
    static func spawn(_ body: @escaping @Sendable () -> Void) {
        final class Box: @unchecked Sendable {
            let body: @Sendable () -> Void
            init(_ body: @escaping @Sendable () -> Void) { self.body = body }
        }
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var thread = pthread_t()
        pthread_create(
            &thread,
            nil,
            { raw in
                Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue().body()
                return nil
            },
            box
        )
        pthread_detach(thread)
    }
}
