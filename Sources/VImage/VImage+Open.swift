// Design notes
// ------------
// Creating and opening images. Opening reads and validates the header (every field is hostile until
// checked), the L1 and refcount tables, and the snapshot table, then builds the engine state.
//
// A clone's backing image is not opened here: the caller passes either the device itself or a
// `BackingOpener`, and `ImageFormats` is the one place that turns a backing reference (a name resolved
// against the clone's folder, with a format or a probe) into a device, for every format and at any depth.
// So VImage knows nothing of qcow2, and every program opens chains the same way.

import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// The backing file a clone names, resolved (docs/FORMAT.md, "Backing file name").
public struct BackingReference: Sendable, Hashable {
    /// The name as stored in the image.
    public var name: String
    /// The format the image names ("vimg", "raw", "qcow2"), or nil to probe.
    public var format: String?
    /// The path of the image that names it (nil for images not opened from a path).
    public var imagePath: String?
    /// `name` resolved against the folder of `imagePath`.
    public var resolvedPath: String

    public init(name: String, format: String?, imagePath: String?) {
        self.name = name
        self.format = format
        self.imagePath = imagePath
        self.resolvedPath = Self.resolve(name, relativeTo: imagePath)
    }

    /// Resolves a backing name as the format says: an absolute name, or an `rbd:` name (an image in a Ceph
    /// cluster), is used as it is; any other is relative to the folder of the image that names it (the text
    /// up to and including its last `/`).
    /// The one place this rule is implemented.
    public static func resolve(_ name: String, relativeTo imagePath: String?) -> String {
        if name.hasPrefix("/") || name.hasPrefix("rbd:") { return name }
        if let imagePath, let slash = imagePath.lastIndex(of: "/") { return String(imagePath[...slash]) + name }
        return name
    }
}

/// Opens the backing image of a clone (read-only); the clone closes what it returns.
public typealias BackingOpener = (BackingReference) throws -> any BlockDevice

/// Where `open` gets an image's backing device.
enum BackingSource {
    /// This device, whatever the header names (an overlay over any device; a caller that opened the
    /// chain itself). The image does not close it.
    case device(any BlockDevice)
    /// The device the opener returns for the backing file the header names (none if it names none). The
    /// image closes it.
    case opener(BackingOpener?)
}

