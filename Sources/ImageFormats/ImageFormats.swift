// Design notes
// ------------
// The one place that turns a path (and an optional format name) into a `BlockDevice`, for every format
// vdisk reads, and the one walker of backing chains. Every command of `vimg`, `vdisk serve` and the bus
// open images here, so a VIMG clone over qcow2 over raw (at any depth up to 32) opens the same way
// everywhere, and `VImage` itself knows nothing of qcow2: it is handed `openBacking` as its opener.
//
// An image name is a file path or an `rbd:` name (an image in a Ceph cluster, `RBD.RBDSpec`): `openStorage`
// turns either into the device an image format sits on, so every format, chain and command works on both,
// and a local clone may sit on a golden image in the cluster. An `rbd:` backing name is used as it is,
// never resolved against the clone's folder.
//
// A chain is opened without recursion, so a crafted chain cannot deepen the stack:
//
//   walk down (headers only):  child ──► level 1 ──► level 2 ──► ... ──► raw / no backing name
//                              each name resolved against its image's folder (BackingReference.resolve),
//                              formats named or probed, loops (by canonical path) and depth > 32 refused
//   open up:                   bottom level first, each opened over the one below, which it then owns

import BlockIO
import RBD
import VImage

#if canImport(Glibc)
import Glibc
#endif

public enum ImageFormats {
    /// The formats vdisk reads and writes.
    public enum Format: String, Sendable, CaseIterable {
        case vimg, raw, qcow2
    }

    /// The deepest backing chain an image may have (levels below the image opened).
    public static let maxBackingDepth = VImage.maxBackingDepth

    /// One level of a backing chain, found by reading headers only.
    public struct ChainLevel: Sendable, Hashable {
        public var path: String
        public var format: Format

        public init(path: String, format: Format) {
            self.path = path
            self.format = format
        }
    }

    /// Why a backing chain cannot be walked.
    public struct BackingChainError: Error, CustomStringConvertible {
        public enum Kind: String, Sendable {
            case missing = "backing-missing"
            case loop = "backing-loop"
            /// Too deep, an unknown format, an unreadable header.
            case other = "backing-chain"
        }
        public var kind: Kind
        public var error: ImageFormatError
        public var description: String { error.description }
    }

    // MARK: Opening

    /// Opens the image at `path`, with its backing chain.
    /// - Parameters:
    ///   - format: the format, or nil to probe it (a file that is not VIMG or qcow2 is raw).
    ///   - readOnly: open without write access (shared lock instead of an exclusive one). A qcow2 image
    ///     opened for writing is a `VImage` (the engine writes qcow2 as it writes VIMG).
    ///   - snapshot: read an internal snapshot (by name; qcow2 also by id) instead of the active state
    ///     (read-only).
    ///   - rbd: timeouts for `rbd:` images (the whole chain).
    ///   - cache: `.direct` opens the image and its backing chain with direct I/O (qemu's cache=none, whose
    ///     backing files inherit it too; files only).
    ///   - discard: what a VIMG image does with discards (punch holes by default).
    /// - Returns: a device whose `size` is the guest (virtual) size.
    /// - Throws: `ImageFormatError`, `VImageError`, `BlockIOError` or `RBDError` with a clear message.
    public static func open(
        path: String,
        format: Format? = nil,
        readOnly: Bool,
        snapshot: String? = nil,
        rbd: RBDOptions = .init(),
        cache: FileDevice.CacheMode = .writeback,
        discard: VImage.DiscardPolicy = .punch
    ) throws -> any BlockDevice {
        if RBDSpec.isRBD(path) {
            return try openRBD(path: path, format: format, readOnly: readOnly, snapshot: snapshot, rbd: rbd)
        }
        switch try format ?? probe(path: path) {
        case .raw:
            if snapshot != nil {
                throw ImageFormatError(.invalidArgument, path: path, message: "raw images have no snapshots")
            }
            return try openStorage(path: path, readOnly: readOnly, lock: readOnly ? .shared : .exclusive, cache: cache)
        case .vimg:
            var options = VImage.OpenOptions()
            options.cache = cache
            options.discard = discard
            return try openVImage(path: path, readOnly: readOnly, snapshot: snapshot, options: options, rbd: rbd)
        case .qcow2:
            // Writers get the engine (the same one as VIMG's); readers keep the qcow2 reader, which also
            // takes what the engine refuses to write (extended L2 entries, external data files, bitmaps).
            if readOnly { return try openQcow2(path: path, snapshot: snapshot, cache: cache) }
            var options = VImage.OpenOptions()
            options.cache = cache
            options.discard = discard
            return try openVImage(path: path, readOnly: false, snapshot: snapshot, options: options, rbd: rbd)
        }
    }

