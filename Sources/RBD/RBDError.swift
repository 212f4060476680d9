import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// The one error type of `RBD`: a stable code, the image it concerns, a one-line message naming what is
/// wrong (the pool, the image, the key, the conf file...), and the errno a block-layer client sees.
public struct RBDError: ErrnoConvertible, CustomStringConvertible, Sendable {
    public enum Code: String, Sendable {
        /// The `rbd:` name does not parse.
        case invalidName = "invalid-name"
        /// The conf file or a Ceph option is wrong.
        case configuration
        /// The cluster refused our credentials (`id=`, `key=`, keyring).
        case authentication
        /// No monitor answered within the timeout.
        case unreachable
        /// The pool (or namespace) does not exist.
        case poolNotFound = "pool-not-found"
        /// The image does not exist.
        case imageNotFound = "image-not-found"
        /// The snapshot does not exist.
        case snapshotNotFound = "snapshot-not-found"
        /// The image (or snapshot) already exists.
        case exists
        /// Another client holds the image's exclusive lock.
        case locked
        /// This client was fenced: its lock was broken and it is blocklisted.
        case fenced
        /// The image lacks a feature vdisk needs (the exclusive lock for writers).
        case unsupported
        /// A request failed or timed out in the cluster.
        case io
    }

    public var code: Code
    /// The image, as `RBDSpec.description` (never with the key).
    public var image: String?
    public var message: String
    /// The (positive) errno librados or librbd returned, if any.
    public var cephErrno: Int32?

    public init(_ code: Code, image: String? = nil, message: String, cephErrno: Int32? = nil) {
        self.code = code
        self.image = image
        self.message = message
        self.cephErrno = cephErrno
    }

    /// Block-layer clients see EIO for every cluster failure, EROFS-like EPERM for a lost lock.
    public var errnoCode: Int32 {
        switch code {
        case .invalidName, .configuration: return EINVAL
        case .poolNotFound, .imageNotFound, .snapshotNotFound: return ENOENT
        case .exists: return EEXIST
        case .locked: return EAGAIN
        case .unsupported: return ENOTSUP
        case .authentication: return EACCES
        case .unreachable, .fenced, .io: return EIO
        }
    }

    public var description: String {
        (image.map { "\($0): " } ?? "") + message
    }
}
