// Design notes
// ------------
// A growable in-memory device that behaves like a disk with a volatile write cache:
//
//   write ──► visible to reads at once, queued as "unflushed"
//   flush ──► every queued write becomes durable
//   crash ──► a new device holding the durable bytes plus some of the unflushed writes, in any order,
//             possibly torn at 512-byte sector granularity
//
// Crash tests run a workload, cut the power at some step (`powerCut()`: every later call fails, so the
// abandoned engine cannot write anything more), then reopen the image from `crashImage(...)`.

import BlockIO

/// What happens to unflushed writes at a crash.
public enum CrashMode: Sendable, CaseIterable {
    /// None reaches the disk.
    case dropAll
    /// All reach the disk (a crash right after the cache drained).
    case keepAll
    /// Each reaches the disk or not, independently.
    case keepSome
    /// Each reaches the disk, not at all, or only some of its sectors.
    case tear
}

public final class FaultInjectingDevice: TruncatableDevice, @unchecked Sendable {
    private let monitor = Monitor()
    private let durable: MemoryDevice
    private let volatile: MemoryDevice
    private var unflushed: [(offset: UInt64, bytes: [UInt8])] = []
    private var isPoweredOff = false
    private var operationsUntilCut: Int? = nil
    /// Counts for tests: writes and flushes seen.
    public private(set) var writeCount = 0
    public private(set) var flushCount = 0

    /// - Parameter initial: durable content to start from (for example an image made elsewhere).
    public init(initial: [UInt8] = []) {
        durable = MemoryDevice(size: 0, growable: true)
        volatile = MemoryDevice(size: 0, growable: true)
        if !initial.isEmpty {
            try! durable.write(initial, at: 0)
            try! volatile.write(initial, at: 0)
        }
    }

    public var size: UInt64 { volatile.size }
    public var capabilities: BlockDeviceCapabilities { [.flush] }

    private func checkPower(_ operation: BlockIOError.Operation) throws {
        if operation != .read, let remaining = operationsUntilCut {
            if remaining <= 0 { isPoweredOff = true }
            operationsUntilCut = remaining - 1
        }
        if isPoweredOff {
            throw BlockIOError(.system, operation: operation, errno: 5, message: "power cut (fault injection)")
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try monitor.withLock {
            try checkPower(.read)
            try volatile.read(into: buffer, at: offset)
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try monitor.withLock {
            try checkPower(.write)
            writeCount += 1
            try volatile.write(buffer, at: offset, fua: false)
            unflushed.append((offset, Array(buffer)))
            if fua { try drain() }
        }
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try write([UInt8](repeating: 0, count: Int(count)), at: offset)
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try writeZeroes(at: offset, count: count, mayUnmap: true, fast: false)
    }

    public func flush() throws {
        try monitor.withLock {
            try checkPower(.flush)
            flushCount += 1
            try drain()
        }
    }

    /// Truncation reaches the disk with everything written before it (a model of a file system that
    /// orders the size change after the data): after a crash the file is either cut or not.
    public func truncate(to length: UInt64) throws {
        try monitor.withLock {
            try checkPower(.truncate)
            try drain()
            try durable.truncate(to: length)
            try volatile.truncate(to: length)
        }
    }

    private func drain() throws {
        for w in unflushed { try durable.write(w.bytes, at: w.offset) }
        unflushed.removeAll()
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] { allDataExtent(at: offset, count: count) }
    public func close() throws {}

    /// Cuts the power just before the `count`-th next write or flush (0: the very next one), which may
    /// fall in the middle of an engine's multi-step metadata update.
    public func cutPower(afterOperations count: Int) { monitor.withLock { operationsUntilCut = count } }

    /// Whether the power is off.
    public var isOff: Bool { monitor.withLock { isPoweredOff } }

    /// Cuts the power: every later call fails, so nothing more reaches the "disk".
    public func powerCut() { monitor.withLock { isPoweredOff = true } }

    /// The number of writes not yet flushed.
    public var unflushedCount: Int { monitor.withLock { unflushed.count } }

    /// What the disk could hold after a crash now, as a fresh growable device.
    public func crashImage<R: RandomNumberGenerator>(_ mode: CrashMode, using rng: inout R) -> MemoryDevice {
        monitor.withLock {
            let result = MemoryDevice(size: 0, growable: true)
            try! result.write(durable.snapshotBytes(), at: 0)
            for w in unflushed {
                switch mode {
                case .dropAll: continue
                case .keepAll: try! result.write(w.bytes, at: w.offset)
                case .keepSome: if Bool.random(using: &rng) { try! result.write(w.bytes, at: w.offset) }
                case .tear:
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: continue
                    case 1: try! result.write(w.bytes, at: w.offset)
                    default:
                        // Sector by sector (a sector is the unit a disk writes atomically).
                        var start = 0
                        while start < w.bytes.count {
                            let sectorEnd = min(
                                w.bytes.count,
                                Int((w.offset + UInt64(start)) / 512 * 512 + 512 - w.offset)
                            )
                            if Bool.random(using: &rng) {
                                try! result.write(Array(w.bytes[start..<sectorEnd]), at: w.offset + UInt64(start))
                            }
                            start = sectorEnd
                        }
                    }
                }
            }
            return result
        }
    }
}
