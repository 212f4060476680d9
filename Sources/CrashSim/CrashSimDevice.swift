// Design notes
// ------------
// A disk with a volatile write cache, modelled in front of a real device (a plugged disk's image):
//
//   write         -> a copy goes into the cache, in arrival order; reads see it at once
//   cache full    -> the oldest writes are written back to the device: they are on the medium from then on
//   flush, FUA    -> every write that completed before is written back, then the device is flushed
//   crash(seed)   -> the cache settles onto the device as a power cut would leave it; every later I/O
//                    fails with EIO
//
// The device below only ever holds what is on the medium (flushed or written-back writes), so a process
// that dies with writes in the cache leaves the image as `drop` mode would. At a crash each cached write
// (in `tear` mode, each piece of it between tear-size boundaries) lands or not, as a coin from SplitMix64
// seeded with the crash's seed decides, and the pieces that land do so in a shuffled order. So each sector
// ends up holding its value as of the last completed flush or any version written to it since, and two
// writes with no flush between them may land in either order, or only the second. The outcome depends on
// the seed and the cache's content alone: a crash replays from its seed.
//
// The cache:
//
//   entries  [ e(first) e(first+1) ... e(next-1) ]   FIFO by sequence number; write-back pops the front
//   index    64 KiB chunk -> sequence numbers of the live entries touching it, oldest first
//
// A read gathers the entries touching its chunks, newest first, copies what they cover and reads the gaps
// from the device. Two locks: `state` guards the bookkeeping and is never held during device I/O;
// `writeBack` is held by whoever moves entries to the device (eviction, flush, crash), so overlapping
// entries reach the device in cache order (others are written in parallel, as the front ends sent them),
// an entry is freed only once it is there, and a crash waits for a write-back in progress to finish.
//
// What it costs: one more copy of every byte written (into the cache), which is what bounds sequential
// writes on a machine whose memory bandwidth is the limit (docs/PERFORMANCE.md).

import BlockIO
import Dispatch
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A `BlockDevice` that models a disk's volatile write cache in front of `inner` and can lose power.
///
/// Writes are cached (bounded by `cacheSize`; when full, the oldest are written back to `inner`, as a disk
/// does). `flush()` and FUA writes write back the cache and flush `inner`. `crash(seed:mode:tearSize:)`
/// cuts the power: `inner` then holds exactly one post-crash state (see `Mode`), and every later call
/// fails with `EIO`. Closing closes `inner`.
public final class CrashSimDevice: BlockDevice, @unchecked Sendable {
    /// What happens to the writes still in the cache when the power is cut.
    public enum Mode: String, Sendable, CaseIterable, Codable {
        /// None of them reaches the disk: it holds what was flushed (or written back) only.
        case drop
        /// Each lands whole or not at all, in any order: a sector holds its flushed value or any later version.
        case reorder
        /// As `reorder`, but each write is cut at tear-size boundaries and each piece lands or not.
        case tear
    }

    /// What a power cut did.
    public struct CrashReport: Sendable, Hashable, Codable, CustomStringConvertible {
        public var seed: UInt64
        public var mode: Mode
        /// The unit a write may be torn into, in `tear` mode.
        public var tearSize: Int
        /// Writes (and write-zeroes, discards) in the cache when the power went.
        public var cachedWrites: Int
        public var cachedBytes: UInt64
        /// Cached writes that landed whole, in part (torn), or not at all.
        public var landed: Int
        public var torn: Int
        public var lost: Int

        public var description: String {
            var text = "seed \(seed), mode \(mode.rawValue)"
            if mode == .tear { text += " at \(ByteSize.format(UInt64(tearSize)))" }
            guard cachedWrites > 0 else { return text + ": the cache was empty, nothing was lost" }
            text += ": \(cachedWrites) write\(cachedWrites == 1 ? "" : "s") (\(ByteSize.format(cachedBytes)))"
            text += " in the cache; \(landed) landed, "
            if mode == .tear { text += "\(torn) torn, " }
            return text + "\(lost) lost"
        }
    }

