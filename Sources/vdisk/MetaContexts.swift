import BlockIO
import ImageFormats
import NBDProtocol
import NBDServer
import VImage

// Design notes
// ------------
// The NBD metadata contexts an export offers besides base:allocation, built the same way for `vdisk serve`
// and for the bus's exports (docs/NBD.md, "Changed blocks"):
//
//   qemu:allocation-depth        every export: which level of the backing chain holds each range
//   qemu:dirty-bitmap:NAME       a persistent bitmap of a VIMG image, read live at each request
//   qemu:dirty-bitmap:FROM..TO   a snapshot diff, computed once from the L2 tables when the export starts
//
// A bitmap is read live, not copied: a bitmap that the export's own writes keep recording is exported as
// it is at each BLOCK_STATUS (bits are set before a write is acknowledged, so a write a client saw
// completing is in every later answer). Only consistent bitmaps are offered: a stale one (after a crash)
// would tell a backup tool to skip changed data, so it is refused with the way out.
//
// A snapshot diff is fixed once computed, so its target must not change: a snapshot, or the exported
// state of an export that nothing writes (read-only, or a snapshot view).

/// Why an export's contexts cannot be built; one line for the user.
struct MetaContextError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// `FROM..TO`: the changes from snapshot FROM (empty: an empty disk) to snapshot TO (empty: the state the
/// export shows), as `--bitmap-from-snapshots` spells it.
struct SnapshotRange: Hashable {
    var from: String?
    var to: String?
    /// The spelling given, which names the context: `qemu:dirty-bitmap:FROM..TO`.
    var spelling: String

    init(parsing text: String) throws {
        let parts = text.components(separatedBy: "..")
        guard parts.count == 2 else {
            throw MetaContextError(
                "'\(text)' is not a snapshot range: write FROM..TO (either may be empty; names must not contain '..')"
            )
        }
        from = parts[0].isEmpty ? nil : parts[0]
        to = parts[1].isEmpty ? nil : parts[1]
        spelling = text
    }
}

enum MetaContexts {
    /// The contexts of one export.
    /// - Parameters:
    ///   - device: the exported device, below any wrapper (its chain answers qemu:allocation-depth).
    ///   - image: the VIMG image, if the device is one (a clone's top level, or a snapshot view).
    ///   - bitmaps: names of its persistent bitmaps to offer.
    ///   - snapshotRanges: `FROM..TO` diffs to offer.
    ///   - changing: whether the exported state can change while served (a diff to it would go stale).
    ///   - path: the image's path, for messages.
    /// - Throws: `MetaContextError` for a bitmap that is missing or stale, a diff that cannot be made, or
    ///   two contexts with one name.
    static func make(
        device: any BlockDevice,
        image: VImage?,
        bitmaps: [String],
        snapshotRanges: [SnapshotRange],
        changing: Bool,
        path: String
    ) throws -> [NBDMetaContext] {
        var contexts = [allocationDepth(device)]
        for name in bitmaps {
            contexts.append(try dirtyBitmap(name, of: image, path: path))
        }
        for range in snapshotRanges {
            contexts.append(try snapshotDiff(range, of: image, changing: changing, path: path))
        }
        var seen: Set<String> = []
        for context in contexts {
            guard seen.insert(context.name).inserted else {
                throw MetaContextError("\(path): '\(context.name)' is offered twice; rename the bitmap or drop one")
            }
            guard context.name.utf8.count <= NBDLimits.maximumString else {
                throw MetaContextError("\(path): the context name '\(context.name)' is over 4096 bytes")
            }
        }
        return contexts
    }

    /// `qemu:allocation-depth` over the device's backing chain.
    static func allocationDepth(_ device: any BlockDevice) -> NBDMetaContext {
        NBDMetaContext(name: NBDQemuContext.allocationDepth) { offset, count in
            try ImageFormats.allocationDepth(of: device, at: offset, count: count).map {
                NBDStatusRun(offset: $0.offset, length: $0.length, flags: UInt32($0.depth))
            }
        }
    }

    /// `qemu:dirty-bitmap:NAME`: a live view of a consistent persistent bitmap.
    static func dirtyBitmap(_ name: String, of image: VImage?, path: String) throws -> NBDMetaContext {
        guard let image else {
            throw MetaContextError("\(path) is not a VIMG image: only VIMG images have dirty bitmaps")
        }
        guard let info = image.bitmapList.first(where: { $0.name == name }) else {
            let known = image.bitmapList.map { "'\($0.name)'" }.joined(separator: ", ")
            throw MetaContextError(
                "\(path) has no bitmap '\(name)'" + (known.isEmpty ? " (it has none)" : " (it has \(known))")
            )
        }
        guard info.consistent else {
            throw MetaContextError(
                "bitmap '\(name)' of \(path) is inconsistent (the image was not closed cleanly, or was written "
                    + "by a program that does not keep bitmaps), so it cannot say what changed: take a full "
                    + "backup, then replace it (vimg bitmap --remove, then --add)"
            )
        }
        return NBDMetaContext(name: NBDQemuContext.dirtyBitmap(name)) { offset, count in
            try image.bitmapRuns(named: name, at: offset, count: count).map {
                NBDStatusRun(offset: $0.offset, length: $0.length, flags: $0.dirty ? NBDQemuContext.dirty : 0)
            }
        }
    }

    /// `qemu:dirty-bitmap:FROM..TO`: what changed between two snapshots (or a snapshot and the exported
    /// state), from the L2 tables, as a read-only bitmap with one granule per cluster.
    static func snapshotDiff(
        _ range: SnapshotRange,
        of image: VImage?,
        changing: Bool,
        path: String
    ) throws -> NBDMetaContext {
        guard let image else {
            throw MetaContextError("\(path) is not a VIMG image: only VIMG images have snapshot diffs")
        }
        if range.to == nil && changing {
            throw MetaContextError(
                "'\(range.spelling)' ends at the live disk, which this export writes: serve it read-only "
                    + "(--read-only), or name a snapshot after '..'"
            )
        }
        var changes = try image.changes(from: range.from, to: range.to)
        // TO may be smaller than the exported disk (it grew since): what lies past TO's end is not
        // described by the diff, so it counts as changed rather than let a backup skip it.
        let targetSize =
            range.to.flatMap { to in image.snapshotList.first { $0.name == to }?.virtualSize } ?? image.size
        if targetSize < image.size {
            changes.append(ChangedExtent(offset: targetSize, length: image.size - targetSize, isZero: false))
        }
        let diff = changes
        return NBDMetaContext(name: NBDQemuContext.dirtyBitmap(range.spelling)) { offset, count in
            diff.runs(at: offset, count: count).map {
                NBDStatusRun(offset: $0.offset, length: $0.length, flags: $0.dirty ? NBDQemuContext.dirty : 0)
            }
        }
    }
}