    /// An image in a Ceph cluster: the RBD image is opened once, probed, and the format opened over it.
    private static func openRBD(
        path: String,
        format: Format?,
        readOnly: Bool,
        snapshot: String?,
        rbd: RBDOptions
    ) throws -> any BlockDevice {
        let device = try RBDDevice.open(RBDSpec(parsing: path), readOnly: readOnly, options: rbd)
        do {
            switch try format ?? probe(device: device, path: path) {
            case .raw:
                if snapshot != nil {
                    throw ImageFormatError(
                        .invalidArgument,
                        path: path,
                        message:
                            "a raw RBD image has no internal snapshots; name an RBD snapshot as rbd:POOL/IMAGE@SNAP"
                    )
                }
                return device
            case .qcow2 where readOnly:
                return try openQcow2(file: device, path: path, snapshot: snapshot, rbd: rbd)
            case .vimg, .qcow2:
                device.allowGrowth()
                return try VImage.open(
                    owning: device,
                    path: path,
                    readOnly: readOnly,
                    snapshot: snapshot,
                    backingOpener: { try openBacking($0, rbd: rbd) }
                )
            }
        } catch {
            try? device.close()
            throw error
        }
    }

    /// The storage an image name refers to, without any format on top: the file at `path`, or the RBD image
    /// an `rbd:` name names (whose writers take its exclusive lock whatever `lock` says).
    /// - Parameter growable: for an image format's host file: writes may extend it (see `FileDevice`).
    /// - Parameter cache: for a file: through the page cache, or with direct I/O.
    public static func openStorage(
        path: String,
        readOnly: Bool,
        growable: Bool = false,
        lock: FileDevice.LockMode = .none,
        rbd: RBDOptions = .init(),
        cache: FileDevice.CacheMode = .writeback
    ) throws -> any BlockDevice {
        if RBDSpec.isRBD(path) {
            let device = try RBDDevice.open(RBDSpec(parsing: path), readOnly: readOnly, options: rbd)
            if growable { device.allowGrowth() }
            return device
        }
        return try withPath(path) {
            try FileDevice.open(path: path, readOnly: readOnly, growable: growable, lock: lock, cache: cache)
        }
    }

    /// Opens a VIMG image with its backing chain (any formats below it), the chain with `options.cache` too.
    /// - Parameter alongsideWriter: open a snapshot without taking the file's lock, so it can be read
    ///   while a writer has the image open (see `VImage.openSnapshotAlongsideWriter`).
    public static func openVImage(
        path: String,
        readOnly: Bool,
        snapshot: String? = nil,
        options: VImage.OpenOptions = .init(),
        alongsideWriter: Bool = false,
        rbd: RBDOptions = .init()
    ) throws -> VImage {
        let opener: BackingOpener = { try openBacking($0, rbd: rbd, cache: options.cache) }
        if alongsideWriter, let snapshot, !RBDSpec.isRBD(path) {
            return try VImage.openSnapshotAlongsideWriter(
                path: path,
                snapshot: snapshot,
                options: options,
                backingOpener: opener
            )
        }
        let readOnly = readOnly || snapshot != nil
        let host = try openStorage(
            path: path,
            readOnly: readOnly,
            growable: true,
            lock: readOnly ? .shared : .exclusive,
            rbd: rbd,
            cache: options.cache
        )
        return try VImage.open(
            owning: host,
            path: path,
            readOnly: readOnly,
            snapshot: snapshot,
            options: options,
            backingOpener: opener
        )
    }

