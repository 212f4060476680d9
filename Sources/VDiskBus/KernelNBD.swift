// Design notes
// ------------
// /dev/nbdN is driven through the kernel's NBD generic netlink interface (family "nbd"), by the bus
// itself: no nbd-client child, nothing to wait for but the kernel's answer (bounded by a receive timeout).
//
//   bus: connect to its own <runtime>/nbd.sock, NBD_OPT_GO for export NAME   (NBDNegotiatedSocket)
//        NBD_CMD_CONNECT {size, block size 512, server flags, timeout 0, dead-connection timeout,
//                         socket fd, backend identifier "vdisk:RUNTIME:NAME:TOKEN"}  -> index N
//   kernel: /dev/nbdN sends requests on that socket; the bus's NBD server answers them
//
// The backend identifier marks a device as ours: the kernel shows it in /sys/block/nbdN/backend, and a
// bus that starts after a crash disconnects exactly the devices that carry its runtime folder, leaving
// any other (qemu-nbd -c, nbd-client, another bus) alone.
//
// Timeouts. The I/O timeout is off (0): a slow request never makes the kernel declare a healthy
// connection dead. The dead-connection timeout is what happens when the bus goes away: requests wait that
// long for a new socket (NBD_CMD_RECONFIGURE, the planned restart) and then fail with EIO. After a crash
// the new bus never reconfigures: the engine may have lost writes it acknowledged but had not flushed, so
// it disconnects the device and every request fails with EIO, as on a disk that lost power.
//
// Block size 512, as a loop device and qemu-nbd have: a partition table written through one front end
// reads the same through the other.

import CNBDLinux
import Foundation

#if canImport(Glibc)
import Glibc
#endif

enum KernelNBD {
    /// How long requests wait for a new socket after the bus's went away (a planned restart takes a few
    /// seconds; a crash fails them with EIO after this, or at once when a new bus cleans up).
    static let deadConnectionTimeout: UInt64 = 30
    /// How long a netlink request may take.
    static let netlinkTimeout: Int32 = 30

    /// Whether this kernel has NBD devices (the `nbd` module loaded).
    static var isAvailable: Bool { access("/sys/block/nbd0", F_OK) == 0 && access("/dev/nbd0", F_OK) == 0 }

    static func path(_ index: UInt32) -> String { "/dev/nbd\(index)" }

    /// The device number in `/dev/nbdN`, or nil.
    static func index(of path: String) -> UInt32? {
        guard path.hasPrefix("/dev/nbd") else { return nil }
        return UInt32(path.dropFirst("/dev/nbd".count))
    }

    /// What identifies a device connected by the bus of `runtime`.
    static func backendPrefix(runtime: String) -> String { "vdisk:\(runtime):" }

    static func backendIdentifier(runtime: String, disk: String) -> String {
        backendPrefix(runtime: runtime) + disk + ":" + String(UInt64.random(in: 1...UInt64.max), radix: 16)
    }

    /// Connects a free /dev/nbdN to `socket` (past the handshake; the kernel takes its own reference, the
    /// caller still closes its descriptor) and returns N.
    static func connect(socket: Int32, size: UInt64, flags: UInt16, backend: String) throws -> UInt32 {
        guard size > 0, size % 512 == 0 else {
            throw BusError("the kernel NBD driver needs a size that is a multiple of 512 bytes (this disk has \(size))")
        }
        return try withNetlink("connect a /dev/nbdN device") { fd, family in
            var index: UInt32 = 0
            let rc = withConfiguration(index: nil, socket: socket, size: size, flags: flags, backend: backend) {
                CNBDLinux_connect(fd, family, &$0, &index)
            }
            try check(rc, "connect a /dev/nbdN device")
            return index
        }
    }

