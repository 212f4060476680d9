// Design notes
// ------------
// The recorder sits between a disk's front ends and its device, and appends one record to the write log
// for every write, write-zeroes, discard and flush the device completed (docs/CRASH.md):
//
//   front end --> WriteRecorder --> device (a VIMG image, possibly under a CrashSimDevice)
//                      |
//                      +--> log: header | record 1 | record 2 | ...
//
// A request is recorded after the device completed it and before it is acknowledged, so the log's order
// agrees with what the front end saw: a write acknowledged before a flush was issued is logged before
// that flush. Each record reserves its place in the file under a short lock (sequence number and
// offset), and its bytes are written with one `pwritev` outside it, so concurrent writers never wait for
// one another's log I/O. The checksum of the payload is computed before the reservation, outside the lock
// too, which is why the record's checksum covers the payload before the head.
//
// The log is not synced at each flush: it serves tests on this machine, where a host crash ruins the
// experiment anyway; it is synced when the recording stops, with its `end` record. If the log cannot be
// written, the request fails with EIO and so does every later one: a recording with a hole is worthless,
// and the front end must know.

import BlockIO
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// A `BlockDevice` that records every change made through it to a write log.
public final class WriteRecorder: BlockDevice, @unchecked Sendable {
    public let inner: any BlockDevice
    public let path: String
    public let header: WriteLogHeader
    private let fd: Int32
    /// The CRC-32C of the log's header, where every record's checksum starts.
    private let chain: UInt32
    private let state = Monitor()
    // Guarded by `state`:
    private var nextSequence: UInt64 = 1
    private var position = UInt64(WriteLogHeader.size)
    private var failure: CrashSimError?
    private var isClosed = false

    /// The start snapshot's name for a log id.
    public static func snapshotName(logID: UInt64) -> String {
        let hex = String(logID, radix: 16)
        return "vdisk-record-" + String(repeating: "0", count: 16 - hex.count) + hex
    }

    /// Starts recording: takes an internal snapshot of `image` (the log's start state), creates the log at
    /// `logPath` (which must not exist) with its header, and returns the recorder to put in front of
    /// `device` (the image itself, or a device stacked on it that holds nothing unflushed yet).
    /// - Throws: `CrashSimError` `.unsupported` for an image without a UUID or opened read-only, `.io`
    ///   when the log cannot be created; errors of the image. Nothing is left behind when it throws.
    public static func start(recording device: any BlockDevice, image: VImage, logPath: String) throws -> WriteRecorder
    {
        guard !image.isReadOnly else {
            throw CrashSimError(.unsupported, message: "a recorded disk must be writable")
        }
        guard let uuid = image.currentHeader.uuid else {
            throw CrashSimError(
                .unsupported,
                path: image.path,
                message:
                    "the image has no UUID (it predates them), and a log must name the image it was recorded on; 'vimg convert -O vimg' makes a copy that has one"
            )
        }
        let fd = open(logPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let code = errno
            throw CrashSimError(
                .io,
                path: logPath,
                message: code == EEXIST
                    ? "the log already exists (a log is never overwritten; remove it or choose another name)"
                    : "cannot create the log: \(describeErrno(code))"
            )
        }
        var generator = SystemRandomNumberGenerator()
        let logID = generator.next() as UInt64
        let header = WriteLogHeader(
            deviceSize: device.size,
            imageUUID: uuid,
            logID: logID,
            createdNanoseconds: wallClockNanoseconds(),
            start: .snapshot(snapshotName(logID: logID))
        )
        var snapshotTaken = false
        do {
            try image.flush()
            try image.createSnapshot(named: header.snapshotName)
            snapshotTaken = true
            try image.flush()
            try header.encode().withUnsafeBytes { try writeAll(fd, [$0], at: 0, path: logPath) }
        } catch {
            if snapshotTaken { try? image.deleteSnapshot(named: header.snapshotName) }
            Glibc.close(fd)
            unlink(logPath)
            throw error
        }
        return WriteRecorder(inner: device, path: logPath, header: header, fd: fd)
    }

    private init(inner: any BlockDevice, path: String, header: WriteLogHeader, fd: Int32) {
        self.inner = inner
        self.path = path
        self.header = header
        self.fd = fd
        self.chain = CRC32C.checksum(header.encode())
    }

    deinit {
        if !isClosed { Glibc.close(fd) }
    }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockDeviceCapabilities { inner.capabilities }

