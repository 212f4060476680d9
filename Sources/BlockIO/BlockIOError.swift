#if canImport(Glibc)
import Glibc
#endif

/// Errors that carry an errno, so front ends (NBD, FUSE) can translate any library's error in one place.
public protocol ErrnoConvertible: Error {
    /// The errno that best describes the failure to a block-layer client.
    var errnoCode: Int32 { get }
}

/// The one error type of `BlockIO`: a stable code, the operation, where it happened, and the errno.
public struct BlockIOError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// A system call failed; `errno` says why.
        case system
        /// The request reaches past the end of the device.
        case outOfRange
        /// The device is read-only.
        case readOnly
        /// The operation is not supported (for example a fast zero that would be slow).
        case notSupported
        /// The device was closed.
        case closed
        /// An argument was invalid.
        case invalidArgument
        /// The file is locked by another user.
        case locked
    }

    public enum Operation: String, Sendable {
        case open, read, write, writeZeroes, discard, flush, extents, close, lock, stat, truncate
    }

    public var code: Code
    public var operation: Operation
    public var errno: Int32
    public var path: String?
    public var offset: UInt64?
    public var message: String

    public init(
        _ code: Code,
        operation: Operation,
        errno: Int32? = nil,
        path: String? = nil,
        offset: UInt64? = nil,
        message: String
    ) {
        self.code = code
        self.operation = operation
        self.errno = errno ?? code.defaultErrno(for: operation)
        self.path = path
        self.offset = offset
        self.message = message
    }

    /// An error from a failed system call, with `strerror` text.
    public static func system(
        _ operation: Operation,
        errno: Int32,
        path: String? = nil,
        offset: UInt64? = nil
    ) -> BlockIOError {
        BlockIOError(
            .system,
            operation: operation,
            errno: errno,
            path: path,
            offset: offset,
            message: describeErrno(errno)
        )
    }

    public var errnoCode: Int32 { errno }

    public var description: String {
        var text = ""
        if let path { text += "\(path): " }
        text += "\(operation.rawValue) failed"
        if let offset { text += " at offset \(offset)" }
        return text + ": " + message
    }
}

extension BlockIOError.Code {
    fileprivate func defaultErrno(for operation: BlockIOError.Operation) -> Int32 {
        switch self {
        case .system: return EIO
        case .outOfRange: return operation == .write || operation == .writeZeroes ? ENOSPC : EINVAL
        case .readOnly: return EPERM
        case .notSupported: return ENOTSUP
        case .closed: return ESHUTDOWN
        case .invalidArgument: return EINVAL
        case .locked: return EAGAIN
        }
    }
}

/// `strerror` as a Swift string.
public func describeErrno(_ code: Int32) -> String {
    guard let text = strerror(code) else { return "errno \(code)" }
    return String(cString: text)
}
