// Design notes
// ------------
// `Metadata` is everything about an open image that changes: the header, the active L1 table, the L2 and
// refcount caches, the allocator's position, frees waiting for their unlink to become durable, clusters
// being allocated, the snapshot table. It lives in a `Guarded` owned by the `VImage`, so it is only ever
// touched with the engine lock held; every method here assumes that lock.
//
// Requests use it to *plan* (look up where data lives, allocate) and to *commit* (point L2 entries at new
// clusters); the data I/O in between happens outside the lock (VImage+IO.swift). Metadata reaches disk in
// `writeBack()` (Metadata+WriteBack.swift), which enforces the format's write order:
//
//   refcount blocks ─sync─► refcount table ─sync─► L2 tables ─sync─► L1 + header ─sync─► apply frees
//
// The files along its seams: L2 tables (Metadata+L2Tables.swift), refcounts and the allocator
// (Metadata+Refcounts.swift), write-back (Metadata+WriteBack.swift).

import BlockIO
import Synchronization

/// A reference dropped from the metadata, to be counted down once the drop is durable and every
/// request planned before it has completed (IOGate.swift).
struct PendingFree: Sendable {
    var cluster: HostCluster
    /// The gate epoch in which the reference was dropped.
    var epoch: UInt64
}

/// The virtual size, readable without the engine lock (every request checks its range against it).
final class SharedSize: Sendable {
    let value: Atomic<UInt64>
    init(_ size: UInt64) { value = Atomic(size) }
}

/// The mutable state of an open image, reachable only through the engine lock (see the design notes).
struct Metadata {
    // MARK: Context (fixed while the image is open)

    let host: any BlockDevice
    let path: String?
    let geometry: ClusterGeometry
    let format: any OnDiskFormat
    let entries: EntryCodec
    let refcountWidth: RefcountWidth
    let refcountsPerBlock: Int
    let isReadOnly: Bool
    /// Whether unallocated clusters read from a backing image.
    let hasBacking: Bool
    /// Dirty on disk at open and not repaired: a clean close must not hide the leaks `check` should see.
    let leftDirty: Bool
    let gate: IOGate
    let sharedSize: SharedSize
    /// The checksummed device under the engine, when the image has checksums (ChecksummedHost.swift).
    let checked: ChecksummedHost?

    // MARK: State

    var header: ImageHeader {
        didSet { sharedSize.value.store(header.virtualSize, ordering: .relaxed) }
    }
    /// The active L1 table, decoded.
    var l1: [UInt64]
    /// 512-byte sectors of the L1 table with changes not yet on disk.
    var dirtyL1Sectors: Set<Int> = []
    var l2Cache: TableCache<UInt64>
    /// The refcount table, decoded (it is small: 8 bytes per refcount block).
    var refcountTable: [UInt64]
    var dirtyRefcountTableSectors: Set<Int> = []
    var refcountCache: TableCache<UInt64>
    /// Host clusters whose reference was dropped; decremented after a flush makes that durable.
    var pendingFrees: [PendingFree] = []
    /// L2 tables whose reference was dropped (after a copy); released after a flush, together with the
    /// clusters they map if that was their last reference.
    var pendingTableFrees: [PendingFree] = []
    /// Frees the last write-back had to keep (requests planned before them still in flight).
    var freesKeptAtLastWriteBack = 0
    /// Guest clusters being allocated by a request in progress.
    var inflight: Set<GuestCluster> = []
    /// First host cluster never handed out: allocation at the end of the file starts here.
    var hostEnd: HostCluster
    /// Lowest host cluster that may be free.
    var freeHint = HostCluster(0)
    /// Whether the header on disk has the dirty bit set (so metadata may be written).
    var dirtyBitOnDisk: Bool
    /// Whether fixed header fields changed in memory and must be written at the next flush.
    var headerChanged = false
    var isClosed = false
    /// An operation is waiting for (or running after) a drain of the I/O gate: no new request is planned.
    var isDraining = false
    /// The I/O gate's epoch (IOGate.swift).
    var gateEpoch: UInt64 = 0
    /// The completed-changes count a finished flush made durable (VImage.flush's group commit).
    var durableChanges: UInt64 = 0
    /// Where the next compressed record goes (inside a cluster set aside for compressed data), if any.
    var compressedCursor: HostOffset? = nil
    /// The snapshot table, decoded.
    var snapshots: [SnapshotEntry] = []

    // MARK: Dirty bitmaps (Bitmaps.swift)

    /// Whether this writer keeps bitmaps (false emulates a writer that predates them, for tests).
    let maintainsBitmaps: Bool
    let discardPolicy: VImage.DiscardPolicy
    /// Clusters whose refcount dropped to zero, to punch out of the file before any allocation.
    var punchQueue: [HostCluster] = []
    var bitmaps: [DirtyBitmap] = []
    /// The bitmap directory on disk, when the image has a usable one.
    var bitmapDirectory: BitmapDirectoryPointer? = nil
    /// Why the bitmap directory on disk cannot be used (it is then ignored).
    var bitmapDirectoryProblem: String? = nil
    /// The enabled bitmaps were marked in use on disk in this session.
    var bitmapsMarkedInUse = false
    /// Clusters of removed bitmaps, freed at the next directory switch.
    var replacedBitmapClusters: [HostCluster] = []

