import BlockIO

/// Reads a write log record by record, checking each one (docs/CRASH.md, "Reading a log").
///
/// Hostile input: every record's fields, checksum and sequence number are checked before it is returned,
/// sizes are bounded, and a log that stops without its `end` record is reported as truncated.
public final class WriteLogReader {
    public let path: String
    public let header: WriteLogHeader
    private let file: FileDevice
    private let fileSize: UInt64
    /// The CRC-32C of the header: where every record's checksum starts.
    private let chain: UInt32
    private var position = UInt64(WriteLogHeader.size)
    private var sequence: UInt64 = 1
    private var ended = false

    /// Opens `path` and checks its header.
    /// - Throws: `CrashSimError` (`.io` if the file cannot be read, `.notALog`, `.unsupportedVersion`,
    ///   `.corruptLog`, `.truncatedLog`).
    public init(path: String) throws {
        self.path = path
        do {
            file = try FileDevice.open(path: path, readOnly: true)
        } catch {
            throw CrashSimError(.io, path: path, message: "cannot open the log", cause: error as? BlockIOError)
        }
        fileSize = file.size
        let first = try Self.read(file, count: Int(min(fileSize, UInt64(WriteLogHeader.size))), at: 0, path: path)
        header = try WriteLogHeader.decode(first, path: path)
        chain = CRC32C.checksum(first)
    }

    deinit { try? file.close() }

    /// Records read so far.
    public var recordsRead: UInt64 { sequence - 1 }

    /// The next record and its payload (a write's data, a mark's label), or nil once the `end` record was
    /// read.
    /// - Throws: `CrashSimError` `.truncatedLog` (the file stops inside a record, or before an `end`
    ///   record), `.corruptLog` (a field, checksum or sequence number is wrong; bytes after the end).
    public func next() throws -> (record: WriteLogRecord, payload: [UInt8])? {
        if ended { return nil }
        guard position < fileSize else {
            throw CrashSimError(
                .truncatedLog,
                path: path,
                record: sequence,
                offset: position,
                message:
                    "the log stops after record \(sequence - 1) without its end record: it was cut short (the recording did not stop cleanly, or the file was truncated)"
            )
        }
        let start = position
        guard fileSize - position >= UInt64(WriteLogRecord.headSize) else { throw cutShort(at: start) }
        let head = try Self.read(file, count: WriteLogRecord.headSize, at: position, path: path)
        let (record, stored) = try WriteLogRecord.decodeHead(
            head,
            expecting: sequence,
            header: header,
            path: path,
            at: start
        )
        position += UInt64(WriteLogRecord.headSize)
        guard fileSize - position >= UInt64(record.payloadLength) else { throw cutShort(at: start) }
        let payload = try Self.read(file, count: Int(record.payloadLength), at: position, path: path)
        position += UInt64(record.payloadLength)
        guard record.checksum(payloadChecksum: CRC32C.update(chain, payload)) == stored else {
            throw CrashSimError(
                .corruptLog,
                path: path,
                record: sequence,
                offset: start,
                message: "corrupt log: the record's checksum does not match (a damaged record, or one from another log)"
            )
        }
        if record.kind == .mark && String(validating: payload, as: UTF8.self) == nil {
            throw CrashSimError(
                .corruptLog,
                path: path,
                record: sequence,
                offset: start,
                message: "corrupt log: a mark label that is not UTF-8"
            )
        }
        if record.kind == .end {
            ended = true
            guard position == fileSize else {
                throw CrashSimError(
                    .corruptLog,
                    path: path,
                    record: sequence,
                    offset: position,
                    message: "corrupt log: \(fileSize - position) bytes follow its end record"
                )
            }
        }
        sequence += 1
        return (record, payload)
    }

    private func cutShort(at offset: UInt64) -> CrashSimError {
        CrashSimError(
            .truncatedLog,
            path: path,
            record: sequence,
            offset: offset,
            message: "the log is truncated: it stops inside record \(sequence)"
        )
    }

    private static func read(_ file: FileDevice, count: Int, at offset: UInt64, path: String) throws -> [UInt8] {
        do {
            return try file.read(count: count, at: offset)
        } catch {
            throw CrashSimError(
                .io,
                path: path,
                offset: offset,
                message: "cannot read the log",
                cause: error as? BlockIOError
            )
        }
    }
}
