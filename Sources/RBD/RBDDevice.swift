// Design notes
// ------------
// An RBD image of a Ceph cluster as a `BlockDevice`, through librados and librbd. This is the one file
// that speaks to the C libraries (the `CRBD` module); everything else in vdisk sees a `BlockDevice`.
//
// Requests: each call submits one librbd asynchronous request (rbd_aio_read/write/discard/write_zeroes/
// flush with a completion) and waits for that completion on the calling thread. The device is called from
// many threads at once (the NBD server's pool, FUSE's workers, the converter's workers), so as many
// requests are in flight in the cluster as there are callers; librbd orders nothing between them, as a
// disk does not.
//
// One cluster connection per open image, as qemu does: fencing blocklists a client instance (its address
// and nonce), so two images sharing one connection would be fenced together.
//
// Writers and fencing: a writable open takes the image's exclusive lock with rbd_lock_acquire in
// exclusive mode, which also turns off librbd's cooperative hand-over, so a second writer anywhere is
// refused (its lock request is answered with "busy") instead of being handed the lock. A holder that
// died keeps the lock until someone breaks it (`breakLock`, an explicit command): librbd then blocklists
// the holder's client instance in the OSD map before removing its lock, so a holder that was merely
// paused and wakes up gets its next request refused by the OSDs instead of writing over the new owner.
//
// A cluster that stops answering: every request librados sends carries a timeout (rados_osd_op_timeout,
// rados_mon_op_timeout: the caller's reconnect timeout), so a request waits for the cluster to come back
// at most that long and then fails with EIO; librados itself reconnects and resends meanwhile, so a
// cluster back within the timeout costs a pause, not an error. Nothing waits forever.
//
// Growable mode (an image format inside the RBD image, as qcow2 over qemu's rbd driver): writes past the
// end grow the image first (rbd_resize, ahead by up to `growthStep` so that appending clusters does not
// resize for each), reads past it return zeroes, and `size` is the end of what was written (what a file
// would report), not the RBD size; close shrinks the RBD image back to that end.
//
// Everything the cluster returns is untrusted: sizes are bounded, lengths checked before use.

import BlockIO
import CRBD
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How an RBD image is reached.
public struct RBDOptions: Sendable, Hashable {
    /// How long a request waits for a cluster that stopped answering before it fails with EIO (and how
    /// long connecting waits for a monitor, at most `connectTimeout`).
    public var reconnectTimeout: Duration = .seconds(60)
    /// The longest wait for a monitor when connecting.
    public var connectTimeout: Duration = .seconds(20)

    public init(reconnectTimeout: Duration = .seconds(60)) {
        self.reconnectTimeout = reconnectTimeout
    }

    /// Whole seconds, at least one (librados reads zero as "wait forever").
    static func seconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return max(1, seconds + (attoseconds > 0 ? 1 : 0))
    }
}

/// One RBD image (or snapshot of one) as a block device.
public final class RBDDevice: TruncatableDevice, @unchecked Sendable {
    /// The image's name (its `description` never shows a key).
    public let spec: RBDSpec
    public let isReadOnly: Bool
    /// Grows the RBD image ahead of writes by up to this much (growable mode only).
    static let growthStep: UInt64 = 64 << 20
    /// The largest image accepted from the cluster (the largest offset a `BlockDevice` can address safely).
    static let maxSize: UInt64 = 1 << 62

    private let cluster: rados_t
    private let ioctx: rados_ioctx_t
    private let image: rbd_image_t

    private struct Sizes {
        /// The RBD image's size.
        var physical: UInt64
        /// What the device reports: `physical` unless growable (then the end of written data).
        var logical: UInt64
        var growable = false
        var closed = false
    }
    private let state: Mutex<Sizes>

    private init(
        spec: RBDSpec,
        readOnly: Bool,
        cluster: rados_t,
        ioctx: rados_ioctx_t,
        image: rbd_image_t,
        size: UInt64
    ) {
        self.spec = spec
        self.isReadOnly = readOnly
        self.cluster = cluster
        self.ioctx = ioctx
        self.image = image
        self.state = Mutex(Sizes(physical: size, logical: size))
    }