extension VImage {
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
        let format: any OnDiskFormat
        switch options.format {
        case .vimg:
            format = VIMGFormat()
        case .qcow2(let version, let refcountBits):
            let order = refcountBits.trailingZeroBitCount
            guard version == 2 || version == 3, refcountBits > 0, refcountBits <= 64, 1 << order == refcountBits,
                version == 3 || refcountBits == 16
            else {
                throw VImageError(
                    .invalidArgument,
                    message:
                        "qcow2 images are version 2 or 3, with refcount bits a power of two up to 64 (16 in version 2)"
                )
            }
            guard !options.checksums else {
                throw VImageError(.invalidArgument, message: "end-to-end checksums are a VIMG feature, not a qcow2 one")
            }
            var q = Qcow2Header.empty(clusterBits: UInt32(options.clusterBits), virtualSize: 0)
            q.version = UInt32(version)
            q.headerLength = version == 3 ? 112 : 72
            q.refcountOrder = UInt32(order)
            format = Qcow2Format(original: q)
        }
        let perBlock = UInt64(format.refcounts.entriesPerBlock(clusterSize: geometry.clusterSize))
        let cs = UInt64(geometry.clusterSize)
        let l1Clusters = max(1, geometry.clusters(covering: l1Entries * 8))
        // Refcount blocks and table clusters needed to describe the initial clusters (a fixed point).
        var blocks: UInt64 = 1
        var tableClusters: UInt64 = 1
        while true {
            let total = 1 + tableClusters + blocks + l1Clusters
            let needBlocks = (total + perBlock - 1) / perBlock
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
        if case .vimg = options.format {
            // The bitmap directory extension first (empty), so that adding bitmaps later switches it with
            // one write of the first sector; then the informational extensions.
            header.setBitmapDirectory(.empty)
            header.featureNames = FeatureName.all
            header.uuid = options.uuid ?? ImageUUID.random()
        }
        if let backingFile = options.backingFile {
            guard !backingFile.isEmpty, backingFile.utf8.count <= ImageHeader.maxBackingNameLength,
                !backingFile.utf8.contains(0)
            else {
                throw VImageError(.invalidArgument, message: "backing file name must be 1 to 4095 bytes")
            }
            header.backingFileName = backingFile
            header.backingFileFormat = options.backingFormat
        }
        var headerBytes = format.encodeHeader(header)
        guard headerBytes.count <= geometry.clusterSize else {
            throw VImageError(.invalidArgument, message: "header and extensions do not fit in one cluster")
        }
        headerBytes += [UInt8](repeating: 0, count: geometry.clusterSize - headerBytes.count)

        var table = [UInt64](repeating: 0, count: Int(tableClusters) * geometry.l2Entries)
        for b in 0..<blocks { table[Int(b)] = (blocksStart + b) * cs }
        var refcounts = [UInt64](repeating: 0, count: Int(blocks * perBlock))
        for c in 0..<Int(total) { refcounts[c] = 1 }

        try wrapIO(nil) {
            try host.write(headerBytes, at: 0)
            try host.write(encodeTable(table[...]), at: tableStart * cs)
            try host.write(format.refcounts.encode(refcounts), at: blocksStart * cs)
            try host.write([UInt8](repeating: 0, count: Int(l1Clusters * cs)), at: l1Start * cs)
            try host.flush()
        }
        if options.checksums { try enableChecksums(host: host) }
    }

