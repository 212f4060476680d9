import BlockIO
import Synchronization

/// Wraps a plugged disk's device to count its I/O for `vdisk list`, whichever front end it came through.
final class CountingDevice: BlockDevice {
    let inner: any BlockDevice
    private let counters = Mutex(IOCounters())

    init(_ inner: any BlockDevice) { self.inner = inner }

    var size: UInt64 { inner.size }
    var capabilities: BlockDeviceCapabilities { inner.capabilities }
    var snapshot: IOCounters { counters.withLock { $0 } }

    private func count<T>(_ body: () throws -> T, then update: (inout IOCounters) -> Void) throws -> T {
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
}
