import CBlockIO

#if canImport(Glibc)
import Glibc
#endif

/// A file or host block device accessed with `pread`/`pwrite`/`fdatasync`/`fallocate`.
///
/// Two uses, chosen at open:
/// - a *fixed* device (a raw image exported as a disk): the size is the file size at open and requests past
///   it are refused;
/// - a *growable* device (the host file under a VIMG image): writes may extend the file and reads past the
///   end return zeroes, because an image allocates clusters past its current end before writing them.
///
/// With cache mode `.direct` (qemu's cache=none) the file is opened with O_DIRECT and any request is carried
/// out in aligned blocks (design notes in DirectIO.swift).
public final class FileDevice: BlockDevice, @unchecked Sendable {
    /// Whether the file's data goes through the host page cache. The raw values are qemu's names for the
    /// same modes (`--cache=writeback`, `--cache=none`).
    public enum CacheMode: String, Sendable, Codable, CaseIterable {
        /// Buffered I/O through the page cache; data is durable after a flush.
        case writeback
        /// Direct I/O (O_DIRECT), qemu's cache=none: reads and writes bypass the page cache; data is
        /// durable after a flush (which still syncs the file's metadata and the disk's own cache).
        case direct = "none"
    }

    /// Advisory whole-file lock taken at open (`flock`), so two writers cannot open one image; with it, the
    /// byte-range locks qemu takes and checks (QemuImageLocks.swift), so neither can a VM and vdisk.
    public enum LockMode: Sendable {
        case none
        /// Shared: other readers may also hold it; a writer may not.
        case shared
        /// Exclusive: nobody else may hold any lock.
        case exclusive
    }

    public let path: String
    public let isReadOnly: Bool
    public let isGrowable: Bool
    private let fd: Int32
    private let fixedSize: UInt64
    private let isBlockDevice: Bool
    public let cacheMode: CacheMode
    /// The aligned-I/O path, with cache mode `.direct`.
    let direct: DirectIO?
    /// With cache mode `.direct`, for a fixed-size file whose size is not a multiple of the alignment: a
    /// descriptor without O_DIRECT for the bytes of its last, partial block (from `directEnd` on).
    private let tailFD: Int32
    private let directEnd: UInt64
    // Set once by close(); reads race only with a caller misusing a closed device.
    private nonisolated(unsafe) var isClosed = false

    private init(
        path: String,
        fd: Int32,
        readOnly: Bool,
        growable: Bool,
        size: UInt64,
        isBlockDevice: Bool,
        cacheMode: CacheMode,
        tailFD: Int32
    ) {
        self.path = path
        self.fd = fd
        self.isReadOnly = readOnly
        self.isGrowable = growable
        self.fixedSize = size
        self.isBlockDevice = isBlockDevice
        self.cacheMode = cacheMode
        self.direct = cacheMode == .direct ? DirectIO(fd: fd, path: path) : nil
        self.tailFD = tailFD
        self.directEnd = tailFD >= 0 ? DirectIO.alignDown(size) : .max
    }

    deinit {
        if !isClosed {
            Glibc.close(fd)
            if tailFD >= 0 { Glibc.close(tailFD) }
        }
    }