    /// A disk cache of a usual size.
    public static let defaultCacheSize: UInt64 = 64 << 20
    /// At most this many cached requests, whatever their size (write-zeroes and discards carry no data).
    public static let maximumCachedWrites = 1 << 16
    /// The tear sizes `crash` accepts: powers of two from a sector to 64 KiB.
    public static let tearSizes = (9...16).map { 1 << $0 }

    public let inner: any BlockDevice
    /// The seed a crash uses unless it is given another.
    public let seed: UInt64
    public let cacheSize: UInt64

    private let state = Monitor()
    private let writeBack = Monitor()
    // Guarded by `state`:
    private var entries: [CachedWrite] = []
    private var head = 0
    private var firstSequence: UInt64 = 1
    private var index: [UInt64: ChunkList] = [:]
    private var cachedBytes: UInt64 = 0
    private var isPoweredOff = false
    private var isClosed = false
    private var report: CrashReport?
    /// A power cut armed to happen at a coming write (`crash(afterWrites:...)`).
    private var trigger: Trigger?
    private var triggerFailure: (any Error)?

    private struct Trigger {
        var remaining: Int
        var seed: UInt64?
        var mode: Mode
        var tearSize: Int
    }

    /// - Parameters:
    ///   - inner: the medium; it must not be written by anyone else while this device is in use.
    ///   - seed: the default seed of `crash`.
    ///   - cacheSize: bytes of written data the cache holds before it writes the oldest back.
    public init(_ inner: any BlockDevice, seed: UInt64, cacheSize: UInt64 = defaultCacheSize) {
        self.inner = inner
        self.seed = seed
        self.cacheSize = cacheSize
    }

    deinit {
        for entry in entries[head...] { entry.free() }
    }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockDeviceCapabilities { inner.capabilities }

    /// Whether the power was cut.
    public var hasCrashed: Bool { state.withLock { isPoweredOff } }
    /// What the power cut did, once it is over.
    public var crashReport: CrashReport? { state.withLock { report } }
    /// Requests and bytes of data in the cache now.
    public var cached: (writes: Int, bytes: UInt64) { state.withLock { (entries.count - head, cachedBytes) } }

