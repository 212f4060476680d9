import BlockIO
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// The one public error of `ImageFormats`: a stable code, a message, the file and offset it concerns,
/// and what caused it.
public struct ImageFormatError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The file is not a valid image of its format (bad magic, malformed header, tables outside the file).
        case invalidImage
        /// The image uses a version or feature this implementation does not read.
        case unsupportedFeature
        /// Metadata points somewhere it must not (past the end of the file, misaligned, undecodable data).
        case corrupt
        /// A write to an image this library only reads.
        case readOnly
        /// A caller mistake: bad option, bad format name, bad size.
        case invalidArgument
        /// A limit of the format or of this implementation was reached.
        case limitExceeded
        /// A named thing (snapshot, backing file) does not exist.
        case notFound
        /// The underlying storage failed; see `cause`.
        case io
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
        case .invalidArgument: return EINVAL
        case .limitExceeded: return EFBIG
        case .notFound: return ENOENT
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

/// Runs `body`, giving storage errors the file's path so every failure names the image it concerns.
func withPath<T>(_ path: String?, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch var error as ImageFormatError {
        if error.path == nil { error.path = path }
        throw error
    } catch let error as VImageError {
        throw error
    } catch let error as BlockIOError {
        if error.errno == ENOENT { throw ImageFormatError(.notFound, path: path, message: "no such file or directory") }
        if error.code == .notSupported && error.operation == .open {  // no direct I/O there: say so plainly
            throw ImageFormatError(.unsupportedFeature, path: path, message: error.message)
        }
        throw ImageFormatError(.io, path: path, offset: error.offset, message: "I/O error", cause: error)
    }
}
