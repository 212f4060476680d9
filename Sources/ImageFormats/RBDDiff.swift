// Design notes
// ------------
// Snapshot diff streams in Ceph's "rbd diff v1" format (docs/FORMAT.md, "Appendix: snapshot diff
// streams"), so vdisk and RBD's tools exchange incremental backups:
//
//   "rbd diff v1\n"  ['f' u32 name]  ['t' u32 name]  ['s' u64 size]  ('w' u64 off u64 len data | 'z' u64 off u64 len)*  'e'
//
// little-endian throughout. Export walks the changed extents an image computes from its tables
// (`VImage.changes`) and reads only the data of changed ranges. Import checks the stream's `from`/`to`
// against the target's snapshots as `rbd import-diff` does (and, stricter, that the live disk has not
// changed since `from`), takes an internal snapshot of the target first, applies the records, and reverts
// to that snapshot if anything fails, so a bad or cut stream leaves the target as it was.

import BlockIO
import VImage

#if canImport(Glibc)
import Glibc
#endif

public enum RBDDiff {
    static let banner = Array("rbd diff v1\n".utf8)
    /// Largest data record vimg writes.
    static let maxRecord = 4 << 20
    static let maxNameLength: UInt32 = 4096

    /// The metadata of a diff stream.
    public struct Header: Sendable, Hashable {
        public var fromSnapshot: String?
        public var toSnapshot: String?
        public var size: UInt64?
    }

    // MARK: Export

    /// Writes the diff from snapshot `from` (nil: an empty disk) to the state `image` shows (its active
    /// state, or the snapshot it was opened at, named `to` in the stream).
    /// - Parameter write: receives the stream in pieces.
    public static func export(
        image: VImage,
        from: String?,
        to: String?,
        progress: ((UInt64, UInt64) -> Void)? = nil,
        write: (UnsafeRawBufferPointer) throws -> Void
    ) throws {
        let extents = try image.changes(from: from, to: nil)
        var w = LittleEndianWriter()
        w.bytes += banner
        if let from { w.record("f", name: from) }
        if let to { w.record("t", name: to) }
        w.bytes.append(UInt8(ascii: "s"))
        w.write(image.size)
        try w.flush(write)
        let total = extents.reduce(0) { $0 + $1.length }
        var done: UInt64 = 0
        var buffer = [UInt8](repeating: 0, count: maxRecord)
        for e in extents {
            var position = e.offset
            while position < e.offset + e.length {
                let n = Int(min(UInt64(maxRecord), e.offset + e.length - position))
                w.bytes.append(UInt8(ascii: e.isZero ? "z" : "w"))
                w.write(position)
                w.write(UInt64(n))
                try w.flush(write)
                if !e.isZero {
                    try buffer.withUnsafeMutableBytes {
                        try image.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: position)
                    }
                    try buffer.withUnsafeBytes { try write(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                }
                position += UInt64(n)
                done += UInt64(n)
                progress?(done, total)
            }
        }
        w.bytes.append(UInt8(ascii: "e"))
        try w.flush(write)
    }

    // MARK: Import

    /// A source of stream bytes (a file or standard input).
    public protocol Source {
        /// Reads up to `buffer.count` bytes; 0 at the end of the stream.
        mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int
    }

    /// Applies a diff stream to `image`.
    /// - Parameter force: skip the check that the live disk has not changed since the `from` snapshot.
    /// - Returns: the stream's header.
    /// - Throws: `ImageFormatError` for a stream that does not fit the image or is malformed (the image is
    ///   then reverted to its state before the call).
    @discardableResult
    public static func apply<S: Source>(
        _ source: inout S,
        to image: VImage,
        force: Bool = false,
        progress: ((UInt64) -> Void)? = nil
    ) throws -> Header {
        var r = StreamReader(source: source)
        defer { source = r.source }
        guard try r.bytes(banner.count) == banner else {
            throw ImageFormatError(.invalidImage, message: "not an rbd diff v1 stream (bad banner)")
        }
        var header = Header()
        var tag = try r.tag()
        while tag == "f" || tag == "t" || tag == "s" {
            switch tag {
            case "f": header.fromSnapshot = try r.name()
            case "t": header.toSnapshot = try r.name()
            default: header.size = try r.u64()
            }
            tag = try r.tag()
        }
        try checkTarget(image, header: header, force: force)

        // Everything below is undone by reverting to this snapshot if it fails.
        let rollback = "vimg-import-diff-\(getpid())"
        try image.createSnapshot(named: rollback)
        do {
            if let size = header.size, size != image.size { try image.resize(to: size, allowShrink: true) }
            let size = image.size
            var end: UInt64 = 0
            var buffer = [UInt8](repeating: 0, count: 1 << 20)
            var applied: UInt64 = 0
            while tag != "e" {
                guard tag == "w" || tag == "z" else {
                    throw ImageFormatError(.invalidImage, message: "unknown diff record '\(tag)'")
                }
                let offset = try r.u64()
                let length = try r.u64()
                let (recordEnd, overflow) = offset.addingReportingOverflow(length)
                guard !overflow, recordEnd <= size, offset >= end else {
                    throw ImageFormatError(
                        .invalidImage,
                        message: "diff record \(offset)+\(length) is outside the disk (\(size) bytes) or out of order"
                    )
                }
                end = recordEnd
                if tag == "z" {
                    if length > 0 { try image.writeZeroes(at: offset, count: length, mayUnmap: true, fast: false) }
                } else {
                    var position = offset
                    while position < recordEnd {
                        let n = Int(min(UInt64(buffer.count), recordEnd - position))
                        try buffer.withUnsafeMutableBytes {
                            try r.fill(UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]))
                        }
                        try buffer.withUnsafeBytes {
                            try image.write(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: position, fua: false)
                        }
                        position += UInt64(n)
                    }
                }
                applied += length
                progress?(applied)
                tag = try r.tag()
            }
            try image.flush()
        } catch {
            try? image.applySnapshot(named: rollback)
            try? image.deleteSnapshot(named: rollback)
            throw error
        }
        try image.deleteSnapshot(named: rollback)
        if let to = header.toSnapshot { try image.createSnapshot(named: to) }
        return header
    }

    /// The target must hold the stream's `from` snapshot and not yet its `to` one (as `rbd import-diff`
    /// checks), and its live state must equal `from` (unless forced).
    static func checkTarget(_ image: VImage, header: Header, force: Bool) throws {
        let names = Set(image.snapshotList.map(\.name))
        if let from = header.fromSnapshot {
            guard names.contains(from) else {
                throw ImageFormatError(
                    .invalidArgument,
                    message: "the diff starts at snapshot '\(from)', which the image does not have"
                )
            }
            if !force, !(try image.changes(from: from, to: nil)).isEmpty {
                throw ImageFormatError(
                    .invalidArgument,
                    message:
                        "the disk has changed since snapshot '\(from)'; applying the diff would mix the two (use --force to apply anyway)"
                )
            }
        }
        if let to = header.toSnapshot, names.contains(to) {
            throw ImageFormatError(
                .invalidArgument,
                message: "the image already has snapshot '\(to)', where the diff ends"
            )
        }
    }

    /// Reads a diff stream's header (for `vimg info`-like inspection and tests).
    public static func readHeader<S: Source>(_ source: inout S) throws -> Header {
        var r = StreamReader(source: source)
        defer { source = r.source }
        guard try r.bytes(banner.count) == banner else {
            throw ImageFormatError(.invalidImage, message: "not an rbd diff v1 stream (bad banner)")
        }
        var header = Header()
        while true {
            switch try r.tag() {
            case "f": header.fromSnapshot = try r.name()
            case "t": header.toSnapshot = try r.name()
            case "s": header.size = try r.u64()
            default: return header
            }
        }
    }
}

