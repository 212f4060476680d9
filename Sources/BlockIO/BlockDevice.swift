// Design notes
// ------------
// Every storage thing in vdisk is a `BlockDevice`: a flat array of bytes with a size, plus the few
// operations a block layer needs (read, write, write-zeroes, discard, flush, extents). Files, RAM disks,
// VIMG images, backing images and remote NBD exports all conform, so a clone's backing file, an NBD
// export and a FUSE-exported loop device are all "just a device". The protocol is synchronous on purpose:
// the engine is plain blocking code that is easy to reason about and to test; async lives at the edges
// (the NBD server runs device calls on a thread pool).

/// What a device can do beyond reading. Front ends advertise these to clients (NBD transmission flags).
public struct BlockDeviceCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Writes, write-zeroes and discards are refused with `EROFS`/`EPERM`.
    public static let readOnly = BlockDeviceCapabilities(rawValue: 1 << 0)
    /// `flush()` makes earlier acknowledged writes durable.
    public static let flush = BlockDeviceCapabilities(rawValue: 1 << 1)
    /// `discard` may release storage.
    public static let discard = BlockDeviceCapabilities(rawValue: 1 << 2)
    /// `writeZeroes` is cheaper than writing a buffer of zeroes.
    public static let writeZeroes = BlockDeviceCapabilities(rawValue: 1 << 3)
    /// `writeZeroes(fast: true)` either completes quickly or fails with `ENOTSUP` without touching data.
    public static let fastZero = BlockDeviceCapabilities(rawValue: 1 << 4)
    /// `extents` reports holes and zero ranges, not just "all data".
    public static let extents = BlockDeviceCapabilities(rawValue: 1 << 5)
    /// Several connections or threads may use the device at once and see each other's flushed writes.
    public static let multiConnection = BlockDeviceCapabilities(rawValue: 1 << 6)
}

/// How a range of a device reads: the two bits of NBD's `base:allocation` context, and of `qemu-img map`.
public struct ExtentFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// No storage is allocated for the range.
    public static let hole = ExtentFlags(rawValue: 1 << 0)
    /// The range reads as zeroes.
    public static let zero = ExtentFlags(rawValue: 1 << 1)
}

/// A run of a device's address space with uniform `ExtentFlags`.
public struct Extent: Sendable, Hashable, CustomStringConvertible {
    public var offset: UInt64
    public var length: UInt64
    public var flags: ExtentFlags

    public init(offset: UInt64, length: UInt64, flags: ExtentFlags) {
        self.offset = offset
        self.length = length
        self.flags = flags
    }

    public var end: UInt64 { offset + length }

    public var description: String {
        let kind =
            flags.contains(.hole)
            ? (flags.contains(.zero) ? "hole" : "unmapped") : (flags.contains(.zero) ? "zero" : "data")
        return "\(offset)+\(length) \(kind)"
    }
}

extension Array where Element == Extent {
    /// Appends `extent`, merged into the last one when it continues it with the same flags, so a device
    /// answers `extents` with as few runs as its layout allows.
    public mutating func appendMerging(_ extent: Extent) {
        if var last = self.last, last.flags == extent.flags, last.end == extent.offset {
            last.length += extent.length
            self[count - 1] = last
        } else {
            append(extent)
        }
    }
}

/// A device whose length can be cut, such as an image file: compaction gives the space past its last
/// cluster back to the host.
public protocol TruncatableDevice: BlockDevice {
    /// Sets the device's length; bytes past it are gone.
    func truncate(to length: UInt64) throws
}

/// A synchronous, thread-safe random-access block device.
///
/// Implementations must allow concurrent calls from many threads. Offsets and lengths are in bytes and need
/// no alignment; a request past `size` fails with `BlockIOError` code `.outOfRange` (errno `ENOSPC` for
/// writes, `EINVAL` otherwise, as the NBD spec asks).
public protocol BlockDevice: AnyObject, Sendable {
    /// The device size in bytes.
    var size: UInt64 { get }
    /// What the device supports beyond read.
    var capabilities: BlockDeviceCapabilities { get }

    /// Fills `buffer` with the bytes at `offset ..< offset + buffer.count`.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// Writes `buffer` at `offset`. With `fua`, the bytes are durable when the call returns.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws
    /// Makes `count` bytes at `offset` read as zero.
    /// - Parameters:
    ///   - mayUnmap: the device may release storage for the range (NBD: no `NO_HOLE` flag).
    ///   - fast: fail with `.notSupported` instead of falling back to slow writes (NBD `FAST_ZERO`).
    func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws
    /// Tells the device the range's content is no longer needed. Reads afterwards return unspecified
    /// data (zeroes for every device in this package).
    func discard(at offset: UInt64, count: UInt64) throws
    /// Makes every write that completed before the call durable.
    func flush() throws
    /// Describes `offset ..< offset + count` as extents; may stop early but returns at least one extent.
    func extents(at offset: UInt64, count: UInt64) throws -> [Extent]
    /// Flushes and releases the device. Further calls fail.
    func close() throws
}

extension BlockDevice {
    /// Convenience for whole buffers of bytes, used by tests and small tools.
    public func read(count: Int, at offset: UInt64) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        return bytes
    }

    /// Convenience for whole buffers of bytes, used by tests and small tools.
    public func write(_ bytes: [UInt8], at offset: UInt64, fua: Bool = false) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset, fua: fua) }
    }

    /// Checks that `offset ..< offset + count` lies inside the device without overflowing.
    /// - Throws: `BlockIOError` `.outOfRange` with `ENOSPC` for writes and `EINVAL` for other operations.
    public func checkRange(offset: UInt64, count: UInt64, operation: BlockIOError.Operation) throws {
        let (end, overflow) = offset.addingReportingOverflow(count)
        if overflow || end > size {
            throw BlockIOError(
                .outOfRange,
                operation: operation,
                offset: offset,
                message: "range \(offset)+\(count) is past the end of the device (\(size) bytes)"
            )
        }
    }

    /// The default `extents`: everything is data.
    public func allDataExtent(at offset: UInt64, count: UInt64) -> [Extent] {
        [Extent(offset: offset, length: count, flags: [])]
    }
}
