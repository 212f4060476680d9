/// A device whose flushes are dropped: qemu's `cache=unsafe`. For outputs that are worthless until a whole
/// job finishes (`vimg convert` writes under a temporary name), where durability along the way buys
/// nothing and costs a sync per metadata step.
public final class UnsyncedDevice: BlockDevice {
    public let inner: any BlockDevice

    public init(_ inner: any BlockDevice) { self.inner = inner }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockDeviceCapabilities { inner.capabilities }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try inner.read(into: buffer, at: offset)
    }
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try inner.write(buffer, at: offset, fua: false)
    }
    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try inner.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
    }
    public func discard(at offset: UInt64, count: UInt64) throws { try inner.discard(at: offset, count: count) }
    public func flush() throws {}
    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: count)
    }
    /// Closes without the final flush an ordinary close would make.
    public func close() throws {
        if let file = inner as? FileDevice { try file.close(flushing: false) } else { try inner.close() }
    }
}