    /// Opens a qcow2 image and its backing chain.
    public static func openQcow2(
        path: String,
        snapshot: String? = nil,
        cache: FileDevice.CacheMode = .writeback
    ) throws -> Qcow2Image {
        try openQcow2(
            file: openStorage(path: path, readOnly: true, lock: .shared, cache: cache),
            path: path,
            snapshot: snapshot,
            cache: cache
        )
    }

    /// Opens a qcow2 image stored on `file` (which it then owns) and its backing chain.
    static func openQcow2(
        file: any BlockDevice,
        path: String,
        snapshot: String?,
        rbd: RBDOptions = .init(),
        cache: FileDevice.CacheMode = .writeback
    ) throws -> Qcow2Image {
        var backing: (any BlockDevice)? = nil
        do {
            let header = try Qcow2Header.read(from: file, path: path)
            if let name = header.backingFile {
                backing = try openBacking(
                    BackingReference(name: name, format: header.backingFormat, imagePath: path),
                    rbd: rbd,
                    cache: cache
                )
            }
            return try Qcow2Image(file: file, path: path, snapshot: snapshot, backing: backing)
        } catch {
            try? backing?.close()
            try? file.close()
            throw error
        }
    }

    /// Opens the backing chain a clone names, read-only, and returns its top level: the `BackingOpener`
    /// every VIMG image is opened with.
    public static func openBacking(_ reference: BackingReference) throws -> any BlockDevice {
        try openBacking(reference, rbd: .init())
    }

    /// `openBacking` with timeouts for the `rbd:` images of the chain, and every level's file opened in
    /// cache mode `cache`.
    public static func openBacking(
        _ reference: BackingReference,
        rbd: RBDOptions = .init(),
        cache: FileDevice.CacheMode = .writeback
    ) throws -> any BlockDevice {
        let top = reference.imagePath.map(identity)
        let levels: [ChainLevel]
        do {
            levels = try backingLevels(from: reference, excluding: top.map { [$0] } ?? [], rbd: rbd)
        } catch let failure as BackingChainError {
            throw failure.error
        }
        var device: (any BlockDevice)? = nil
        do {
            for level in levels.reversed() {
                let below = device
                device = nil
                device = try openLevel(level, over: below, rbd: rbd, cache: cache)
            }
        } catch {
            try? device?.close()
            throw error
        }
        return device!
    }

    /// Opens one chain level read-only over the (already open) level below, which it then owns.
    private static func openLevel(
        _ level: ChainLevel,
        over below: (any BlockDevice)?,
        rbd: RBDOptions,
        cache: FileDevice.CacheMode
    ) throws -> any BlockDevice {
        var taken = false
        do {
            switch level.format {
            case .raw:
                try? below?.close()  // a raw level ends a chain: nothing is below it
                taken = true
                return try openStorage(path: level.path, readOnly: true, lock: .shared, rbd: rbd, cache: cache)
            case .vimg:
                var options = VImage.OpenOptions()
                options.cache = cache
                return try VImage.open(
                    owning: openStorage(
                        path: level.path,
                        readOnly: true,
                        growable: true,
                        lock: .shared,
                        rbd: rbd,
                        cache: cache
                    ),
                    path: level.path,
                    readOnly: true,
                    options: options,
                    backingOpener: { _ in
                        guard let below else {
                            throw ImageFormatError(
                                .invalidImage,
                                path: level.path,
                                message: "backing chain changed while opening"
                            )
                        }
                        taken = true
                        return below
                    }
                )
            case .qcow2:
                let file = try openStorage(path: level.path, readOnly: true, lock: .shared, rbd: rbd, cache: cache)
                do {
                    taken = true
                    return try Qcow2Image(file: file, path: level.path, backing: below)
                } catch {
                    try? file.close()
                    throw error
                }
            }
        } catch {
            if !taken { try? below?.close() }
            throw error
        }
    }

    // MARK: Chains