    // MARK: Opening

    /// Opens an image, or a snapshot of one (read-only).
    ///
    /// A writer takes the image's exclusive lock; a second writer, here or on another host, is refused
    /// with `.locked`. Readers take no lock (a snapshot is the safe thing to share between hosts).
    /// - Throws: `RBDError` naming the conf file, the credentials, the pool, the image or the snapshot.
    public static func open(_ spec: RBDSpec, readOnly: Bool, options: RBDOptions = .init()) throws -> RBDDevice {
        let readOnly = readOnly || spec.snapshot != nil
        let (cluster, ioctx) = try connect(spec, options: options)
        var handle: rbd_image_t? = nil
        let r =
            readOnly
            ? rbd_open_read_only(ioctx, spec.image, &handle, spec.snapshot)
            : rbd_open(ioctx, spec.image, &handle, nil)
        guard r == 0, let image = handle else {
            var failure = openFailure(spec, ioctx: ioctx, errno: -r)
            if r == -ENOENT, spec.snapshot != nil, exists(spec.at(snapshot: nil), ioctx: ioctx) {
                failure = RBDError(
                    .snapshotNotFound,
                    image: spec.description,
                    message: "no snapshot '\(spec.snapshot!)' in image '\(spec.image)'"
                )
            }
            disconnect(cluster, ioctx)
            throw failure
        }
        do {
            var size: UInt64 = 0
            try check(rbd_get_size(image, &size), spec, "cannot read the image's size")
            guard size <= maxSize else {
                throw RBDError(.io, image: spec.description, message: "the cluster reports an impossible size \(size)")
            }
            if !readOnly { try acquireLock(image, spec) }
            return RBDDevice(spec: spec, readOnly: readOnly, cluster: cluster, ioctx: ioctx, image: image, size: size)
        } catch {
            rbd_close(image)
            disconnect(cluster, ioctx)
            throw error
        }
    }

    /// Creates an image of `size` bytes with the cluster's default features (exclusive lock, object map).
    /// - Throws: `RBDError` `.exists` if it exists.
    public static func create(_ spec: RBDSpec, size: UInt64, options: RBDOptions = .init()) throws {
        guard spec.snapshot == nil else {
            throw RBDError(.invalidName, image: spec.description, message: "cannot create a snapshot as an image")
        }
        guard size <= maxSize else {
            throw RBDError(.invalidName, image: spec.description, message: "size \(size) is too large")
        }
        let (cluster, ioctx) = try connect(spec, options: options)
        defer { disconnect(cluster, ioctx) }
        var order: Int32 = 0
        let r = rbd_create(ioctx, spec.image, size, &order)
        if r == -EEXIST {
            throw RBDError(.exists, image: spec.description, message: "the image already exists", cephErrno: EEXIST)
        }
        try check(r, spec, "cannot create the image")
    }

    /// Removes an image (a failed `create` + convert cleans up with it).
    public static func remove(_ spec: RBDSpec, options: RBDOptions = .init()) throws {
        let (cluster, ioctx) = try connect(spec, options: options)
        defer { disconnect(cluster, ioctx) }
        try check(rbd_remove(ioctx, spec.image), spec, "cannot remove the image")
    }

    /// Breaks the exclusive lock of a writer that died, after blocklisting it, and returns the owners it
    /// broke (an empty list: nobody held the lock).
    ///
    /// The holder's client instance is added to the OSD map's blocklist first (librbd waits until the OSDs
    /// have the map), so a holder that was only paused cannot write again when it wakes: its requests fail
    /// and its image reports the fencing. Only run this for a holder known to be dead or hung.
    public static func breakLock(_ spec: RBDSpec, options: RBDOptions = .init()) throws -> [String] {
        let (cluster, ioctx) = try connect(spec, options: options)
        defer { disconnect(cluster, ioctx) }
        var handle: rbd_image_t? = nil
        let r = rbd_open(ioctx, spec.image, &handle, nil)
        guard r == 0, let image = handle else { throw openFailure(spec, ioctx: ioctx, errno: -r) }
        defer { rbd_close(image) }
        let owners = lockOwners(image)
        for owner in owners {
            try check(rbd_lock_break(image, RBD_LOCK_MODE_EXCLUSIVE, owner), spec, "cannot break the lock of \(owner)")
        }
        return owners
    }

