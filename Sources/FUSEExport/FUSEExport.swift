// Design notes
// ------------
// `FUSEExport` shows a `BlockDevice` to the kernel as one regular file, `<mountpoint>/<fileName>`, served
// by libfuse3's high-level API; `LoopDevice` then binds that file to /dev/loopN. Together they give a real
// block device backed by our engine on machines without the nbd module (and without a privileged NBD
// client): mkfs, mount, dd and VMs all work on /dev/loopN.
//
//     mkfs / mount / dd
//            |
//        /dev/loopN  ---- loop driver: read/write_iter, fallocate, fsync on the backing file
//            |
//     <mountpoint>/disk  ---- FUSE (kernel) --- /dev/fuse --- libfuse workers --- BlockDevice
//
// Why FUSE + loop rather than NBD: /dev/nbd* is often missing (containers, minimal kernels) while FUSE and
// loop are nearly always there; the file is also directly usable by qemu or cp without any block layer.
//
// Threading: `start()` mounts synchronously (fuse_new + fuse_mount), then runs `fuse_loop_mt` on a
// dedicated pthread; libfuse spawns up to 10 idle worker threads that call the device concurrently (it is
// thread-safe by contract). C callbacks cannot capture, so they find their `ExportContext` through
// `fuse_get_context()->private_data`, an unretained pointer the export keeps alive until `fuse_destroy`.
// `start()` returns once the kernel's INIT has been answered, so the file is usable when it returns.
//
// Caching: writes go straight through to the device (no FUSE writeback cache), buffered reads are cached
// in the FUSE file's page cache, kept across opens (`kernel_cache`): only this mount changes the device
// while it is exported. A loop device bound with direct I/O (as the bus does) bypasses that cache and
// sends O_DIRECT requests, asynchronous and many in flight, which libfuse's workers serve in parallel. fsync(2) on the file (the loop driver sends it for REQ_PREFLUSH / REQ_FUA) is
// `device.flush()`; close(2) sends nothing (FOPEN_NOFLUSH), so no close ever waits for this process.
//
// Stopping: libfuse's workers block in read(2) on /dev/fuse and `fuse_exit` alone does not wake them. So
// `stop()` sets the exit flag, then sends the file system one request (statfs on the mountpoint, from a
// throw-away thread, because nothing guarantees a worker is left to answer it); the worker that takes it
// answers, sees the flag and leaves, and the loop cancels the others. Then `fuse_unmount` closes
// /dev/fuse, which aborts the connection (any request still waiting fails with ENOTCONN, so the poke
// thread always returns) and lazily unmounts; `fuse_destroy` frees libfuse's state; the context is
// released last.
//
// The daemon lives in the same process as its clients (tests, the bus), which is only safe while no
// request can wait for a daemon that is gone or busy: a child being spawned holds copies of our
// descriptors until exec closes them, /dev/fuse included, so the connection outlives `fuse_unmount`
// until then; had its exec-time close of the disk file sent FUSE_FLUSH, it would wait forever (seen in
// testing before FOPEN_NOFLUSH). Likewise never stat every loop device (`losetup -a`) from the process
// that serves one of them.
//
// Order: detach the loop device (and unmount whatever is mounted on it) *before* `stop()`. While the loop
// device is bound it holds the file open, so the FUSE mount can only be detached lazily and the loop's
// I/O fails from then on; the export never closes the device, its owner does.

import BlockIO
import CFUSE
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Exposes a `BlockDevice` as a single regular file in a FUSE mount, for `LoopDevice.attach`.
///
/// ```swift
/// let export = FUSEExport(device: image, mountpoint: "/run/vdisk/fuse0", readOnly: false)
/// try export.start()
/// let loop = try LoopDevice.attach(file: export.filePath, readOnly: false)
/// // ... use /dev/loopN ...
/// try LoopDevice.detach(loop)
/// export.stop()
/// ```
public final class FUSEExport: Sendable {
    /// The exported device; the export never closes it.
    public let device: any BlockDevice
    /// An existing directory the file system is mounted on.
    public let mountpoint: String
    /// The name of the one file in the mount.
    public let fileName: String
    /// Whether the file refuses writes (mode 0400 and the `ro` mount option).
    public let readOnly: Bool

