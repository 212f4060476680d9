import Synchronization
import Testing
import VImageTestSupport

@testable import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// `FileDevice` with cache mode `none` (O_DIRECT): any offset, length and buffer, read-modify-write of
/// partial blocks that loses nothing to a concurrent writer, and a clear refusal where O_DIRECT is refused.
@Suite struct DirectIOTests {
    /// A fresh file path in a temporary folder (on the root file system, which supports O_DIRECT).
    func scratch(_ name: String = "file") -> (folder: String, path: String) {
        let folder = TestEnvironment.temporaryDirectory("vdisk-direct")
        return (folder, folder + "/" + name)
    }

    /// The whole file as read without O_DIRECT.
    func contents(_ path: String) throws -> [UInt8] {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        return try file.read(count: Int(file.size), at: 0)
    }

    /// Invariant: random reads and writes at any offset and length, from memory at any address, read back
    /// like a flat reference disk, through the device and through the page cache afterwards; on a growable
    /// file and on a fixed one whose size ends inside a block.
    @Test(arguments: [true, false]) func matchesReference(growable: Bool) throws {
        let (folder, path) = scratch()
        defer { TestEnvironment.remove(folder) }
        let size = growable ? 1 << 20 : (1 << 20) + 1536  // fixed: a last block of 1.5 KiB
        if !growable {
            let f = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
            try f.truncate(to: UInt64(size))
            try f.close()
        }
        let device = try FileDevice.open(
            path: path,
            readOnly: false,
            create: growable,
            growable: growable,
            cache: .direct
        )
        #expect(device.cacheMode == .direct)
        var reference = ReferenceDisk(size: size)
        var random = SeededRandom(seed: 19)
        // One buffer at a 4 KiB boundary; requests start at random distances from it (0 keeps them aligned).
        let memory = UnsafeMutableRawBufferPointer.allocate(byteCount: (1 << 18) + 8192, alignment: 4096)
        defer { memory.deallocate() }
        for step in 0..<400 {
            let aligned = random.next() % 3 == 0
            let count = aligned ? Int(1 + random.next() % 64) * 4096 : Int(1 + random.next() % (1 << 17))
            let offset =
                aligned
                ? Int(random.next() % UInt64(size / 4096 - 64)) * 4096 : Int(random.next() % UInt64(size - count))
            let shift = aligned ? 0 : Int(random.next() % 4096)
            let buffer = UnsafeMutableRawBufferPointer(rebasing: memory[shift..<shift + count])
            if random.next() % 2 == 0 {
                let data = Pattern.bytes(count: count, offset: UInt64(offset), seed: UInt64(step))
                data.withUnsafeBytes { buffer.copyMemory(from: $0) }
                try device.write(UnsafeRawBufferPointer(buffer), at: UInt64(offset), fua: false)
                reference.write(data, at: offset)
            } else {
                try device.read(into: buffer, at: UInt64(offset))
                #expect(Array(buffer) == Array(reference.read(at: offset, count: count)), "step \(step)")
            }
        }
        // The last partial block of the fixed file, alone.
        if !growable {
            let data = Pattern.bytes(count: 1000, offset: 0, seed: 99)
            try device.write(data, at: UInt64(size - 1200))
            reference.write(data, at: size - 1200)
            #expect(
                try device.read(count: 1200, at: UInt64(size - 1200))
                    == Array(reference.read(at: size - 1200, count: 1200))
            )
        }
        try device.close()
        // A growable file ends at the block boundary after the last byte written; the rest reads as zeroes.
        var stored = try contents(path)
        if growable {
            #expect(stored.count <= size && DirectIO.isAligned(UInt64(stored.count)))
            stored += [UInt8](repeating: 0, count: max(0, size - stored.count))
        }
        #expect(stored.count == size)
        #expect(firstDifference(stored, reference.bytes) == nil)
    }

    /// Invariant: on a growable file, a partial block past the end reads as zeroes around what was written,
    /// and zeroing or punching parts of blocks keeps the bytes around them.
    @Test func partialBlocksPastTheEndAndZeroing() throws {
        let (folder, path) = scratch()
        defer { TestEnvironment.remove(folder) }
        let device = try FileDevice.open(path: path, readOnly: false, create: true, growable: true, cache: .direct)
        var reference = ReferenceDisk(size: 65536)
        let data = Pattern.bytes(count: 3000, offset: 0, seed: 1)
        try device.write(data, at: 10000)
        reference.write(data, at: 10000)
        #expect(firstDifference(try device.read(count: 65536, at: 0), reference.bytes) == nil)
        let more = Pattern.bytes(count: 30000, offset: 0, seed: 2)
        try device.write(more, at: 20000)
        reference.write(more, at: 20000)
        try device.writeZeroes(at: 21000, count: 5000, mayUnmap: false, fast: false)
        reference.zero(at: 21000, count: 5000)
        try device.writeZeroes(at: 30001, count: 9000, mayUnmap: true, fast: false)
        reference.zero(at: 30001, count: 9000)
        #expect(firstDifference(try device.read(count: 65536, at: 0), reference.bytes) == nil)
        try device.close()
        // Whole blocks reached the file: it ends at the block boundary after the last byte written.
        let stored = try contents(path)
        #expect(stored.count == 53248)
        #expect(firstDifference(stored, Array(reference.bytes.prefix(53248))) == nil)
    }

    /// Two writers change different halves of one 4 KiB block at the same time; the first is held right
    /// after its read-modify-write has read the block, until the second has either finished (no locks: its
    /// half is then overwritten with the old bytes) or is waiting for the block's lock. No sleeps: the hold
    /// ends on one of those two events. Returns the block as stored.
    func raceOnOneBlock(locksDisabled: Bool) throws -> [UInt8] {
        let (folder, path) = scratch()
        defer { TestEnvironment.remove(folder) }
        let device = try FileDevice.open(path: path, readOnly: false, create: true, growable: true, cache: .direct)
        try device.write([UInt8](repeating: 0, count: 4096), at: 0)
        let direct = try #require(device.direct)
        direct.locksDisabled = locksDisabled
        let gate = Gate()
        let firstRead = Atomic<Bool>(false)
        let second = Box<TestThread>()
        direct.hooks.afterBlockRead = { _ in
            guard !firstRead.exchange(true, ordering: .acquiringAndReleasing) else { return }
            second.value = TestThread {
                try device.write([UInt8](repeating: 0xBB, count: 2048), at: 2048)
                gate.open()
            }
            gate.wait()
        }
        direct.hooks.willWaitForBlock = { _ in gate.open() }
        try device.write([UInt8](repeating: 0xAA, count: 2048), at: 0)
        try second.value?.join()
        let block = try device.read(count: 4096, at: 0)
        try device.close()
        return block
    }

    /// Invariant: concurrent writes to different bytes of one block both survive (the block's lock
    /// serializes the read-modify-writes).
    @Test func concurrentPartialWritesToOneBlockBothSurvive() throws {
        let block = try raceOnOneBlock(locksDisabled: false)
        #expect(block == [UInt8](repeating: 0xAA, count: 2048) + [UInt8](repeating: 0xBB, count: 2048))
    }

    /// The same interleaving without the locks loses the second write: the race above is real, and the
    /// test forces it.
    @Test func withoutTheLocksTheSameInterleavingLosesAWrite() throws {
        let block = try raceOnOneBlock(locksDisabled: true)
        #expect(block == [UInt8](repeating: 0xAA, count: 2048) + [UInt8](repeating: 0, count: 2048))
    }

    /// Invariant: threads writing unaligned pieces that share blocks but never bytes, all at once, leave
    /// every thread's bytes (the read-modify-writes of a shared block are serialized). Each thread owns the
    /// bytes whose 1000-byte slot number is its index modulo the thread count, so almost every write is
    /// partial at both ends and its neighbours' writes hit the same blocks. Seeded; the seed is printed.
    @Test func concurrentUnalignedWritersMatchReference() throws {
        for seed in TestSeeds.seeds(0..<2, test: "DirectIOTests.concurrentUnalignedWritersMatchReference") {
            let (folder, path) = scratch()
            defer { TestEnvironment.remove(folder) }
            let size = 256 << 10
            let slot = 1000
            let threads = 4
            let device = try FileDevice.open(path: path, readOnly: false, create: true, growable: true, cache: .direct)
            try device.write([UInt8](repeating: 0, count: size), at: 0)
            var reference = ReferenceDisk(size: size)
            // Plan every thread's writes first (deterministic from the seed), then run them at once.
            var random = SeededRandom(seed: seed)
            var plans: [[(offset: Int, data: [UInt8])]] = Array(repeating: [], count: threads)
            for round in 0..<300 {
                for t in 0..<threads {
                    let slots = (size / slot - threads) / threads
                    let index = Int(random.next() % UInt64(slots)) * threads + t
                    let data = Pattern.bytes(count: slot, offset: UInt64(index * slot), seed: seed &+ UInt64(round))
                    plans[t].append((index * slot, data))
                    reference.write(data, at: index * slot)
                }
            }
            let start = Gate()
            let workers = plans.map { plan in
                TestThread {
                    start.wait()
                    for (offset, data) in plan { try device.write(data, at: UInt64(offset)) }
                }
            }
            start.open()
            for worker in workers { try worker.join() }
            let stored = try device.read(count: size, at: 0)
            try device.close()
            #expect(firstDifference(stored, reference.bytes) == nil, "seed \(seed)")
            #expect(firstDifference(try contents(path), reference.bytes) == nil, "seed \(seed), page cache")
        }
    }

    /// Invariant: the blocks a request covers only in part are its head and tail, once each.
    @Test func partialBlocks() {
        #expect(DirectIO.partialBlocks(offset: 0, count: 4096) == [])
        #expect(DirectIO.partialBlocks(offset: 0, count: 8192) == [])
        #expect(DirectIO.partialBlocks(offset: 1, count: 10) == [0])
        #expect(DirectIO.partialBlocks(offset: 0, count: 100) == [0])
        #expect(DirectIO.partialBlocks(offset: 4000, count: 200) == [0, 4096])
        #expect(DirectIO.partialBlocks(offset: 4096, count: 8192 + 5) == [12288])
        #expect(DirectIO.partialBlocks(offset: 4095, count: 4097) == [0])
    }

    /// Invariant: where the file system refuses O_DIRECT (ramfs; tmpfs before Linux 6.6), opening fails
    /// with `.notSupported` and a message naming the way out, and a file it was to create is not left behind.
    @Test(.enabled(if: TestEnvironment.isRoot, "mounts ramfs")) func refusedWhereTheFileSystemHasNoDirectIO() throws {
        let folder = TestEnvironment.temporaryDirectory("vdisk-ramfs")
        defer { TestEnvironment.remove(folder) }
        guard mount("none", folder, "ramfs", 0, nil) == 0 else {
            Issue.record("mount ramfs: \(String(cString: strerror(errno)))")
            return
        }
        defer { umount(folder) }
        let path = folder + "/image"
        #expect {
            try FileDevice.open(path: path, readOnly: false, create: true, growable: true, cache: .direct)
        } throws: { error in
            guard let error = error as? BlockIOError else { return false }
            return error.code == .notSupported && "\(error)".contains("use cache mode writeback")
        }
        #expect(access(path, F_OK) != 0, "the file it was to create is left behind")
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
        try file.close()
        #expect(throws: BlockIOError.self) { try FileDevice.open(path: path, readOnly: true, cache: .direct) }
        #expect(access(path, F_OK) == 0, "an existing file is kept")
    }
}

/// `firstDifference` of whole arrays.
func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? { firstDifference(a[...], b[...]) }

/// A one-way signal between threads: `wait` returns once `open` was called (before or after).
final class Gate: @unchecked Sendable {
    private let monitor = Monitor()
    private var isOpen = false

    func open() {
        monitor.withLock {
            isOpen = true
            monitor.broadcast()
        }
    }

    func wait() {
        monitor.withLock { while !isOpen { monitor.wait() } }
    }
}

/// A value set on one thread and read on another after a join.
final class Box<T>: @unchecked Sendable {
    var value: T?
}
