import BlockIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Wraps a plugged disk's device to count its I/O for `vdisk list`, whichever front end it came through,
/// and to fence it off when the bus hands it over to its successor (`seal`).
final class CountingDevice: BlockDevice {
    let inner: any BlockDevice
    private let counters = Mutex(IOCounters())
    /// Requests inside `inner` right now.
    private let inFlight = Atomic<Int>(0)
    private let sealed = Atomic<Bool>(false)

    init(_ inner: any BlockDevice) { self.inner = inner }

    var size: UInt64 { inner.size }
    var capabilities: BlockDeviceCapabilities { inner.capabilities }
    var snapshot: IOCounters { counters.withLock { $0 } }

    private func count<T>(_ body: () throws -> T, then update: (inout IOCounters) -> Void) throws -> T {
        inFlight.add(1, ordering: .sequentiallyConsistent)
        defer { inFlight.subtract(1, ordering: .sequentiallyConsistent) }
        if sealed.load(ordering: .sequentiallyConsistent) { parkForever() }
        do {
            let result = try body()
            counters.withLock { update(&$0) }
            return result
        } catch {
            counters.withLock { $0.errors += 1 }
            throw error
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try count {
            try inner.read(into: buffer, at: offset)
        } then: {
            $0.reads += 1
            $0.bytesRead += UInt64(buffer.count)
        }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try count {
            try inner.write(buffer, at: offset, fua: fua)
        } then: {
            $0.writes += 1
            $0.bytesWritten += UInt64(buffer.count)
        }
    }

    func writeZeroes(at offset: UInt64, count n: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try count {
            try inner.writeZeroes(at: offset, count: n, mayUnmap: mayUnmap, fast: fast)
        } then: {
            $0.zeroes += 1
        }
    }

    func discard(at offset: UInt64, count n: UInt64) throws {
        try count {
            try inner.discard(at: offset, count: n)
        } then: {
            $0.discards += 1
        }
    }

    func flush() throws {
        try count {
            try inner.flush()
        } then: {
            $0.flushes += 1
        }
    }

    func extents(at offset: UInt64, count n: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: n)
    }

    func close() throws { try inner.close() }

    /// Lets no request reach `inner` any more and waits (at most `seconds`) for those inside it to finish.
    /// A request that comes later never completes: it must not be answered at all, not even with an error,
    /// because its client (the kernel) will send it again to the next bus. Only for a bus that hands its
    /// disks over and exits.
    /// - Returns: false if requests were still running at the deadline.
    func seal(waitingAtMost seconds: Double) -> Bool {
        sealed.store(true, ordering: .sequentiallyConsistent)
        let deadline = monotonicSeconds() + seconds
        while inFlight.load(ordering: .sequentiallyConsistent) > 0 {
            if monotonicSeconds() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    private func parkForever() -> Never {
        inFlight.subtract(1, ordering: .sequentiallyConsistent)
        while true { pause() }
    }
}