    /// Records written so far (the next record's number less one) and the log's size in bytes.
    public var recorded: (records: UInt64, bytes: UInt64) { state.withLock { (nextSequence - 1, position) } }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try inner.read(into: buffer, at: offset)
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try inner.write(buffer, at: offset, fua: fua)
        guard buffer.count > 0 else { return }
        let record = WriteLogRecord(
            kind: .write,
            flags: fua ? .fua : [],
            sequence: 0,
            offset: offset,
            length: UInt64(buffer.count),
            payloadLength: UInt32(buffer.count)
        )
        try append(record, payload: buffer)
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try inner.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
        guard count > 0 else { return }
        let flags: WriteLogRecord.Flags = mayUnmap ? .mayUnmap : []
        try append(WriteLogRecord(kind: .writeZeroes, flags: flags, sequence: 0, offset: offset, length: count))
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try inner.discard(at: offset, count: count)
        guard count > 0 else { return }
        try append(WriteLogRecord(kind: .discard, sequence: 0, offset: offset, length: count))
    }

    public func flush() throws {
        try inner.flush()
        try append(WriteLogRecord(kind: .flush, sequence: 0))
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: count)
    }

    /// Puts a label in the log (`vdisk mark`), between the requests completed before and after it.
    /// - Returns: the mark's record number.
    /// - Throws: `CrashSimError` `.invalidArgument` for an empty label, one longer than 255 bytes, or one
    ///   with control characters.
    @discardableResult
    public func mark(_ label: String) throws -> UInt64 {
        let bytes = Array(label.utf8)
        guard (1...WriteLogRecord.maximumLabelLength).contains(bytes.count),
            !label.unicodeScalars.contains(where: { $0.properties.generalCategory == .control })
        else {
            throw CrashSimError(
                .invalidArgument,
                message:
                    "a mark label is 1 to \(WriteLogRecord.maximumLabelLength) bytes of text without control characters"
            )
        }
        let record = WriteLogRecord(kind: .mark, sequence: 0, payloadLength: UInt32(bytes.count))
        return try bytes.withUnsafeBytes { try append(record, payload: $0) }
    }

    /// Ends the log (an `end` record, then a sync), then closes `inner`.
    public func close() throws {
        var problem: (any Error)?
        let open = state.withLock { () -> Bool in
            defer { isClosed = true }
            return !isClosed
        }
        if open {
            if state.withLock({ failure }) == nil {
                do {
                    try append(WriteLogRecord(kind: .end, sequence: 0), evenIfClosed: true)
                    if fdatasync(fd) != 0 {
                        throw CrashSimError(.io, path: path, message: "cannot sync the log: \(describeErrno(errno))")
                    }
                } catch {
                    problem = error
                }
            }
            Glibc.close(fd)
        }
        do { try inner.close() } catch { problem = problem ?? error }
        if let problem { throw problem }
    }

    // MARK: Appending

    @discardableResult
    private func append(
        _ record: WriteLogRecord,
        payload: UnsafeRawBufferPointer? = nil,
        evenIfClosed: Bool = false
    ) throws -> UInt64 {
        let payloadChecksum = payload.map { CRC32C.update(chain, $0) } ?? chain
        let size = UInt64(WriteLogRecord.headSize) + UInt64(payload?.count ?? 0)
        var record = record
        let at: UInt64 = try state.withLock {
            if let failure { throw failure }
            if isClosed && !evenIfClosed {
                throw CrashSimError(.io, path: path, message: "the recording has stopped")
            }
            record.sequence = nextSequence
            nextSequence += 1
            defer { position += size }
            return position
        }
        do {
            try withUnsafeTemporaryAllocation(byteCount: WriteLogRecord.headSize, alignment: 8) { head in
                record.encodeHead(into: head, checksum: record.checksum(payloadChecksum: payloadChecksum))
                try Self.writeRecord(fd, head: UnsafeRawBufferPointer(head), payload: payload, at: at, path: path)
            }
        } catch let error as CrashSimError {
            state.withLock { failure = failure ?? error }
            throw error
        }
        return record.sequence
    }

    /// A record's head and payload at `offset`: one `pwritev` from the stack, as nearly always suffices.
    private static func writeRecord(
        _ fd: Int32,
        head: UnsafeRawBufferPointer,
        payload: UnsafeRawBufferPointer?,
        at offset: UInt64,
        path: String
    ) throws {
        let body = payload ?? UnsafeRawBufferPointer(start: nil, count: 0)
        var vectors = (
            iovec(iov_base: UnsafeMutableRawPointer(mutating: head.baseAddress), iov_len: head.count),
            iovec(iov_base: UnsafeMutableRawPointer(mutating: body.baseAddress), iov_len: body.count)
        )
        let written = withUnsafeMutablePointer(to: &vectors) {
            $0.withMemoryRebound(to: iovec.self, capacity: 2) { pwritev(fd, $0, body.count > 0 ? 2 : 1, off_t(offset)) }
        }
        if written == head.count + body.count { return }
        try writeAll(fd, [head, body], at: offset, path: path)
    }

    /// `pwritev` of `parts` at `offset`, continued after short writes.
    private static func writeAll(
        _ fd: Int32,
        _ parts: [UnsafeRawBufferPointer],
        at offset: UInt64,
        path: String
    )
        throws
    {
        var pieces = parts.filter { $0.count > 0 }
        var at = offset
        while !pieces.isEmpty {
            let vectors = pieces.map {
                iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count)
            }
            let n = vectors.withUnsafeBufferPointer { pwritev(fd, $0.baseAddress, Int32($0.count), off_t(at)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw CrashSimError(
                    .io,
                    path: path,
                    offset: at,
                    message: "cannot write the log: \(describeErrno(errno))"
                )
            }
            at += UInt64(n)
            var written = n
            while written > 0 {
                if written >= pieces[0].count {
                    written -= pieces[0].count
                    pieces.removeFirst()
                } else {
                    pieces[0] = UnsafeRawBufferPointer(rebasing: pieces[0][written...])
                    written = 0
                }
            }
        }
    }
}

/// Nanoseconds since 1970 (CLOCK_REALTIME).
func wallClockNanoseconds() -> UInt64 {
    var now = timespec()
    clock_gettime(CLOCK_REALTIME, &now)
    return UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)
}
