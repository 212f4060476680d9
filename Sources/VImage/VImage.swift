// Design notes
// ------------
// `VImage` is the copy-on-write engine: a synchronous, thread-safe `BlockDevice` over a host device.
//
//   request ──► plan (under `monitor`: look up L1/L2, allocate, mark clusters in flight)
//           ──► data I/O (outside the lock: pread/pwrite on the host, backing reads)
//           ──► commit (under `monitor`: point L2 entries at new clusters, queue frees)
//
// Metadata (L1, L2 tables, refcounts) lives in write-back caches and reaches disk only in `writeBack()`,
// which enforces the format's write order:
//
//   refcount blocks ─sync─► refcount table ─sync─► L2 tables ─sync─► L1 + header ─sync─► apply frees
//
// Frees (refcount decrements) are queued and applied only after the flush that made the reference
// removal durable, so a freed cluster is never reused while an on-disk reference to it may remain.
// A crash therefore leaks clusters at worst; it never leaves a live reference to a free cluster.
//
// Concurrency: one `Monitor` guards all metadata. Clusters being allocated are "in flight"; a request that
// touches one waits until its allocation commits, so two partial writes to one new cluster cannot race.
// Writes to clusters already owned (refcount one) go straight to the host with no waiting.

import BlockIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A VIMG image opened for reading or writing.
public final class VImage: BlockDevice, @unchecked Sendable {
    /// Options for `create`.
    public struct CreateOptions: Sendable {
        /// log2 of the cluster size, 12...21 (4 KiB to 2 MiB). Default 16 (64 KiB).
        public var clusterBits: Int = 16
        /// Backing file name as stored in the image (relative names resolve against the image's folder).
        public var backingFile: String? = nil
        /// Backing file format ("vimg", "raw"); nil = probe when opening.
        public var backingFormat: String? = nil

        public init(clusterBits: Int = 16, backingFile: String? = nil, backingFormat: String? = nil) {
            self.clusterBits = clusterBits
            self.backingFile = backingFile
            self.backingFormat = backingFormat
        }
    }

    /// Options for `open`.
    public struct OpenOptions: Sendable {
        /// Bytes of L2 tables to keep in memory. The default (128 MiB) maps 1 TiB at 64 KiB clusters.
        public var l2CacheBytes: Int = 128 << 20
        /// Bytes of refcount blocks to keep in memory. The default (32 MiB) covers 1 TiB of host file at 64 KiB.
        public var refcountCacheBytes: Int = 32 << 20

        public init(l2CacheBytes: Int = 128 << 20, refcountCacheBytes: Int = 32 << 20) {
            self.l2CacheBytes = l2CacheBytes
            self.refcountCacheBytes = refcountCacheBytes
        }
    }

    /// The deepest backing chain an image may have.
    public static let maxBackingDepth = 32

    public let path: String?
    public let isReadOnly: Bool
    public let geometry: ClusterGeometry
    let host: any BlockDevice
    let ownsHost: Bool
    let monitor = Monitor()

    // MARK: State guarded by `monitor`

    var header: ImageHeader {
        didSet { virtualSize.store(header.virtualSize, ordering: .relaxed) }
    }
    /// The virtual size, readable without the lock (every request checks its range against it).
    let virtualSize: Atomic<UInt64>
    /// The active L1 table, decoded.
    var l1: [UInt64]
    /// 512-byte sectors of the L1 table with changes not yet on disk.
    var dirtyL1Sectors: Set<Int> = []
    var l2Cache: TableCache<UInt64>
    /// The refcount table, decoded (it is small: 8 bytes per refcount block).
    var refcountTable: [UInt64]
    var dirtyRefcountTableSectors: Set<Int> = []
    var refcountCache: TableCache<UInt16>
    /// Host clusters whose reference was dropped; decremented after the next flush makes that durable.
    var pendingFrees: [UInt64] = []
    /// L2 tables whose reference was dropped (after a copy); released after the next flush, together
    /// with the clusters they map if that was their last reference.
    var pendingTableFrees: [UInt64] = []
    /// Guest clusters being allocated by a request in progress.
    var inflight: Set<UInt64> = []
    /// First host cluster never handed out: allocation at the end of the file starts here.
    var hostEnd: UInt64
    /// Lowest host cluster that may be free.
    var freeHint: UInt64 = 0
    /// Whether the header on disk has the dirty bit set (so metadata may be written).
    var dirtyBitOnDisk: Bool
    /// Whether fixed header fields changed in memory and must be written at the next flush.
    var headerChanged = false
    var isClosed = false
    /// Where the next compressed record goes (inside a cluster set aside for compressed data), if any.
    var compressedCursor: UInt64? = nil
    /// The snapshot table, decoded.
    var snapshots: [SnapshotEntry] = []

    /// The backing image, for clones.
    let backing: (any BlockDevice)?
    /// `backing` when it is a VIMG image (reads walk such chains without a dynamic cast per level).
    let backingImage: VImage?
    /// The image was not closed cleanly by its last writer (it may have leaked clusters).
    /// Whether the image was not closed cleanly before this open (a read-write open then frees the
    /// leaked clusters, as `vimg check -r leaks` would, so a clean close can clear the bit).
    public internal(set) var wasDirtyAtOpen: Bool
    /// Dirty on disk at open and not repaired: a clean close must not hide the leaks `check` should see.
    let leftDirty: Bool

