// Design notes
// ------------
// vdisk's own lock on an image is `flock` (FileDevice.open), which qemu never looks at; qemu (file-posix,
// locking=auto) uses open-file-description byte-range locks instead, which vdisk never looked at. So a
// running VM and `vdisk plug` could both write one image. This file speaks qemu's protocol too, so each side
// refuses the other:
//
//   byte 100 + i   a shared lock here says "I hold permission i"
//   byte 200 + i   a shared lock here says "I do not let anyone else hold permission i"
//
// for the permissions i = 0 consistent read, 1 write, 2 write-unchanged, 3 resize (qemu 7.2's numbering,
// observed in /proc/locks). Locks are only ever shared (F_RDLCK), so they never block each other; a
// conflict is found by testing: for every permission we hold, nobody may lock 200 + i, and for every one we
// do not share, nobody may lock 100 + i. Like qemu we take our locks first and test after, so of two
// openers racing at least one sees the other.
//
// What we take is what qemu takes for the same role (as qemu-nbd does on the top image and its backing
// file): a writer holds consistent read, write and resize and does not share write or resize; a reader
// holds consistent read and does not share write or resize. A writer shares consistent read, so
// `qemu-img info -U` (which asks for nothing exclusive) still works on a plugged image, as with a VM.
//
// A file system without OFD locks (some network file systems) keeps flock's protection only, as qemu then
// runs without locks.

import CBlockIO

#if canImport(Glibc)
import Glibc
#endif

/// qemu-compatible image locks on an open file (see the design notes above).
enum QemuImageLocks {
    /// qemu's block-layer permissions, by their lock-byte index.
    enum Permission: Int64, CaseIterable {
        case consistentRead = 0
        case write = 1
        case writeUnchanged = 2
        case resize = 3

        var name: String {
            switch self {
            case .consistentRead: "consistent read"
            case .write: "write"
            case .writeUnchanged: "write unchanged"
            case .resize: "resize"
            }
        }
    }

    static let holdBase: Int64 = 100
    static let unshareBase: Int64 = 200

    /// The permissions held and those not shared, for a writer or a reader.
    static func role(writer: Bool) -> (held: [Permission], unshared: [Permission]) {
        (writer ? [.consistentRead, .write, .resize] : [.consistentRead], [.write, .resize])
    }

    /// Takes the locks for the role, then refuses if another process's locks conflict with it.
    static func take(fd: Int32, path: String, writer: Bool) throws {
        let (held, unshared) = role(writer: writer)
        for byte in held.map({ holdBase + $0.rawValue }) + unshared.map({ unshareBase + $0.rawValue }) {
            if CBlockIO_ofd_read_lock(fd, byte) != 0 {
                let code = errno
                // No OFD locks on this file system: flock still keeps vdisk processes apart.
                if code == EINVAL || code == ENOLCK || code == EOPNOTSUPP || code == ENOSYS { return }
                throw BlockIOError.system(.lock, errno: code, path: path)
            }
        }
        for permission in held where try lockedElsewhere(fd, unshareBase + permission.rawValue, path) {
            throw conflict(
                path,
                "another process (qemu, or a program that locks images as qemu does) does not share the \(permission.name) permission"
            )
        }
        for permission in unshared where try lockedElsewhere(fd, holdBase + permission.rawValue, path) {
            throw conflict(
                path,
                "another process (qemu, or a program that locks images as qemu does) has it open with the \(permission.name) permission"
            )
        }
    }

    private static func lockedElsewhere(_ fd: Int32, _ byte: Int64, _ path: String) throws -> Bool {
        switch CBlockIO_ofd_locked_elsewhere(fd, byte) {
        case 0: return false
        case 1: return true
        default: throw BlockIOError.system(.lock, errno: errno, path: path)
        }
    }

    private static func conflict(_ path: String, _ why: String) -> BlockIOError {
        BlockIOError(.locked, operation: .lock, errno: EAGAIN, path: path, message: "the image is in use: \(why)")
    }
}