    /// Lets writes past the end grow the image, and reports the end of the data as the size (see the
    /// type's notes): for an image format stored inside this RBD image. Called once, before any I/O.
    public func allowGrowth() {
        state.withLock { $0.growable = true }
    }

    // MARK: BlockDevice

    public var size: UInt64 { state.withLock { $0.logical } }

    public var capabilities: BlockDeviceCapabilities {
        var caps: BlockDeviceCapabilities = [.flush, .discard, .writeZeroes, .fastZero, .extents, .multiConnection]
        if isReadOnly { caps.insert(.readOnly) }
        return caps
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let count = UInt64(buffer.count)
        let (physical, growable) = try current(.read)
        if !growable { try checkRange(offset: offset, count: count, operation: .read) }
        // Past the RBD image's end (growable mode only) reads as zeroes.
        let inside = offset >= physical ? 0 : Int(min(count, physical - offset))
        if inside < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        guard inside > 0 else { return }
        let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
        let done = try submit(.read, offset: offset) { rbd_aio_read(image, offset, inside, base, $0) }
        guard done == inside else {
            throw BlockIOError(
                .system,
                operation: .read,
                errno: EIO,
                path: spec.description,
                offset: offset,
                message: "short read from the cluster: \(done) of \(inside) bytes"
            )
        }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try prepareWrite(.write, offset: offset, count: UInt64(buffer.count))
        guard buffer.count > 0 else { return }
        let base = buffer.baseAddress!.assumingMemoryBound(to: CChar.self)
        _ = try submit(.write, offset: offset) { rbd_aio_write(image, offset, buffer.count, base, $0) }
        if fua { try flush() }
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try prepareWrite(.writeZeroes, offset: offset, count: count)
        guard count > 0 else { return }
        // librbd zeroes in the OSDs (truncating or removing whole objects): never slower than writing.
        var done: UInt64 = 0
        while done < count {
            let piece = min(count - done, 1 << 30)
            let at = offset + done
            _ = try submit(.writeZeroes, offset: at) { rbd_aio_write_zeroes(image, at, Int(piece), $0, 0, 0) }
            done += piece
        }
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try prepareWrite(.discard, offset: offset, count: count)
        guard count > 0 else { return }
        _ = try submit(.discard, offset: offset) { rbd_aio_discard(image, offset, count, $0) }
    }

    public func flush() throws {
        _ = try current(.flush)
        if isReadOnly { return }
        _ = try submit(.flush, offset: nil) { rbd_aio_flush(image, $0) }
    }