    // MARK: I/O

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read)
        guard let base = buffer.baseAddress, buffer.count > 0 else { return }
        let end = offset + UInt64(buffer.count)
        // Copy what the cache holds under the lock (an entry may be freed as soon as it is released); the
        // gaps are on the device, where only a write-back of a newer write could change them, which a read
        // racing with that write may see anyway.
        let gaps: [Range<UInt64>] = try state.withLock {
            try checkPower(.read)
            var gaps = [offset..<end]
            for sequence in overlappingSequences(offset, end).reversed() {
                let entry = entries[position(of: sequence)]
                var remaining: [Range<UInt64>] = []
                for gap in gaps {
                    let low = max(gap.lowerBound, entry.offset)
                    let high = min(gap.upperBound, entry.offset + entry.length)
                    guard low < high else {
                        remaining.append(gap)
                        continue
                    }
                    let target = base + Int(low - offset)
                    if let bytes = entry.bytes {
                        target.copyMemory(
                            from: bytes.baseAddress! + Int(low - entry.offset),
                            byteCount: Int(high - low)
                        )
                    } else {
                        target.initializeMemory(as: UInt8.self, repeating: 0, count: Int(high - low))
                    }
                    if gap.lowerBound < low { remaining.append(gap.lowerBound..<low) }
                    if high < gap.upperBound { remaining.append(high..<gap.upperBound) }
                }
                gaps = remaining
                if gaps.isEmpty { break }
            }
            return gaps
        }
        for gap in gaps {
            let part = UnsafeMutableRawBufferPointer(
                start: base + Int(gap.lowerBound - offset),
                count: Int(gap.upperBound - gap.lowerBound)
            )
            try inner.read(into: part, at: gap.lowerBound)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try checkWritable(.write, offset: offset, count: UInt64(buffer.count))
        guard buffer.count > 0 else {
            if fua { try flush() }
            return
        }
        // The copy is made before taking the lock: writers only contend for the bookkeeping.
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: buffer.count, alignment: 16)
        copy.copyMemory(from: buffer)
        try cache(CachedWrite(kind: .data, offset: offset, length: UInt64(buffer.count), bytes: copy), fua: fua)
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try checkWritable(.writeZeroes, offset: offset, count: count)
        if fast && !inner.capabilities.contains(.fastZero) {
            throw BlockIOError(.notSupported, operation: .writeZeroes, offset: offset, message: "no fast zeroing")
        }
        guard count > 0 else { return }
        try cache(CachedWrite(kind: mayUnmap ? .zeroesMayUnmap : .zeroes, offset: offset, length: count), fua: false)
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try checkWritable(.discard, offset: offset, count: count)
        guard count > 0 else { return }
        try cache(CachedWrite(kind: .discard, offset: offset, length: count), fua: false)
    }

    public func flush() throws {
        let last = try state.withLock {
            try checkPower(.flush)
            return nextSequence - 1
        }
        try settle(through: last, flushing: true)
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try checkRange(offset: offset, count: count, operation: .extents)
        let cachedHere = try state.withLock {
            try checkPower(.extents)
            return !overlappingSequences(offset, offset + count).isEmpty
        }
        // Cached data may sit over a hole of the device: "all data" is always a correct answer.
        return cachedHere ? allDataExtent(at: offset, count: count) : try inner.extents(at: offset, count: count)
    }

    /// Writes the cache back (unless the power was cut, which settled it already) and closes `inner`. A
    /// power cut still armed is called off.
    public func close() throws {
        var failure: (any Error)?
        let crashed = state.withLock {
            trigger = nil
            state.broadcast()
            return isPoweredOff
        }
        if !crashed {
            do { try flush() } catch { failure = error }
        }
        state.withLock {
            isClosed = true
            state.broadcast()
        }
        do { try inner.close() } catch { failure = failure ?? error }
        if let failure { throw failure }
    }

    // MARK: The power cut

    /// Cuts the power: the cached writes settle onto `inner` as `mode` and the seed decide, `inner` is
    /// flushed, and every later call but `close` fails with `EIO`. Waits for a write-back in progress.
    /// - Parameters:
    ///   - seed: the seed of the choices; `self.seed` when nil.
    ///   - tearSize: for `tear`: the unit of a write that lands or not (one of `tearSizes`).
    /// - Returns: what happened, for the log.
    /// - Throws: `CrashSimError` `.invalidArgument` for a bad tear size or a second crash; an error of
    ///   `inner` if writing the outcome fails.
    @discardableResult
    public func crash(seed: UInt64? = nil, mode: Mode, tearSize: Int = 512) throws -> CrashReport {
        try Self.checkTearSize(tearSize)
        return try writeBack.withLock {
            let cached: [CachedWrite] = try state.withLock {
                try checkCanCrash()
                isPoweredOff = true
                trigger = nil
                defer {
                    entries = []
                    head = 0
                    index = [:]
                    cachedBytes = 0
                }
                return Array(entries[head...])
            }
            defer { for entry in cached { entry.free() } }
            var outcome = CrashReport(
                seed: seed ?? self.seed,
                mode: mode,
                tearSize: tearSize,
                cachedWrites: cached.count,
                cachedBytes: cached.reduce(0) { $0 + UInt64($1.bytes?.count ?? 0) },
                landed: 0,
                torn: 0,
                lost: 0
            )
            var random = SplitMix64(seed: outcome.seed)
            var landing: [(entry: Int, piece: Range<UInt64>)] = []
            for (number, entry) in cached.enumerated() {
                let pieces = mode == .drop ? [] : entry.pieces(tearSize: mode == .tear ? UInt64(tearSize) : nil)
                var landedPieces = 0
                for piece in pieces where random.next() & 1 == 1 {
                    landing.append((number, piece))
                    landedPieces += 1
                }
                if landedPieces == 0 {
                    outcome.lost += 1
                } else if landedPieces == pieces.count {
                    outcome.landed += 1
                } else {
                    outcome.torn += 1
                }
            }
            landing.shuffle(using: &random)
            for (number, piece) in landing { try cached[number].land(piece, on: inner) }
            try inner.flush()
            state.withLock {
                report = outcome
                state.broadcast()
            }
            return outcome
        }
    }

    /// Arms a power cut at the `writes`-th write (write-zeroes and discards count too) from now, and
    /// waits for it: the power goes right after that write entered the cache, wherever the workload
    /// above is then (in the middle of a journal commit, say). The write itself completes.
    /// - Parameter timeout: seconds to wait for the writes; the cut is then called off.
    /// - Throws: `CrashSimError` `.invalidArgument` as `crash` does, or when a cut is already armed;
    ///   `.notFound` when the writes do not come in time or the disk is closed first.
    public func crash(
        afterWrites writes: Int,
        seed: UInt64? = nil,
        mode: Mode,
        tearSize: Int = 512,
        timeout: Int
    ) throws -> CrashReport {
        try Self.checkTearSize(tearSize)
        guard writes >= 1 else {
            throw CrashSimError(.invalidArgument, message: "a power cut comes after 1 write or more")
        }
        var deadline = timespec()
        clock_gettime(CLOCK_REALTIME, &deadline)
        deadline.tv_sec += max(1, timeout)
        return try state.withLock {
            try checkCanCrash()
            guard trigger == nil else {
                throw CrashSimError(.invalidArgument, message: "a power cut is already armed on this disk")
            }
            trigger = Trigger(remaining: writes, seed: seed, mode: mode, tearSize: tearSize)
            triggerFailure = nil
            while report == nil && triggerFailure == nil && trigger != nil {
                var now = timespec()
                clock_gettime(CLOCK_REALTIME, &now)
                if now.tv_sec > deadline.tv_sec || (now.tv_sec == deadline.tv_sec && now.tv_nsec >= deadline.tv_nsec) {
                    let came = writes - trigger!.remaining
                    trigger = nil
                    throw CrashSimError(
                        .notFound,
                        message:
                            "the disk received \(came) of the \(writes) writes in \(timeout) s; the power is still on"
                    )
                }
                state.timedWait(until: deadline)
            }
            if let report { return report }
            if let triggerFailure { throw triggerFailure }
            throw CrashSimError(.notFound, message: "the disk was closed before the power cut")
        }
    }

    private static func checkTearSize(_ tearSize: Int) throws {
        guard tearSizes.contains(tearSize) else {
            throw CrashSimError(
                .invalidArgument,
                message: "the tear size must be a power of two from 512 bytes to 64 KiB, not \(tearSize)"
            )
        }
    }

    /// With `state` held.
    private func checkCanCrash() throws {
        guard !isPoweredOff else {
            throw CrashSimError(.invalidArgument, message: "the power of this disk is already off")
        }
        guard !isClosed else { throw CrashSimError(.invalidArgument, message: "the disk is closed") }
    }

    // MARK: The cache

    private var nextSequence: UInt64 { firstSequence + UInt64(entries.count - head) }

    private func position(of sequence: UInt64) -> Int { head + Int(sequence - firstSequence) }

    private func checkPower(_ operation: BlockIOError.Operation) throws {
        if isPoweredOff {
            throw CrashSimError(
                .poweredOff,
                message: "\(operation.rawValue) after the power was cut (crash simulation)"
            )
        }
    }

    private func checkWritable(_ operation: BlockIOError.Operation, offset: UInt64, count: UInt64) throws {
        if inner.capabilities.contains(.readOnly) {
            throw BlockIOError(.readOnly, operation: operation, message: "device is read-only")
        }
        try checkRange(offset: offset, count: count, operation: operation)
    }

    /// The sequence numbers of live entries touching `start..<end`'s chunks, oldest first, each once.
    private func overlappingSequences(_ start: UInt64, _ end: UInt64) -> [UInt64] {
        guard entries.count > head, start < end else { return [] }
        let first = start / ChunkList.chunkSize
        let last = (end - 1) / ChunkList.chunkSize
        var found: [UInt64] = []
        if last - first < UInt64(index.count) {
            for chunk in first...last { index[chunk]?.appendLive(to: &found) }
        } else {
            for (chunk, list) in index where chunk >= first && chunk <= last { list.appendLive(to: &found) }
        }
        found.sort()
        var unique: [UInt64] = []
        unique.reserveCapacity(found.count)
        for sequence in found where unique.last != sequence { unique.append(sequence) }
        return unique.filter {
            let entry = entries[position(of: $0)]
            return entry.offset < end && start < entry.offset + entry.length
        }
    }

    private func cache(_ write: CachedWrite, fua: Bool) throws {
        let (sequence, full, fire): (UInt64, Bool, Trigger?) = try state.withLock {
            do { try checkPower(.write) } catch {
                write.free()
                throw error
            }
            let sequence = nextSequence
            entries.append(write)
            for chunk in write.chunks { index[chunk, default: ChunkList()].append(sequence) }
            cachedBytes += UInt64(write.bytes?.count ?? 0)
            var fire: Trigger?
            if var armed = trigger {
                armed.remaining -= 1
                if armed.remaining == 0 { fire = armed }
                trigger = armed
            }
            return (sequence, cachedBytes > cacheSize || entries.count - head > Self.maximumCachedWrites, fire)
        }
        if let fire {
            // The armed power cut: this write made it into the cache, nothing after it does.
            do {
                try crash(seed: fire.seed, mode: fire.mode, tearSize: fire.tearSize)
            } catch {
                state.withLock {
                    triggerFailure = error
                    state.broadcast()
                }
            }
            // A FUA write promises durability, which the power cut took away: it fails, like any write
            // the power cut interrupts (its data may or may not have landed).
            if fua { try checkPower(.write) }
            return
        }
        if fua {
            // Writing back everything up to this write is more than FUA asks, and always allowed.
            try settle(through: sequence, flushing: true)
        } else if full {
            try evict()
        }
    }

    /// Writes back the oldest entries until the cache is at three quarters of its size, so that a full
    /// cache drains in batches rather than one write at a time.
    private func evict() throws {
        try writeBack.withLock {
            let batch: [CachedWrite] = try state.withLock {
                try checkPower(.write)
                var bytes = cachedBytes
                var count = entries.count - head
                var end = head
                while end < entries.count && (bytes > cacheSize / 4 * 3 || count > Self.maximumCachedWrites / 4 * 3) {
                    bytes -= UInt64(entries[end].bytes?.count ?? 0)
                    count -= 1
                    end += 1
                }
                return Array(entries[head..<end])
            }
            try writeBackLocked(batch, flushing: false)
        }
    }

    /// Writes back every entry up to `last` (those still cached), then flushes `inner` if asked.
    private func settle(through last: UInt64, flushing: Bool) throws {
        try writeBack.withLock {
            let batch: [CachedWrite] = try state.withLock {
                try checkPower(flushing ? .flush : .write)
                guard last >= firstSequence else { return [] }
                return Array(entries[head..<min(entries.count, position(of: last) + 1)])
            }
            try writeBackLocked(batch, flushing: flushing)
        }
    }

    /// With `writeBack` held: the batch (the oldest entries) goes to `inner`, then leaves the cache.
    /// Entries that do not overlap are written in parallel, as the front ends sent them; overlapping ones
    /// keep their order (a run ends before an entry that overlaps one in it).
    private func writeBackLocked(_ batch: [CachedWrite], flushing: Bool) throws {
        for run in Self.overlapFreeRuns(batch) {
            if run.count == 1 {
                try batch[run.lowerBound].land(0..<batch[run.lowerBound].length, on: inner)
                continue
            }
            let failure = Mutex<(any Error)?>(nil)
            DispatchQueue.concurrentPerform(iterations: run.count) { i in
                let entry = batch[run.lowerBound + i]
                do { try entry.land(0..<entry.length, on: inner) } catch { failure.withLock { $0 = $0 ?? error } }
            }
            if let error = failure.withLock({ $0 }) { throw error }
        }
        if flushing { try inner.flush() }
        state.withLock {
            for entry in batch {
                let sequence = firstSequence
                for chunk in entry.chunks {
                    index[chunk]!.removeOldest(sequence)
                    if index[chunk]!.isEmpty { index[chunk] = nil }
                }
                cachedBytes -= UInt64(entry.bytes?.count ?? 0)
                entry.free()
                head += 1
                firstSequence += 1
            }
            if head > 4096 && head * 2 > entries.count {
                entries.removeFirst(head)
                head = 0
            }
        }
    }
}