    private let state = Mutex<FUSESession?>(nil)

    /// - Parameters:
    ///   - device: the device to export; it stays owned by the caller.
    ///   - mountpoint: an existing directory to mount on.
    ///   - fileName: the file's name: not empty, no "/", not "." or "..".
    ///   - readOnly: refuse writes, whatever the device allows.
    public init(device: any BlockDevice, mountpoint: String, fileName: String = "disk", readOnly: Bool) {
        precondition(
            !fileName.isEmpty && !fileName.contains("/") && fileName != "." && fileName != "..",
            "FUSEExport: invalid file name \(fileName)"
        )
        self.device = device
        self.mountpoint = mountpoint
        self.fileName = fileName
        self.readOnly = readOnly || device.capabilities.contains(.readOnly)
    }

    deinit {
        stop()
    }

    /// The path of the exported file: `mountpoint/fileName`.
    public var filePath: String {
        (mountpoint.hasSuffix("/") ? mountpoint : mountpoint + "/") + fileName
    }

    /// Whether the file system is mounted and served.
    public var isRunning: Bool { state.withLock { $0 != nil } }

    /// Mounts the file system and starts serving it; returns once the kernel has completed the FUSE
    /// handshake, so `filePath` is usable.
    /// - Throws: `FUSEExportError` `.mountpointMissing`, `.fuseUnavailable`, `.alreadyStarted` or
    ///   `.mountFailed`. A failed start leaves nothing mounted.
    public func start() throws {
        try state.withLock { session in
            if session != nil {
                throw FUSEExportError(
                    .alreadyStarted,
                    errno: EBUSY,
                    path: mountpoint,
                    message: "export already started"
                )
            }
            session = try FUSESession.start(
                device: device,
                mountpoint: mountpoint,
                fileName: fileName,
                readOnly: readOnly
            )
        }
    }

    /// Stops serving and unmounts. Idempotent; does nothing if `start()` failed or was never called.
    /// Detach any loop device bound to `filePath` first (see the design notes).
    public func stop() {
        state.withLock { session in
            session?.shutDown()
            session = nil
        }
    }
}

/// One mount: libfuse's handle, the thread running its loop, and the context the callbacks use.
final class FUSESession: @unchecked Sendable {
    private let fuse: OpaquePointer
    private let context: Unmanaged<ExportContext>
    private let mountpoint: String
    private var thread = pthread_t()
    /// Set by the loop thread when `fuse_loop_mt` returns.
    private let loopFinished = Atomic<Bool>(false)
    private var isShutDown = false

    private init(fuse: OpaquePointer, context: Unmanaged<ExportContext>, mountpoint: String) {
        self.fuse = fuse
        self.context = context
        self.mountpoint = mountpoint
    }

    /// How long `start` waits for the kernel's INIT to be answered.
    private static let handshakeTimeoutMicroseconds = 10_000_000