    /// The levels of the backing chain below a clone, top-down, found by reading only headers.
    /// - Parameter excluding: canonical paths that must not appear (the clone itself, to catch loops).
    /// - Throws: `BackingChainError`.
    public static func backingLevels(
        from reference: BackingReference,
        excluding: Set<String> = [],
        rbd: RBDOptions = .init()
    ) throws -> [ChainLevel] {
        var levels: [ChainLevel] = []
        var seen = excluding
        var next: BackingReference? = reference
        while let ref = next {
            let resolved = ref.resolvedPath
            if let parent = ref.imagePath, RBDSpec.isRBD(parent), !RBDSpec.isRBD(ref.name), !ref.name.hasPrefix("/") {
                throw BackingChainError(
                    kind: .other,
                    error: ImageFormatError(
                        .invalidImage,
                        path: parent,
                        message:
                            "backing file '\(ref.name)' is relative, but the image is in a Ceph cluster: name it rbd:POOL/IMAGE or by an absolute path"
                    )
                )
            }
            guard RBDSpec.isRBD(resolved) || access(resolved, F_OK) == 0 else {
                throw BackingChainError(
                    kind: .missing,
                    error: ImageFormatError(
                        .notFound,
                        path: ref.imagePath,
                        message: "backing file '\(ref.name)' not found (looked for \(resolved))"
                    )
                )
            }
            let canonical = identity(resolved)
            guard seen.insert(canonical).inserted else {
                throw BackingChainError(
                    kind: .loop,
                    error: ImageFormatError(
                        .invalidImage,
                        path: ref.imagePath,
                        message: "backing chain loops back to \(canonical)"
                    )
                )
            }
            guard levels.count < maxBackingDepth else {
                throw BackingChainError(
                    kind: .other,
                    error: ImageFormatError(
                        .limitExceeded,
                        path: ref.imagePath,
                        message: "backing chain is deeper than \(maxBackingDepth) images"
                    )
                )
            }
            do {
                let format: Format
                if let text = ref.format {
                    guard let named = Format(rawValue: text) else {
                        throw ImageFormatError(
                            .unsupportedFeature,
                            path: ref.imagePath,
                            message: "unknown backing format '\(text)'"
                        )
                    }
                    format = named
                } else {
                    format = try probe(path: resolved, rbd: rbd)
                }
                levels.append(ChainLevel(path: resolved, format: format))
                next = try backingReference(of: resolved, format: format, rbd: rbd)
            } catch let error as ImageFormatError {
                throw BackingChainError(kind: .other, error: error)
            } catch let error as RBDError {
                throw BackingChainError(
                    kind: error.code == .imageNotFound || error.code == .snapshotNotFound ? .missing : .other,
                    error: ImageFormatError(
                        .notFound,
                        path: ref.imagePath,
                        message: "backing file: \(error)",
                        cause: error
                    )
                )
            } catch {
                throw BackingChainError(
                    kind: .other,
                    error: ImageFormatError(.invalidImage, path: resolved, message: "\(error)", cause: error)
                )
            }
        }
        return levels
    }

    /// The backing file an image names, read from its header alone (nil for raw images and for images
    /// without one).
    public static func backingReference(
        of path: String,
        format: Format,
        rbd: RBDOptions = .init()
    ) throws -> BackingReference? {
        switch format {
        case .raw:
            return nil
        case .vimg:
            let header = try withPath(path) { () -> ImageHeader in
                let file = try openStorage(path: path, readOnly: true, rbd: rbd)
                defer { try? file.close() }
                let bytes = try file.read(count: Int(min(file.size, 2 << 20)), at: 0)
                return try ImageHeader.decode(bytes)
            }
            return header.backingFileName.map {
                BackingReference(name: $0, format: header.backingFileFormat, imagePath: path)
            }
        case .qcow2:
            let header = try withPath(path) { () -> Qcow2Header in
                let file = try openStorage(path: path, readOnly: true, rbd: rbd)
                defer { try? file.close() }
                return try Qcow2Header.read(from: file, path: path)
            }
            return header.backingFile.map { BackingReference(name: $0, format: header.backingFormat, imagePath: path) }
        }
    }

