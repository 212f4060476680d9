import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// The one error type of `FUSEExport`: a stable code, the path involved, the errno and a message.
public struct FUSEExportError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The mountpoint does not exist or is not a directory.
        case mountpointMissing
        /// `/dev/fuse` is missing or cannot be opened (no FUSE in this kernel or container).
        case fuseUnavailable
        /// `start()` was called on an export that is already running.
        case alreadyStarted
        /// libfuse refused the options, the mount failed, or the file system never answered.
        case mountFailed
        /// Attaching or detaching a loop device failed.
        case loopFailed
        /// The loop device is still open by someone (a mounted file system?); the kernel will detach it
        /// when the last user closes it.
        case loopBusy
    }

    public var code: Code
    public var errno: Int32
    public var path: String?
    public var message: String

    public init(_ code: Code, errno: Int32, path: String? = nil, message: String) {
        self.code = code
        self.errno = errno
        self.path = path
        self.message = message
    }

    public var errnoCode: Int32 { errno }

    public var description: String {
        var text = ""
        if let path { text += "\(path): " }
        return text + message + (errno != 0 ? " (\(describeErrno(errno)))" : "")
    }
}

/// Maps any error thrown by a device to the errno a FUSE reply carries.
func errnoCode(of error: any Error) -> Int32 {
    (error as? any ErrnoConvertible)?.errnoCode ?? EIO
}