    /// Operations waiting for requests in flight to complete (for tests; always 0 until the engine has an
    /// I/O gate).
    var drainWaiters: Int { 0 }

    /// The virtual disk size in bytes.
    public var size: UInt64 { virtualSize.load(ordering: .relaxed) }

    public var capabilities: BlockDeviceCapabilities {
        var caps: BlockDeviceCapabilities = [.flush, .discard, .writeZeroes, .fastZero, .extents, .multiConnection]
        if isReadOnly { caps.insert(.readOnly) }
        return caps
    }

    /// A copy of the current header.
    public var currentHeader: ImageHeader { monitor.withLock { header } }

    private init(
        path: String?,
        host: any BlockDevice,
        ownsHost: Bool,
        readOnly: Bool,
        header: ImageHeader,
        l1: [UInt64],
        refcountTable: [UInt64],
        hostEnd: UInt64,
        backing: (any BlockDevice)?,
        options: OpenOptions
    ) {
        self.path = path
        self.host = host
        self.ownsHost = ownsHost
        self.isReadOnly = readOnly
        self.header = header
        self.virtualSize = Atomic(header.virtualSize)
        self.geometry = header.geometry
        self.l1 = l1
        self.refcountTable = refcountTable
        self.hostEnd = hostEnd
        self.backing = backing
        self.backingImage = backing as? VImage
        self.wasDirtyAtOpen = header.incompatibleFeatures.contains(.dirty)
        self.leftDirty = header.incompatibleFeatures.contains(.dirty)
        self.dirtyBitOnDisk = header.incompatibleFeatures.contains(.dirty)
        self.l2Cache = TableCache(capacity: options.l2CacheBytes / header.clusterSize)
        self.refcountCache = TableCache(capacity: options.refcountCacheBytes / header.clusterSize)
    }

    deinit {
        if !isClosed { try? close() }
    }

    // MARK: Create

    /// Writes a new, empty image to `host` (which must be empty and growable).
    /// - Parameters:
    ///   - host: the storage for the image file.
    ///   - virtualSize: the guest size in bytes; rounded up to a multiple of 512.
    ///   - options: cluster size and backing file.
    /// - Throws: `VImageError.invalidArgument` for sizes outside the format's limits.
    public static func create(on host: any BlockDevice, virtualSize: UInt64, options: CreateOptions = .init()) throws {
        guard options.clusterBits >= Int(ImageHeader.minClusterBits),
            options.clusterBits <= Int(ImageHeader.maxClusterBits)
        else {
            throw VImageError(.invalidArgument, message: "cluster size must be a power of two from 4 KiB to 2 MiB")
        }
        let geometry = ClusterGeometry(clusterBits: options.clusterBits)
        let (rounded, overflow) = virtualSize.addingReportingOverflow(511)
        guard !overflow, rounded & ~511 <= ImageHeader.maxVirtualSize else {
            throw VImageError(
                .invalidArgument,
                message: "virtual size \(virtualSize) exceeds the format's limit of 64 PiB"
            )
        }
        let size = rounded & ~511
        let l1Entries = geometry.l1Entries(forVirtualSize: size)
        guard l1Entries <= UInt64(ImageHeader.maxL1Entries) else {
            throw VImageError(
                .invalidArgument,
                message:
                    "virtual size \(ByteSize.format(size)) needs a larger cluster size (L1 limit at \(ByteSize.format(UInt64(geometry.clusterSize))) clusters)"
            )
        }
        let cs = UInt64(geometry.clusterSize)
        let l1Clusters = max(1, geometry.clusters(covering: l1Entries * 8))
        // Refcount blocks and table clusters needed to describe the initial clusters (a fixed point).
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        while true {
            let total = 1 + tableClusters + blocks + l1Clusters
            let needBlocks = (total + UInt64(geometry.refcountBlockEntries) - 1) / UInt64(geometry.refcountBlockEntries)
            let needTable = geometry.clusters(covering: needBlocks * 8)
            if needBlocks == blocks && needTable == tableClusters { break }
            blocks = needBlocks
            tableClusters = needTable
        }
        let tableStart: UInt64 = 1
        let blocksStart = tableStart + tableClusters
        let l1Start = blocksStart + blocks
        let total = l1Start + l1Clusters

        var header = ImageHeader(
            clusterBits: UInt32(options.clusterBits),
            virtualSize: size,
            l1TableOffset: HostOffset(l1Start * cs),
            l1Size: UInt32(l1Entries),
            refcountTableOffset: HostOffset(tableStart * cs),
            refcountTableClusters: UInt32(tableClusters)
        )
        if let backingFile = options.backingFile {
            guard !backingFile.isEmpty, backingFile.utf8.count <= ImageHeader.maxBackingNameLength else {
                throw VImageError(.invalidArgument, message: "backing file name must be 1 to 4095 bytes")
            }
            header.backingFileName = backingFile
            header.backingFileFormat = options.backingFormat
        }
        var headerBytes = header.encode()
        guard headerBytes.count <= geometry.clusterSize else {
            throw VImageError(.invalidArgument, message: "header and extensions do not fit in one cluster")
        }
        headerBytes += [UInt8](repeating: 0, count: geometry.clusterSize - headerBytes.count)

        var table = [UInt64](repeating: 0, count: Int(tableClusters) * geometry.l2Entries)
        for b in 0..<blocks { table[Int(b)] = (blocksStart + b) * cs }
        var refcounts = [UInt16](repeating: 0, count: Int(blocks) * geometry.refcountBlockEntries)
        for c in 0..<Int(total) { refcounts[c] = 1 }

        try wrapIO(nil) {
            try host.write(headerBytes, at: 0)
            try host.write(encodeTable(table[...]), at: tableStart * cs)
            try host.write(encodeTable(refcounts[...]), at: blocksStart * cs)
            try host.write([UInt8](repeating: 0, count: Int(l1Clusters * cs)), at: l1Start * cs)
            try host.flush()
        }
    }

