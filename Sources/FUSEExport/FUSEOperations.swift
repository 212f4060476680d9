import BlockIO
import CFUSE
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// The libfuse callbacks. They are global functions (C function pointers cannot capture), so each finds its
// export through `fuse_get_context()->private_data`, which holds an unretained `ExportContext` that the
// owning `FUSEExport` keeps alive until `fuse_destroy` has returned.
//
// Every callback runs on one of libfuse's worker threads, several at once; the device is thread-safe and
// the context is immutable apart from an atomic flag, so no lock is taken here.

/// What the callbacks need: the device and the shape of the one-file tree.
final class ExportContext: Sendable {
    let device: any BlockDevice
    let readOnly: Bool
    /// "/" + file name, NUL-terminated, compared with `strcmp` against the paths libfuse passes.
    let filePath: [CChar]
    let uid: uid_t
    let gid: gid_t
    let startTime: Int
    /// Set by the `init` callback: the kernel and libfuse finished their handshake.
    let initialized = Atomic<Bool>(false)

    init(device: any BlockDevice, fileName: String, readOnly: Bool) {
        self.device = device
        self.readOnly = readOnly
        self.filePath = Array(("/" + fileName).utf8CString)
        self.uid = getuid()
        self.gid = getgid()
        self.startTime = time(nil)
    }

    enum Node { case root, file, missing }