    /// Hands /dev/nbdN a new socket after its old one died (the planned restart); the kernel checks that
    /// the device carries `backend`.
    static func reconfigure(_ index: UInt32, socket: Int32, backend: String) throws {
        try withNetlink("reattach \(path(index))") { fd, family in
            let rc = withConfiguration(index: index, socket: socket, size: 0, flags: 0, backend: backend) {
                CNBDLinux_reconfigure(fd, family, &$0)
            }
            try check(rc, "reattach \(path(index))")
        }
    }

    /// Disconnects /dev/nbdN: requests in flight and later ones fail with EIO. The kernel keeps the
    /// device's configuration until its last opener (a file system still mounted from it) lets go.
    static func disconnect(_ index: UInt32) throws {
        try withNetlink("disconnect \(path(index))") { fd, family in
            let rc = CNBDLinux_disconnect(fd, family, index)
            if rc == -EINVAL || rc == -ENODEV { return }  // not connected (any more)
            try check(rc, "disconnect \(path(index))")
            // Usually gone at once; a moment's grace for a prober that has it open.
            let deadline = monotonicSeconds() + 2
            while CNBDLinux_status(fd, family, index) == 1 && monotonicSeconds() < deadline { usleep(10_000) }
        }
    }

    /// Whether /dev/nbdN is connected (nil when the kernel cannot say).
    static func isConnected(_ index: UInt32) -> Bool? {
        try? withNetlink("ask about \(path(index))") { fd, family in
            let rc = CNBDLinux_status(fd, family, index)
            return rc < 0 ? nil : rc == 1
        }
    }

    /// The backend identifier of /dev/nbdN, if it is connected with one.
    static func backend(of index: UInt32) -> String? {
        guard let text = try? String(contentsOfFile: "/sys/block/nbd\(index)/backend", encoding: .utf8) else {
            return nil
        }
        let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return trimmed.isEmpty ? nil : trimmed
    }

    /// Every /dev/nbdN the kernel has.
    static func devices() -> [UInt32] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? []
        return names.compactMap { $0.hasPrefix("nbd") ? UInt32($0.dropFirst(3)) : nil }.sorted()
    }

    // MARK: Netlink plumbing

    private static func withConfiguration<T>(
        index: UInt32?,
        socket: Int32,
        size: UInt64,
        flags: UInt16,
        backend: String,
        _ body: (inout CNBDLinux_config) -> T
    ) -> T {
        var sockets: [Int32] = [socket]
        return sockets.withUnsafeMutableBufferPointer { sockets in
            backend.withCString { backend in
                var configuration = CNBDLinux_config()
                configuration.index = index ?? 0
                configuration.has_index = index == nil ? 0 : 1
                configuration.size_bytes = size
                configuration.block_size = size == 0 ? 0 : 512
                configuration.server_flags = UInt64(flags)
                configuration.timeout = 0
                configuration.has_timeout = size == 0 ? 0 : 1
                configuration.dead_connection_timeout = deadConnectionTimeout
                configuration.sockets = UnsafePointer(sockets.baseAddress)
                configuration.socket_count = Int32(sockets.count)
                configuration.backend = backend
                return body(&configuration)
            }
        }
    }

    private static func withNetlink<T>(_ what: String, _ body: (Int32, Int32) throws -> T) throws -> T {
        let fd = CNBDLinux_open(netlinkTimeout)
        try check(fd, what)
        defer { close(fd) }
        let family = CNBDLinux_family(fd)
        if family == -ENOENT { throw BusError("this kernel has no NBD driver ('modprobe nbd', or --device loop)") }
        try check(family, what)
        return try body(fd, family)
    }

    private static func check(_ rc: Int32, _ what: String) throws {
        guard rc < 0 else { return }
        let reason: String
        switch -rc {
        case EBUSY: reason = "the device is in use"
        case ETIMEDOUT: reason = "the kernel did not answer within \(netlinkTimeout) s"
        case EPERM, EACCES: reason = "permission denied (the bus must run as root)"
        default: reason = String(cString: strerror(-rc))
        }
        throw BusError("cannot \(what): \(reason)")
    }
}