    /// Creates an image file at `path` (which must not exist). On failure the file is removed.
    public static func create(path: String, virtualSize: UInt64, options: CreateOptions = .init()) throws {
        let file = try wrapIO(path) {
            try FileDevice.open(path: path, readOnly: false, create: true, growable: true, lock: .exclusive)
        }
        do {
            try create(on: file, virtualSize: virtualSize, options: options)
            try file.close()
        } catch {
            try? file.close()
            unlink(path)
            if var error = error as? VImageError {
                error.path = path
                throw error
            }
            throw error
        }
    }

    // MARK: Open

    /// Opens an image stored on `host`.
    /// - Parameters:
    ///   - host: the image file's storage (growable for writing).
    ///   - path: the file's path, for messages and for resolving a relative backing file name.
    ///   - readOnly: refuse writes; nothing is ever written to `host`.
    ///   - backing: an already-open backing device; nil opens the one the header names (if any) read-only.
    /// - Throws: `VImageError` for invalid or unsupported images.
    public static func open(
        host: any BlockDevice,
        path: String? = nil,
        readOnly: Bool,
        backing: (any BlockDevice)? = nil,
        options: OpenOptions = .init()
    ) throws -> VImage {
        try open(
            host: host,
            ownsHost: false,
            path: path,
            readOnly: readOnly,
            backing: backing,
            resolveBacking: backing == nil,
            options: options
        )
    }

    /// Opens the image file at `path`, taking an exclusive lock for writing or a shared one for reading.
    /// - Parameter snapshot: expose this internal snapshot (read-only) instead of the active state.
    public static func open(
        path: String,
        readOnly: Bool,
        snapshot: String? = nil,
        options: OpenOptions = .init()
    ) throws -> VImage {
        try open(
            path: path,
            readOnly: readOnly,
            backing: nil,
            resolveBacking: true,
            options: options,
            snapshot: snapshot
        )
    }

    static func open(
        path: String,
        readOnly: Bool,
        backing: (any BlockDevice)?,
        resolveBacking: Bool,
        options: OpenOptions,
        snapshot: String? = nil,
        lock: FileDevice.LockMode? = nil
    ) throws -> VImage {
        let file = try wrapIO(path) {
            try FileDevice.open(
                path: path,
                readOnly: readOnly,
                growable: true,
                lock: lock ?? (readOnly ? .shared : .exclusive)
            )
        }
        do {
            let image = try open(
                host: file,
                ownsHost: true,
                path: path,
                readOnly: readOnly,
                backing: backing,
                resolveBacking: resolveBacking,
                options: options
            )
            if let snapshot {
                do {
                    try image.selectSnapshot(named: snapshot)
                } catch {
                    try? image.close()
                    throw error
                }
            }
            return image
        } catch {
            try? file.close()
            throw error
        }
    }

