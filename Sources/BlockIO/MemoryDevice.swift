#if canImport(Glibc)
import Glibc
#endif

/// A sparse RAM disk: storage is allocated in 64 KiB chunks on first write and freed by discard.
///
/// Also serves as the host storage of images in tests (`growable: true`: no size limit, reads past the
/// written end return zeroes), which is what the fault-injecting device wraps.
public final class MemoryDevice: TruncatableDevice, @unchecked Sendable {
    public static let chunkSize = 64 * 1024

    private let monitor = Monitor()
    private var chunks: [UInt64: UnsafeMutableRawPointer] = [:]
    private var length: UInt64
    private let fixedSize: UInt64
    public let isGrowable: Bool
    public let isReadOnly: Bool

    /// - Parameters:
    ///   - size: the device size (for a growable device, the initial length).
    ///   - growable: accept writes past the end (host storage for an image).
    public init(size: UInt64, growable: Bool = false, readOnly: Bool = false) {
        self.fixedSize = size
        self.length = size
        self.isGrowable = growable
        self.isReadOnly = readOnly
    }

    deinit {
        for chunk in chunks.values { chunk.deallocate() }
    }

    public var size: UInt64 { isGrowable ? monitor.withLock { length } : fixedSize }

    public var capabilities: BlockDeviceCapabilities {
        var caps: BlockDeviceCapabilities = [.flush, .discard, .writeZeroes, .fastZero, .extents, .multiConnection]
        if isReadOnly { caps.insert(.readOnly) }
        return caps
    }

    /// Bytes of RAM currently holding data.
    public var allocatedBytes: UInt64 { monitor.withLock { UInt64(chunks.count * Self.chunkSize) } }

    private func checkWritable(_ operation: BlockIOError.Operation, offset: UInt64, count: UInt64) throws {
        if isReadOnly { throw BlockIOError(.readOnly, operation: operation, message: "device is read-only") }
        if !isGrowable { try checkRange(offset: offset, count: count, operation: operation) }
    }

    /// Calls `body` for each chunk-sized piece of a range: (chunk index, offset in chunk, length, offset in range).
    private func forEachPiece(_ offset: UInt64, _ count: UInt64, _ body: (UInt64, Int, Int, Int) -> Void) {
        var done: UInt64 = 0
        let size = UInt64(Self.chunkSize)
        while done < count {
            let position = offset + done
            let inChunk = Int(position % size)
            let n = Int(min(size - UInt64(inChunk), count - done))
            body(position / size, inChunk, n, Int(done))
            done += UInt64(n)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        if !isGrowable { try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read) }
        guard let base = buffer.baseAddress else { return }
        monitor.withLock {
            forEachPiece(offset, UInt64(buffer.count)) { index, inChunk, n, at in
                if let chunk = chunks[index] {
                    (base + at).copyMemory(from: chunk + inChunk, byteCount: n)
                } else {
                    (base + at).initializeMemory(as: UInt8.self, repeating: 0, count: n)
                }
            }
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try checkWritable(.write, offset: offset, count: UInt64(buffer.count))
        guard let base = buffer.baseAddress else { return }
        monitor.withLock {
            forEachPiece(offset, UInt64(buffer.count)) { index, inChunk, n, at in
                let chunk = chunks[index] ?? newChunk(index)
                (chunk + inChunk).copyMemory(from: base + at, byteCount: n)
            }
            length = max(length, offset + UInt64(buffer.count))
        }
    }

    private func newChunk(_ index: UInt64) -> UnsafeMutableRawPointer {
        let chunk = UnsafeMutableRawPointer.allocate(byteCount: Self.chunkSize, alignment: 4096)
        chunk.initializeMemory(as: UInt8.self, repeating: 0, count: Self.chunkSize)
        chunks[index] = chunk
        return chunk
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try checkWritable(.writeZeroes, offset: offset, count: count)
        zero(offset, count)
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try checkWritable(.discard, offset: offset, count: count)
        zero(offset, count)
    }

    private func zero(_ offset: UInt64, _ count: UInt64) {
        monitor.withLock {
            forEachPiece(offset, count) { index, inChunk, n, _ in
                guard let chunk = chunks[index] else { return }
                if n == Self.chunkSize {
                    chunk.deallocate()
                    chunks[index] = nil
                } else {
                    (chunk + inChunk).initializeMemory(as: UInt8.self, repeating: 0, count: n)
                }
            }
        }
    }

    public func flush() throws {}

    /// Cuts a growable device to `length` bytes (what was past it reads as zeroes if written again).
    public func truncate(to newLength: UInt64) throws {
        guard isGrowable else {
            throw BlockIOError(.readOnly, operation: .truncate, message: "a fixed-size device cannot be truncated")
        }
        monitor.withLock {
            let size = UInt64(Self.chunkSize)
            for index in Array(chunks.keys) where index * size >= newLength {
                chunks[index]!.deallocate()
                chunks[index] = nil
            }
            if newLength % size != 0, let chunk = chunks[newLength / size] {
                let from = Int(newLength % size)
                (chunk + from).initializeMemory(as: UInt8.self, repeating: 0, count: Self.chunkSize - from)
            }
            length = newLength
        }
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        if !isGrowable { try checkRange(offset: offset, count: count, operation: .extents) }
        var result: [Extent] = []
        monitor.withLock {
            forEachPiece(offset, count) { index, _, n, at in
                let flags: ExtentFlags = chunks[index] == nil ? [.hole, .zero] : []
                if var last = result.last, last.flags == flags {
                    last.length += UInt64(n)
                    result[result.count - 1] = last
                } else {
                    result.append(Extent(offset: offset + UInt64(at), length: UInt64(n), flags: flags))
                }
            }
        }
        return result
    }

    public func close() throws {}

    /// A copy of the whole written content, for reference comparisons in tests.
    public func snapshotBytes() -> [UInt8] {
        let count = Int(size)
        return (try? read(count: count, at: 0)) ?? []
    }
}
