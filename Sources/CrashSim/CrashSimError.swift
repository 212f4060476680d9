import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// The one public error of `CrashSim`: a stable code, a sentence for the user, where it happened (the log
/// file, the record number and its byte offset), and what caused it.
public struct CrashSimError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// I/O on a simulated disk after its power was cut.
        case poweredOff
        /// A caller mistake: a bad tear size, a mark label that is too long, a second crash.
        case invalidArgument
        /// What was asked cannot be done with this disk (recording a raw file, an image without a UUID).
        case unsupported
        /// The file is not a write log (no magic).
        case notALog
        /// The log was written by a newer version of the format.
        case unsupportedVersion
        /// A checksum, a sequence number or a field of the log is wrong.
        case corruptLog
        /// The log ends before the point asked for (or without its end record).
        case truncatedLog
        /// The log was recorded on another image than the one given.
        case wrongImage
        /// The stop point asked for (a flush, a mark, a record) is not in the log.
        case notFound
        /// Reading or writing a file failed; see `cause`.
        case io
    }

    public var code: Code
    public var message: String
    public var path: String?
    /// The record the problem is in (1 is the first record of a log).
    public var record: UInt64?
    /// The byte offset in the log.
    public var offset: UInt64?
    public var cause: (any Error & Sendable)?

    public init(
        _ code: Code,
        path: String? = nil,
        record: UInt64? = nil,
        offset: UInt64? = nil,
        message: String,
        cause: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.path = path
        self.record = record
        self.offset = offset
        self.cause = cause
    }

    public var errnoCode: Int32 {
        switch code {
        case .poweredOff: return EIO
        case .invalidArgument, .notFound: return EINVAL
        case .unsupported: return ENOTSUP
        case .notALog, .unsupportedVersion, .corruptLog, .truncatedLog, .wrongImage: return EINVAL
        case .io: return (cause as? ErrnoConvertible)?.errnoCode ?? EIO
        }
    }

    public var description: String {
        var text = ""
        if let path { text += "\(path): " }
        text += message
        switch (record, offset) {
        case (let record?, let offset?): text += " (record \(record), at byte \(offset))"
        case (let record?, nil): text += " (record \(record))"
        case (nil, let offset?): text += " (at byte \(offset))"
        case (nil, nil): break
        }
        if let cause { text += ": \(cause)" }
        return text
    }
}
