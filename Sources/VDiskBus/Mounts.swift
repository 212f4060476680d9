// Design notes
// ------------
// What is built on a plugged disk's block device, and the few operations the bus does on it.
//
//   /dev/nbd0 -- /dev/nbd0p1 .. p5            partitions (sysfs: /sys/class/block/nbd0/nbd0pN)
//                     \-- dm-0 (vg-lv) ...     device-mapper holders (sysfs: .../holders/dm-0), recursively
//
// A file system belongs to the disk when its superblock's device number (mountinfo's "major:minor") or
// its source's device number is one of those: names alone miss /dev/mapper/vg-lv, and btrfs reports an
// anonymous device number, so both are compared. Each superblock counts once, however often it is mounted.
//
// Freezing is FIFREEZE on the mountpoint (fsfreeze(8) without the program). A file system that cannot be
// frozen (FUSE: ntfs-3g) is synced instead (syncfs, then fsync of the block device it is on, which is what
// writes a FUSE block file system's cached blocks): its snapshot is crash-consistent, not frozen.

import CBlockIO
import Foundation

#if canImport(Glibc)
import Glibc
#endif

enum Mounts {
    struct Mount: Hashable {
        /// The source as /proc/self/mountinfo shows it (`/dev/nbd0p1`, `/dev/mapper/vg-lv`).
        var device: String
        var mountpoint: String
        var type: String
        /// The superblock's device number ("major:minor").
        var superblock: String
    }

    /// The block devices built on `device`: itself, its partitions and their device-mapper holders, as
    /// kernel names (`nbd0`, `nbd0p1`, `dm-0`) with their "major:minor" numbers.
    static func stack(of device: String) -> [(name: String, number: String)] {
        let base = (device as NSString).lastPathComponent
        var result: [(String, String)] = []
        var queue = [base]
        let partitions = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/block/\(base)")) ?? []
        queue += partitions.filter { $0.hasPrefix(base + "p") }
        var seen = Set<String>()
        while let name = queue.popLast() {
            guard seen.insert(name).inserted, let number = sysfsLine("/sys/class/block/\(name)/dev") else { continue }
            result.append((name, number))
            queue += (try? FileManager.default.contentsOfDirectory(atPath: "/sys/class/block/\(name)/holders")) ?? []
        }
        return result
    }

    /// Device-mapper devices built on `device` (their /dev/mapper names).
    static func holders(of device: String) -> [String] {
        stack(of: device).compactMap { entry in
            entry.name.hasPrefix("dm-") ? sysfsLine("/sys/class/block/\(entry.name)/dm/name") ?? entry.name : nil
        }
    }

    /// File systems mounted from `device`, its partitions or what is built on them, one per superblock, in
    /// mount order.
    static func mounted(onDevice device: String) -> [Mount] {
        let numbers = Set(stack(of: device).map(\.number))
        guard !numbers.isEmpty, let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
        else { return [] }
        var result: [Mount] = []
        var superblocks = Set<String>()
        for line in text.split(separator: "\n") {
            // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPEROPTIONS
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard fields.count >= 10, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { continue }
            let superblock = fields[2]
            let source = unescape(fields[dash + 2])
            var matches = numbers.contains(superblock)
            if !matches && source.hasPrefix("/dev/") {
                var st = stat()
                if stat(source, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK {
                    matches = numbers.contains(
                        "\(CBlockIO_major(UInt64(st.st_rdev))):\(CBlockIO_minor(UInt64(st.st_rdev)))"
                    )
                }
            }
            guard matches, superblocks.insert(superblock + " " + source).inserted else { continue }
            result.append(
                Mount(device: source, mountpoint: unescape(fields[4]), type: fields[dash + 1], superblock: superblock)
            )
        }
        return result
    }

    /// mountinfo writes space, tab, newline and backslash as octal escapes.
    static func unescape(_ field: String) -> String {
        guard field.contains("\\") else { return field }
        let bytes = Array(field.utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
                let code = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
            {
                out.append(code)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func unmount(_ mountpoint: String) throws {
        if umount2(mountpoint, 0) == 0 { return }
        let e = errno
        throw BusError("cannot unmount \(mountpoint): \(String(cString: strerror(e)))")
    }

    /// How a file system was made ready for a snapshot.
    enum Consistency: Equatable {
        /// FIFREEZE held it still: the snapshot is a clean file system.
        case frozen
        /// It was synced but kept running: the snapshot is what a power cut at that moment would leave.
        case crashConsistent(reason: String)
    }

    /// A frozen (or synced) file system; thaw it when done.
    struct Held {
        let mount: Mount
        let consistency: Consistency
        private let fd: Int32

        init(mount: Mount, consistency: Consistency, fd: Int32) {
            self.mount = mount
            self.consistency = consistency
            self.fd = fd
        }

        /// Thaws a frozen file system and closes what was opened; returns a problem, if any.
        func release() -> String? {
            defer { if fd >= 0 { close(fd) } }
            guard consistency == .frozen, fd >= 0 else { return nil }
            if CBlockIO_thaw(fd) == 0 || errno == EINVAL { return nil }  // EINVAL: no longer frozen
            return "cannot thaw \(mount.mountpoint): \(String(cString: strerror(errno)))"
        }
    }

    /// Freezes `mount` or, when it cannot be frozen (or `freeze` is false), syncs it and its device.
    static func hold(_ mount: Mount, freeze: Bool) throws -> Held {
        let fd = open(mount.mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else {
            throw BusError("cannot open \(mount.mountpoint) for the snapshot: \(String(cString: strerror(errno)))")
        }
        var reason = "--no-freeze"
        if freeze {
            if CBlockIO_freeze(fd) == 0 { return Held(mount: mount, consistency: .frozen, fd: fd) }
            let e = errno
            reason = "cannot be frozen: \(String(cString: strerror(e)))"
        }
        var problems: [String] = []
        if CBlockIO_syncfs(fd) != 0 { problems.append("syncfs: \(String(cString: strerror(errno)))") }
        let device = open(mount.device, O_RDONLY | O_CLOEXEC)
        if device >= 0 {
            if fsync(device) != 0 { problems.append("fsync \(mount.device): \(String(cString: strerror(errno)))") }
            close(device)
        }
        guard problems.isEmpty else {
            close(fd)
            throw BusError("cannot sync \(mount.mountpoint) for the snapshot (\(problems.joined(separator: "; ")))")
        }
        return Held(mount: mount, consistency: .crashConsistent(reason: reason), fd: fd)
    }

    /// Writes a block device's cached blocks to it (before it is detached).
    static func syncDevice(_ path: String) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK)
        guard fd >= 0 else { return }
        fsync(fd)
        close(fd)
    }
}

/// The first line of a small sysfs file, without its newline.
func sysfsLine(_ path: String) -> String? {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return nil }
    defer { close(fd) }
    var bytes = [UInt8](repeating: 0, count: 4096)
    let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
    guard n > 0 else { return nil }
    let line = String(decoding: bytes[..<n], as: UTF8.self).split(separator: "\n").first.map(String.init) ?? ""
    return line.isEmpty ? nil : line
}