    static func open(
        host: any BlockDevice,
        ownsHost: Bool,
        path: String?,
        readOnly: Bool,
        backing: (any BlockDevice)?,
        resolveBacking: Bool,
        options: OpenOptions,
        repairedDirty: Bool = false
    ) throws -> VImage {
        let fileSize = host.size
        let (header, l1, refcountTable) = try wrapIO(path) { () throws -> (ImageHeader, [UInt64], [UInt64]) in
            var header: ImageHeader
            do {
                header = try ImageHeader.decode(try readHeaderCluster(host, fileSize: fileSize))
                try header.validate(fileSize: fileSize)
            } catch var error as VImageError {
                error.path = path
                throw error
            }
            let l1Bytes = try host.read(count: Int(header.l1Size) * 8, at: header.l1TableOffset.rawValue)
            let l1 = l1Bytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            let rtBytes = try host.read(
                count: Int(header.refcountTableClusters) * header.clusterSize,
                at: header.refcountTableOffset.rawValue
            )
            let rt = rtBytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            return (header, l1, rt)
        }
        if !readOnly && header.incompatibleFeatures.contains(.corrupt) {
            throw VImageError(
                .corrupt,
                path: path,
                message: "image is marked corrupt; open it read-only, or repair it with 'vimg check -r all'"
            )
        }
        if !readOnly && !repairedDirty && header.incompatibleFeatures.contains(.dirty) {
            // Not closed cleanly: refcounts may be too high. Free the leaks now (refcounts are only ever
            // lowered to what the metadata references), then open the repaired image; if the check finds
            // a corruption the image is opened anyway and stays dirty, as `vimg check` will report.
            let result = try wrapIO(path) { try ImageCheck.repair(host: host, mode: .leaks) }
            if result.after.corruptions == 0 && result.after.checkErrors == 0 {
                let image = try open(
                    host: host,
                    ownsHost: ownsHost,
                    path: path,
                    readOnly: readOnly,
                    backing: backing,
                    resolveBacking: resolveBacking,
                    options: options,
                    repairedDirty: true
                )
                image.wasDirtyAtOpen = true
                return image
            }
        }
        var backingDevice = backing
        var ownedBacking = false
        if backingDevice == nil, resolveBacking, let name = header.backingFileName {
            backingDevice = try openBackingChain(
                name: name,
                format: header.backingFileFormat,
                childPath: path,
                options: options
            )
            ownedBacking = true
        }
        let geometry = header.geometry
        let fileClusters = geometry.clusters(covering: fileSize)
        let image = VImage(
            path: path,
            host: host,
            ownsHost: ownsHost,
            readOnly: readOnly,
            header: header,
            l1: l1,
            refcountTable: refcountTable,
            hostEnd: fileClusters,
            backing: backingDevice,
            options: options
        )
        image.ownsBacking = ownedBacking
        if header.snapshotCount > 0 {
            image.snapshots = try wrapIO(path) {
                let bytes = try host.read(count: Int(header.snapshotTableSize), at: header.snapshotTableOffset.rawValue)
                do {
                    return try SnapshotTable.decode(
                        bytes,
                        count: Int(header.snapshotCount),
                        geometry: header.geometry,
                        fileSize: fileSize
                    )
                } catch var error as VImageError {
                    error.path = path
                    throw error
                }
            }
        }
        // Clusters past the end of the file may already be counted (allocated, not yet written when the
        // last writer crashed): allocation at the end must start after the last counted cluster.
        try image.monitor.withLock {
            let firstBlock = Int(fileClusters / UInt64(geometry.refcountBlockEntries))
            var end = fileClusters
            if firstBlock < refcountTable.count {
                for index in firstBlock..<refcountTable.count where refcountTable[index] & hostOffsetMask != 0 {
                    let block = try image.refcountBlock(tableIndex: index)
                    if let last = block.entries.lastIndex(where: { $0 != 0 }) {
                        end = max(end, UInt64(index) * UInt64(geometry.refcountBlockEntries) + UInt64(last) + 1)
                    }
                }
            }
            image.hostEnd = end
        }
        return image
    }

    /// Whether `close()` closes the backing device too.
    var ownsBacking = false

    /// Why a backing chain cannot be opened; `error` is what `open` throws.
    struct BackingChainFailure: Error {
        enum Kind: String {
            case missing = "backing-missing"
            case loop = "backing-loop"
        }
        var kind: Kind
        var error: VImageError
        init(_ kind: Kind, _ error: VImageError) {
            self.kind = kind
            self.error = error
        }
    }

    /// The levels of the backing chain below an image, top-down, found by reading only headers.
    /// - Throws: `BackingChainFailure` for a missing file or a loop; `VImageError` for anything else
    ///   (excess depth, an unknown format, an unreadable header).
    static func backingChainLevels(
        name: String,
        format: String?,
        childPath: String?
    ) throws -> [(path: String, format: DiskImage.Format)] {
        var levels: [(path: String, format: DiskImage.Format)] = []
        var seen: Set<String> = [childPath.flatMap(realPath) ?? childPath ?? ""]
        var next: (name: String, format: String?, child: String?)? = (name, format, childPath)
        while let (name, format, child) = next {
            var resolved = name
            if !name.hasPrefix("/"), let child, let slash = child.lastIndex(of: "/") {
                resolved = String(child[...slash]) + name
            }
            guard access(resolved, F_OK) == 0 else {
                throw BackingChainFailure(
                    .missing,
                    VImageError(
                        .notFound,
                        path: child,
                        message: "backing file '\(name)' not found (looked for \(resolved))"
                    )
                )
            }
            let canonical = realPath(resolved) ?? resolved
            guard seen.insert(canonical).inserted else {
                throw BackingChainFailure(
                    .loop,
                    VImageError(.invalidImage, path: child, message: "backing chain loops back to \(canonical)")
                )
            }
            guard levels.count < maxBackingDepth else {
                throw VImageError(
                    .limitExceeded,
                    path: childPath,
                    message: "backing chain is deeper than \(maxBackingDepth) images"
                )
            }
            let kind =
                try format.map { text -> DiskImage.Format in
                    guard let f = DiskImage.Format(rawValue: text) else {
                        throw VImageError(.invalidImage, path: child, message: "unknown backing format '\(text)'")
                    }
                    return f
                } ?? DiskImage.probe(path: resolved)
            levels.append((resolved, kind))
            next = nil
            if kind == .vimg {
                let header = try wrapIO(resolved) { () -> ImageHeader in
                    let file = try FileDevice.open(path: resolved, readOnly: true)
                    defer { try? file.close() }
                    var header = try ImageHeader.decode(try readHeaderCluster(file, fileSize: file.size))
                    header.extensions = header.extensions.filter { $0.type <= HeaderExtension.backingFileFormat }
                    return header
                }
                if let name = header.backingFileName { next = (name, header.backingFileFormat, resolved) }
            }
        }
        return levels
    }

