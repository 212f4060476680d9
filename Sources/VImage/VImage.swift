// Design notes
// ------------
// `VImage` is the copy-on-write engine: a synchronous, thread-safe `BlockDevice` over a host device.
//
//   request ──► plan    (engine lock: look up L1/L2, allocate, mark clusters in flight, enter the I/O gate)
//           ──► data I/O (no lock: pread/pwrite on the host, backing reads)
//           ──► commit  (engine lock: point L2 entries at new clusters, queue frees; leave the gate)
//
// Everything that changes lives in one `Metadata` value behind the engine lock (`Guarded`), so it cannot
// be reached without it. Metadata reaches disk only in write-back, in the format's write order
// (Metadata+WriteBack.swift); frees are applied only after the flush that made the reference removal
// durable, and only once every request planned before the removal has completed (IOGate.swift). A crash
// therefore leaks clusters at worst; it never leaves a live reference to a free cluster, and a late
// request never lands in a reused cluster.
//
// Operations that change what a planned request relies on (snapshots, resize, unallocation, backing
// changes, close) run `drained`: no new request is planned and every counted one has completed.
//
// The engine's files, by concern: opening and creating (VImage+Open.swift), guest I/O (VImage+IO.swift),
// the backing chain (BackingChain.swift), metadata state and write-back (Metadata*.swift), snapshots,
// resize/commit/rebase, compression, check and repair.

import BlockIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A VIMG image opened for reading or writing.
public final class VImage: BlockDevice, Sendable {
    /// Options for `create`.
    public struct CreateOptions: Sendable {
        /// log2 of the cluster size, 12...21 (4 KiB to 2 MiB). Default 16 (64 KiB).
        public var clusterBits: Int = 16
        /// Backing file name as stored in the image (relative names resolve against the image's folder).
        public var backingFile: String? = nil
        /// Backing file format ("vimg", "raw", "qcow2"); nil = probe when opening.
        public var backingFormat: String? = nil
        /// End-to-end checksums of every 4 KiB block (`-o checksums=on`).
        public var checksums = false
        /// The image's UUID; nil for a new random one (fixtures pin it, so their bytes are reproducible).
        public var uuid: ImageUUID? = nil
        /// The file format: VIMG, or qcow2 (written and changed by the same engine).
        public var format: FileFormat = .vimg

        /// An on-disk format the engine writes.
        public enum FileFormat: Sendable, Hashable {
            case vimg
            /// qcow2 version 2 or 3, with refcounts of `refcountBits` (1 to 64, a power of two; 16 in
            /// version 2), as `qemu-img create -f qcow2 -o compat=...,refcount_bits=...` makes them.
            case qcow2(version: Int = 3, refcountBits: Int = 16)
        }

        public init(
            clusterBits: Int = 16,
            backingFile: String? = nil,
            backingFormat: String? = nil,
            checksums: Bool = false,
            uuid: ImageUUID? = nil
        ) {
            self.clusterBits = clusterBits
            self.backingFile = backingFile
            self.backingFormat = backingFormat
            self.checksums = checksums
            self.uuid = uuid
        }
    }

    /// Options for `open`.
    public struct OpenOptions: Sendable {
        /// Bytes of L2 tables to keep in memory. The default (128 MiB) maps 1 TiB at 64 KiB clusters.
        public var l2CacheBytes: Int = 128 << 20
        /// Bytes of refcount blocks (as stored on disk) to keep in memory. The default (32 MiB) covers
        /// 1 TiB of host file at 64 KiB clusters.
        public var refcountCacheBytes: Int = 32 << 20

        /// Keep the image's dirty bitmaps up to date (false behaves like a writer that predates bitmaps and
        /// makes them inconsistent: for tests of the format's autoclear rule).
        public var maintainsBitmaps = true
        /// What a discard does with the space it frees.
        public var discard: DiscardPolicy = .punch
        /// Whether the image file (opened by path) is read and written through the host page cache
        /// (`.writeback`) or with direct I/O (`.none`).
        public var cache: FileDevice.CacheMode = .writeback

        public init(
            l2CacheBytes: Int = 128 << 20,
            refcountCacheBytes: Int = 32 << 20,
            maintainsBitmaps: Bool = true,
            discard: DiscardPolicy = .punch
        ) {
            self.l2CacheBytes = l2CacheBytes
            self.refcountCacheBytes = refcountCacheBytes
            self.maintainsBitmaps = maintainsBitmaps
            self.discard = discard
        }
    }