    /// Allocated and unallocated ranges from librbd's diff (the object map where the image has one, so a
    /// whole 4 MiB object is the unit). A range with no object reads as zeroes (or as the parent image,
    /// which the diff includes).
    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        let (physical, growable) = try current(.extents)
        if !growable { try checkRange(offset: offset, count: count, operation: .extents) }
        guard count > 0 else { return [] }
        let end = offset + count
        let inside = offset >= physical ? 0 : min(count, physical - offset)
        final class Collector {
            var runs: [(UInt64, UInt64)] = []
        }
        let collector = Collector()
        if inside > 0 {
            let r = withExtendedLifetime(collector) {
                rbd_diff_iterate2(
                    image,
                    nil,
                    offset,
                    inside,
                    1,
                    1,
                    { start, length, exists, context in
                        let collector = Unmanaged<Collector>.fromOpaque(context!).takeUnretainedValue()
                        if exists != 0 { collector.runs.append((start, UInt64(length))) }
                        return 0
                    },
                    Unmanaged.passUnretained(collector).toOpaque()
                )
            }
            if r < 0 { return allDataExtent(at: offset, count: count) }  // "all data" is always correct
        }
        var result: [Extent] = []
        var position = offset
        for (start, length) in collector.runs.sorted(by: { $0.0 < $1.0 }) {
            // Whole objects may reach outside the range asked for; clip, and skip what is out of order.
            let (runEnd, overflow) = start.addingReportingOverflow(length)
            let from = max(start, position)
            let to = min(overflow ? end : runEnd, end)
            guard from < to else { continue }
            if from > position {
                result.appendMerging(Extent(offset: position, length: from - position, flags: [.hole, .zero]))
            }
            result.appendMerging(Extent(offset: from, length: to - from, flags: []))
            position = to
        }
        if position < end {
            result.appendMerging(Extent(offset: position, length: end - position, flags: [.hole, .zero]))
        }
        return result
    }

    public func close() throws {
        let (physical, logical, growable) = try state.withLock { s -> (UInt64, UInt64, Bool) in
            if s.closed {
                throw BlockIOError(.closed, operation: .close, path: spec.description, message: "device is closed")
            }
            s.closed = true
            return (s.physical, s.logical, s.growable)
        }
        var failure: (any Error)? = nil
        if !isReadOnly {
            let r = rbd_flush(image)
            if r < 0 { failure = Self.failure(.flush, spec, offset: nil, errno: -r) }
            // Give back what growing ahead reserved (nothing was written there).
            if failure == nil, growable, physical > logical { _ = rbd_resize(image, logical) }
        }
        rbd_close(image)  // releases the exclusive lock
        Self.disconnect(cluster, ioctx)
        if let failure { throw failure }
    }

    /// Resizes the RBD image (`vimg resize` of a raw one, `vimg compact` of an image inside); shrinking
    /// drops the data past the new end.
    public func truncate(to newSize: UInt64) throws {
        try requireWritable(.truncate)
        guard newSize <= Self.maxSize else {
            throw BlockIOError(
                .outOfRange,
                operation: .truncate,
                path: spec.description,
                message: "size \(newSize) is too large"
            )
        }
        try Self.check(rbd_resize(image, newSize), spec, "cannot resize the image")
        state.withLock {
            $0.physical = newSize
            $0.logical = newSize
        }
    }

    // MARK: Snapshots

    /// Creates an RBD snapshot of the image (the writer's view: earlier completed writes are in it).
    public func createSnapshot(named name: String) throws {
        try requireWritable(.write)
        try Self.check(rbd_snap_create(image, name), spec, "cannot create snapshot '\(name)'")
    }

    /// Removes an RBD snapshot.
    public func deleteSnapshot(named name: String) throws {
        try requireWritable(.write)
        try Self.check(rbd_snap_remove(image, name), spec, "cannot remove snapshot '\(name)'")
    }

    /// Rolls the image back to an RBD snapshot (nobody else may have it open meanwhile: we hold the lock).
    public func rollback(toSnapshot name: String) throws {
        try requireWritable(.write)
        try Self.check(rbd_snap_rollback(image, name), spec, "cannot roll back to snapshot '\(name)'")
    }

    /// The image's snapshots: name, size and id, oldest first.
    public func snapshots() throws -> [(id: UInt64, name: String, size: UInt64)] {
        var capacity: Int32 = 16
        while true {
            var infos = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(capacity))
            let r = rbd_snap_list(image, &infos, &capacity)
            if r == -ERANGE, capacity > 0, capacity <= 65536 { continue }  // capacity now holds the count needed
            try Self.check(r, spec, "cannot list snapshots")
            let count = min(Int(r), infos.count)
            let list = infos[0..<count].map { info in
                (id: info.id, name: info.name.map { String(cString: $0) } ?? "", size: info.size)
            }
            rbd_snap_list_end(&infos)
            return list
        }
    }

    // MARK: Internals

    /// The RBD size and mode, or `.closed`.
    private func current(_ operation: BlockIOError.Operation) throws -> (UInt64, Bool) {
        try state.withLock { s in
            if s.closed {
                throw BlockIOError(.closed, operation: operation, path: spec.description, message: "device is closed")
            }
            return (s.physical, s.growable)
        }
    }

    private func requireWritable(_ operation: BlockIOError.Operation) throws {
        if isReadOnly {
            throw BlockIOError(.readOnly, operation: operation, path: spec.description, message: "device is read-only")
        }
    }

    /// Checks a write's range; in growable mode grows the image first when it ends past it.
    private func prepareWrite(_ operation: BlockIOError.Operation, offset: UInt64, count: UInt64) throws {
        try requireWritable(operation)
        let (physical, growable) = try current(operation)
        guard growable else {
            try checkRange(offset: offset, count: count, operation: operation)
            return
        }
        let (end, overflow) = offset.addingReportingOverflow(count)
        guard !overflow, end <= Self.maxSize else {
            throw BlockIOError(
                .outOfRange,
                operation: operation,
                path: spec.description,
                offset: offset,
                message: "range \(offset)+\(count) is too large"
            )
        }
        if end <= physical {
            state.withLock { $0.logical = max($0.logical, end) }
            return
        }
        try state.withLock { s in
            if end > s.physical {
                // Ahead of the write, so appending cluster after cluster resizes once per step.
                let target = min(Self.maxSize, max(end, s.physical + Self.growthStep) / 4096 * 4096 + 4096)
                let r = rbd_resize(image, target)
                if r < 0 { throw Self.failure(operation, spec, offset: offset, errno: -r) }
                s.physical = target
            }
            s.logical = max(s.logical, end)
        }
    }

    /// Submits one asynchronous request and waits for its completion; returns its non-negative result.
    private func submit(
        _ operation: BlockIOError.Operation,
        offset: UInt64?,
        _ start: (rbd_completion_t) -> Int32
    ) throws -> Int {
        var handle: rbd_completion_t? = nil
        guard rbd_aio_create_completion(nil, nil, &handle) == 0, let completion = handle else {
            throw Self.failure(operation, spec, offset: offset, errno: ENOMEM)
        }
        defer { rbd_aio_release(completion) }
        let submitted = start(completion)
        if submitted < 0 { throw Self.failure(operation, spec, offset: offset, errno: -submitted) }
        rbd_aio_wait_for_complete(completion)
        let result = rbd_aio_get_return_value(completion)
        if result < 0 { throw Self.failure(operation, spec, offset: offset, errno: Int32(clamping: -result)) }
        return result
    }

    /// What a failed request means to a block-layer client: EIO, with the reason in words.
    static func failure(
        _ operation: BlockIOError.Operation,
        _ spec: RBDSpec,
        offset: UInt64?,
        errno code: Int32
    ) -> BlockIOError {
        let reason: String
        switch code {
        case ESHUTDOWN:  // EBLOCKLISTED
            reason = "this client was fenced: another client broke its lock and blocklisted it"
        case ETIMEDOUT:
            reason = "the cluster did not answer within the reconnect timeout"
        case EROFS:
            reason = "this client no longer holds the image's exclusive lock"
        default:
            reason = describeErrno(code)
        }
        let clientCode = code == ENOSPC || code == EINVAL ? code : EIO
        return BlockIOError(
            .system,
            operation: operation,
            errno: clientCode,
            path: spec.description,
            offset: offset,
            message: reason
        )
    }

    private static func check(_ r: Int32, _ spec: RBDSpec, _ what: String) throws {
        guard r < 0 else { return }
        let code = -r
        switch code {
        case ESHUTDOWN:
            throw RBDError(
                .fenced,
                image: spec.description,
                message: "\(what): this client was fenced (blocklisted)",
                cephErrno: code
            )
        case ETIMEDOUT:
            throw RBDError(
                .unreachable,
                image: spec.description,
                message: "\(what): the cluster did not answer in time",
                cephErrno: code
            )
        case ENOENT:
            throw RBDError(.imageNotFound, image: spec.description, message: "\(what): not found", cephErrno: code)
        case EEXIST:
            throw RBDError(.exists, image: spec.description, message: "\(what): already exists", cephErrno: code)
        default:
            throw RBDError(.io, image: spec.description, message: "\(what): \(describeErrno(code))", cephErrno: code)
        }
    }

    private static func exists(_ spec: RBDSpec, ioctx: rados_ioctx_t) -> Bool {
        var handle: rbd_image_t? = nil
        guard rbd_open_read_only(ioctx, spec.image, &handle, nil) == 0, let image = handle else { return false }
        rbd_close(image)
        return true
    }

    private static func openFailure(_ spec: RBDSpec, ioctx: rados_ioctx_t, errno code: Int32) -> RBDError {
        switch code {
        case ENOENT:
            let place = spec.pool + (spec.namespace.map { "/" + $0 } ?? "")
            return RBDError(
                .imageNotFound,
                image: spec.description,
                message: "no image '\(spec.image)' in pool '\(place)'",
                cephErrno: code
            )
        case EACCES, EPERM:
            return RBDError(
                .authentication,
                image: spec.description,
                message: "client.\(spec.id ?? "admin") may not open the image (cephx caps)",
                cephErrno: code
            )
        default:
            return RBDError(
                .io,
                image: spec.description,
                message: "cannot open the image: \(describeErrno(code))",
                cephErrno: code
            )
        }
    }

    /// Takes the exclusive lock in exclusive mode, or explains who holds it.
    private static func acquireLock(_ image: rbd_image_t, _ spec: RBDSpec) throws {
        var features: UInt64 = 0
        try check(rbd_get_features(image, &features), spec, "cannot read the image's features")
        let exclusiveLock: UInt64 = 1 << 2  // RBD_FEATURE_EXCLUSIVE_LOCK (features.h)
        guard features & exclusiveLock != 0 else {
            throw RBDError(
                .unsupported,
                image: spec.description,
                message: "the image has no exclusive-lock feature, so two writers could corrupt it; enable it "
                    + "('rbd feature enable \(spec.pool)/\(spec.image) exclusive-lock') or open it read-only"
            )
        }
        let r = rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE)
        guard r < 0 else { return }
        if r == -EROFS || r == -EBUSY || r == -EAGAIN {
            let owners = lockOwners(image)
            let holder = owners.isEmpty ? "another client" : owners.joined(separator: ", ")
            throw RBDError(
                .locked,
                image: spec.description,
                message: "in use by another writer (\(holder) holds its exclusive lock); if that client is dead, "
                    + "break its lock with 'vimg rbd-break-lock \(spec.description)'",
                cephErrno: -r
            )
        }
        try check(r, spec, "cannot take the exclusive lock")
    }

    /// The clients holding the exclusive lock (`client.ID ADDR`-like strings from librbd), at most 64.
    private static func lockOwners(_ image: rbd_image_t) -> [String] {
        var mode = RBD_LOCK_MODE_EXCLUSIVE
        var count = 8
        var names = [UnsafeMutablePointer<CChar>?](repeating: nil, count: count)
        var r = rbd_lock_get_owners(image, &mode, &names, &count)
        if r == -ERANGE, count <= 64 {
            names = [UnsafeMutablePointer<CChar>?](repeating: nil, count: count)
            r = rbd_lock_get_owners(image, &mode, &names, &count)
        }
        guard r >= 0 else { return [] }
        let used = min(count, names.count)
        let owners = names[0..<used].compactMap { $0.map { String(cString: $0) } }
        rbd_lock_get_owners_cleanup(&names, used)
        return owners
    }

    // MARK: Connecting

    private static func connect(_ spec: RBDSpec, options: RBDOptions) throws -> (rados_t, rados_ioctx_t) {
        var handle: rados_t? = nil
        let created = rados_create(&handle, spec.id)
        guard created == 0, let cluster = handle else {
            throw RBDError(
                .configuration,
                image: spec.description,
                message: "cannot create a cluster handle for client.\(spec.id ?? "admin"): \(describeErrno(-created))"
            )
        }
        do {
            if let conf = spec.conf {
                guard access(conf, R_OK) == 0 else {
                    throw RBDError(
                        .configuration,
                        image: spec.description,
                        message: "conf file \(conf): \(describeErrno(errno))"
                    )
                }
                let r = rados_conf_read_file(cluster, conf)
                guard r == 0 else {
                    throw RBDError(
                        .configuration,
                        image: spec.description,
                        message: "conf file \(conf) is not a valid ceph.conf (\(describeErrno(-r)))"
                    )
                }
            } else {
                _ = rados_conf_read_file(cluster, nil)  // $CEPH_CONF, /etc/ceph/ceph.conf; options may name monitors
            }
            let wait = RBDOptions.seconds(options.reconnectTimeout)
            let settings: [(String, String)] =
                [
                    // librados's own messages would break our one-line errors.
                    ("log_to_stderr", "false"), ("err_to_stderr", "false"),
                    ("client_mount_timeout", "\(min(wait, RBDOptions.seconds(options.connectTimeout)))"),
                    ("rados_osd_op_timeout", "\(wait)"), ("rados_mon_op_timeout", "\(wait)"),
                ] + (spec.key.map { [("key", $0)] } ?? []) + spec.options.map { ($0.name, $0.value) }
            for (name, value) in settings {
                let r = rados_conf_set(cluster, name, value)
                guard r == 0 else {
                    throw RBDError(
                        .configuration,
                        image: spec.description,
                        message: r == -ENOENT
                            ? "unknown Ceph option '\(name)'" : "invalid value for Ceph option '\(name)'"
                    )
                }
            }
            let r = rados_connect(cluster)
            if r < 0 {
                let user = "client.\(spec.id ?? "admin")"
                let conf = spec.conf ?? "the default ceph.conf"
                switch -r {
                case EACCES, EPERM:
                    throw RBDError(
                        .authentication,
                        image: spec.description,
                        message: "the cluster refused \(user): wrong key or keyring",
                        cephErrno: -r
                    )
                case ETIMEDOUT:
                    throw RBDError(
                        .unreachable,
                        image: spec.description,
                        message:
                            "no monitor answered within \(min(wait, RBDOptions.seconds(options.connectTimeout))) s (monitors from \(conf))",
                        cephErrno: -r
                    )
                case ENOENT:
                    throw RBDError(
                        .configuration,
                        image: spec.description,
                        message: "no monitors or no keyring for \(user) (from \(conf)); give conf=PATH",
                        cephErrno: -r
                    )
                default:
                    throw RBDError(
                        .unreachable,
                        image: spec.description,
                        message: "cannot connect as \(user): \(describeErrno(-r))",
                        cephErrno: -r
                    )
                }
            }
            var context: rados_ioctx_t? = nil
            let opened = rados_ioctx_create(cluster, spec.pool, &context)
            guard opened == 0, let ioctx = context else {
                throw RBDError(
                    opened == -ENOENT ? .poolNotFound : .io,
                    image: spec.description,
                    message: opened == -ENOENT
                        ? "no pool '\(spec.pool)' in the cluster"
                        : "cannot open pool '\(spec.pool)': \(describeErrno(-opened))",
                    cephErrno: -opened
                )
            }
            if let namespace = spec.namespace { rados_ioctx_set_namespace(ioctx, namespace) }
            return (cluster, ioctx)
        } catch {
            rados_shutdown(cluster)
            throw error
        }
    }

    private static func disconnect(_ cluster: rados_t, _ ioctx: rados_ioctx_t) {
        rados_ioctx_destroy(ioctx)
        rados_shutdown(cluster)
    }
}
