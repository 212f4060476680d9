import BlockIO
import Synchronization

/// A device that forwards every call to another, running a hook before each read: tests use it to fail,
/// slow down or watch reads without writing a whole device. The hook gets the read's number (0 for the
/// first) and offset.
public final class HookedDevice: BlockDevice {
    public let inner: any BlockDevice
    /// Reads so far.
    public let reads = Atomic<Int>(0)
    private let beforeRead: @Sendable (_ index: Int, _ offset: UInt64) throws -> Void

    public init(_ inner: any BlockDevice, beforeRead: @escaping @Sendable (Int, UInt64) throws -> Void) {
        self.inner = inner
        self.beforeRead = beforeRead
    }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockDeviceCapabilities { inner.capabilities }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try beforeRead(reads.add(1, ordering: .relaxed).oldValue, offset)
        try inner.read(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try inner.write(buffer, at: offset, fua: fua)
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try inner.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
    }

    public func discard(at offset: UInt64, count: UInt64) throws { try inner.discard(at: offset, count: count) }
    public func flush() throws { try inner.flush() }
    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: count)
    }
    public func close() throws { try inner.close() }
}