    /// Opens `path`.
    /// - Parameters:
    ///   - readOnly: open `O_RDONLY`; writes are refused.
    ///   - create: create the file (it must not exist yet) with mode 0644.
    ///   - growable: see the type's notes.
    ///   - lock: advisory lock to take; fails with `.locked` if it is held elsewhere.
    ///   - cache: `.direct` for direct I/O; fails with `.notSupported` where the file system refuses it.
    /// - Throws: `BlockIOError`.
    public static func open(
        path: String,
        readOnly: Bool,
        create: Bool = false,
        growable: Bool = false,
        lock: LockMode = .none,
        cache: CacheMode = .writeback
    ) throws -> FileDevice {
        var flags: Int32 = readOnly ? O_RDONLY : O_RDWR
        flags |= O_CLOEXEC
        if create { flags |= O_CREAT | O_EXCL }
        let fd = Glibc.open(path, flags, 0o644)
        if fd < 0 { throw BlockIOError.system(.open, errno: errno, path: path) }
        var tailFD: Int32 = -1
        do {
            var st = stat()
            if fstat(fd, &st) != 0 { throw BlockIOError.system(.stat, errno: errno, path: path) }
            let isBlock = (st.st_mode & S_IFMT) == S_IFBLK
            if (st.st_mode & S_IFMT) == S_IFDIR {
                throw BlockIOError(
                    .invalidArgument,
                    operation: .open,
                    errno: EISDIR,
                    path: path,
                    message: "is a directory"
                )
            }
            var size = UInt64(max(0, st.st_size))
            if isBlock {
                var bytes: UInt64 = 0
                // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
                if ioctl(fd, 0x8008_1272, &bytes) == 0 { size = bytes }
            }
            if cache == .direct {
                // O_DIRECT is added after the open, so that a file just created can be removed again if
                // the file system refuses it (the open would create the file, then fail).
                if fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | CBlockIO_O_DIRECT) != 0 {
                    let code = errno
                    if create { unlink(path) }
                    if code == EINVAL {
                        throw BlockIOError(
                            .notSupported,
                            operation: .open,
                            errno: EINVAL,
                            path: path,
                            message:
                                "the file system does not support direct I/O (O_DIRECT), which cache mode none needs; use cache mode writeback"
                        )
                    }
                    throw BlockIOError.system(.open, errno: code, path: path)
                }
                if !growable && !DirectIO.isAligned(size) {
                    tailFD = Glibc.open("/proc/self/fd/\(fd)", (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
                    if tailFD < 0 { throw BlockIOError.system(.open, errno: errno, path: path) }
                }
            }
            if lock != .none {
                let op = (lock == .exclusive ? LOCK_EX : LOCK_SH) | LOCK_NB
                if Self.flockRetryingBriefly(fd, op) != 0 {
                    let code = errno
                    if code == EWOULDBLOCK {
                        throw BlockIOError(
                            .locked,
                            operation: .lock,
                            errno: EAGAIN,
                            path: path,
                            message: lock == .exclusive
                                ? "the image is in use by another process (could not get the write lock)"
                                : "the image is being written by another process (could not get a shared lock)"
                        )
                    }
                    throw BlockIOError.system(.lock, errno: code, path: path)
                }
                // And qemu's locks, which qemu checks (flock it does not): QemuImageLocks.swift.
                try QemuImageLocks.take(fd: fd, path: path, writer: lock == .exclusive)
            }
            return FileDevice(
                path: path,
                fd: fd,
                readOnly: readOnly,
                growable: growable,
                size: size,
                isBlockDevice: isBlock,
                cacheMode: cache,
                tailFD: tailFD
            )
        } catch {
            Glibc.close(fd)
            if tailFD >= 0 { Glibc.close(tailFD) }
            throw error
        }
    }

    public var size: UInt64 { isGrowable ? currentLength() : fixedSize }

    /// The file's length now (`fstat`); for a growable device this is where the image currently ends.
    public func currentLength() -> UInt64 {
        if isBlockDevice { return fixedSize }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return fixedSize }
        return UInt64(max(0, st.st_size))
    }