extension CrashSimDevice {
    /// Splits `batch` into consecutive runs in which no two entries overlap.
    static func overlapFreeRuns(_ batch: [CachedWrite]) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        var start = 0
        var taken: [UInt64: [Range<UInt64>]] = [:]  // chunk -> ranges of the current run touching it
        for (i, entry) in batch.enumerated() {
            let range = entry.offset..<entry.offset + entry.length
            if entry.chunks.contains(where: { taken[$0]?.contains { $0.overlaps(range) } ?? false }) {
                runs.append(start..<i)
                start = i
                taken = [:]
            }
            for chunk in entry.chunks { taken[chunk, default: []].append(range) }
        }
        if start < batch.count { runs.append(start..<batch.count) }
        return runs
    }
}

/// One cached request. `bytes` is owned by the cache and freed when the entry leaves it; until then it is
/// only read, so write-back threads may share it.
struct CachedWrite: @unchecked Sendable {
    enum Kind { case data, zeroes, zeroesMayUnmap, discard }
    var kind: Kind
    var offset: UInt64
    var length: UInt64
    var bytes: UnsafeMutableRawBufferPointer? = nil

    func free() { bytes?.deallocate() }

    /// The index chunks the entry touches.
    var chunks: ClosedRange<UInt64> {
        (offset / ChunkList.chunkSize)...((offset + length - 1) / ChunkList.chunkSize)
    }

