import BlockIO
import CFUSE

#if canImport(Glibc)
import Glibc
#endif

/// Binds files to Linux loop devices (/dev/loopN) with the loop ioctls, as `losetup --find --show` does.
///
/// A device is found with LOOP_CTL_GET_FREE and bound with LOOP_CONFIGURE (LOOP_SET_FD + LOOP_SET_STATUS64
/// on kernels older than 5.8). Autoclear is off: the device stays bound until `detach`, even after every
/// user closed it. With `partitionScan` the kernel creates /dev/loopNpM for partitions it finds (and rescans
/// when a partition table is written through the device).
public enum LoopDevice {
    /// Binds `file` to a free loop device.
    /// - Parameters:
    ///   - file: a regular file (for example `FUSEExport.filePath`).
    ///   - readOnly: bind read-only (the file is opened read-only too).
    ///   - partitionScan: ask the kernel to scan for partitions (LO_FLAGS_PARTSCAN).
    ///   - directIO: ask the loop driver for O_DIRECT on the file, which avoids caching every block twice
    ///     (in the loop device's and the file's page cache); the kernel silently keeps buffered I/O when
    ///     the file cannot do it.
    /// - Returns: the device path, `/dev/loopN`.
    /// - Throws: `FUSEExportError` `.loopFailed`.
    public static func attach(
        file: String,
        readOnly: Bool,
        directIO: Bool = false,
        partitionScan: Bool = false
    ) throws -> String {
        let backing = open(file, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard backing >= 0 else {
            throw FUSEExportError(.loopFailed, errno: errno, path: file, message: "cannot open the backing file")
        }
        defer { close(backing) }  // the loop device keeps its own reference
        var lastError = EBUSY
        for _ in 0..<100 {
            let index = cfuse_loop_get_free()
            guard index >= 0 else {
                throw FUSEExportError(
                    .loopFailed,
                    errno: -index,
                    path: "/dev/loop-control",
                    message: "cannot find a free loop device"
                )
            }
            let path = "/dev/loop\(index)"
            let loop = open(path, O_RDWR | O_CLOEXEC)
            if loop < 0 {
                // A device just created by LOOP_CTL_GET_FREE may not have its node yet.
                lastError = errno
                if lastError == ENOENT || lastError == ENXIO {
                    usleep(10_000)
                    continue
                }
                throw FUSEExportError(.loopFailed, errno: lastError, path: path, message: "cannot open the loop device")
            }
            let result = cfuse_loop_configure(
                loop,
                backing,
                readOnly ? 1 : 0,
                directIO ? 1 : 0,
                partitionScan ? 1 : 0,
                file
            )
            close(loop)
            if result == 0 { return path }
            lastError = -result
            // Someone else bound the device between GET_FREE and CONFIGURE: take the next free one.
            if lastError == EBUSY { continue }
            throw FUSEExportError(.loopFailed, errno: lastError, path: path, message: "cannot bind \(file)")
        }
        throw FUSEExportError(.loopFailed, errno: lastError, path: file, message: "no loop device could be bound")
    }

    /// Unbinds a loop device and waits until the kernel has released the backing file. Unbinding a device
    /// that is not bound succeeds.
    /// - Parameter path: `/dev/loopN`.
    /// - Throws: `FUSEExportError` `.loopFailed`, or `.loopBusy` if someone still has the device open (a
    ///   mounted file system): the kernel then unbinds it when the last user closes it.
    public static func detach(_ path: String) throws {
        let loop = open(path, O_RDONLY | O_CLOEXEC)
        guard loop >= 0 else {
            throw FUSEExportError(.loopFailed, errno: errno, path: path, message: "cannot open the loop device")
        }
        var result: Int32 = 0
        for _ in 0..<50 {
            result = cfuse_loop_clear(loop)
            if result != -EBUSY && result != -EAGAIN { break }
            usleep(20_000)
        }
        close(loop)
        if result == -ENXIO { return }  // not bound
        if result < 0 {
            throw FUSEExportError(.loopFailed, errno: -result, path: path, message: "cannot unbind the loop device")
        }
        // The kernel unbinds at the last close (ours, above, unless someone else has it open).
        for _ in 0..<250 {
            if backingFile(of: path) == nil { return }
            usleep(20_000)
        }
        throw FUSEExportError(
            .loopBusy,
            errno: EBUSY,
            path: path,
            message: "the loop device is still in use; it will be unbound on last close"
        )
    }

    /// The file bound to a loop device (from sysfs), or nil if it is not bound.
    public static func backingFile(of path: String) -> String? {
        guard let slash = path.lastIndex(of: "/") else { return nil }
        let name = path[path.index(after: slash)...]
        let fd = open("/sys/block/\(name)/loop/backing_file", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 4096)
        let count = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { return nil }
        var text = String(decoding: bytes[..<count], as: UTF8.self)
        while text.last == "\n" { text.removeLast() }
        return text
    }
}