    /// Which node a callback is about. With `nullpath_ok`, operations on an open file get a NULL path and
    /// the file handle instead; only the disk file is ever opened (`fh` = `fileHandle`).
    func node(_ path: UnsafePointer<CChar>?, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Node {
        guard let path else { return info?.pointee.fh == fileHandle ? .file : .missing }
        if path[0] == 0x2F && path[1] == 0 { return .root }
        let same = filePath.withUnsafeBufferPointer { strcmp(path, $0.baseAddress!) == 0 }
        return same ? .file : .missing
    }

    func attributes(of node: Node) -> stat {
        var st = stat()
        st.st_uid = uid
        st.st_gid = gid
        st.st_atim = timespec(tv_sec: startTime, tv_nsec: 0)
        st.st_mtim = st.st_atim
        st.st_ctim = st.st_atim
        if node == .root {
            st.st_mode = 0o040000 | 0o755  // S_IFDIR
            st.st_nlink = 2
        } else {
            let size = device.size
            st.st_mode = 0o100000 | (readOnly ? 0o400 : 0o600)  // S_IFREG
            st.st_nlink = 1
            st.st_size = off_t(clamping: size)
            st.st_blocks = blkcnt_t(clamping: (size + 511) / 512)
            st.st_blksize = 4096
        }
        return st
    }
}

/// The `fh` the open disk file carries (0 means "no handle").
let fileHandle: UInt64 = 1

/// The export behind the calling FUSE request.
private func currentContext() -> ExportContext {
    Unmanaged<ExportContext>.fromOpaque(fuse_get_context()!.pointee.private_data!).takeUnretainedValue()
}

// fallocate(2) modes (linux/falloc.h).
private let fallocKeepSize: Int32 = 0x01
private let fallocPunchHole: Int32 = 0x02
private let fallocZeroRange: Int32 = 0x10

/// Every callback this file system implements; the rest answer ENOSYS, which the kernel remembers.
/// There is deliberately no `flush` (see `fuseOpen`); fsync is the durability point.
func makeOperations() -> fuse_operations {
    var ops = fuse_operations()
    ops.`init` = fuseInit
    ops.getattr = fuseGetattr
    ops.readdir = fuseReaddir
    ops.open = fuseOpen
    ops.read = fuseRead
    ops.write = fuseWrite
    ops.fsync = fuseFsync
    ops.truncate = fuseTruncate
    ops.utimens = fuseUtimens
    ops.fallocate = fuseFallocate
    ops.statfs = fuseStatfs
    return ops
}

private func fuseInit(
    _ conn: UnsafeMutablePointer<fuse_conn_info>?,
    _ config: UnsafeMutablePointer<fuse_config>?
) -> UnsafeMutableRawPointer? {
    let data = fuse_get_context()!.pointee.private_data
    if let config {
        // Keep the page cache across opens: only this mount changes the device while it is exported.
        config.pointee.kernel_cache = 1
        config.pointee.direct_io = 0
        // Read, write, fsync and fallocate take the file handle; skip libfuse's path reconstruction.
        config.pointee.nullpath_ok = 1
    }
    if let conn {
        // libfuse lowers this to what its receive buffer and the kernel allow (1 MiB on current kernels).
        conn.pointee.max_write = 1 << 20
        // Asynchronous requests (a direct-I/O loop device's reads and writes) are "background" requests,
        // of which the kernel keeps only 12 in flight by default; a queue depth of 32 on the loop device
        // then waits on the kernel, not on us. 64 gave 4 KiB random writes at depth 32 about 1.3x
        // (Tools/bench-bus.sh); libfuse's workers, not this number, bound the real concurrency.
        conn.pointee.max_background = 64
        conn.pointee.congestion_threshold = 48
    }
    Unmanaged<ExportContext>.fromOpaque(data!).takeUnretainedValue().initialized.store(true, ordering: .releasing)
    return data  // becomes private_data for every later request
}

private func fuseGetattr(
    _ path: UnsafePointer<CChar>?,
    _ st: UnsafeMutablePointer<stat>?,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let context = currentContext()
    let node = context.node(path, info)
    guard node != .missing else { return -ENOENT }
    st?.pointee = context.attributes(of: node)
    return 0
}

private func fuseReaddir(
    _ path: UnsafePointer<CChar>?,
    _ buffer: UnsafeMutableRawPointer?,
    _ filler: fuse_fill_dir_t?,
    _ offset: off_t,
    _ info: UnsafeMutablePointer<fuse_file_info>?,
    _ flags: fuse_readdir_flags
) -> Int32 {
    let context = currentContext()
    // With `nullpath_ok` libfuse passes NULL for the directory handle: the root is the only directory.
    if path != nil && context.node(path, nil) != .root { return -ENOTDIR }
    guard let filler else { return -EIO }
    _ = filler(buffer, ".", nil, 0, fuse_fill_dir_flags(0))
    _ = filler(buffer, "..", nil, 0, fuse_fill_dir_flags(0))
    _ = context.filePath.withUnsafeBufferPointer { filler(buffer, $0.baseAddress! + 1, nil, 0, fuse_fill_dir_flags(0)) }
    return 0
}

private func fuseOpen(_ path: UnsafePointer<CChar>?, _ info: UnsafeMutablePointer<fuse_file_info>?) -> Int32 {
    let context = currentContext()
    switch context.node(path, nil) {
    case .missing: return -ENOENT
    case .root: return -EISDIR
    case .file: break
    }
    guard let info else { return -EIO }
    // The `ro` mount option already refuses writers; this also covers root, whom the mode does not stop.
    if context.readOnly && info.pointee.flags & O_ACCMODE != O_RDONLY { return -EROFS }
    info.pointee.fh = fileHandle
    // No FUSE_FLUSH on close (FOPEN_NOFLUSH; older kernels stop sending it after the first ENOSYS, as there
    // is no `flush` callback). Writes are on the device when they return and close(2) promises no
    // durability, so there is nothing to do; and a close that needs no answer cannot hang. That matters
    // because closes happen where nobody expects them: a child spawned by this very process closes its
    // inherited O_CLOEXEC copy of the descriptor at exec, and if the export is stopping at that moment no
    // worker is left to answer, while the child's copy of /dev/fuse keeps the connection from aborting.
    info.pointee.noflush = 1
    return 0
}

private func fuseRead(
    _ path: UnsafePointer<CChar>?,
    _ buffer: UnsafeMutablePointer<CChar>?,
    _ size: Int,
    _ offset: off_t,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let device = currentContext().device
    guard let buffer, offset >= 0 else { return -EINVAL }
    let deviceSize = device.size
    let start = UInt64(offset)
    guard start < deviceSize else { return 0 }  // end of file
    let count = Int(min(UInt64(size), deviceSize - start))
    do {
        try device.read(into: UnsafeMutableRawBufferPointer(start: buffer, count: count), at: start)
    } catch {
        return -errnoCode(of: error)
    }
    return Int32(count)
}

private func fuseWrite(
    _ path: UnsafePointer<CChar>?,
    _ buffer: UnsafePointer<CChar>?,
    _ size: Int,
    _ offset: off_t,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let context = currentContext()
    guard !context.readOnly else { return -EROFS }
    guard let buffer, offset >= 0 else { return -EINVAL }
    let deviceSize = context.device.size
    let start = UInt64(offset)
    // The file cannot grow: a write that starts at or past the end fails, one that crosses it is short.
    guard start < deviceSize else { return size == 0 ? 0 : -ENOSPC }
    let count = Int(min(UInt64(size), deviceSize - start))
    do {
        // O_SYNC/O_DSYNC writers get an fsync from the kernel after the write, so no FUA here.
        try context.device.write(UnsafeRawBufferPointer(start: buffer, count: count), at: start, fua: false)
    } catch {
        return -errnoCode(of: error)
    }
    return Int32(count)
}

private func fuseFsync(
    _ path: UnsafePointer<CChar>?,
    _ dataOnly: Int32,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let context = currentContext()
    if context.readOnly { return 0 }
    do {
        try context.device.flush()
    } catch {
        return -errnoCode(of: error)
    }
    return 0
}

/// The file's size is the device's: truncating to it succeeds (so `O_TRUNC` on an empty device works),
/// any other size is refused.
private func fuseTruncate(
    _ path: UnsafePointer<CChar>?,
    _ size: off_t,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let context = currentContext()
    switch context.node(path, info) {
    case .missing: return -ENOENT
    case .root: return -EISDIR
    case .file: break
    }
    if context.readOnly { return -EROFS }
    return size >= 0 && UInt64(size) == context.device.size ? 0 : -EPERM
}

/// Times are not stored; accepting them keeps `touch` and `cp -p` quiet.
private func fuseUtimens(
    _ path: UnsafePointer<CChar>?,
    _ times: UnsafePointer<timespec>?,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    currentContext().node(path, info) == .missing ? -ENOENT : 0
}

/// The loop driver turns REQ_OP_DISCARD and REQ_OP_WRITE_ZEROES into fallocate(2) on the backing file:
/// PUNCH_HOLE (discard, or write-zeroes that may unmap) and ZERO_RANGE (write-zeroes with NOUNMAP).
///
/// A punched hole must read back as zeroes (fallocate(2), and the block layer relies on it for
/// write-zeroes), which `BlockDevice.discard` does not promise (VIMG leaves partial clusters alone and a
/// clone may show its backing file), so PUNCH_HOLE maps to `writeZeroes(mayUnmap: true)`: zeroes, with
/// storage released where the device can.
private func fuseFallocate(
    _ path: UnsafePointer<CChar>?,
    _ mode: Int32,
    _ offset: off_t,
    _ length: off_t,
    _ info: UnsafeMutablePointer<fuse_file_info>?
) -> Int32 {
    let context = currentContext()
    guard mode & ~(fallocKeepSize | fallocPunchHole | fallocZeroRange) == 0 else { return -EOPNOTSUPP }
    guard offset >= 0, length > 0, offset <= off_t.max - length else { return -EINVAL }
    if context.readOnly { return -EROFS }
    let deviceSize = context.device.size
    let start = UInt64(offset)
    let requestedEnd = start + UInt64(length)
    // Without KEEP_SIZE the file would have to grow past the device.
    if mode & fallocKeepSize == 0 && requestedEnd > deviceSize { return -ENOSPC }
    let end = min(requestedEnd, deviceSize)
    guard start < end else { return 0 }
    do {
        if mode & fallocPunchHole != 0 {
            try context.device.writeZeroes(at: start, count: end - start, mayUnmap: true, fast: false)
        } else if mode & fallocZeroRange != 0 {
            try context.device.writeZeroes(at: start, count: end - start, mayUnmap: false, fast: false)
        }
        // Plain preallocation: every byte of the device already exists.
    } catch {
        return -errnoCode(of: error)
    }
    return 0
}

private func fuseStatfs(_ path: UnsafePointer<CChar>?, _ st: UnsafeMutablePointer<statvfs>?) -> Int32 {
    let context = currentContext()
    guard let st else { return -EINVAL }
    var info = statvfs()
    info.f_bsize = 4096
    info.f_frsize = 4096
    info.f_blocks = fsblkcnt_t((context.device.size + 4095) / 4096)
    info.f_files = 2
    info.f_namemax = 255
    st.pointee = info
    return 0
}
