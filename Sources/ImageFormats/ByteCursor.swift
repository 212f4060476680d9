/// A bounds-checked big-endian reader over untrusted bytes: every read returns nil on short input
/// instead of trapping.
struct ByteCursor {
    let bytes: [UInt8]
    private(set) var index: Int

    init(_ bytes: [UInt8], at index: Int = 0) {
        self.bytes = bytes
        self.index = index
    }

    var remaining: Int { index <= bytes.count ? bytes.count - index : 0 }

    mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) -> T? {
        let width = MemoryLayout<T>.size
        guard index >= 0, remaining >= width else { return nil }
        var value: T = 0
        for i in 0..<width { value = value << 8 | T(bytes[index + i]) }
        index += width
        return value
    }

    mutating func readBytes(_ count: Int) -> [UInt8]? {
        guard count >= 0, remaining >= count else { return nil }
        defer { index += count }
        return Array(bytes[index..<index + count])
    }

    mutating func skip(_ count: Int) -> Bool {
        guard count >= 0, remaining >= count else { return false }
        index += count
        return true
    }
}

/// Appends big-endian fields.
struct ByteAppender {
    private(set) var bytes: [UInt8] = []

    mutating func write<T: FixedWidthInteger>(_ value: T) {
        let width = MemoryLayout<T>.size
        for i in (0..<width).reversed() { bytes.append(UInt8(truncatingIfNeeded: value >> (i * 8))) }
    }

    mutating func write(_ data: [UInt8]) { bytes.append(contentsOf: data) }

    mutating func pad(toMultipleOf alignment: Int) {
        while bytes.count % alignment != 0 { bytes.append(0) }
    }
}

/// Decodes a big-endian table of 64-bit entries (L1, L2, refcount table).
func decodeEntries(_ bytes: UnsafeRawBufferPointer) -> [UInt64] {
    let count = bytes.count / 8
    return [UInt64](unsafeUninitializedCapacity: count) { buffer, initialized in
        for i in 0..<count { buffer[i] = UInt64(bigEndian: bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        initialized = count
    }
}

/// Encodes 64-bit entries big-endian.
func encodeEntries(_ entries: ArraySlice<UInt64>) -> [UInt8] {
    [UInt8](unsafeUninitializedCapacity: entries.count * 8) { buffer, initialized in
        let raw = UnsafeMutableRawBufferPointer(buffer)
        for (i, entry) in entries.enumerated() { raw.storeBytes(of: entry.bigEndian, toByteOffset: i * 8, as: UInt64.self) }
        initialized = entries.count * 8
    }
}

/// Whether every byte of `buffer` is zero (word at a time).
func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    guard let base = buffer.baseAddress else { return true }
    var i = 0
    let n = buffer.count
    while i < n && (Int(bitPattern: base + i) & 7) != 0 {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    while i + 32 <= n {
        let a = base.load(fromByteOffset: i, as: UInt64.self) | base.load(fromByteOffset: i + 8, as: UInt64.self)
        let b = base.load(fromByteOffset: i + 16, as: UInt64.self) | base.load(fromByteOffset: i + 24, as: UInt64.self)
        if a | b != 0 { return false }
        i += 32
    }
    while i < n {
        if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
        i += 1
    }
    return true
}