    /// The number of bytes the file occupies on its file system (`st_blocks * 512`).
    public func allocatedBytes() -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return 0 }
        return UInt64(max(0, st.st_blocks)) &* 512
    }

    /// `flock` that tries again for a moment (up to about 0.25 s) when the lock is taken. A lock can be
    /// held a little after its owner closed the file: a process spawned meanwhile by another thread shares
    /// the open file until it execs (O_CLOEXEC only closes it then), which on a busy machine takes
    /// milliseconds. Without the retry, reopening an image just closed fails as "in use" now and then.
    private static func flockRetryingBriefly(_ fd: Int32, _ operation: Int32) -> Int32 {
        var pause: UInt32 = 1000
        while true {
            let result = flock(fd, operation)
            guard result != 0, errno == EWOULDBLOCK, pause <= 128_000 else { return result }
            usleep(pause)
            pause *= 2
        }
    }

    public var capabilities: BlockDeviceCapabilities {
        var caps: BlockDeviceCapabilities = [.flush, .discard, .writeZeroes, .fastZero, .extents, .multiConnection]
        if isReadOnly { caps.insert(.readOnly) }
        return caps
    }

    private func checkOpen(_ operation: BlockIOError.Operation) throws {
        if isClosed { throw BlockIOError(.closed, operation: operation, path: path, message: "device is closed") }
    }

    private func checkWritable(_ operation: BlockIOError.Operation, offset: UInt64, count: UInt64) throws {
        try checkOpen(operation)
        if isReadOnly {
            throw BlockIOError(.readOnly, operation: operation, path: path, message: "device is read-only")
        }
        if !isGrowable { try checkRange(offset: offset, count: count, operation: operation) }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkOpen(.read)
        if !isGrowable { try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read) }
        if let direct {
            let (head, tail) = splitAtDirectEnd(offset: offset, count: buffer.count)
            try direct.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<head]), at: offset)
            if tail > 0 {
                try readBuffered(
                    tailFD,
                    into: UnsafeMutableRawBufferPointer(rebasing: buffer[head...]),
                    at: offset + UInt64(head)
                )
            }
            return
        }
        try readBuffered(fd, into: buffer, at: offset)
    }

    /// Splits a request of `count` bytes at `offset` into the bytes before `directEnd` and those after it.
    private func splitAtDirectEnd(offset: UInt64, count: Int) -> (head: Int, tail: Int) {
        guard offset + UInt64(count) > directEnd else { return (count, 0) }
        let head = offset >= directEnd ? 0 : Int(directEnd - offset)
        return (head, count - head)
    }

    private func readBuffered(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockIOError.system(.read, errno: errno, path: path, offset: offset + UInt64(done))
            }
            if n == 0 {
                // Past the end of a growable file: unwritten space reads as zeroes.
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try checkWritable(.write, offset: offset, count: UInt64(buffer.count))
        if let direct {
            let (head, tail) = splitAtDirectEnd(offset: offset, count: buffer.count)
            try direct.write(UnsafeRawBufferPointer(rebasing: buffer[0..<head]), at: offset)
            if tail > 0 {
                try writeBuffered(tailFD, UnsafeRawBufferPointer(rebasing: buffer[head...]), at: offset + UInt64(head))
            }
        } else {
            try writeBuffered(fd, buffer, at: offset)
        }
        if fua { try flush() }
    }

    private func writeBuffered(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw BlockIOError.system(.write, errno: errno, path: path, offset: offset + UInt64(done))
            }
            done += n
        }
    }

    /// Runs `body` (a change of bytes at `offset..<offset + count` other than through `write`) so that no
    /// read-modify-write of direct I/O overlaps it in a block they share (see DirectIO.swift).
    private func excludingPartialBlockWrites<T>(offset: UInt64, count: UInt64, _ body: () throws -> T) rethrows -> T {
        guard let direct else { return try body() }
        return try direct.withPartialBlocksLocked(offset: offset, count: count) { _ in try body() }
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try checkWritable(.writeZeroes, offset: offset, count: count)
        if count == 0 { return }
        if !isBlockDevice {
            // Punching keeps the size and frees blocks; zero-range keeps blocks allocated (NO_HOLE).
            let mode = mayUnmap ? (CBlockIO_FALLOC_PUNCH_HOLE | CBlockIO_FALLOC_KEEP_SIZE) : CBlockIO_FALLOC_ZERO_RANGE
            var end = offset + count
            if isGrowable || mayUnmap { end = min(end, max(offset, currentLength())) }
            guard end > offset else { return }  // entirely past the end of a growable file: already zero
            let result = excludingPartialBlockWrites(offset: offset, count: end - offset) {
                CBlockIO_fallocate(fd, mode, Int64(offset), Int64(end - offset))
            }
            if result == 0 && end - offset == count { return }
        }
        if fast {
            throw BlockIOError(
                .notSupported,
                operation: .writeZeroes,
                path: path,
                offset: offset,
                message: "no fast zeroing"
            )
        }
        try writeZeroesSlowly(at: offset, count: count)
    }

    private func writeZeroesSlowly(at offset: UInt64, count: UInt64) throws {
        let chunk = 1 << 20
        let zeroes = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeroes.deallocate() }
        zeroes.initializeMemory(as: UInt8.self, repeating: 0)
        var done: UInt64 = 0
        while done < count {
            let n = Int(min(UInt64(chunk), count - done))
            try write(UnsafeRawBufferPointer(rebasing: zeroes[0..<n]), at: offset + done, fua: false)
            done += UInt64(n)
        }
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try checkWritable(.discard, offset: offset, count: count)
        guard count > 0, !isBlockDevice else { return }
        // Best effort: a file system without hole punching simply keeps the blocks.
        _ = excludingPartialBlockWrites(offset: offset, count: count) {
            CBlockIO_fallocate(fd, CBlockIO_FALLOC_PUNCH_HOLE | CBlockIO_FALLOC_KEEP_SIZE, Int64(offset), Int64(count))
        }
    }

    public func flush() throws {
        try checkOpen(.flush)
        if isReadOnly { return }
        while fdatasync(fd) != 0 {
            if errno == EINTR { continue }
            throw BlockIOError.system(.flush, errno: errno, path: path)
        }
    }

    /// Sets the file length (growable host files only; used when an image is created or shrunk).
    public func truncate(to length: UInt64) throws {
        try checkOpen(.truncate)
        if ftruncate(fd, off_t(length)) != 0 { throw BlockIOError.system(.truncate, errno: errno, path: path) }
    }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try checkOpen(.extents)
        if !isGrowable { try checkRange(offset: offset, count: count, operation: .extents) }
        if count == 0 { return [] }
        if isBlockDevice { return allDataExtent(at: offset, count: count) }
        // SEEK_DATA/SEEK_HOLE walk; any failure falls back to "all data", which is always correct.
        var result: [Extent] = []
        let end = offset + count
        let fileEnd = currentLength()
        var position = offset
        while position < end {
            if position >= fileEnd {
                result.append(Extent(offset: position, length: end - position, flags: [.hole, .zero]))
                break
            }
            let data = lseek(fd, off_t(position), CBlockIO_SEEK_DATA)
            if data < 0 {
                if errno == ENXIO {  // no data after position
                    result.append(Extent(offset: position, length: end - position, flags: [.hole, .zero]))
                    break
                }
                return allDataExtent(at: offset, count: count)
            }
            if UInt64(data) > position {
                let holeEnd = min(UInt64(data), end)
                result.append(Extent(offset: position, length: holeEnd - position, flags: [.hole, .zero]))
                position = holeEnd
                continue
            }
            let hole = lseek(fd, off_t(position), CBlockIO_SEEK_HOLE)
            if hole < 0 { return allDataExtent(at: offset, count: count) }
            let dataEnd = min(max(UInt64(hole), position + 1), end)
            result.append(Extent(offset: position, length: dataEnd - position, flags: []))
            position = dataEnd
        }
        return result
    }

    public func close() throws { try close(flushing: true) }

    /// Closes the file; without `flushing`, written data is left to the page cache (qemu's cache=unsafe).
    public func close(flushing: Bool) throws {
        if isClosed { return }
        if flushing && !isReadOnly { try? flush() }
        isClosed = true
        if tailFD >= 0 { Glibc.close(tailFD) }
        if Glibc.close(fd) != 0 { throw BlockIOError.system(.close, errno: errno, path: path) }
    }
}

extension FileDevice: TruncatableDevice {}

/// The canonical absolute path of an existing file (symbolic links and `..` resolved), or nil.
public func canonicalPath(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
}
