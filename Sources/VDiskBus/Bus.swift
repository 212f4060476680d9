// Design notes
// ------------
// The bus is one process per host holding a table of plugged disks. Each disk is a backend device (an
// image, a RAM disk, a remote export, optionally under a RAM overlay), wrapped to count its I/O, and
// attached to up to two front ends:
//
//   backend --+-- NBD export "NAME" on <runtime>/nbd.sock      (always, so any NBD client can reach it)
//             +-- /dev/nbdN   kernel NBD client -> the export  (where the kernel has NBD)
//             +-- FUSE file <runtime>/mnt/NAME/disk -> /dev/loopN   (everywhere else)
//
// Plugging builds these bottom up and unplugging tears them down top down; every step that succeeded is
// undone if a later one fails, so a failed plug leaves nothing behind (no loop device, mount or export).
// Unplug refuses while a file system on the device (or one of its partitions) is mounted, unless forced,
// and reports every step that failed instead of hiding it. The table is under one lock; plugging and
// unplugging are serialized (they are rare and slow), I/O never takes that lock, and no operation waits on
// anything unbounded while it holds the operations lock (programs run with a deadline, the kernel's
// netlink answers with a receive timeout).
//
// What a bus leaves when it dies (kill -9, a crash) is found by the next bus on the same runtime folder
// (Recovery.swift): loop devices over <runtime>/mnt/*, dead FUSE mounts there, /dev/nbdN whose backend
// identifier names this runtime folder. A planned restart (`vdisk bus --restart`) instead flushes and
// closes every disk and writes <runtime>/handover.json; the next bus re-opens them and gives each /dev/nbdN
// a new socket (NBD_CMD_RECONFIGURE) while the kernel holds its requests.

