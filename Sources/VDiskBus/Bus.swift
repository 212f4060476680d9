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
// unplugging are serialized (they are rare and slow), I/O never takes that lock.

import BlockIO
import FUSEExport
import Foundation
import Synchronization
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Exports plugged disks over NBD (the bus's NBD server).
public protocol BusExporter: Sendable {
    func add(name: String, device: any BlockDevice, readOnly: Bool) throws
    func remove(name: String)
    /// The URI of an export, e.g. `nbd+unix:///NAME?socket=/run/vdisk/nbd.sock`.
    func uri(for name: String) -> String
    /// The unix socket the exports are on (for the kernel NBD client).
    var socketPath: String { get }
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
    private let disks = Mutex<[String: PluggedDisk]>([:])
    /// Serializes plug/unplug/snapshot: each takes seconds at most and must see a stable table.
    private let operations = Mutex<Void>(())
    let log: @Sendable (String) -> Void

    public init(
        paths: BusPaths,
        opener: BusOpener,
        exporter: (any BusExporter)?,
        persist: Bool,
        log: @escaping @Sendable (String) -> Void
    ) {
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
                return BusResponse(ok: true, disks: list())
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
                let notes = try snapshot(target, name: snap)
                return BusResponse(ok: true, notes: notes)
            case .shutdown:
                return BusResponse(ok: true)
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
            source: disk.backend.source,
            format: disk.backend.format,
            size: disk.counting.size,
            readOnly: disk.readOnly,
            overlay: disk.request.overlay,
            snapshot: disk.request.snapshot,
            nbdURI: disk.exported ? exporter?.uri(for: disk.name) : nil,
            counters: disk.counting.snapshot
        )
    }

    // MARK: Plug

    static func validName(_ name: String) -> Bool {
        !name.isEmpty && name.count <= 64 && name.first != "." && name.first != "-"
            && name.unicodeScalars.allSatisfy {
                CharacterSet.alphanumerics.contains($0) && $0.isASCII || "._-".unicodeScalars.contains($0)
            }
    }

    /// Plugs a disk and returns what was attached.
    public func plug(_ request: PlugRequest) throws -> DiskInfo {
        try operations.withLock { _ in
            let name = try chooseName(request)
            if let source = request.source, !source.contains("://") {
                let path = URL(fileURLWithPath: source).standardizedFileURL.resolvingSymlinksInPath().path
                // A snapshot of a plugged VIMG disk may be plugged beside it (read-only or under an overlay).
                let alongside = request.snapshot != nil && (request.readOnly || request.overlay)
                if let other = disks.withLock({ $0.values.first { $0.backend.source == path } }),
                    !(alongside && other.backend.image != nil)
                {
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
            do {
                try attach(disk)
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
                stem = String(URL(fileURLWithPath: source).deletingPathExtension().lastPathComponent.prefix(48))
                stem = String(stem.unicodeScalars.map { Self.validName(String($0)) ? Character($0) : "_" })
                if stem.isEmpty || !Self.validName(stem) { stem = "disk" }
            }
        }
        if !taken.contains(stem) && stem != "ram" && stem != "nbd" { return stem }
        var i = 0
        while taken.contains("\(stem)\(i)") { i += 1 }
        return "\(stem)\(i)"
    }

    /// Attaches the front ends, bottom up. On failure the caller undoes what was done with `detach`.
    private func attach(_ disk: PluggedDisk) throws {
        if let exporter {
            try exporter.add(name: disk.name, device: disk.counting, readOnly: disk.readOnly)
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
            disk.devicePath = try KernelNBD.connect(
                socket: exporter.socketPath,
                export: disk.name,
                readOnly: disk.readOnly
            )
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

    /// Tears the front ends down, top down, and returns what failed (nothing is skipped because of it).
    private func detach(_ disk: PluggedDisk) -> [String] {
        var problems: [String] = []
        if let device = disk.devicePath {
            do {
                if disk.frontEnd == "nbd" { try KernelNBD.disconnect(device) } else { try LoopDevice.detach(device) }
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

    /// - Parameter forget: drop the disk from the remembered table (not at shutdown, so that a persistent
    ///   bus re-plugs it when it starts again).
    private func unplugLocked(_ disk: PluggedDisk, force: Bool, forget: Bool = true) throws -> [String] {
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
        }
        // Flush while the front ends still hold the device, so nothing is in flight below them. A disk
        // whose power was cut has nothing left to flush: its image holds the post-crash state.
        var problems: [String] = []
        let crashed = disk.backend.crashSim?.hasCrashed ?? false
        if !crashed {
            do { try disk.counting.flush() } catch { problems.append("flush: \(error)") }
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

    /// Takes an internal snapshot of a plugged VIMG disk. File systems mounted from it are frozen around
    /// the snapshot (fsfreeze), so it holds a consistent file system, not just consistent blocks.
    public func snapshot(_ target: String, name: String) throws -> [String] {
        try operations.withLock { _ in
            let disk = try find(target)
            guard let image = disk.backend.image, !disk.request.overlay else {
                throw BusError(
                    "'\(disk.name)' is not a VIMG image (\(disk.backend.format)); only VIMG disks have internal snapshots"
                )
            }
            guard !disk.readOnly else {
                throw BusError("'\(disk.name)' is plugged read-only; snapshots change the image")
            }
            var frozen: [String] = []
            defer { for m in frozen.reversed() { _ = Mounts.thaw(m) } }
            if let device = disk.devicePath {
                for m in Mounts.mounted(onDevice: device) {
                    try Mounts.freeze(m.mountpoint)
                    frozen.append(m.mountpoint)
                }
            }
            try image.flush()
            try image.createSnapshot(named: name)
            try image.flush()
            log("snapshot '\(name)' of \(disk.name)")
            return [
                "snapshot '\(name)' of \(disk.name) created"
                    + (frozen.isEmpty ? "" : " (froze \(frozen.joined(separator: ", ")))")
            ]
        }
    }

    // MARK: Persistence

    struct State: Codable {
        var disks: [PlugRequest]
    }

    private func saveState() {
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