    /// Opens a backing chain without recursion (a crafted chain cannot deepen the stack): walk the
    /// headers top-down to find every level, checking for missing files, loops and excess depth, then
    /// open the levels bottom-up, each over the one below.
    private static func openBackingChain(
        name: String,
        format: String?,
        childPath: String?,
        options: OpenOptions
    ) throws -> any BlockDevice {
        let levels: [(path: String, format: DiskImage.Format)]
        do {
            levels = try backingChainLevels(name: name, format: format, childPath: childPath)
        } catch let failure as BackingChainFailure {
            throw failure.error
        }
        var device: (any BlockDevice)? = nil
        do {
            for level in levels.reversed() {
                switch level.format {
                case .vimg:
                    let image = try VImage.open(
                        path: level.path,
                        readOnly: true,
                        backing: device,
                        resolveBacking: false,
                        options: options
                    )
                    image.ownsBacking = true
                    device = image
                case .raw:
                    device = try wrapIO(level.path) {
                        try FileDevice.open(path: level.path, readOnly: true, lock: .shared)
                    }
                case .qcow2:
                    throw VImageError(
                        .unsupportedFeature,
                        path: level.path,
                        message: "qcow2 backing files are not supported yet"
                    )
                }
            }
        } catch {
            try? device?.close()
            throw error
        }
        return device!
    }

    // MARK: Flush and close

    public func flush() throws {
        if isReadOnly { return }
        try monitor.withLock {
            try checkOpen()
            try wrapIO(path) { try writeBack() }
        }
    }

    /// Flushes everything, clears the dirty bit and releases the host file. Safe to call twice.
    public func close() throws {
        let alreadyClosed = monitor.withLock { () -> Bool in
            while !inflight.isEmpty { monitor.wait() }
            defer { isClosed = true }
            return isClosed
        }
        if alreadyClosed { return }
        var failure: (any Error)?
        if !isReadOnly {
            do {
                try monitor.withLock {
                    try wrapIO(path) {
                        try writeBack()
                        // The frees applied by writeBack are in the refcount cache; write them too.
                        try writeBackRefcounts()
                        if dirtyBitOnDisk && !leftDirty {
                            header.incompatibleFeatures.remove(.dirty)
                            try host.write(header.encodeFixed(), at: 0)
                            try host.flush()
                            dirtyBitOnDisk = false
                        }
                    }
                }
            } catch {
                failure = error
            }
        }
        if ownsBacking { try? backing?.close() }
        if ownsHost { try? host.close() }
        if let failure { throw failure }
    }

    func checkOpen() throws {
        if isClosed { throw VImageError(.closed, path: path, message: "image is closed") }
    }

    /// Writes all dirty metadata in the order the format requires, syncs, then applies queued frees.
    /// Called with the lock held.
    func writeBack() throws {
        let metadataDirty =
            !dirtyL1Sectors.isEmpty || !pendingTableFrees.isEmpty || headerChanged || l2Cache.hasDirty
            || refcountCache.hasDirty
            || !dirtyRefcountTableSectors.isEmpty
        if metadataDirty { try setDirtyBit() }
        try writeBackRefcounts()
        let dirtyL2 = l2Cache.dirtyTables()
        if !dirtyL2.isEmpty {
            // Guest data first: an L2 entry must never reach disk ahead of the data it maps.
            try host.flush()
            for table in dirtyL2 { try writeTable(table) }
            try host.flush()  // L2 tables durable before L1 entries point at them
        }
        for sector in dirtyL1Sectors.sorted() {
            let first = sector * 64
            let last = min(l1.count, first + 64)
            try host.write(encodeTable(l1[first..<last]), at: header.l1TableOffset.rawValue + UInt64(sector * 512))
        }
        dirtyL1Sectors.removeAll()
        if headerChanged {
            try host.write(header.encodeFixed(), at: 0)
            headerChanged = false
        }
        try host.flush()  // guest data and everything above durable: the flush's promise
        // The dropped references are durable now, so their clusters may be counted down and reused.
        for cluster in pendingFrees { try decrementRefcount(cluster) }
        pendingFrees.removeAll()
        // A cluster of compressed records may just have been freed: never append to it again.
        compressedCursor = nil
        for table in pendingTableFrees { try releaseL2Table(table) }
        pendingTableFrees.removeAll()
    }

    /// Refcount blocks, then the refcount table, each made durable: both must be on disk before any L2
    /// entry that relies on them.
    /// - Parameter sync: false when the caller syncs itself before pointing at anything new (saves one
    ///   flush); a new block is still made durable before the refcount table points at it.
    func writeBackRefcounts(sync: Bool = true) throws {
        let dirtyBlocks = refcountCache.dirtyTables()
        if dirtyBlocks.isEmpty && dirtyRefcountTableSectors.isEmpty { return }
        try setDirtyBit()
        for block in dirtyBlocks { try writeTable(block) }
        if !dirtyRefcountTableSectors.isEmpty {
            if !dirtyBlocks.isEmpty { try host.flush() }
            for sector in dirtyRefcountTableSectors.sorted() {
                let first = sector * 64
                try host.write(
                    encodeTable(refcountTable[first..<first + 64]),
                    at: header.refcountTableOffset.rawValue + UInt64(sector * 512)
                )
            }
            dirtyRefcountTableSectors.removeAll()
        }
        if sync { try host.flush() }
    }

