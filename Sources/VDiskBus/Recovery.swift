// Design notes
// ------------
// A bus is one process; it can die without unplugging anything (kill -9, a crash, the OOM killer). What
// it leaves, and what the next bus on the same runtime folder does with it:
//
//   left behind                                   next bus
//   /dev/nbdN, backend "vdisk:RUNTIME:NAME:..."   disconnects it: its requests fail with EIO (the engine
//                                                 may have lost acknowledged, unflushed writes, so the
//                                                 device must not carry on as if nothing happened)
//   /dev/loopN over RUNTIME/mnt/NAME/disk         detaches it (or, while mounted, leaves it to be
//                                                 unbound by the kernel at the last close)
//   a dead FUSE mount on RUNTIME/mnt/NAME         unmounts it (lazily) and removes the folder
//
// Devices that do not carry this runtime folder (someone's loop device, qemu-nbd -c, another bus) are
// never touched. Everything found is logged and listed by `vdisk list` until the bus stops.
//
// The planned restart (`vdisk bus --restart`, for upgrades) is a handover instead of a crash:
//
//   old bus: withdraw each export (closing the kernel's connection), seal the disk (requests that still
//            arrive are never answered: the kernel sends them again later), flush and close it cleanly,
//            write RUNTIME/handover.json, exit
//   kernel:  its socket is dead; it holds new requests for up to the dead-connection timeout, and re-sends
//            those that were in flight once a new socket is attached
//   new bus: read and delete handover.json (a crash after this point is a crash, not a handover), re-open
//            every disk, NBD_CMD_RECONFIGURE each /dev/nbdN with a socket to itself
//
// Loop devices cannot be moved to another process while mounted (the FUSE file dies with the old bus), so
// the handover refuses while one is mounted; unmounted ones are plugged again under the same name.

import FUSEExport
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One disk handed from a bus to its successor.
struct HandedOverDisk: Codable {
    var request: PlugRequest
    /// The /dev/nbdN the kernel keeps for it, and the backend identifier it carries.
    var nbdIndex: UInt32?
    var nbdBackend: String?
}

extension Bus {
    var handoverFile: String { paths.runtimeDirectory + "/handover.json" }

    /// Flushes and closes every disk, keeping each /dev/nbdN for the next bus, and writes the handover
    /// file. The bus must exit right after (its sealed disks never answer again).
    func handOver() throws -> [String] {
        try operations.withLock { _ in
            let all = disks.withLock { Array($0.values) }.sorted { $0.name < $1.name }
            for disk in all where disk.request.ramSize != nil || disk.request.overlay {
                throw BusError(
                    "'\(disk.name)' keeps its data in this bus's memory (RAM disk or overlay) and cannot move to a "
                        + "new bus; unplug it first"
                )
            }
            for disk in all where disk.frontEnd == "loop" {
                if let device = disk.devicePath, !Mounts.mounted(onDevice: device).isEmpty {
                    throw BusError(
                        "'\(disk.name)' (\(device)) is mounted, and a loop device cannot move to a new bus; "
                            + "unmount it first (disks on /dev/nbdN can stay mounted)"
                    )
                }
            }
            var records: [HandedOverDisk] = []
            var notes: [String] = []
            for disk in all {
                var request = disk.request
                request.name = disk.name
                request.source = disk.backend.source == "ram" ? nil : disk.backend.source
                guard let nbd = disk.nbd else {
                    notes += try unplugLocked(disk, force: false, forget: false)
                    records.append(HandedOverDisk(request: request))
                    continue
                }
                exporter?.remove(name: disk.name)
                if !disk.counting.seal(waitingAtMost: 30) {
                    log("handover \(disk.name): requests still running after 30 s")
                }
                var problems: [String] = []
                do { try disk.counting.inner.flush() } catch { problems.append("flush: \(error)") }
                problems += disk.backend.close()
                disks.withLock { _ = $0.removeValue(forKey: disk.name) }
                guard problems.isEmpty else {
                    // Not safely on disk: the device must not be reattached to what may be stale.
                    try? KernelNBD.disconnect(nbd.index)
                    notes.append(
                        "'\(disk.name)' could not be closed cleanly (\(problems.joined(separator: "; "))); disconnected"
                    )
                    continue
                }
                records.append(HandedOverDisk(request: request, nbdIndex: nbd.index, nbdBackend: nbd.backend))
                notes.append("handed over \(disk.name) (\(disk.devicePath ?? "export"))")
            }
            try writeAtomically(try Wire.encode(records), to: handoverFile)
            log("handed over \(records.count) disk(s) in \(handoverFile)")
            return notes
        }
    }

