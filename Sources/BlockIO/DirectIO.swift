// Design notes
// ------------
// `FileDevice` in cache mode `.direct` (qemu's cache=none) has its file open with O_DIRECT: data moves
// between the caller's memory and the disk without the host page cache. The kernel then wants the file
// offset, the length and the memory address to be multiples of the device's logical block size, while
// callers (the engine, the NBD server, FUSE) hand over any offset, length and buffer. So each request is
// mapped onto aligned blocks of `DirectIO.alignment` (4 KiB: a multiple of the logical block sizes in use,
// 512 and 4096):
//
//   request                 |<------------------ count ------------------>|
//   blocks          |   head     |   whole blocks ...            |    tail    |
//                   ^ alignDown(offset)                   alignUp(offset + count) ^
//
//   - offset, length and buffer aligned: one pread/pwrite straight to or from the caller's memory;
//   - otherwise through an aligned bounce buffer, at most `bounceLimit` bytes at a time;
//   - a write that covers only part of its head or tail block reads that block first and writes it back
//     whole (read-modify-write).
//
// A read-modify-write is not atomic: two writes to different bytes of one block whose reads and writes
// interleave each put back the other's old bytes, and one of them is lost. So a partial block is read,
// modified and written under a lock, one of `StripedLocks.count` chosen by block number. Writes of whole
// blocks take none: such a write overlaps any other write to its blocks, and overlapping writes in flight
// together have no defined order anyway. Zeroing or punching part of a block (fallocate) takes the lock
// too, since it changes bytes that a read-modify-write in progress would put back.
//
// A fixed-size file whose size is not a multiple of the alignment ends in a partial block that O_DIRECT
// cannot write without growing the file. Its bytes go through a second descriptor opened without O_DIRECT;
// the kernel keeps the two coherent (a direct read first writes back cached pages of its range).

import CBlockIO

#if canImport(Glibc)
import Glibc
#endif

/// Aligned I/O for a file descriptor opened with O_DIRECT.
final class DirectIO: @unchecked Sendable {
    /// The alignment of file offsets, lengths and memory for O_DIRECT.
    static let alignment = 4096
    /// The largest bounce buffer one request uses; longer requests go through it in pieces.
    static let bounceLimit = 1 << 20

    /// Test hooks: called with a block's file offset after a read-modify-write has read the block (before
    /// it writes it back), and when a read-modify-write finds its block's lock taken and is about to wait.
    struct Hooks: Sendable {
        var afterBlockRead: (@Sendable (UInt64) -> Void)?
        var willWaitForBlock: (@Sendable (UInt64) -> Void)?
    }

    let fd: Int32
    let path: String
    private let locks = StripedLocks()
    // Set by tests before any I/O, read afterwards.
    nonisolated(unsafe) var hooks = Hooks()
    // For tests that show the race the locks prevent; never cleared in normal use.
    nonisolated(unsafe) var locksDisabled = false

    init(fd: Int32, path: String) {
        self.fd = fd
        self.path = path
    }

    static func isAligned(_ value: UInt64) -> Bool { value % UInt64(alignment) == 0 }
    static func alignDown(_ value: UInt64) -> UInt64 { value - value % UInt64(alignment) }
    static func alignUp(_ value: UInt64) -> UInt64 { alignDown(value + UInt64(alignment) - 1) }

    private static func isAligned(_ pointer: UnsafeRawPointer) -> Bool { Int(bitPattern: pointer) % alignment == 0 }

    // MARK: Reads