    static func start(
        device: any BlockDevice,
        mountpoint: String,
        fileName: String,
        readOnly: Bool
    ) throws -> FUSESession {
        var st = stat()
        if stat(mountpoint, &st) != 0 {
            throw FUSEExportError(.mountpointMissing, errno: errno, path: mountpoint, message: "mountpoint is missing")
        }
        if st.st_mode & 0o170000 != 0o040000 {
            throw FUSEExportError(
                .mountpointMissing,
                errno: ENOTDIR,
                path: mountpoint,
                message: "mountpoint is not a directory"
            )
        }
        if access("/dev/fuse", R_OK | W_OK) != 0 {
            throw FUSEExportError(
                .fuseUnavailable,
                errno: errno,
                path: "/dev/fuse",
                message: "FUSE is not available"
            )
        }

        let context = Unmanaged.passRetained(ExportContext(device: device, fileName: fileName, readOnly: readOnly))
        // Options libfuse hands to mount(2): root needs no allow_other; default_permissions lets the kernel
        // check the file mode instead of asking us.
        var options = "fsname=vdisk,subtype=vdisk,default_permissions"
        if readOnly { options += ",ro" }
        guard let fuse = newFUSE(arguments: ["vdisk", "-o", options], context: context) else {
            context.release()
            throw FUSEExportError(
                .mountFailed,
                errno: EINVAL,
                path: mountpoint,
                message: "libfuse refused the options \(options)"
            )
        }
        if fuse_mount(fuse, mountpoint) != 0 {
            let code = errno
            fuse_destroy(fuse)
            context.release()
            throw FUSEExportError(
                .mountFailed,
                errno: code,
                path: mountpoint,
                message: "cannot mount the FUSE file system"
            )
        }

        let session = FUSESession(fuse: fuse, context: context, mountpoint: mountpoint)
        let argument = Unmanaged.passRetained(session).toOpaque()
        let created = pthread_create(
            &session.thread,
            nil,
            { argument in
                let session = Unmanaged<FUSESession>.fromOpaque(argument!).takeRetainedValue()
                _ = fuse_loop_mt_31(session.fuse, 0)  // clone_fd 0; libfuse keeps at most 10 idle workers
                session.loopFinished.store(true, ordering: .releasing)
                return nil
            },
            argument
        )
        if created != 0 {
            Unmanaged<FUSESession>.fromOpaque(argument).release()
            session.isShutDown = true
            fuse_unmount(fuse)
            fuse_destroy(fuse)
            context.release()
            throw FUSEExportError(
                .mountFailed,
                errno: created,
                path: mountpoint,
                message: "cannot start the FUSE thread"
            )
        }

        // The kernel queued INIT at mount time; wait until a worker has answered it.
        var waited = 0
        while !context.takeUnretainedValue().initialized.load(ordering: .acquiring) {
            if session.loopFinished.load(ordering: .acquiring) || waited >= handshakeTimeoutMicroseconds {
                session.shutDown()
                throw FUSEExportError(
                    .mountFailed,
                    errno: EIO,
                    path: mountpoint,
                    message: "the FUSE handshake did not complete"
                )
            }
            usleep(1000)
            waited += 1000
        }
        return session
    }

    /// `fuse_new` with `arguments` as argv (argv[0] is a program name).
    private static func newFUSE(arguments: [String], context: Unmanaged<ExportContext>) -> OpaquePointer? {
        let strings = arguments.map { strdup($0) }
        defer { for string in strings { free(string) } }
        var argv = strings + [nil]
        return argv.withUnsafeMutableBufferPointer { argv in
            var args = fuse_args(argc: Int32(arguments.count), argv: argv.baseAddress, allocated: 0)
            var operations = makeOperations()
            let fuse = fuse_new(&args, &operations, MemoryLayout<fuse_operations>.size, context.toOpaque())
            fuse_opt_free_args(&args)  // frees only what libfuse allocated
            return fuse
        }
    }

    /// Stops the loop, unmounts and frees everything (see "Stopping" in the design notes).
    func shutDown() {
        guard !isShutDown else { return }
        isShutDown = true
        fuse_exit(fuse)
        if !loopFinished.load(ordering: .acquiring) { Self.poke(mountpoint) }
        pthread_join(thread, nil)
        fuse_unmount(fuse)
        fuse_destroy(fuse)
        context.release()
    }

    /// Sends the file system one request from a detached thread, to wake a worker blocked on /dev/fuse.
    private static func poke(_ mountpoint: String) {
        guard let path = strdup(mountpoint) else { return }
        var thread = pthread_t()
        let created = pthread_create(
            &thread,
            nil,
            { path in
                var info = statvfs()
                _ = statvfs(path!.assumingMemoryBound(to: CChar.self), &info)
                free(path)
                return nil
            },
            path
        )
        if created == 0 { pthread_detach(thread) } else { free(path) }
    }
}