    /// What guest discards (and freed clusters) do with host space.
    public enum DiscardPolicy: String, Sendable, CaseIterable, Codable {
        /// Free discarded clusters and punch every cluster whose refcount drops to zero out of the file
        /// (after the change that freed it is durable); punch discarded parts of owned clusters too, so
        /// space comes back at the file system's block size.
        case punch
        /// Free discarded clusters for reuse, but punch nothing: the file never shrinks (the behaviour of
        /// earlier versions).
        case free
        /// Accept discards and do nothing (qemu's discard=ignore).
        case ignore
    }

    /// The deepest backing chain an image may have.
    public static let maxBackingDepth = 32

    public let path: String?
    public let isReadOnly: Bool
    public let geometry: ClusterGeometry
    let host: any BlockDevice
    let ownsHost: Bool
    /// The mutable state, reachable only with the engine lock held.
    let state: Guarded<Metadata>
    let gate: IOGate
    let sharedSize: SharedSize
    /// Told of every block that fails its checksum (the bus and `vdisk serve` log it).
    let checksumObserver = Mutex<(@Sendable (VImageError) -> Void)?>(nil)
    /// Requests that changed the disk and completed (counted after their I/O and commit), for group commit:
    /// a flush returns at once when a flush that started after the last of them has completed.
    let completedChanges = Atomic<UInt64>(0)
    /// The backing image, for clones.
    let backing: (any BlockDevice)?
    /// `backing` when it is a VIMG image (reads walk such chains without a dynamic cast per level).
    let backingImage: VImage?
    /// Whether `close()` closes the backing device too.
    let ownsBacking: Bool
    /// The on-disk format's encodings (VIMG or qcow2).
    let format: any OnDiskFormat
    /// What discards do with host space (from the open options).
    public let discardPolicy: DiscardPolicy
    /// Whether the image was not closed cleanly before this open (a read-write open then frees the
    /// leaked clusters, as `vimg check -r leaks` would, so a clean close can clear the bit).
    public let wasDirtyAtOpen: Bool

    init(
        path: String?,
        host: any BlockDevice,
        ownsHost: Bool,
        metadata: (IOGate, SharedSize) -> Metadata,
        backing: (any BlockDevice)?,
        ownsBacking: Bool,
        wasDirtyAtOpen: Bool
    ) {
        let gate = IOGate()
        let metadata = metadata(gate, SharedSize(0))
        self.path = path
        self.host = host
        self.ownsHost = ownsHost
        self.isReadOnly = metadata.isReadOnly
        self.discardPolicy = metadata.discardPolicy
        self.geometry = metadata.geometry
        self.format = metadata.format
        self.gate = gate
        self.sharedSize = metadata.sharedSize
        self.sharedSize.value.store(metadata.header.virtualSize, ordering: .relaxed)
        self.state = Guarded(metadata)
        self.backing = backing
        self.backingImage = backing as? VImage
        self.ownsBacking = ownsBacking
        self.wasDirtyAtOpen = wasDirtyAtOpen
    }

    deinit {
        try? close()
    }

    /// The virtual disk size in bytes.
    public var size: UInt64 { sharedSize.value.load(ordering: .relaxed) }

    public var capabilities: BlockDeviceCapabilities {
        var caps: BlockDeviceCapabilities = [.flush, .discard, .writeZeroes, .fastZero, .extents, .multiConnection]
        if isReadOnly { caps.insert(.readOnly) }
        return caps
    }

    /// The image's on-disk format: "vimg" or "qcow2".
    public var formatName: String { format.name }

    /// Refuses a VIMG-only feature on a qcow2 image (its file has no room for VIMG's structures).
    func requireVIMG(_ feature: String) throws {
        guard format is VIMGFormat else {
            throw VImageError(
                .unsupportedFeature,
                path: path,
                message: "\(feature) in a qcow2 image are not supported: convert it to VIMG for that"
            )
        }
    }

    /// Whether the image has end-to-end checksums (docs/FORMAT.md, "End-to-end checksums").
    public var hasChecksums: Bool { host is ChecksummedHost }

    /// Blocks that failed their checksum since the image was opened.
    public var checksumMismatches: UInt64 { (host as? ChecksummedHost)?.mismatches.load(ordering: .relaxed) ?? 0 }

    /// Calls `handler` for every block that fails its checksum (with the guest and host offsets).
    public func onChecksumMismatch(_ handler: @escaping @Sendable (VImageError) -> Void) {
        checksumObserver.withLock { $0 = handler }
    }

    /// A copy of the current header.
    public var currentHeader: ImageHeader { state.withLock { $0.header } }

    /// Operations waiting for (or running after) a drain of the I/O gate (for tests).
    var drainWaiters: Int { state.withLock { $0.isDraining ? 1 : 0 } }

    // MARK: Requests and drains