    /// Turns on end-to-end checksums for the (closed, cleanly closed) image on `host`: checksums of every
    /// block in use are computed and written, then the header switches to them (docs/FORMAT.md, "End-to-end
    /// checksums"). Reads the whole image: cheap for a new one (create and convert use it).
    public static func enableChecksums(host: any BlockDevice, path: String? = nil) throws {
        let image = try VImage.open(host: host, path: path, readOnly: false, backing: MemoryDevice(size: 0))
        defer { try? image.close() }
        guard !image.currentHeader.incompatibleFeatures.contains(.checksums) else { return }
        try image.drained { m in try m.enableChecksums() }
        try image.close()
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
    ///   - backing: the clone's backing device, already open (the image does not close it). A clone
    ///     opened without one is refused.
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
            backing: backing.map { .device($0) } ?? .opener(nil),
            options: options
        )
    }

    /// Opens the image file at `path`, taking an exclusive lock for writing or a shared one for reading.
    /// - Parameters:
    ///   - snapshot: expose this internal snapshot (read-only) instead of the active state.
    ///   - backingOpener: opens the backing image of a clone (`ImageFormats.backingOpener` handles
    ///     every format and depth); a clone opened without one is refused.
    public static func open(
        path: String,
        readOnly: Bool,
        snapshot: String? = nil,
        options: OpenOptions = .init(),
        backingOpener: BackingOpener? = nil
    ) throws -> VImage {
        try open(
            path: path,
            readOnly: readOnly,
            snapshot: snapshot,
            options: options,
            backingOpener: backingOpener,
            lock: nil
        )
    }

    /// Opens a read-only view of internal snapshot `snapshot` without taking the image's lock, so that a
    /// snapshot can be read while a writer has the image open (the bus plugs snapshots of plugged disks).
    ///
    /// A snapshot's L2 tables and data clusters are shared (refcount above one), so the writer never
    /// changes them in place and the view stays stable, as long as nobody deletes the snapshot meanwhile.
    public static func openSnapshotAlongsideWriter(
        path: String,
        snapshot: String,
        options: OpenOptions = .init(),
        backingOpener: BackingOpener? = nil
    ) throws -> VImage {
        try open(
            path: path,
            readOnly: true,
            snapshot: snapshot,
            options: options,
            backingOpener: backingOpener,
            lock: FileDevice.LockMode.none
        )
    }

    static func open(
        path: String,
        readOnly: Bool,
        snapshot: String?,
        options: OpenOptions,
        backingOpener: BackingOpener?,
        lock: FileDevice.LockMode?
    ) throws -> VImage {
        let readOnly = readOnly || snapshot != nil
        let file = try wrapIO(path) {
            try FileDevice.open(
                path: path,
                readOnly: readOnly,
                growable: true,
                lock: lock ?? (readOnly ? .shared : .exclusive),
                cache: options.cache
            )
        }
        return try open(
            owning: file,
            path: path,
            readOnly: readOnly,
            snapshot: snapshot,
            options: options,
            backingOpener: backingOpener
        )
    }

    /// Opens an image stored on `host` (any device: a file, an RBD image), which the image then owns and
    /// closes; `host` is closed here if opening fails.
    /// - Parameters:
    ///   - host: the image file's storage (growable for writing).
    ///   - path: the image's name, for messages and for resolving a relative backing file name.
    ///   - snapshot: expose this internal snapshot (read-only) instead of the active state.
    ///   - backingOpener: opens the backing image of a clone (`ImageFormats.openBacking`).
    public static func open(
        owning host: any BlockDevice,
        path: String?,
        readOnly: Bool,
        snapshot: String? = nil,
        options: OpenOptions = .init(),
        backingOpener: BackingOpener?
    ) throws -> VImage {
        do {
            let image = try open(
                host: host,
                ownsHost: true,
                path: path,
                readOnly: readOnly || snapshot != nil,
                backing: .opener(backingOpener),
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
            try? host.close()
            throw error
        }
    }

    static func open(
        host: any BlockDevice,
        ownsHost: Bool,
        path: String?,
        readOnly: Bool,
        backing source: BackingSource,
        options: OpenOptions,
        repairedDirty: Bool = false
    ) throws -> VImage {
        let fileSize = host.size
        var checked: ChecksummedHost? = nil
        var format: any OnDiskFormat = VIMGFormat()
        let (header, l1, refcountTable) = try wrapIO(path) { () throws -> (ImageHeader, [UInt64], [UInt64]) in
            var header: ImageHeader
            do {
                (header, format) = try readEngineHeader(host, fileSize: fileSize, forWriting: !readOnly)
                checked = try ChecksummedHost.open(raw: host, header: header, fileSize: fileSize)
            } catch var error as VImageError {
                error.path = path
                throw error
            }
            // With checksums, everything below is read (and verified) through the checksummed device. After
            // a crash the checksums of metadata written since the last flush may be stale: an open of a dirty
            // image computes them again in memory first (FORMAT.md, "Writing and crashes", rule 4); a
            // writer's repair below then writes them.
            if let checked, header.incompatibleFeatures.contains(.dirty) {
                try checked.rehashMetadata(of: host)
            }
            let host: any BlockDevice = checked ?? host
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
            // a corruption the image is opened anyway and stays dirty, as `vimg check` will report. A dirty
            // qcow2 image had lazy refcounts, which may be too low as well: like qemu, rebuild them all.
            let mode: RepairMode = format.setsDirtyBit ? .leaks : .all
            let result = try wrapIO(path) { try ImageCheck.repair(host: host, mode: mode) }
            if result.after.corruptions == 0 && result.after.checkErrors == 0 {
                return try open(
                    host: host,
                    ownsHost: ownsHost,
                    path: path,
                    readOnly: readOnly,
                    backing: source,
                    options: options,
                    repairedDirty: true
                )
            }
        }
        var backingDevice: (any BlockDevice)? = nil
        var ownsBacking = false
        switch source {
        case .device(let device):
            backingDevice = device
        case .opener(let opener):
            if let name = header.backingFileName {
                let reference = BackingReference(name: name, format: header.backingFileFormat, imagePath: path)
                guard let opener else {
                    throw VImageError(
                        .invalidArgument,
                        path: path,
                        message:
                            "the image is a clone of '\(name)'; open it with ImageFormats (VImage needs a backing opener)"
                    )
                }
                backingDevice = try opener(reference)
                ownsBacking = true
            }
        }
        do {
            let image = try makeImage(
                host: checked ?? host,
                format: format,
                ownsHost: ownsHost,
                path: path,
                readOnly: readOnly,
                header: header,
                l1: l1,
                refcountTable: refcountTable,
                fileSize: fileSize,
                backing: backingDevice,
                ownsBacking: ownsBacking,
                options: options,
                wasDirty: repairedDirty || header.incompatibleFeatures.contains(.dirty)
            )
            return image
        } catch {
            if ownsBacking { try? backingDevice?.close() }
            throw error
        }
    }

    private static func makeImage(
        host: any BlockDevice,
        format: any OnDiskFormat,
        ownsHost: Bool,
        path: String?,
        readOnly: Bool,
        header: ImageHeader,
        l1: [UInt64],
        refcountTable: [UInt64],
        fileSize: UInt64,
        backing: (any BlockDevice)?,
        ownsBacking: Bool,
        options: OpenOptions,
        wasDirty: Bool
    ) throws -> VImage {
        let geometry = header.geometry
        var snapshots: [SnapshotEntry] = []
        if header.snapshotCount > 0 {
            snapshots = try wrapIO(path) {
                let bytes = try host.read(count: Int(header.snapshotTableSize), at: header.snapshotTableOffset.rawValue)
                do {
                    return try format.decodeSnapshots(
                        bytes,
                        count: Int(header.snapshotCount),
                        geometry: geometry,
                        fileSize: fileSize
                    )
                } catch var error as VImageError {
                    error.path = path
                    throw error
                }
            }
        }
        let image = VImage(
            path: path,
            host: host,
            ownsHost: ownsHost,
            metadata: { gate, size in
                var m = Metadata(
                    host: host,
                    path: path,
                    format: format,
                    readOnly: readOnly,
                    header: header,
                    l1: l1,
                    refcountTable: refcountTable,
                    hostEnd: HostCluster(geometry.clusters(covering: fileSize)),
                    hasBacking: backing != nil,
                    options: options,
                    gate: gate,
                    sharedSize: size
                )
                m.snapshots = snapshots
                return m
            },
            backing: backing,
            ownsBacking: ownsBacking,
            wasDirtyAtOpen: wasDirty
        )
        // Clusters past the end of the file may already be counted (allocated, not yet written when the
        // last writer crashed): allocation at the end must start after the last counted cluster.
        try image.state.withLock { m in
            let perBlock = UInt64(m.refcountsPerBlock)
            let firstBlock = Int(m.hostEnd.rawValue / perBlock)
            var end = m.hostEnd
            if firstBlock < m.refcountTable.count {
                for index in firstBlock..<m.refcountTable.count where m.refcountTable[index] & hostOffsetMask != 0 {
                    let block = try wrapIO(path) { try m.refcountBlock(tableIndex: index) }
                    if let last = block.entries.lastIndex(where: { $0 != 0 }) {
                        end = max(end, HostCluster(UInt64(index) * perBlock + UInt64(last) + 1))
                    }
                }
            }
            m.hostEnd = end
            try wrapIO(path) { try m.loadBitmaps(fileSize: fileSize) }
        }
        return image
    }
}

extension VImage {
    /// The backing device of a clone.
    public var backingDevice: (any BlockDevice)? { backing }
    /// The backing file name resolved against the image's folder.
    public var backingPath: String? {
        currentHeader.backingFileName.map { BackingReference.resolve($0, relativeTo: path) }
    }
}