    /// Takes over what a planned restart handed over, then removes what a dead predecessor left behind.
    public func recover() {
        var found: [String] = []
        if let data = FileManager.default.contents(atPath: handoverFile) {
            // Deleted before anything is reattached: if this bus dies during the takeover, the next one must
            // treat the devices as a crash's leftovers.
            unlink(handoverFile)
            do {
                for record in try JSONDecoder().decode([HandedOverDisk].self, from: data) {
                    found.append(takeOver(record))
                }
            } catch {
                found.append("ignored an unreadable \(handoverFile): \(error)")
            }
        }
        found += removeLeftovers()
        for line in found { log(line) }
        recovered.withLock { $0 += found }
    }

    private func takeOver(_ record: HandedOverDisk) -> String {
        let name = record.request.name ?? record.request.source ?? "?"
        var reattach: (UInt32, String)?
        if let index = record.nbdIndex, let backend = record.nbdBackend { reattach = (index, backend) }
        do {
            let info = try plug(record.request, reattach: reattach)
            return "took over \(info.name) as \(info.device ?? "an NBD export") from the previous bus"
        } catch {
            if let (index, backend) = reattach, KernelNBD.backend(of: index) == backend {
                try? KernelNBD.disconnect(index)
                return "could not take over \(name) (\(error)); disconnected \(KernelNBD.path(index)): its I/O fails"
            }
            return "could not take over \(name): \(error)"
        }
    }

    /// Disconnects, detaches and unmounts what carries this runtime folder but is not in the table.
    func removeLeftovers() -> [String] {
        var found: [String] = []
        let ours = Set(disks.withLock { $0.values.compactMap { $0.nbd?.index } })
        let prefix = KernelNBD.backendPrefix(runtime: paths.runtimeDirectory)
        for index in KernelNBD.devices() where !ours.contains(index) {
            guard let backend = KernelNBD.backend(of: index), backend.hasPrefix(prefix) else { continue }
            let disk = backend.dropFirst(prefix.count).split(separator: ":").first.map(String.init) ?? "?"
            do {
                try KernelNBD.disconnect(index)
                found.append(
                    "disconnected \(KernelNBD.path(index)) (disk \(disk)) left by a bus that stopped without "
                        + "unplugging: its I/O now fails; unmount what is mounted from it"
                )
            } catch {
                found.append("cannot disconnect \(KernelNBD.path(index)) (disk \(disk)) left by a dead bus: \(error)")
            }
        }
        let mountRoot = paths.mountDirectory + "/"
        for name in (try? FileManager.default.contentsOfDirectory(atPath: "/sys/block")) ?? [] {
            guard name.hasPrefix("loop"), let backing = LoopDevice.backingFile(of: "/dev/\(name)"),
                backing.hasPrefix(mountRoot)
            else { continue }
            do {
                try LoopDevice.detach("/dev/\(name)")
                found.append("detached /dev/\(name) over \(backing), left by a bus that stopped without unplugging")
            } catch {
                found.append("/dev/\(name) over \(backing) (left by a dead bus): \(error)")
            }
        }
        let live = Set(disks.withLock { $0.values.compactMap { $0.fuse?.mountpoint } })
        let mountinfo = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for line in mountinfo.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 4 else { continue }
            let point = Mounts.unescape(String(fields[4]))
            guard point.hasPrefix(mountRoot), !live.contains(point) else { continue }
            if umount2(point, Int32(MNT_DETACH)) == 0 {
                rmdir(point)
                found.append("unmounted \(point), a FUSE file system left by a bus that stopped without unplugging")
            } else {
                found.append("cannot unmount \(point) (left by a dead bus): \(String(cString: strerror(errno)))")
            }
        }
        return found
    }
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one, and durably.
func writeAtomically(_ bytes: [UInt8], to path: String) throws {
    let temporary = path + ".tmp"
    let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard fd >= 0 else { throw BusError("cannot write \(temporary): \(String(cString: strerror(errno)))") }
    let written = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    let synced = fsync(fd) == 0
    close(fd)
    guard written == bytes.count, synced, rename(temporary, path) == 0 else {
        throw BusError("cannot write \(path): \(String(cString: strerror(errno)))")
    }
}
