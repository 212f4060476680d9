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

    private func count<T>(_ update: (inout IOCounters) -> Void, _ body: () throws -> T) throws -> T {
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
        try count({ $0.reads += 1; $0.bytesRead += UInt64(buffer.count) }) { try inner.read(into: buffer, at: offset) }
    }

    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try count({ $0.writes += 1; $0.bytesWritten += UInt64(buffer.count) }) { try inner.write(buffer, at: offset, fua: fua) }
    }

    func writeZeroes(at offset: UInt64, count n: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try count({ $0.zeroes += 1 }) { try inner.writeZeroes(at: offset, count: n, mayUnmap: mayUnmap, fast: fast) }
    }

    func discard(at offset: UInt64, count n: UInt64) throws {
        try count({ $0.discards += 1 }) { try inner.discard(at: offset, count: n) }
    }

    func flush() throws {
        try count({ $0.flushes += 1 }) { try inner.flush() }
    }

    func extents(at offset: UInt64, count n: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: n)
    }

    func close() throws { try inner.close() }
}