    /// Reads `buffer.count` bytes at `offset`; bytes past the end of the file read as zeroes.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        let count = UInt64(buffer.count)
        if Self.isAligned(offset) && Self.isAligned(count) && Self.isAligned(buffer.baseAddress!) {
            try readBlocks(into: buffer, at: offset)
            return
        }
        let start = Self.alignDown(offset)
        let end = Self.alignUp(offset + count)
        let bounce = Self.bounce(for: end - start)
        defer { bounce.deallocate() }
        var position = start
        while position < end {
            let piece = Int(min(UInt64(bounce.count), end - position))
            let window = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<piece])
            try readBlocks(into: window, at: position)
            // The part of this piece inside the request.
            let from = max(position, offset)
            let to = min(position + UInt64(piece), offset + count)
            (buffer.baseAddress! + Int(from - offset)).copyMemory(
                from: window.baseAddress! + Int(from - position),
                byteCount: Int(to - from)
            )
            position += UInt64(piece)
        }
    }

    /// Reads whole aligned blocks into aligned memory; what lies past the end of the file is zeroed.
    private func readBlocks(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockIOError.system(.read, errno: errno, path: path, offset: offset + UInt64(done))
            }
            done += n
            // A short read that leaves an unaligned position ended at the end of the file (O_DIRECT could
            // not read on from there anyway); so did a read of nothing.
            if n == 0 || (done < buffer.count && !Self.isAligned(UInt64(done))) {
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
        }
    }

    // MARK: Writes

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard buffer.count > 0 else { return }
        let count = UInt64(buffer.count)
        if Self.isAligned(offset) && Self.isAligned(count) && Self.isAligned(buffer.baseAddress!) {
            try writeBlocks(buffer, at: offset)
            return
        }
        try withPartialBlocksLocked(offset: offset, count: count) { partial in
            let start = Self.alignDown(offset)
            let end = Self.alignUp(offset + count)
            let bounce = Self.bounce(for: end - start)
            defer { bounce.deallocate() }
            var position = start
            while position < end {
                let piece = Int(min(UInt64(bounce.count), end - position))
                let window = UnsafeMutableRawBufferPointer(rebasing: bounce[0..<piece])
                // Blocks only partly written keep their other bytes: read them first.
                for block in partial where block >= position && block < position + UInt64(piece) {
                    let at = Int(block - position)
                    try readBlocks(
                        into: UnsafeMutableRawBufferPointer(rebasing: window[at..<at + Self.alignment]),
                        at: block
                    )
                    hooks.afterBlockRead?(block)
                }
                let from = max(position, offset)
                let to = min(position + UInt64(piece), offset + count)
                (window.baseAddress! + Int(from - position)).copyMemory(
                    from: buffer.baseAddress! + Int(from - offset),
                    byteCount: Int(to - from)
                )
                try writeBlocks(UnsafeRawBufferPointer(window), at: position)
                position += UInt64(piece)
            }
        }
    }

    /// Writes whole aligned blocks from aligned memory.
    private func writeBlocks(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockIOError.system(.write, errno: errno, path: path, offset: offset + UInt64(done))
            }
            done += n
        }
    }

    // MARK: Partial blocks

    /// The file offsets of the blocks that `offset..<offset + count` covers only in part (none, one or two).
    static func partialBlocks(offset: UInt64, count: UInt64) -> [UInt64] {
        guard count > 0 else { return [] }
        let end = offset + count
        let head = alignDown(offset)
        let tail = alignDown(end - 1)
        var blocks: [UInt64] = []
        if offset != head || end < head + UInt64(alignment) { blocks.append(head) }
        if tail != head && !isAligned(end) { blocks.append(tail) }
        return blocks
    }

    /// Runs `body` with the locks of the blocks `offset..<offset + count` covers only in part, passing
    /// their offsets. Every change to part of a block happens inside this.
    func withPartialBlocksLocked<T>(offset: UInt64, count: UInt64, _ body: ([UInt64]) throws -> T) rethrows -> T {
        let blocks = Self.partialBlocks(offset: offset, count: count)
        if blocks.isEmpty || locksDisabled { return try body(blocks) }
        let stripes = locks.lock(blocks: blocks.map { $0 / UInt64(Self.alignment) }) { [hooks] stripe in
            hooks.willWaitForBlock?(blocks.first { StripedLocks.stripe(of: $0 / UInt64(Self.alignment)) == stripe }!)
        }
        defer { locks.unlock(stripes) }
        return try body(blocks)
    }

    /// An aligned buffer for up to `length` bytes (at most `bounceLimit`).
    private static func bounce(for length: UInt64) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(length, UInt64(bounceLimit))), alignment: alignment)
    }
}

/// A fixed set of mutexes, one chosen per block number, so that work on one block excludes other work on
/// the same block without a lock per block.
final class StripedLocks: @unchecked Sendable {
    static let count = 64
    private let mutexes: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutexes = .allocate(capacity: Self.count)
        for i in 0..<Self.count { pthread_mutex_init(mutexes + i, nil) }
    }

    deinit {
        for i in 0..<Self.count { pthread_mutex_destroy(mutexes + i) }
        mutexes.deallocate()
    }

    static func stripe(of block: UInt64) -> Int { Int(block % UInt64(count)) }

    /// Locks the stripes of `blocks` in ascending order (so two requests cannot deadlock), calling
    /// `contended` with a stripe before waiting for it; returns them for `unlock`.
    func lock(blocks: [UInt64], contended: (Int) -> Void) -> [Int] {
        let stripes = Set(blocks.map(Self.stripe(of:))).sorted()
        for stripe in stripes where pthread_mutex_trylock(mutexes + stripe) != 0 {
            contended(stripe)
            pthread_mutex_lock(mutexes + stripe)
        }
        return stripes
    }

    func unlock(_ stripes: [Int]) {
        for stripe in stripes.reversed() { pthread_mutex_unlock(mutexes + stripe) }
    }
}