    func writeTable<E>(_ table: CachedTable<E>) throws {
        try host.write(encodeTable(table.entries[...]), at: table.offset)
        table.isDirty = false
    }

    /// Sets the dirty bit durably before the first metadata write of this session (format rule 4), and
    /// clears autoclear bits this build does not maintain.
    func setDirtyBit() throws {
        guard !dirtyBitOnDisk || header.autoclearFeatures != 0 else { return }
        header.incompatibleFeatures.insert(.dirty)
        header.autoclearFeatures = 0
        try host.write(header.encodeFixed(), at: 0)
        try host.flush()
        dirtyBitOnDisk = true
    }

    /// Marks the image corrupt on disk (best effort) and returns the error to throw.
    func corruption(_ message: String, offset: UInt64? = nil) -> VImageError {
        if !isReadOnly && !header.incompatibleFeatures.contains(.corrupt) {
            header.incompatibleFeatures.insert(.corrupt)
            try? host.write(header.encodeFixed(), at: 0)
            try? host.flush()
        }
        return VImageError(
            .corrupt,
            path: path,
            offset: offset,
            message: "image is corrupt: \(message); run 'vimg check'"
        )
    }

    // MARK: L2 tables

    /// The L2 table at `offset`, loaded through the cache. Lock held.
    func l2Table(at offset: UInt64) throws -> CachedTable<UInt64> {
        if let table = l2Cache.lookup(offset) { return table }
        guard geometry.isAligned(offset), offset + UInt64(geometry.clusterSize) <= host.size else {
            throw corruption(
                "L2 table offset 0x\(String(offset, radix: 16)) is misaligned or outside the file",
                offset: offset
            )
        }
        let bytes = try host.read(count: geometry.clusterSize, at: offset)
        let table = CachedTable(offset: offset, entries: bytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) })
        try makeRoomInL2Cache()
        l2Cache.insert(table)
        return table
    }

    func makeRoomInL2Cache() throws {
        while l2Cache.isFull, let victim = l2Cache.leastRecentlyUsed() {
            if victim.isDirty {
                // The table may point at clusters counted only in the cache, or at data not yet durable.
                try writeBackRefcounts()
                try setDirtyBit()
                try host.flush()
                try writeTable(victim)
            }
            l2Cache.remove(victim.offset)
        }
    }

    /// The L2 entry of a guest cluster (`.unallocated` when its range has no L2 table). Lock held.
    ///
    /// In a table shared with a snapshot (its L1 entry lacks COPIED) no cluster is owned, whatever the
    /// entry's own COPIED bit says, so the entry is returned without it.
    func l2Entry(guestCluster: UInt64) throws -> L2Entry {
        let l1Index = geometry.l1Index(guestCluster: guestCluster)
        guard l1Index < l1.count else { return .unallocated }
        let l1Entry = L1Entry(rawValue: l1[l1Index])
        guard let tableOffset = l1Entry.l2Table else { return .unallocated }
        let table = try l2Table(at: tableOffset.rawValue)
        let raw = table.entries[geometry.l2Index(guestCluster: guestCluster)]
        return L2Entry(raw: l1Entry.isCopied ? raw : raw & ~copiedFlag)
    }

    /// The writable L2 table for a guest cluster, allocating or copying it as needed. Lock held.
    func writableL2Table(guestCluster: UInt64) throws -> CachedTable<UInt64> {
        let l1Index = geometry.l1Index(guestCluster: guestCluster)
        guard l1Index < l1.count else {
            throw VImageError(.outOfRange, path: path, message: "cluster beyond the L1 table")
        }
        let entry = L1Entry(rawValue: l1[l1Index])
        if let offset = entry.l2Table {
            if entry.isCopied { return try l2Table(at: offset.rawValue) }
            // Shared with a snapshot: copy the table, then every cluster it maps gains a reference.
            let old = try l2Table(at: offset.rawValue)
            let entries = old.entries
            let newCluster = try allocateCluster()
            for raw in entries {
                let e = L2Entry(raw: raw)
                if let host = e.hostCluster { try incrementRefcount(geometry.clusterIndex(host.rawValue)) }
                if case .compressed(let d) = e { try incrementRefcounts(of: d) }
            }
            // The copies are shared now: nothing in them is "copied" (refcount one) any more.
            let table = CachedTable(
                offset: geometry.offset(ofCluster: newCluster),
                entries: entries.map { $0 & ~copiedFlag }
            )
            table.isDirty = true
            try makeRoomInL2Cache()
            l2Cache.insert(table)
            setL1(l1Index, L1Entry(l2Table: HostOffset(table.offset), copied: true))
            pendingTableFrees.append(offset.rawValue)
            return table
        }
        let newCluster = try allocateCluster()
        let table = CachedTable(
            offset: geometry.offset(ofCluster: newCluster),
            entries: [UInt64](repeating: 0, count: geometry.l2Entries)
        )
        table.isDirty = true
        try makeRoomInL2Cache()
        l2Cache.insert(table)
        setL1(l1Index, L1Entry(l2Table: HostOffset(table.offset), copied: true))
        return table
    }

    func setL1(_ index: Int, _ entry: L1Entry) {
        l1[index] = entry.rawValue
        dirtyL1Sectors.insert(index / 64)
    }

    // MARK: Refcounts

    func refcountBlock(tableIndex: Int) throws -> CachedTable<UInt16> {
        let raw = refcountTable[tableIndex]
        let offset = raw & hostOffsetMask
        if let block = refcountCache.lookup(offset) { return block }
        guard raw & ~hostOffsetMask == 0, offset != 0, offset + UInt64(geometry.clusterSize) <= host.size else {
            throw corruption("refcount block offset 0x\(String(raw, radix: 16)) is invalid", offset: offset)
        }
        let bytes = try host.read(count: geometry.clusterSize, at: offset)
        let block = CachedTable(offset: offset, entries: bytes.withUnsafeBytes { decodeTable($0, as: UInt16.self) })
        try makeRoomInRefcountCache()
        refcountCache.insert(block)
        return block
    }

    func makeRoomInRefcountCache() throws {
        while refcountCache.isFull, let victim = refcountCache.leastRecentlyUsed() {
            // Any refcount state may reach disk early: increments are always safe, and decrements are
            // applied only once the dropped reference is durable.
            if victim.isDirty {
                try setDirtyBit()
                try writeTable(victim)
            }
            refcountCache.remove(victim.offset)
        }
    }

    /// The block and index holding `cluster`'s refcount, or nil if no block covers it (refcount 0).
    func refcountSlot(_ cluster: UInt64) throws -> (CachedTable<UInt16>, Int)? {
        let perBlock = UInt64(geometry.refcountBlockEntries)
        let tableIndex = cluster / perBlock
        guard tableIndex < UInt64(refcountTable.count), refcountTable[Int(tableIndex)] & hostOffsetMask != 0 else {
            return nil
        }
        return (try refcountBlock(tableIndex: Int(tableIndex)), Int(cluster % perBlock))
    }

    func refcount(_ cluster: UInt64) throws -> UInt16 {
        guard let (block, index) = try refcountSlot(cluster) else { return 0 }
        return block.entries[index]
    }

    func incrementRefcount(_ cluster: UInt64) throws {
        guard let (block, index) = try refcountSlot(cluster) else {
            throw corruption("cluster \(cluster) has no refcount block", offset: geometry.offset(ofCluster: cluster))
        }
        guard block.entries[index] < UInt16.max else {
            throw VImageError(.limitExceeded, path: path, message: "refcount of cluster \(cluster) would overflow")
        }
        block.entries[index] += 1
        block.isDirty = true
    }

    func decrementRefcount(_ cluster: UInt64) throws {
        guard let (block, index) = try refcountSlot(cluster), block.entries[index] > 0 else {
            throw corruption(
                "refcount of cluster \(cluster) would drop below zero",
                offset: geometry.offset(ofCluster: cluster)
            )
        }
        block.entries[index] -= 1
        block.isDirty = true
        if block.entries[index] == 0 { freeHint = min(freeHint, cluster) }
    }

    /// Host clusters a compressed record's span touches.
    func clusters(of d: CompressedDescriptor) -> ClosedRange<UInt64> {
        geometry.clusterIndex(d.hostOffset)...geometry.clusterIndex(d.hostOffset + d.byteLength - 1)
    }

    func incrementRefcounts(of d: CompressedDescriptor) throws {
        for c in clusters(of: d) { try incrementRefcount(c) }
    }

    /// Queues the references an L2 entry held for release after the next flush.
    func queueFree(_ entry: L2Entry) {
        if let host = entry.hostCluster { pendingFrees.append(geometry.clusterIndex(host.rawValue)) }
        if case .compressed(let d) = entry { pendingFrees.append(contentsOf: clusters(of: d)) }
    }

    // MARK: Allocation

    /// Allocates one host cluster with refcount one. Prefers `after + 1` (to keep runs contiguous), then
    /// the lowest free cluster, then the end of the file. Lock held.
    func allocateCluster(after previous: UInt64? = nil) throws -> UInt64 {
        if let previous, previous + 1 < hostEnd, try refcount(previous + 1) == 0 {
            try incrementRefcount(previous + 1)
            return previous + 1
        }
        while freeHint < hostEnd {
            let candidate = freeHint
            if let (block, index) = try refcountSlot(candidate) {
                if block.entries[index] == 0 {
                    block.entries[index] = 1
                    block.isDirty = true
                    freeHint = candidate + 1
                    return candidate
                }
                // Skip the rest of a full block quickly.
                if let next = block.entries[(index + 1)...].firstIndex(of: 0) {
                    freeHint = candidate + UInt64(next - index)
                } else {
                    freeHint = candidate + UInt64(block.entries.count - index)
                }
            } else {
                // No block: skip its range (it is only reachable by allocating at the end).
                let perBlock = UInt64(geometry.refcountBlockEntries)
                freeHint = (candidate / perBlock + 1) * perBlock
            }
        }
        return try allocateAtEnd()
    }

    /// Allocates the cluster at `hostEnd`, first creating the refcount block (and growing the refcount
    /// table) that covers it. A new block sits at the first free cluster of its own range, so it counts itself.
    func allocateAtEnd() throws -> UInt64 {
        let perBlock = UInt64(geometry.refcountBlockEntries)
        while true {
            let cluster = hostEnd
            let tableIndex = cluster / perBlock
            if tableIndex >= UInt64(refcountTable.count) {
                try growRefcountTable(minimumEntries: tableIndex + 1)
                continue
            }
            if refcountTable[Int(tableIndex)] & hostOffsetMask == 0 {
                var entries = [UInt16](repeating: 0, count: Int(perBlock))
                entries[Int(cluster % perBlock)] = 1
                let block = CachedTable(offset: geometry.offset(ofCluster: cluster), entries: entries)
                block.isDirty = true
                try makeRoomInRefcountCache()
                refcountCache.insert(block)
                refcountTable[Int(tableIndex)] = block.offset
                dirtyRefcountTableSectors.insert(Int(tableIndex) / 64)
                hostEnd = cluster + 1
                continue
            }
            hostEnd = cluster + 1
            let (block, index) = try refcountSlot(cluster)!
            if block.entries[index] != 0 { continue }  // counted already (leaked past the old end): skip it
            block.entries[index] = 1
            block.isDirty = true
            return cluster
        }
    }

    /// Replaces the refcount table with a larger one written at the end of the file.
    ///
    /// Layout from `hostEnd`: the refcount blocks the new clusters need, then the (contiguous) new table.
    /// Those are written and synced, the header is switched and synced, and only then is the old table
    /// freed (format rules 1–3).
    func growRefcountTable(minimumEntries: UInt64) throws {
        let perBlock = UInt64(geometry.refcountBlockEntries)
        let perCluster = UInt64(geometry.l2Entries)
        let start = hostEnd
        var entries = max(minimumEntries, UInt64(refcountTable.count) * 2)
        var newRanges: [UInt64] = []
        var tableClusters: UInt64 = 0
        while true {
            entries = (entries + perCluster - 1) / perCluster * perCluster
            guard entries <= ImageHeader.maxRefcountTableEntries else {
                throw VImageError(
                    .limitExceeded,
                    path: path,
                    message: "the image file has reached the refcount table limit"
                )
            }
            tableClusters = entries / perCluster
            // Fixed point: the ranges touched by [start, start + blocks + table) that have no block yet.
            var blockCount = 0
            while true {
                let end = start + UInt64(blockCount) + tableClusters
                newRanges = (start / perBlock...(end - 1) / perBlock).filter {
                    !($0 < UInt64(refcountTable.count) && refcountTable[Int($0)] & hostOffsetMask != 0)
                }
                if newRanges.count == blockCount { break }
                blockCount = newRanges.count
            }
            if (start + UInt64(newRanges.count) + tableClusters - 1) / perBlock < entries { break }
            entries *= 2
        }
        try setDirtyBit()
        let tableStart = start + UInt64(newRanges.count)
        let end = tableStart + tableClusters
        var newTable = refcountTable + [UInt64](repeating: 0, count: Int(entries) - refcountTable.count)
        var blocks: [UInt64: [UInt16]] = [:]
        for (i, range) in newRanges.enumerated() {
            newTable[Int(range)] = geometry.offset(ofCluster: start + UInt64(i))
            blocks[range] = [UInt16](repeating: 0, count: Int(perBlock))
        }
        // Count every new cluster: in a new block directly, or in an existing one through the cache.
        for cluster in start..<end {
            if blocks[cluster / perBlock] != nil {
                blocks[cluster / perBlock]![Int(cluster % perBlock)] = 1
            } else {
                let (block, index) = try refcountSlot(cluster)!
                block.entries[index] = 1
                block.isDirty = true
            }
        }
        for (range, entries) in blocks {
            let block = CachedTable(offset: newTable[Int(range)], entries: entries)
            try host.write(encodeTable(entries[...]), at: block.offset)
            try makeRoomInRefcountCache()
            refcountCache.insert(block)
        }
        try writeBackRefcounts()
        try host.write(encodeTable(newTable[...]), at: geometry.offset(ofCluster: tableStart))
        try host.flush()
        let oldOffset = header.refcountTableOffset.rawValue
        let oldClusters = UInt64(header.refcountTableClusters)
        header.refcountTableOffset = HostOffset(geometry.offset(ofCluster: tableStart))
        header.refcountTableClusters = UInt32(tableClusters)
        try host.write(header.encodeFixed(), at: 0)
        try host.flush()
        refcountTable = newTable
        dirtyRefcountTableSectors.removeAll()
        hostEnd = end
        // The header no longer points at the old table (durably), so it can be freed right away.
        for c in 0..<oldClusters { try decrementRefcount(geometry.clusterIndex(oldOffset) + c) }
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

func realPath(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
}

extension VImage {
    /// The backing device of a clone.
    public var backingDevice: (any BlockDevice)? { backing }
    /// The backing file name as resolved when the image was opened.
    public var backingPath: String? {
        guard let name = currentHeader.backingFileName else { return nil }
        if name.hasPrefix("/") { return name }
        if let path, let slash = path.lastIndex(of: "/") { return String(path[...slash]) + name }
        return name
    }
}