    // MARK: Formats

    /// Guesses an image's format from its magic bytes.
    public static func probe(path: String, rbd: RBDOptions = .init()) throws -> Format {
        let file = try openStorage(path: path, readOnly: true, rbd: rbd)
        defer { try? file.close() }
        return try probe(device: file, path: path)
    }

    /// Guesses the format of the image stored on `device` from its magic bytes.
    static func probe(device: any BlockDevice, path: String) throws -> Format {
        try withPath(path) {
            guard device.size >= 4 else { return .raw }
            let magic = try device.read(count: 4, at: 0)
            if magic == ImageHeader.magicBytes { return .vimg }
            if magic == Qcow2Header.magic { return .qcow2 }
            return .raw
        }
    }

    /// What identifies an image in a chain, to catch loops: a file's canonical path, an RBD image's name
    /// without options.
    public static func identity(_ path: String) -> String {
        if RBDSpec.isRBD(path) { return (try? RBDSpec(parsing: path).description) ?? path }
        return canonicalPath(path) ?? path
    }

    /// Parses a format name (`raw`, `vimg`, `qcow2`).
    public static func format(named name: String) throws -> Format {
        guard let format = Format(rawValue: name) else {
            throw ImageFormatError(.invalidArgument, message: "unknown format '\(name)' (use raw, vimg or qcow2)")
        }
        return format
    }

    // MARK: Checking

    /// Checks the image at `path` (VIMG or qcow2), including whether its backing chain can be opened. qcow2
    /// layouts the engine does not open (clusters under 4 KiB) go to the read-only qcow2 checker.
    public static func check(path: String) throws -> CheckReport {
        let kind = try probe(path: path)
        guard kind != .raw else {
            throw ImageFormatError(.invalidArgument, path: path, message: "raw images have no metadata to check")
        }
        let file = try openStorage(path: path, readOnly: true, growable: true, lock: .shared)
        defer { try? file.close() }
        if kind == .qcow2, !((try? Qcow2Header.read(from: file, path: path)).map(ImageCheck.takes) ?? false) {
            return try Qcow2Check.check(path: path)
        }
        var report = ImageCheck.check(host: file)
        checkBackingChain(of: path, report: &report)
        return report
    }

    /// Checks and repairs the VIMG image at `path` (opened read-write with an exclusive lock).
    /// - Parameters:
    ///   - mode: `.leaks` or `.all`.
    ///   - dryRun: report what would be done, change nothing.
    public static func repair(path: String, mode: RepairMode, dryRun: Bool = false) throws -> RepairResult {
        let host = try openStorage(path: path, readOnly: dryRun, growable: true, lock: dryRun ? .shared : .exclusive)
        defer { try? host.close() }
        var result = try withPath(path) { try ImageCheck.repair(host: host, mode: mode, dryRun: dryRun) }
        checkBackingChain(of: path, report: &result.before)
        checkBackingChain(of: path, report: &result.after)
        return result
    }

    /// A clone whose backing chain cannot be opened cannot be read, so (as `qemu-img check`, which
    /// fails to open it) the check is incomplete: a `backing-missing`, `backing-loop` or
    /// `backing-chain` finding and a check error (exit code 1). Repair cannot fix it; `vimg rebase`
    /// can. Only headers are read.
    static func checkBackingChain(of path: String, report: inout CheckReport) {
        guard let reference = try? backingReference(of: path, format: probe(path: path)) else { return }
        do {
            _ = try backingLevels(from: reference, excluding: [identity(path)])
        } catch let failure as BackingChainError {
            report.add(.info, failure.kind.rawValue, failure.error.message)
            report.checkErrors += 1
            if report.incompleteReason == nil { report.incompleteReason = failure.error.message }
        } catch {
            report.add(.info, BackingChainError.Kind.other.rawValue, "\(error)")
            report.checkErrors += 1
            if report.incompleteReason == nil { report.incompleteReason = "\(error)" }
        }
    }
}
