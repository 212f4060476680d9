// Design notes
// ------------
// Replaying rebuilds a recorded disk as it was at a point of its log: a copy of the log's start state
// (the internal snapshot taken when the recording started), then the records up to that point, applied
// in order onto the copy. The recorded image itself is only read. The copy is `vimg convert -l SNAPSHOT`'s
// (sparse, written under a temporary name and renamed), so it is a new image with its own UUID; any
// failure while the records are applied removes it, so a replay either produces the asked-for state or
// nothing.
//
// Points worth stopping at: a flush (everything before it was durable: the state a power cut right after
// it leaves, in `drop` mode), a mark, or any record (any prefix of the log is a state a disk with a
// write-back cache could have been left in, as long as the cache wrote back in order).

import BlockIO
import ImageFormats
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Where a replay stops.
public enum ReplayStop: Sendable, Hashable, CustomStringConvertible {
    /// After every record (the log must end cleanly).
    case end
    /// After record N (0: the start state).
    case record(UInt64)
    /// After the N-th flush (0: the start state).
    case flush(Int)
    /// After the first mark with this label.
    case mark(String)

    public var description: String {
        switch self {
        case .end: return "the end"
        case .record(let n): return "record \(n)"
        case .flush(let n): return "flush \(n)"
        case .mark(let label): return "mark '\(label)'"
        }
    }
}

/// What a log holds, or what part of it a replay applied.
public struct WriteLogSummary: Sendable {
    public struct Mark: Sendable, Hashable {
        public var label: String
        public var record: UInt64
    }

    public var header: WriteLogHeader
    /// The last record read (or applied).
    public var records: UInt64 = 0
    public var writes = 0
    public var writeZeroes = 0
    public var discards = 0
    public var bytesWritten: UInt64 = 0
    /// The record number of each flush, in order: flush N is `flushes[N - 1]`.
    public var flushes: [UInt64] = []
    public var marks: [Mark] = []
    /// Whether the log's `end` record was read.
    public var ended = false
    /// Why reading stopped early (a summary of a damaged log lists what comes before the damage).
    public var problem: CrashSimError?

    public init(header: WriteLogHeader) { self.header = header }

    mutating func count(_ record: WriteLogRecord, payload: [UInt8]) {
        records = record.sequence
        switch record.kind {
        case .write:
            writes += 1
            bytesWritten += record.length
        case .writeZeroes: writeZeroes += 1
        case .discard: discards += 1
        case .flush: flushes.append(record.sequence)
        case .mark: marks.append(Mark(label: String(decoding: payload, as: UTF8.self), record: record.sequence))
        case .end: ended = true
        }
    }
}

public enum WriteLogReplay {
    /// Reads a whole log: its header, counts, flush points and marks. A damaged log is summarized up to
    /// the damage, which `problem` describes.
    /// - Throws: `CrashSimError` only when the file or its header cannot be read.
    public static func summarize(path: String) throws -> WriteLogSummary {
        let reader = try WriteLogReader(path: path)
        var summary = WriteLogSummary(header: reader.header)
        do {
            while let (record, payload) = try reader.next() { summary.count(record, payload: payload) }
        } catch let error as CrashSimError {
            summary.problem = error
        }
        return summary
    }