    /// Plans a request under the engine lock, once no drain holds planning back, and counts it in the
    /// I/O gate (writable images only: nothing changes under a read-only one). The caller passes the
    /// ticket to `leave` when its I/O has completed.
    @inline(__always)
    func plan<P>(
        waitingUntil ready: (borrowing Metadata) -> Bool = { $0.acceptsRequests },
        _ body: (inout Metadata) throws -> P
    ) throws -> (P, IOGate.Ticket?) {
        try state.withLock(waitingUntil: ready) { m in
            try m.checkOpen()
            let plan = try wrapIO(path) { try body(&m) }
            return (plan, isReadOnly ? nil : gate.enter(epoch: m.gateEpoch))
        }
    }

    /// Uncounts a request whose I/O has completed, waking a drain that may wait for it.
    @inline(__always)
    func leave(_ ticket: IOGate.Ticket?) {
        if let ticket, gate.leave(ticket) { state.broadcast() }
    }

    /// Runs `body` under the engine lock with no request in flight, and none planned until it returns:
    /// for operations that change what a planned request relies on (snapshots, resize, unallocation,
    /// backing changes, close).
    func drained<R>(_ body: (inout Metadata) throws -> R) throws -> R {
        let noOtherDrain = { (m: borrowing Metadata) in !m.isDraining }
        try state.withLock(waitingUntil: noOtherDrain) { m in
            try m.checkOpen()
            m.isDraining = true
        }
        gate.drainWaiting.store(true, ordering: .sequentiallyConsistent)
        defer {
            gate.drainWaiting.store(false, ordering: .sequentiallyConsistent)
            state.withLock(broadcast: true) { $0.isDraining = false }
        }
        let nothingInFlight = { [gate] (_: borrowing Metadata) in gate.isEmpty }
        return try state.withLock(waitingUntil: nothingInFlight) { m in
            try m.checkOpen()
            return try wrapIO(path) { try body(&m) }
        }
    }

    // MARK: Flush and close

    public func flush() throws {
        if isReadOnly { return }
        // Group commit: every change completed before this call must be durable. A flush that read the
        // counter at or after that point and has completed already made them so (its sync came after).
        let wanted = completedChanges.load(ordering: .acquiring)
        let body = { (m: inout Metadata) throws in
            if m.durableChanges >= wanted { return }
            let started = self.completedChanges.load(ordering: .acquiring)
            try wrapIO(self.path) { try m.writeBack() }
            m.durableChanges = max(m.durableChanges, started)
        }
        if hasChecksums {
            // Writes in place into fresh clusters must have completed (and their checksums be known) before
            // the tables that point at those clusters become durable.
            try drained(body)
        } else {
            try state.withLock { m in
                try m.checkOpen()
                try body(&m)
            }
        }
    }

    /// Counts a change of the disk as completed (its data written and its metadata committed).
    @inline(__always)
    func changeCompleted() {
        completedChanges.add(1, ordering: .releasing)
    }

    /// Waits for requests in flight, flushes everything, clears the dirty bit and releases the host file.
    /// Safe to call twice.
    public func close() throws {
        var failure: (any Error)?
        let closedNow =
            (try? drained { m -> Bool in
                if !isReadOnly {
                    do {
                        try m.writeBack()
                        // The bits after every write, and in_use cleared: the bitmaps are consistent again.
                        try m.persistBitmaps()
                        // The frees applied by writeBack are in the refcount cache; write them too.
                        try m.writeBackRefcounts()
                        // Every metadata block's checksum durable before the image is called clean.
                        try m.writeBackChecksums()
                        try m.host.flush()
                        if m.dirtyBitOnDisk && !m.leftDirty {
                            m.header.incompatibleFeatures.remove(.dirty)
                            try m.writeFixedHeader()
                            try m.host.flush()
                            m.dirtyBitOnDisk = false
                        }
                    } catch {
                        failure = error
                    }
                }
                m.isClosed = true
                return true
            }) ?? false
        guard closedNow else { return }
        if ownsBacking { try? backing?.close() }
        if ownsHost { try? host.close() }
        if let failure { throw failure }
    }
}

/// The bytes of cluster 0 (or of the whole file, if shorter): the fixed header tells the cluster size.
func readHeaderCluster(_ host: any BlockDevice, fileSize: UInt64) throws -> [UInt8] {
    let first = try host.read(count: Int(min(fileSize, UInt64(ImageHeader.fixedSize))), at: 0)
    guard first.count == ImageHeader.fixedSize else { return first }
    let bits = UInt32(first[12]) << 24 | UInt32(first[13]) << 16 | UInt32(first[14]) << 8 | UInt32(first[15])
    let clusterSize = UInt64(1) << UInt64(min(max(bits, ImageHeader.minClusterBits), ImageHeader.maxClusterBits))
    return try host.read(count: Int(min(fileSize, clusterSize)), at: 0)
}