/// A diff stream from a file descriptor (a file, or standard input).
public struct FileDescriptorSource: RBDDiff.Source {
    let fd: Int32
    public init(fd: Int32) { self.fd = fd }

    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        while true {
            let n = Glibc.read(fd, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            if errno == EINTR { continue }
            throw ImageFormatError(.io, message: "cannot read the diff stream: \(String(cString: strerror(errno)))")
        }
    }
}

/// An in-memory diff stream (tests).
public struct BytesSource: RBDDiff.Source {
    let bytes: [UInt8]
    var position = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    public mutating func read(into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        let n = min(buffer.count, bytes.count - position)
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[position..<position + n])) }
        position += n
        return n
    }
}

/// Reads little-endian fields from a source, failing clearly on a stream cut short.
struct StreamReader<S: RBDDiff.Source> {
    var source: S
    var buffer = [UInt8](repeating: 0, count: 64 << 10)
    var start = 0
    var end = 0

    init(source: S) { self.source = source }

    mutating func fill(_ target: UnsafeMutableRawBufferPointer) throws {
        var done = 0
        while done < target.count {
            if start == end {
                end = try buffer.withUnsafeMutableBytes { try source.read(into: $0) }
                start = 0
                guard end > 0 else {
                    throw ImageFormatError(.invalidImage, message: "the diff stream ends early (no 'e' record)")
                }
            }
            let n = min(end - start, target.count - done)
            buffer.withUnsafeBytes {
                UnsafeMutableRawBufferPointer(rebasing: target[done..<done + n]).copyMemory(
                    from: UnsafeRawBufferPointer(rebasing: $0[start..<start + n])
                )
            }
            start += n
            done += n
        }
    }

    mutating func bytes(_ count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try fill($0) }
        return out
    }

    mutating func tag() throws -> Character { Character(UnicodeScalar(try bytes(1)[0])) }

    mutating func u32() throws -> UInt32 {
        try bytes(4).reversed().reduce(0) { $0 << 8 | UInt32($1) }
    }

    mutating func u64() throws -> UInt64 {
        try bytes(8).reversed().reduce(0) { $0 << 8 | UInt64($1) }
    }

    mutating func name() throws -> String {
        let length = try u32()
        guard length > 0, length <= RBDDiff.maxNameLength else {
            throw ImageFormatError(.invalidImage, message: "a snapshot name in the diff is \(length) bytes long")
        }
        guard let name = String(validating: try bytes(Int(length)), as: UTF8.self) else {
            throw ImageFormatError(.invalidImage, message: "a snapshot name in the diff is not UTF-8")
        }
        return name
    }
}

/// Collects little-endian fields and hands them out in pieces.
struct LittleEndianWriter {
    var bytes: [UInt8] = []

    mutating func write<T: FixedWidthInteger>(_ value: T) {
        for i in 0..<MemoryLayout<T>.size { bytes.append(UInt8(truncatingIfNeeded: value >> (i * 8))) }
    }

    mutating func record(_ tag: Character, name: String) {
        bytes.append(tag.asciiValue!)
        write(UInt32(name.utf8.count))
        bytes += Array(name.utf8)
    }

    mutating func flush(_ write: (UnsafeRawBufferPointer) throws -> Void) throws {
        try bytes.withUnsafeBytes { try write($0) }
        bytes.removeAll(keepingCapacity: true)
    }
}