    /// The entry cut at multiples of `tearSize` of the device's address space (whole without one).
    func pieces(tearSize: UInt64?) -> [Range<UInt64>] {
        guard let tearSize else { return [0..<length] }
        var pieces: [Range<UInt64>] = []
        var start: UInt64 = 0
        while start < length {
            let end = min(length, (offset + start) / tearSize * tearSize + tearSize - offset)
            pieces.append(start..<end)
            start = end
        }
        return pieces
    }

    /// Puts `piece` (offsets within the entry) on `device`.
    func land(_ piece: Range<UInt64>, on device: any BlockDevice) throws {
        let at = offset + piece.lowerBound
        let count = piece.upperBound - piece.lowerBound
        switch kind {
        case .data:
            let slice = UnsafeRawBufferPointer(start: bytes!.baseAddress! + Int(piece.lowerBound), count: Int(count))
            try device.write(slice, at: at, fua: false)
        case .zeroes, .zeroesMayUnmap:
            try device.writeZeroes(at: at, count: count, mayUnmap: kind == .zeroesMayUnmap, fast: false)
        case .discard:
            try device.discard(at: at, count: count)
        }
    }
}

/// The sequence numbers of the cached entries touching one chunk, oldest first; entries leave from the
/// front, so the list keeps a start index instead of shifting on every removal.
struct ChunkList {
    static let chunkSize: UInt64 = 64 * 1024

    private var sequences: [UInt64] = []
    private var start = 0

    var isEmpty: Bool { start == sequences.count }

    mutating func append(_ sequence: UInt64) {
        // A request touches a chunk once; its sequence number is the newest.
        if sequences.last != sequence { sequences.append(sequence) }
    }

    /// Drops `sequence`, which must be the oldest.
    mutating func removeOldest(_ sequence: UInt64) {
        precondition(sequences[start] == sequence, "the cache's index is out of order")
        start += 1
        if start == sequences.count {
            sequences.removeAll(keepingCapacity: true)
            start = 0
        } else if start > 64 && start * 2 > sequences.count {
            sequences.removeFirst(start)
            start = 0
        }
    }

    func appendLive(to list: inout [UInt64]) { list += sequences[start...] }
}

/// SplitMix64: small, fast and fully determined by its seed, so a crash replays from the seed it printed.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
