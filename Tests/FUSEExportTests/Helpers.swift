import BlockIO
import Synchronization
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// FUSE and loop tests mount things: they need root and a FUSE-capable kernel.
let fuseAvailable = geteuid() == 0 && access("/dev/fuse", R_OK | W_OK) == 0

/// Whether something is mounted exactly at `path` (per /proc/mounts).
func isMounted(_ path: String) -> Bool {
    readFile("/proc/mounts").split(separator: "\n").contains { line in
        let fields = line.split(separator: " ")
        return fields.count > 1 && fields[1] == path
    }
}

/// umount(2), retried for a few seconds on EBUSY: a child that another thread is spawning holds copies
/// of this process's descriptors until it execs, which briefly keeps a file system busy.
/// - Parameter lazyAfterRetries: finally detach lazily (for cleanup paths).
/// - Returns: 0 or -1 with errno set, like umount(2).
@discardableResult
func unmount(_ path: String, lazyAfterRetries: Bool = false) -> Int32 {
    for _ in 0..<250 {
        if umount2(path, 0) == 0 { return 0 }
        if errno != EBUSY { return -1 }
        usleep(20_000)
    }
    return lazyAfterRetries ? umount2(path, Int32(MNT_DETACH)) : -1
}

/// A program in PATH or in the sbin directories test runners often leave out of PATH.
func program(_ name: String) -> String {
    if let path = TestEnvironment.which(name) { return path }
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] where access("\(dir)/\(name)", X_OK) == 0 {
        return "\(dir)/\(name)"
    }
    return name
}

/// pwrite of a whole buffer; returns the byte count or -errno.
func pwriteAll(_ fd: Int32, _ bytes: [UInt8], at offset: Int) -> Int {
    let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(offset)) }
    return n < 0 ? -Int(errno) : n
}

/// pread of `count` bytes (a short read returns fewer); nil on error.
func preadBytes(_ fd: Int32, count: Int, at offset: Int) -> [UInt8]? {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done)) }
        if n < 0 { return nil }
        if n == 0 { break }
        done += n
    }
    return Array(bytes[..<done])
}

/// A device that forwards to another and counts flushes, to see fsync reach the engine.
final class CountingDevice: BlockDevice {
    let base: any BlockDevice
    let flushes = Atomic<Int>(0)

    init(_ base: any BlockDevice) { self.base = base }

    var size: UInt64 { base.size }
    var capabilities: BlockDeviceCapabilities { base.capabilities }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try base.read(into: buffer, at: offset)
    }
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try base.write(buffer, at: offset, fua: fua)
    }
    func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try base.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
    }
    func discard(at offset: UInt64, count: UInt64) throws { try base.discard(at: offset, count: count) }
    func flush() throws {
        flushes.add(1, ordering: .relaxed)
        try base.flush()
    }
    func extents(at offset: UInt64, count: UInt64) throws -> [Extent] { try base.extents(at: offset, count: count) }
    func close() throws { try base.close() }
}