    /// Applies `reader`'s records to `device` in order until `stop`.
    /// - Returns: what was applied.
    /// - Throws: `CrashSimError` (`.notFound` when the log ends before `stop`, and whatever the reader
    ///   finds wrong before it), or the device's errors.
    public static func apply(
        _ reader: WriteLogReader,
        to device: any BlockDevice,
        until stop: ReplayStop
    ) throws -> WriteLogSummary {
        var summary = WriteLogSummary(header: reader.header)
        guard device.size == reader.header.deviceSize else {
            throw CrashSimError(
                .wrongImage,
                path: reader.path,
                message: "the log is of a \(reader.header.deviceSize)-byte disk, the target has \(device.size) bytes"
            )
        }
        if stop == .record(0) || stop == .flush(0) { return summary }
        while let (record, payload) = try reader.next() {
            switch record.kind {
            case .write:
                try payload.withUnsafeBytes { try device.write($0, at: record.offset, fua: false) }
            case .writeZeroes:
                try device.writeZeroes(
                    at: record.offset,
                    count: record.length,
                    mayUnmap: record.flags.contains(.mayUnmap),
                    fast: false
                )
            case .discard:
                try device.discard(at: record.offset, count: record.length)
            case .flush, .mark, .end:
                break
            }
            summary.count(record, payload: payload)
            switch stop {
            case .record(let n) where record.sequence == n: return summary
            case .flush(let n) where record.kind == .flush && summary.flushes.count == n: return summary
            case .mark(let label) where record.kind == .mark && summary.marks.last?.label == label: return summary
            default: continue
            }
        }
        if stop == .end { return summary }
        let holds: String =
            switch stop {
            case .record: "only \(summary.records) records"
            case .flush: "only \(summary.flushes.count) flush\(summary.flushes.count == 1 ? "" : "es")"
            case .mark(let label): "no mark '\(label)'"
            case .end: ""
            }
        throw CrashSimError(.notFound, path: reader.path, message: "the log has \(holds)")
    }

    /// Rebuilds the disk recorded in `log` as it was at `stop`, as a new image at `output`: a copy of the
    /// log's start snapshot of `image`, then the records up to `stop`.
    /// - Parameters:
    ///   - image: the recorded VIMG image (read only; it must hold the log's start snapshot).
    ///   - format: the output's format (VIMG or raw).
    /// - Throws: `CrashSimError` (`.wrongImage` when `image` is not the one the log was recorded on, and
    ///   every problem of the log), or the errors of opening and copying images. `output` is then absent.
    public static func replay(
        log: String,
        image: String,
        output: String,
        format: ImageFormats.Format,
        until stop: ReplayStop
    ) throws -> WriteLogSummary {
        let reader = try WriteLogReader(path: log)
        let header = reader.header
        try checkImage(image, for: header)
        var options = ConvertOptions()
        options.outputFormat = format
        options.sourceFormat = .vimg
        options.snapshot = header.snapshotName
        try ImageConverter.convert(source: image, destination: output, options: options)
        do {
            let device = try ImageFormats.open(path: output, format: format, readOnly: false)
            do {
                let summary = try apply(reader, to: device, until: stop)
                try device.close()
                return summary
            } catch {
                try? device.close()
                throw error
            }
        } catch {
            unlink(output)
            throw error
        }
    }

    /// Checks that `path` is the VIMG image the log was recorded on and still holds its start snapshot.
    static func checkImage(_ path: String, for header: WriteLogHeader) throws {
        let format = try ImageFormats.probe(path: path)
        guard format == .vimg else {
            throw CrashSimError(
                .wrongImage,
                path: path,
                message: "this is a \(format.rawValue) image; the log was recorded on VIMG image \(header.imageUUID)"
            )
        }
        let image = try ImageFormats.openVImage(path: path, readOnly: true)
        defer { try? image.close() }
        guard let uuid = image.currentHeader.uuid, uuid == header.imageUUID else {
            let which = image.currentHeader.uuid.map { "image \($0)" } ?? "an image without a UUID"
            throw CrashSimError(
                .wrongImage,
                path: path,
                message: "the log was recorded on image \(header.imageUUID), and this is \(which)"
            )
        }
        guard let start = image.snapshotList.first(where: { $0.name == header.snapshotName }) else {
            throw CrashSimError(
                .notFound,
                path: path,
                message:
                    "the log's start state, snapshot '\(header.snapshotName)', is not in the image (was it deleted?)"
            )
        }
        guard start.virtualSize == header.deviceSize else {
            throw CrashSimError(
                .wrongImage,
                path: path,
                message:
                    "snapshot '\(header.snapshotName)' is \(start.virtualSize) bytes, the log's disk \(header.deviceSize)"
            )
        }
    }
}