import BlockIO
import FUSEExport
import Foundation
import RBD
import Synchronization
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Exports plugged disks over NBD (the bus's NBD server).
public protocol BusExporter: Sendable {
    /// Adds an export of `device` with the metadata contexts `offer` asks for; returns their names (besides
    /// `base:allocation`).
    /// - Throws: if the export cannot be added, or a context cannot be made (a diff of unknown snapshots).
    func add(name: String, device: any BlockDevice, readOnly: Bool, offer: ExportOffer) throws -> [String]
    func remove(name: String)
    /// The URI of an export, e.g. `nbd+unix:///NAME?socket=/run/vdisk/nbd.sock`.
    func uri(for name: String) -> String
    /// The unix socket the exports are on.
    var socketPath: String { get }
    /// A socket connected to export `name` and past the NBD handshake, for the kernel's NBD driver.
    func negotiatedSocket(for name: String) throws -> NegotiatedSocket
}

/// What a disk's export offers backup clients besides `base:allocation` (docs/BUS.md, "Changed blocks"):
/// the bus decides, the exporter turns it into NBD metadata contexts.
public struct ExportOffer: Sendable {
    /// The backend device under the I/O counters: its backing chain answers `qemu:allocation-depth`.
    public var backend: any BlockDevice
    /// The VIMG image whose bitmaps and snapshot diffs are offered (nil for other backends).
    public var image: VImage?
    /// Its bitmaps to offer as `qemu:dirty-bitmap:NAME`.
    public var bitmaps: [String]
    /// `FROM..TO` snapshot diffs to offer as `qemu:dirty-bitmap:FROM..TO`.
    public var snapshotDiffs: [String]
    /// Whether the exported state can change while plugged (a diff ending at it would go stale).
    public var writable: Bool
    /// The source, for messages.
    public var source: String

    public init(
        backend: any BlockDevice,
        image: VImage?,
        bitmaps: [String],
        snapshotDiffs: [String],
        writable: Bool,
        source: String
    ) {
        self.backend = backend
        self.image = image
        self.bitmaps = bitmaps
        self.snapshotDiffs = snapshotDiffs
        self.writable = writable
        self.source = source
    }
}

/// A connection to one of the bus's exports, negotiated and ready for transmission.
public struct NegotiatedSocket: Sendable {
    /// The socket; whoever receives it closes it.
    public var fd: Int32
    /// The export's size and NBD transmission flags.
    public var size: UInt64
    public var flags: UInt16

    public init(fd: Int32, size: UInt64, flags: UInt16) {
        self.fd = fd
        self.size = size
        self.flags = flags
    }
}

final class PluggedDisk: @unchecked Sendable {
    let name: String
    let request: PlugRequest
    let backend: OpenedBackend
    let counting: CountingDevice
    var frontEnd = "none"
    var devicePath: String?
    var fuse: FUSEExport?
    var exported = false
    /// The metadata contexts its export offers besides base:allocation.
    var metaContexts: [String] = []
    /// For /dev/nbdN: N and the backend identifier the kernel holds for it.
    var nbd: (index: UInt32, backend: String)?

    init(name: String, request: PlugRequest, backend: OpenedBackend) {
        self.name = name
        self.request = request
        self.backend = backend
        self.counting = CountingDevice(backend.device)
    }

    var readOnly: Bool { counting.capabilities.contains(.readOnly) || request.readOnly }
}

/// The bus: the table of plugged disks and the operations on it.
public final class Bus: Sendable {
    public let paths: BusPaths
    let opener: BusOpener
    let exporter: (any BusExporter)?
    /// Remember plugged disks in `paths.stateFile` and re-plug them at start.
    let persist: Bool
    let disks = Mutex<[String: PluggedDisk]>([:])
    /// Serializes plug/unplug/snapshot: each takes seconds at most and must see a stable table.
    let operations = Mutex<Void>(())
    /// What this bus found and removed (or took over) from its predecessor, for `vdisk list`.
    let recovered = Mutex<[String]>([])
    let log: @Sendable (String) -> Void
    /// How long a program the bus runs (dmsetup) may take.
    let toolTimeout: Double

    public init(
        paths: BusPaths,
        opener: BusOpener,
        exporter: (any BusExporter)?,
        persist: Bool,
        toolTimeout: Double = 30,
        log: @escaping @Sendable (String) -> Void
    ) {
        self.toolTimeout = toolTimeout
        self.paths = paths
        self.opener = opener
        self.exporter = exporter
        self.persist = persist
        self.log = log
    }

    /// Answers one control request.
    public func handle(_ request: BusRequest) -> BusResponse {
        do {
            switch request.op {
            case .crash, .mark:
                return try handleCrashTesting(request)
            case .ping:
                return BusResponse(ok: true, pid: getpid())
            case .list:
                let recovered = recovered.withLock { $0 }
                return BusResponse(ok: true, disks: list(), recovered: recovered.isEmpty ? nil : recovered)
            case .plug:
                guard let plug = request.plug else { return .failure("plug needs a source") }
                return BusResponse(ok: true, disk: try self.plug(plug))
            case .unplug:
                if request.all == true {
                    let notes = try unplugAll(force: request.force ?? false)
                    return BusResponse(ok: true, notes: notes)
                }
                guard let target = request.target else { return .failure("unplug needs a disk name or device") }
                let notes = try unplug(target, force: request.force ?? false)
                return BusResponse(ok: true, notes: notes)
            case .snapshot:
                guard let target = request.target, let snap = request.snapshotName else {
                    return .failure("snapshot needs a disk and a snapshot name")
                }
                let notes = try snapshot(target, name: snap, freeze: !(request.noFreeze ?? false))
                return BusResponse(ok: true, notes: notes)
            case .scrub:
                guard let target = request.target else { return .failure("scrub needs a disk name or device") }
                var response = BusResponse(ok: true)
                response.scrub = try scrub(target)
                return response
            case .shutdown:
                return BusResponse(ok: true)
            case .handover:
                return BusResponse(ok: true, notes: try handOver())
            }
        } catch {
            return .failure("\(error)")
        }
    }

    public func list() -> [DiskInfo] {
        disks.withLock { table in table.values.map { info($0) }.sorted { $0.name < $1.name } }
    }

    func info(_ disk: PluggedDisk) -> DiskInfo {
        DiskInfo(
            name: disk.name,
            device: disk.devicePath,
            frontEnd: disk.frontEnd,
            // An rbd: name without its options: a key= must not leak into listings.
            source: (try? RBDSpec(parsing: disk.backend.source).description) ?? disk.backend.source,
            format: disk.backend.format,
            size: disk.counting.size,
            readOnly: disk.readOnly,
            overlay: disk.request.overlay,
            snapshot: disk.request.snapshot,
            nbdURI: disk.exported ? exporter?.uri(for: disk.name) : nil,
            metaContexts: disk.exported ? disk.metaContexts : nil,
            counters: counters(disk),
            connection: disk.backend.owned.lazy.compactMap { ($0 as? any ConnectionStatusReporting)?.connectionStatus }
                .first
        )
    }

    func counters(_ disk: PluggedDisk) -> IOCounters {
        var counters = disk.counting.snapshot
        if let image = disk.backend.image, image.hasChecksums { counters.checksumErrors = image.checksumMismatches }
        return counters
    }

    // MARK: Scrub

    /// Reads and verifies every block of a plugged VIMG disk that has checksums (data of the disk and of its
    /// snapshots, and metadata) while its I/O goes on; the operations lock is not held, so other disks can
    /// be plugged meanwhile. Each bad block is also logged.
    public func scrub(_ target: String) throws -> ScrubSummary {
        let disk = try find(target)
        guard let image = disk.backend.image, image.hasChecksums else {
            throw BusError("'\(disk.name)' has no checksums (a VIMG image created with -o checksums=on)")
        }
        let report = try image.scrub()
        for finding in report.findings {
            let places = finding.guestOffsets.map {
                "\($0.snapshot.map { "snapshot \($0) " } ?? "")offset \($0.offset)"
            }
            log(
                "scrub \(disk.name): \(finding.kind.rawValue) block at host offset \(finding.hostOffset) fails its checksum"
                    + (places.isEmpty ? "" : " (guest \(places.joined(separator: ", ")))")
            )
        }
        log("scrub \(disk.name): \(report.blocksVerified) blocks verified, \(report.findings.count) bad")
        return ScrubSummary(report)
    }

    // MARK: Plug

    static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.first != "." && name.first != "-"
            && name.unicodeScalars.allSatisfy {
                CharacterSet.alphanumerics.contains($0) && $0.isASCII || "._-".unicodeScalars.contains($0)
            }
    }

    /// Plugs a disk and returns what was attached.
    /// - Parameter reattach: a /dev/nbdN handed over by the previous bus (index, backend identifier), to be
    ///   given a socket to this bus instead of a new device being connected.
    public func plug(_ request: PlugRequest) throws -> DiskInfo { try plug(request, reattach: nil) }

    func plug(_ request: PlugRequest, reattach: (index: UInt32, backend: String)?) throws -> DiskInfo {
        try operations.withLock { _ in
            let name = try chooseName(request)
            if let source = request.source, !source.contains("://") {
                let path = URL(fileURLWithPath: source).standardizedFileURL.resolvingSymlinksInPath().path
                // A snapshot of a plugged VIMG disk may be plugged beside it (read-only or under an overlay).
                // Its other snapshots may be plugged too: what matters is that the writer is one of them.
                let alongside = request.snapshot != nil && (request.readOnly || request.overlay)
                let same = disks.withLock { $0.values.filter { $0.backend.source == path } }
                if let other = same.first, !(alongside && same.contains { $0.backend.image != nil }) {
                    throw BusError(
                        "\(source) is already plugged as '\(other.name)'\(other.devicePath.map { " (\($0))" } ?? "")"
                    )
                }
            }
            let backend = try Backends.open(
                request,
                opener: opener,
                alongside: { path in
                    disks.withLock { $0.values.first { $0.backend.source == path && $0.backend.image != nil } } != nil
                }
            )
            let disk = PluggedDisk(name: name, request: request, backend: backend)
            if let image = backend.image, image.hasChecksums {
                // A read that fails its checksum reaches the guest as EIO; the log says where.
                image.onChecksumMismatch { [log] error in log("\(name): \(error)") }
            }
            do {
                try attach(disk, reattach: reattach)
            } catch {
                let problems = detach(disk) + backend.close()
                for p in problems { log("plug \(name): cleanup: \(p)") }
                throw error
            }
            disks.withLock { $0[name] = disk }
            saveState()
            log("plugged \(name) (\(backend.source), \(backend.format)) as \(disk.devicePath ?? "NBD export only")")
            return info(disk)
        }
    }

    private func chooseName(_ request: PlugRequest) throws -> String {
        let taken = disks.withLock { Set($0.keys) }
        if let name = request.name {
            guard Self.validName(name) else {
                throw BusError("invalid disk name '\(name)': use up to 64 letters, digits, '.', '_' or '-'")
            }
            guard !taken.contains(name) else { throw BusError("a disk named '\(name)' is already plugged") }
            return name
        }
        var stem = "ram"
        if let source = request.source {
            if source.contains("://") {
                stem = "nbd"
            } else {
                let spec = try? RBDSpec(parsing: source)
                let base = spec?.image ?? URL(fileURLWithPath: source).deletingPathExtension().lastPathComponent
                stem = String(base.prefix(48))
                stem = String(stem.unicodeScalars.map { Self.validName(String($0)) ? Character($0) : "_" })
                if stem.isEmpty || !Self.validName(stem) { stem = spec == nil ? "disk" : "rbd" }
            }
        }
        if !taken.contains(stem) && stem != "ram" && stem != "nbd" { return stem }
        var i = 0
        while taken.contains("\(stem)\(i)") { i += 1 }
        return "\(stem)\(i)"
    }

    /// Attaches the front ends, bottom up. On failure the caller undoes what was done with `detach`.
    private func attach(_ disk: PluggedDisk, reattach: (index: UInt32, backend: String)?) throws {
        if let exporter {
            disk.metaContexts = try exporter.add(
                name: disk.name,
                device: disk.counting,
                readOnly: disk.readOnly,
                offer: exportOffer(disk)
            )
            disk.exported = true
        }
        var kind = disk.request.device
        if kind == .auto { kind = KernelNBD.isAvailable && exporter != nil ? .nbd : .loop }
        switch kind {
        case .none, .auto:
            disk.frontEnd = "none"
        case .nbd:
            guard let exporter else { throw BusError("--device nbd needs the bus's NBD server") }
            guard KernelNBD.isAvailable else {
                throw BusError(
                    "this kernel has no NBD devices (/dev/nbd0 is missing; try 'modprobe nbd', or --device loop)"
                )
            }
            let socket = try exporter.negotiatedSocket(for: disk.name)
            defer { close(socket.fd) }  // the kernel holds its own reference
            if let reattach {
                guard KernelNBD.backend(of: reattach.index) == reattach.backend else {
                    throw BusError("\(KernelNBD.path(reattach.index)) is no longer the device the last bus handed over")
                }
                try KernelNBD.reconfigure(reattach.index, socket: socket.fd, backend: reattach.backend)
                disk.nbd = reattach
            } else {
                let backend = KernelNBD.backendIdentifier(runtime: paths.runtimeDirectory, disk: disk.name)
                let index = try KernelNBD.connect(
                    socket: socket.fd,
                    size: socket.size,
                    flags: socket.flags,
                    backend: backend
                )
                disk.nbd = (index, backend)
            }
            disk.devicePath = KernelNBD.path(disk.nbd!.index)
            disk.frontEnd = "nbd"
        case .loop:
            let mountpoint = paths.mountDirectory + "/" + disk.name
            try makeDirectory(paths.mountDirectory)
            try makeDirectory(mountpoint)
            let fuse = FUSEExport(
                device: disk.counting,
                mountpoint: mountpoint,
                fileName: "disk",
                readOnly: disk.readOnly
            )
            try fuse.start()
            disk.fuse = fuse
            disk.frontEnd = "loop"
            // Direct I/O: the loop driver then sends the FUSE file asynchronous O_DIRECT requests, many in
            // flight and as large as the block layer made them, instead of buffered writes that it issues one
            // page-cache chunk at a time from a single worker. Measured (Tools/bench-bus.sh): 1 MiB writes
            // 2.5x and 4 KiB random writes at depth 32 3x faster than buffered. It also keeps no second copy
            // of every block in the FUSE file's page cache, so what the bus's NBD export writes is what the
            // loop device reads. The kernel falls back to buffered I/O where it cannot do direct I/O.
            disk.devicePath = try LoopDevice.attach(
                file: fuse.filePath,
                readOnly: disk.readOnly,
                directIO: true,
                partitionScan: true
            )
        }
    }

    /// What a disk's export offers: every consistent bitmap of a VIMG image plugged as itself (a snapshot's
    /// export shows another state than the bitmaps describe, and an overlay has none), the snapshot diffs
    /// the plug asked for, and the allocation depth of every disk.
    private func exportOffer(_ disk: PluggedDisk) -> ExportOffer {
        let image = disk.backend.image
        var bitmaps: [String] = []
        if let image, disk.request.snapshot == nil {
            for bitmap in image.bitmapList {
                if bitmap.consistent {
                    bitmaps.append(bitmap.name)
                } else {
                    log("plug \(disk.name): bitmap '\(bitmap.name)' is inconsistent (not closed cleanly); not exported")
                }
            }
        }
        return ExportOffer(
            backend: disk.backend.device,
            image: image,
            bitmaps: bitmaps,
            snapshotDiffs: disk.request.bitmapFromSnapshots ?? [],
            writable: !disk.readOnly,
            source: disk.backend.source
        )
    }

    /// Tears the front ends down, top down, and returns what failed (nothing is skipped because of it).
    func detach(_ disk: PluggedDisk) -> [String] {
        var problems: [String] = []
        if let device = disk.devicePath {
            do {
                if let nbd = disk.nbd {
                    // What was written through the block device's page cache goes to the disk first.
                    Mounts.syncDevice(device)
                    try KernelNBD.disconnect(nbd.index)
                } else {
                    try LoopDevice.detach(device)
                }
            } catch {
                problems.append("\(error)")
            }
        }
        if let fuse = disk.fuse {
            fuse.stop()
            rmdir(fuse.mountpoint)
        }
        if disk.exported { exporter?.remove(name: disk.name) }
        return problems
    }

    // MARK: Unplug

    func find(_ target: String) throws -> PluggedDisk {
        try disks.withLock { table in
            if let disk = table[target] { return disk }
            let resolved = URL(fileURLWithPath: target).resolvingSymlinksInPath().path
            if let disk = table.values.first(where: { $0.devicePath == target || $0.devicePath == resolved }) {
                return disk
            }
            throw BusError(
                "no plugged disk is named '\(target)'\(table.isEmpty ? " (nothing is plugged)" : "; see 'vdisk list'")"
            )
        }
    }

    /// Flushes, detaches and closes a disk. Refuses while it is mounted unless `force` (which unmounts).
    public func unplug(_ target: String, force: Bool) throws -> [String] {
        try operations.withLock { _ in try unplugLocked(try find(target), force: force) }
    }

    public func unplugAll(force: Bool) throws -> [String] {
        try operations.withLock { _ in
            var notes: [String] = []
            var failures: [String] = []
            for disk in disks.withLock({ Array($0.values) }).sorted(by: { $0.name < $1.name }) {
                do { notes += try unplugLocked(disk, force: force) } catch { failures.append("\(error)") }
            }
            if !failures.isEmpty { throw BusError(failures.joined(separator: "; ")) }
            return notes
        }
    }

    /// How long an unplug waits for a remote disk's lost server to take the final flush (at most the disk's
    /// reconnect timeout). Without a bound, unplugging a disk whose server is gone would wait the whole
    /// reconnect timeout, up to a day.
    static let unplugFlushGrace = 10.0

    /// The flush before a disk leaves. For a remote disk it waits at most `unplugFlushGrace` for a lost
    /// server, then closes the connection, which ends the wait: the writes that server had acknowledged but
    /// not flushed are lost, as they would be if it had crashed for good, and the unplug says so.
    private func finalFlush(_ disk: PluggedDisk) throws {
        let remotes = disk.backend.owned.compactMap { $0 as? any BlockDevice & ConnectionStatusReporting }
        guard !remotes.isEmpty else { return try disk.counting.flush() }
        final class Outcome: @unchecked Sendable {
            // Written before `finished` is signalled, read after it was waited for.
            var error: (any Error)?
            let finished = DispatchSemaphore(value: 0)
        }
        let outcome = Outcome()
        let counting = disk.counting
        spawnThread {
            do { try counting.flush() } catch { outcome.error = error }
            outcome.finished.signal()
        }
        let grace = min(Self.unplugFlushGrace, remotes.map(\.connectionStatus.reconnectTimeout).min()!)
        if outcome.finished.wait(timeout: .now() + grace) == .timedOut {
            for device in remotes { try? device.close() }
            // The flush ends within a fraction of a second once closed; it is not waited for beyond that.
            if outcome.finished.wait(timeout: .now() + 5) == .success, outcome.error == nil { return }
            throw BusError(
                "the server did not come back within \(Int(grace)) s, so the writes it had not flushed are lost"
            )
        }
        if let error = outcome.error { throw error }
    }

    /// - Parameter forget: drop the disk from the remembered table (not at shutdown, so that a persistent
    ///   bus re-plugs it when it starts again).
    func unplugLocked(_ disk: PluggedDisk, force: Bool, forget: Bool = true) throws -> [String] {
        var notes: [String] = []
        if let device = disk.devicePath {
            let mounts = Mounts.mounted(onDevice: device)
            if !mounts.isEmpty {
                let list = mounts.map { "\($0.device) on \($0.mountpoint)" }.joined(separator: ", ")
                guard force else {
                    throw BusError(
                        "'\(disk.name)' is mounted (\(list)); unmount it first, or use --force to unmount it"
                    )
                }
                for m in mounts.reversed() {
                    try Mounts.unmount(m.mountpoint)
                    notes.append("unmounted \(m.mountpoint)")
                }
            }
            // Device-mapper devices (LVM) on the disk keep it open and would turn to I/O errors.
            let holders = Mounts.holders(of: device)
            if !holders.isEmpty {
                guard force else {
                    throw BusError(
                        "'\(disk.name)' is in use by device-mapper (\(holders.joined(separator: ", "))); deactivate it "
                            + "first (vgchange -an VG, or dmsetup remove), or use --force"
                    )
                }
                for holder in holders {
                    let result = try Subprocess.run(
                        "dmsetup",
                        ["remove", "--noudevsync", holder],
                        timeout: toolTimeout
                    )
                    guard result.status == 0 else {
                        throw BusError("cannot remove \(holder): dmsetup exit \(result.status): \(result.output)")
                    }
                    notes.append("removed device-mapper \(holder)")
                }
            }
        }
        // Flush while the front ends still hold the device, so nothing is in flight below them. A disk
        // whose power was cut has nothing left to flush: its image holds the post-crash state.
        var problems: [String] = []
        let crashed = disk.backend.crashSim?.hasCrashed ?? false
        if !crashed {
            do { try finalFlush(disk) } catch { problems.append("flush: \(error)") }
        }
        problems += detach(disk)
        problems += disk.backend.close()
        disks.withLock { _ = $0.removeValue(forKey: disk.name) }
        if forget { saveState() }
        log("unplugged \(disk.name)\(problems.isEmpty ? "" : " with problems: \(problems.joined(separator: "; "))")")
        if !problems.isEmpty {
            throw BusError("'\(disk.name)' was unplugged, but: \(problems.joined(separator: "; "))")
        }
        notes.append(
            "unplugged \(disk.name)" + (crashed ? " (after its power cut; the image holds what survived)" : "")
        )
        return notes
    }

    // MARK: Snapshot

    /// Takes an internal snapshot of a plugged VIMG disk. Each file system mounted from it (its partitions,
    /// LVM on them) is frozen while the snapshot is taken, or, when it cannot be frozen (FUSE) or `freeze`
    /// is false, synced first: the notes say which consistency each one got. Every frozen file system is
    /// thawed whatever happens after it was frozen.
    public func snapshot(_ target: String, name: String, freeze: Bool = true) throws -> [String] {
        try operations.withLock { _ in
            let disk = try find(target)
            // A VIMG image takes an internal snapshot (wherever it is stored); a raw RBD image an RBD snapshot.
            let rbd = disk.request.overlay ? nil : disk.backend.device as? RBDDevice
            guard disk.backend.image != nil || rbd != nil, !disk.request.overlay else {
                throw BusError(
                    "'\(disk.name)' is not a VIMG image (\(disk.backend.format)); only VIMG disks have internal snapshots"
                )
            }
            guard !disk.readOnly else {
                throw BusError("'\(disk.name)' is plugged read-only; snapshots change the image")
            }
            var held: [Mounts.Held] = []
            var thawProblems: [String] = []
            defer {
                for h in held.reversed() { if let problem = h.release() { thawProblems.append(problem) } }
                for problem in thawProblems { log("snapshot \(disk.name): \(problem)") }
            }
            if let device = disk.devicePath {
                for m in Mounts.mounted(onDevice: device) { held.append(try Mounts.hold(m, freeze: freeze)) }
            }
            if let image = disk.backend.image {
                try image.flush()
                try image.createSnapshot(named: name)
                try image.flush()
            } else if let rbd {
                try rbd.flush()
                try rbd.createSnapshot(named: name)
            }
            log("snapshot '\(name)' of \(disk.name)")
            var notes = ["snapshot '\(name)' of \(disk.name) created"]
            for h in held {
                let what = "\(h.mount.mountpoint) (\(h.mount.type) on \(h.mount.device))"
                switch h.consistency {
                case .frozen: notes.append("\(what): frozen")
                case .crashConsistent(let reason): notes.append("\(what): crash-consistent (\(reason); synced)")
                }
            }
            return notes
        }
    }

    // MARK: Persistence

    struct State: Codable {
        var disks: [PlugRequest]
    }

    func saveState() {
        guard persist else { return }
        let requests = disks.withLock { table in
            table.values.sorted { $0.name < $1.name }.compactMap { disk -> PlugRequest? in
                // RAM disks and overlays hold nothing worth re-plugging after a restart, and a recording
                // cannot go on in a log that was closed.
                guard disk.request.ramSize == nil, !disk.request.overlay, disk.request.record == nil else {
                    return nil
                }
                var r = disk.request
                r.name = disk.name
                r.source = disk.backend.source
                return r
            }
        }
        do {
            let bytes = try Wire.encode(State(disks: requests))
            let temporary = paths.stateFile + ".tmp"
            try Data(bytes).write(to: URL(fileURLWithPath: temporary))
            guard rename(temporary, paths.stateFile) == 0 else { throw BusError(String(cString: strerror(errno))) }
        } catch {
            log("cannot save \(paths.stateFile): \(error)")
        }
    }

    /// Re-plugs the disks remembered by an earlier bus (with `persist`).
    public func restoreState() {
        guard persist, let data = FileManager.default.contents(atPath: paths.stateFile) else { return }
        guard let state = try? JSONDecoder().decode(State.self, from: data) else {
            log("ignoring unreadable \(paths.stateFile)")
            return
        }
        for request in state.disks {
            // Taken over from the previous bus already (a planned restart).
            if let name = request.name, disks.withLock({ $0[name] != nil }) { continue }
            do {
                let info = try plug(request)
                log("re-plugged \(info.name) as \(info.device ?? "NBD export")")
            } catch {
                log("cannot re-plug \(request.name ?? request.source ?? "?"): \(error)")
            }
        }
    }

    /// Unplugs everything at shutdown (forced: the bus is going away either way), keeping the state file.
    public func shutDown() {
        let names = disks.withLock { Array($0.keys) }
        for name in names.sorted() {
            do {
                _ = try operations.withLock { _ -> [String] in
                    guard let disk = disks.withLock({ $0[name] }) else { return [] }
                    return try unplugLocked(disk, force: true, forget: false)
                }
            } catch {
                log("shutdown: \(error)")
            }
        }
    }
}

func makeDirectory(_ path: String) throws {
    if mkdir(path, 0o700) != 0 && errno != EEXIST {
        throw BusError("cannot create \(path): \(String(cString: strerror(errno)))")
    }
}
