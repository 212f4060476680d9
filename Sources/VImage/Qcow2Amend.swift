// Design notes
// ------------
// `vimg amend` on qcow2 changes what costs a header rewrite and nothing more: the compat level (version 2
// or 3) and lazy refcounts. Changes that would rewrite tables or data (the refcount width, expanding zero
// clusters for a downgrade: qemu allocates clusters for them, and a preallocated zero cluster qemu wrote may
// be shared with a snapshot, so it cannot simply be zeroed in place) are refused, saying why.
//
// Order, so that a crash at any point leaves an image both qemu and vdisk open:
//   1. The engine opens the image read-write, which settles a dirty lazy-refcounts image (qemu's rule:
//      no downgrade and no lazy-refcounts change over unsettled refcounts), and closes it clean.
//      An upgrade with snapshots first rewrites the snapshot table: this writer always gives each entry the
//      16 bytes of extra data (VM state size, disk size) that version 3 requires and version 2 allows.
//   2. One write of the new header, then a flush. The header is rewritten whole, as every qcow2 header
//      update is (Qcow2Format.encodeHeader); the version, the feature fields and the extension area's
//      start change together.

import BlockIO

/// The qcow2 header options `vimg amend` changes in place (nil: unchanged).
public struct Qcow2Amendment: Sendable, Hashable {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    public var version: UInt32?
    public var lazyRefcounts: Bool?

    public init(version: UInt32? = nil, lazyRefcounts: Bool? = nil) {
        self.version = version
        self.lazyRefcounts = lazyRefcounts
    }
}

extension VImage {
    /// Changes a qcow2 image's compat level and lazy-refcounts bit in place. `host` is the image file,
    /// opened read-write and locked by the caller; no engine may have it open.
    /// - Throws: `VImageError.invalidArgument` for a change that needs more than a header rewrite (the
    ///   message names the command that does it), and whatever opening the image for writing throws.
    public static func amendQcow2(host: any BlockDevice, path: String?, _ amendment: Qcow2Amendment) throws {
        let before = try Qcow2Header.read(from: host, path: path)
        func refuse(_ message: String) -> VImageError { VImageError(.invalidArgument, path: path, message: message) }
        let version = amendment.version ?? before.version
        guard version == 2 || version == 3 else { throw refuse("compat must be 0.10 or 1.1") }
        let lazy = amendment.lazyRefcounts ?? (before.compatibleFeatures & Qcow2Header.lazyRefcountsBit != 0)
        if lazy && version < 3 {
            throw refuse("lazy refcounts need compat=1.1 (a version 2 header has no feature bits)")
        }
        if version < before.version {
            let extra = before.incompatibleFeatures & ~(Qcow2Header.dirtyBit | Qcow2Header.corruptBit)
            guard extra == 0 else {
                throw refuse("cannot downgrade an image with incompatible features 0x\(String(extra, radix: 16)) set")
            }
            guard before.refcountOrder == 4 else {
                throw refuse(
                    "version 2 has only 16-bit refcounts, and changing the width rewrites every refcount block, "
                        + "which vimg amend does not do"
                )
            }
        }

        // 1. Settle the image through the engine (and rewrite the snapshot table for an upgrade).
        let image = try VImage.open(host: host, path: path, readOnly: false, backing: MemoryDevice(size: 0))
        do {
            if version < before.version, try image.hasZeroClusters() {
                throw refuse(
                    "the image has zero clusters, which version 2 cannot describe; expanding them rewrites data "
                        + "clusters, which vimg amend does not do ('qemu-img amend -o compat=0.10' does)"
                )
            }
            if version > before.version, before.snapshotCount > 0 {
                try image.mutateSnapshots { m in try m.switchSnapshotTable(to: m.snapshots, beforeSwitch: { _ in }) }
            }
            try image.close()
        } catch {
            try? image.close()
            throw error
        }

        // 2. The new header, written whole.
        var after = try Qcow2Header.read(from: host, path: path)
        guard !after.isDirty, !after.isCorrupt else { throw refuse("the image is not clean after opening it") }
        if version != after.version {
            after.version = version
            after.incompatibleFeatures = 0
            after.autoclearFeatures = 0
            after.compressionType = .zlib
            after.headerTail = []
            if version >= 3 {
                after.headerLength = 112
            } else {
                after.headerLength = 72
                // A version 2 header has no feature bits to name.
                after.otherExtensions.removeAll { $0.type == Qcow2Header.featureTableExtension }
            }
        }
        if version >= 3 {
            after.compatibleFeatures =
                lazy
                ? after.compatibleFeatures | Qcow2Header.lazyRefcountsBit
                : after.compatibleFeatures & ~Qcow2Header.lazyRefcountsBit
        } else {
            after.compatibleFeatures = 0
        }
        let bytes = after.encode()
        guard bytes.count <= after.clusterSize else { throw refuse("the new header does not fit in one cluster") }
        try wrapIO(path) {
            try host.write(bytes, at: 0)
            try host.flush()
        }
    }

    /// Whether any L2 table the active disk or a snapshot reaches holds a zero entry.
    func hasZeroClusters() throws -> Bool {
        try state.withLock { m in
            var tables = Set<UInt64>()
            for l1 in [m.l1] + (try m.snapshots.map { try m.readSnapshotL1($0) }) {
                for raw in l1 { if let table = L1Entry(rawValue: raw).l2Table { tables.insert(table.rawValue) } }
            }
            for offset in tables.sorted() {
                let entries = try m.l2Table(at: HostOffset(offset)).entries
                if entries.contains(where: { if case .zero = m.format.entries.decode($0) { true } else { false } }) {
                    return true
                }
            }
            return false
        }
    }
}