    // MARK: Checksums (ChecksummedHost.swift, FORMAT.md "Writing and crashes")

    /// Data clusters allocated since the last write-back began: with checksums, the only ones written in
    /// place (every other cluster's data is durable, so a write to it is a copy on write).
    var freshClusters = Set<HostCluster>()
    /// Set while checksum structures are allocated (ChecksummedHost's store is locked then).
    var allocatingChecksumStructures = false

    init(
        host: any BlockDevice,
        path: String?,
        format: any OnDiskFormat,
        readOnly: Bool,
        header: ImageHeader,
        l1: [UInt64],
        refcountTable: [UInt64],
        hostEnd: HostCluster,
        hasBacking: Bool,
        options: VImage.OpenOptions,
        gate: IOGate,
        sharedSize: SharedSize
    ) {
        self.host = host
        self.path = path
        self.format = format
        self.entries = format.entries
        self.refcountWidth = format.refcounts
        self.geometry = header.geometry
        self.refcountsPerBlock = format.refcounts.entriesPerBlock(clusterSize: header.clusterSize)
        self.isReadOnly = readOnly
        self.hasBacking = hasBacking
        self.maintainsBitmaps = options.maintainsBitmaps
        self.discardPolicy = options.discard
        self.leftDirty = header.incompatibleFeatures.contains(.dirty)
        self.dirtyBitOnDisk = header.incompatibleFeatures.contains(.dirty)
        self.gate = gate
        self.sharedSize = sharedSize
        self.checked = host as? ChecksummedHost
        self.header = header
        self.l1 = l1
        self.refcountTable = refcountTable
        self.hostEnd = hostEnd
        self.l2Cache = TableCache(capacity: options.l2CacheBytes / header.clusterSize)
        // The budget is in bytes on disk; in memory each refcount takes 8 bytes whatever its width.
        self.refcountCache = TableCache(capacity: options.refcountCacheBytes / header.clusterSize)
    }

    func checkOpen() throws {
        if isClosed { throw VImageError(.closed, path: path, message: "image is closed") }
    }

    /// Whether enough frees have queued up since the last write-back to be worth one now (memory stays
    /// bounded by a large discard or commit, without a write-back per request while frees wait for the gate).
    var hasManyPendingFrees: Bool {
        // With checksums a write-back must not run while writes may be in flight (only drained flushes do).
        checked == nil && pendingFrees.count - freesKeptAtLastWriteBack > 65536
    }

    /// Whether a new request may be planned now.
    var acceptsRequests: Bool { !isDraining }

    /// Whether a request that changes guest clusters `range` may be planned now: no drain, and none of
    /// them being allocated by another request (two partial writes to one new cluster must not both
    /// fill it from the old content).
    func acceptsRequest(touching range: ClosedRange<GuestCluster>) -> Bool {
        guard !isDraining else { return false }
        // Walk whichever side is smaller: usually only a few clusters are being allocated.
        return inflight.count < range.count
            ? !inflight.contains { range.contains($0) } : !range.contains { inflight.contains($0) }
    }

    /// Marks the image corrupt on disk (best effort) and returns the error to throw.
    mutating func corruption(_ message: String, offset: UInt64? = nil) -> VImageError {
        if !isReadOnly && !header.incompatibleFeatures.contains(.corrupt) {
            header.incompatibleFeatures.insert(.corrupt)
            try? writeFixedHeader()
            try? host.flush()
        }
        return VImageError(
            .corrupt,
            path: path,
            offset: offset,
            message: "image is corrupt: \(message); run 'vimg check'"
        )
    }

    /// Reads a metadata structure; a block that fails its checksum makes the image corrupt (FORMAT.md,
    /// "Verification": metadata is verified before it is followed).
    mutating func readMetadata(count: Int, at offset: UInt64, _ what: @autoclosure () -> String) throws -> [UInt8] {
        do {
            return try host.read(count: count, at: offset)
        } catch let mismatch as ChecksumMismatch {
            throw corruption(
                "\(what()) at 0x\(String(offset, radix: 16)) fails its checksum (block 0x\(String(mismatch.hostOffset, radix: 16)))",
                offset: mismatch.hostOffset
            )
        }
    }

    /// The autoclear bits this writer keeps when it writes metadata.
    var keptAutoclearBits: UInt64 { maintainsBitmaps ? format.maintainedAutoclearBits : 0 }

    /// Sets the dirty bit durably before the first metadata write of this session (format rule 4), and
    /// clears autoclear bits this build does not maintain.
    mutating func setDirtyBit() throws {
        guard !dirtyBitOnDisk || header.autoclearFeatures & ~keptAutoclearBits != 0 else { return }
        if format.setsDirtyBit { header.incompatibleFeatures.insert(.dirty) }
        header.autoclearFeatures &= keptAutoclearBits
        try writeFixedHeader()
        try host.flush()
        dirtyBitOnDisk = true
    }

    /// Writes the fixed header fields in place: one write inside the first sector.
    func writeFixedHeader() throws {
        try host.write(format.encodeFixedHeader(header), at: 0)
    }
}
