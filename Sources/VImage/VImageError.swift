import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// The one public error of `VImage`: a stable code, a message, where it happened, and what caused it.
public struct VImageError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The file is not a valid image (bad magic, malformed header, tables outside the file...).
        case invalidImage
        /// The image needs a version or an incompatible feature this build does not implement.
        case unsupportedFeature
        /// Metadata is inconsistent; the image is marked corrupt and needs `vimg check -r all`.
        case corrupt
        /// A write to a read-only image (or snapshot view).
        case readOnly
        /// A request past the end of the virtual disk.
        case outOfRange
        /// A caller mistake: bad size, bad option, bad name.
        case invalidArgument
        /// A limit of the format or of this implementation was reached.
        case limitExceeded
        /// The image is in use by another process.
        case locked
        /// A named thing (snapshot, backing file) does not exist.
        case notFound
        /// A file or name that must not exist yet already exists.
        case alreadyExists
        /// The underlying storage failed; see `cause`.
        case io
        /// The image was closed.
        case closed
        /// A block failed its checksum (end-to-end checksums): read as EIO, never returned as data.
        case checksum
    }

    public var code: Code
    public var message: String
    public var path: String?
    public var offset: UInt64?
    public var cause: (any Error & Sendable)?

    public init(
        _ code: Code,
        path: String? = nil,
        offset: UInt64? = nil,
        message: String,
        cause: (any Error & Sendable)? = nil
    ) {
        self.code = code
        self.message = message
        self.path = path
        self.offset = offset
        self.cause = cause
    }

    public var errnoCode: Int32 {
        switch code {
        case .invalidImage, .corrupt, .io: return (cause as? ErrnoConvertible)?.errnoCode ?? EIO
        case .unsupportedFeature: return ENOTSUP
        case .readOnly: return EPERM
        case .outOfRange: return EINVAL
        case .invalidArgument: return EINVAL
        case .limitExceeded: return EFBIG
        case .locked: return EAGAIN
        case .notFound: return ENOENT
        case .alreadyExists: return EEXIST
        case .closed: return ESHUTDOWN
        case .checksum: return EIO
        }
    }

    public var description: String {
        var text = ""
        if let path { text += "\(path): " }
        text += message
        if let offset { text += " (at offset \(offset))" }
        if let cause { text += ": \(cause)" }
        return text
    }
}

/// Wraps any storage error thrown inside the engine so callers get one error type with context.
func wrapIO<T>(_ path: String?, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as VImageError {
        throw error
    } catch let error as BlockIOError {
        if error.code == .locked {
            throw VImageError(.locked, path: path, message: error.message)
        }
        // The common cases of opening a file get a plain sentence, not an I/O error.
        switch error.errno {
        case EEXIST: throw VImageError(.alreadyExists, path: path, message: "file already exists")
        case ENOENT: throw VImageError(.notFound, path: path, message: "no such file or directory")
        case EACCES, EPERM: throw VImageError(.io, path: path, message: "permission denied", cause: error)
        default: break
        }
        throw VImageError(.io, path: path, offset: error.offset, message: "I/O error", cause: error)
    } catch let mismatch as ChecksumMismatch {
        // Data mismatches are reported where the data is read; one that gets here is a metadata block.
        throw VImageError(
            .corrupt,
            path: path,
            offset: mismatch.hostOffset,
            message:
                "image is corrupt: metadata block at 0x\(String(mismatch.hostOffset, radix: 16)) fails its checksum; run 'vimg check'"
        )
    } catch {
        throw VImageError(.io, path: path, message: "I/O error: \(error)")
    }
}
