/// A bounds-checked big-endian reader over bytes from an untrusted source: every read returns nil on
/// short input instead of trapping.
public struct ByteReader {
    public let bytes: [UInt8]
    public private(set) var index: Int

    public init(_ bytes: [UInt8], at index: Int = 0) {
        self.bytes = bytes
        self.index = index
    }

    public var remaining: Int { index <= bytes.count ? bytes.count - index : 0 }

    public mutating func readInteger<T: FixedWidthInteger>(as: T.Type = T.self) -> T? {
        let width = MemoryLayout<T>.size
        guard index >= 0, remaining >= width else { return nil }
        var value: T = 0
        for i in 0..<width { value = value << 8 | T(bytes[index + i]) }
        index += width
        return value
    }

    public mutating func readBytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { index += count }
        return Array(bytes[index..<index + count])
    }

    public mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, remaining >= count else { return false }
        index += count
        return true
    }
}

/// Appends big-endian fields.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        let width = MemoryLayout<T>.size
        for i in (0..<width).reversed() { bytes.append(UInt8(truncatingIfNeeded: value >> (i * 8))) }
    }

    public mutating func write(_ data: [UInt8]) { bytes.append(contentsOf: data) }

    public mutating func pad(toMultipleOf alignment: Int) {
        while bytes.count % alignment != 0 { bytes.append(0) }
    }
}

/// Decodes a big-endian table of fixed-width entries (an L1/L2 table, a refcount block).
public func decodeTable<T: FixedWidthInteger>(_ bytes: UnsafeRawBufferPointer, as: T.Type) -> [T] {
    let count = bytes.count / MemoryLayout<T>.size
    return [T](unsafeUninitializedCapacity: count) { buffer, initialized in
        for i in 0..<count {
            buffer[i] = T(bigEndian: bytes.loadUnaligned(fromByteOffset: i * MemoryLayout<T>.size, as: T.self))
        }
        initialized = count
    }
}

/// Encodes a table of entries big-endian.
public func encodeTable<T: FixedWidthInteger>(_ entries: ArraySlice<T>) -> [UInt8] {
    let width = MemoryLayout<T>.size
    return [UInt8](unsafeUninitializedCapacity: entries.count * width) { buffer, initialized in
        let raw = UnsafeMutableRawBufferPointer(buffer)
        for (i, entry) in entries.enumerated() {
            raw.storeBytes(of: entry.bigEndian, toByteOffset: i * width, as: T.self)
        }
        initialized = entries.count * width
    }
}
