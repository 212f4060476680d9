// Design notes
// ------------
// qcow2 as an engine format: the same allocator, write path and write ordering as VIMG, with qcow2's
// encodings (FormatCodec.swift). The engine works on an `ImageHeader`; a qcow2 header maps onto it and
// back, and everything VIMG's header has no field for rides along in `Qcow2Format.original`:
//
//   qcow2 header              engine header                 back to qcow2
//   dirty, corrupt bits       .dirty, .corrupt              the same bits; other incompatible bits kept
//   compatible, autoclear     kept / autoclear as is        lazy_refcounts kept; autoclear cleared on write
//   backing file name         extension 1                   name after the extensions, offset recomputed
//   backing format ext.       extension 2                   0xE2792ACA
//   other extensions          kept in `original`            written back byte for byte
//   snapshots_offset, count   snapshot table offset, count  (the table's size is found by parsing it)
//
// Refused for writing, with the reason: extended L2 entries and external data files (the incompatible bits,
// refused by Qcow2Header), persistent bitmaps (this engine would silently invalidate them), and layouts the
// engine does not take (clusters under 4 KiB, sizes not a multiple of 512). A dirty bit (lazy refcounts left
// unsettled by a crash: refcounts may be too low) is repaired by a writer's open, as qemu does it.
//
// Snapshot entries keep qemu's VM-state fields (vm_state_size, vm_clock, icount, any extra data) and
// their L1 tables, which may map more than the disk (the saved VM state lies past the disk's end).

import BlockIO

/// qcow2 versions 2 and 3 (qemu's docs/interop/qcow2.txt; FORMAT.md, "Differences from qcow2").
struct Qcow2Format: OnDiskFormat {
    /// The header as read (or created): what the engine header cannot hold.
    let original: Qcow2Header

    var name: String { "qcow2" }
    var entries: EntryCodec { .qcow2(clusterBits: Int(original.clusterBits)) }
    var refcounts: RefcountWidth { RefcountWidth(order: Int(original.refcountOrder)) }
    var compression: CompressedEncoding { .qcow2(original.compressionType) }
    var hasZeroEntries: Bool { original.version >= 3 }
    var setsDirtyBit: Bool { false }
    var tablesHoldDataReferences: Bool { false }
    var exactCopiedFlags: Bool { true }
    var maintainedAutoclearBits: UInt64 { 0 }

    /// The engine's view of a qcow2 header. Extension types 1 and 2 carry the backing name and format; the
    /// rest stay in `original`.
    func engineHeader(snapshotTableSize: UInt32) -> ImageHeader {
        let q = original
        var h = ImageHeader(
            clusterBits: q.clusterBits,
            virtualSize: q.virtualSize,
            l1TableOffset: HostOffset(q.l1TableOffset),
            l1Size: q.l1Size,
            refcountTableOffset: HostOffset(q.refcountTableOffset),
            refcountTableClusters: q.refcountTableClusters
        )
        if q.incompatibleFeatures & Qcow2Header.dirtyBit != 0 { h.incompatibleFeatures.insert(.dirty) }
        if q.incompatibleFeatures & Qcow2Header.corruptBit != 0 { h.incompatibleFeatures.insert(.corrupt) }
        h.autoclearFeatures = q.autoclearFeatures
        h.refcountOrder = q.refcountOrder
        h.snapshotCount = q.snapshotCount
        h.snapshotTableOffset = HostOffset(q.snapshotsOffset)
        h.snapshotTableSize = snapshotTableSize
        h.backingFileName = q.backingFile
        h.backingFileFormat = q.backingFormat
        return h
    }

    /// The qcow2 header that says what `header` says.
    func qcow2Header(_ header: ImageHeader) -> Qcow2Header {
        var q = original
        q.clusterBits = header.clusterBits
        q.virtualSize = header.virtualSize
        q.l1Size = header.l1Size
        q.l1TableOffset = header.l1TableOffset.rawValue
        q.refcountTableOffset = header.refcountTableOffset.rawValue
        q.refcountTableClusters = header.refcountTableClusters
        q.snapshotCount = header.snapshotCount
        q.snapshotsOffset = header.snapshotTableOffset.rawValue
        if q.version >= 3 {
            var bits = q.incompatibleFeatures & ~(Qcow2Header.dirtyBit | Qcow2Header.corruptBit)
            if header.incompatibleFeatures.contains(.dirty) { bits |= Qcow2Header.dirtyBit }
            if header.incompatibleFeatures.contains(.corrupt) { bits |= Qcow2Header.corruptBit }
            q.incompatibleFeatures = bits
            q.autoclearFeatures = header.autoclearFeatures
        }
        q.backingFile = header.backingFileName
        q.backingFormat = header.backingFileFormat
        return q
    }

    /// The whole header, extensions and backing name included, as qemu rewrites it on every update: the
    /// backing name's offset is a field computed from the extensions, so the fields alone could point it
    /// at the wrong bytes of a file whose creator laid them out differently. After the first rewrite the
    /// bytes past the fields are the same every time, so only the fields can change in a torn write.
    func encodeFixedHeader(_ header: ImageHeader) -> [UInt8] { encodeHeader(header) }

    func encodeHeader(_ header: ImageHeader) -> [UInt8] { qcow2Header(header).encode() }

    func encodeSnapshots(_ entries: [SnapshotEntry]) -> [UInt8] { Qcow2SnapshotTable.encode(entries) }

    func decodeSnapshots(
        _ bytes: [UInt8],
        count: Int,
        geometry: ClusterGeometry,
        fileSize: UInt64
    ) throws -> [SnapshotEntry] {
        try Qcow2SnapshotTable.decode(
            bytes,
            count: count,
            geometry: geometry,
            fileSize: fileSize,
            diskSize: original.virtualSize
        ).entries
    }

    /// The smallest cluster the engine's tables work with.
    static let minClusterBits: UInt32 = 12

    /// Reads and checks a qcow2 header for the engine; `forWriting` adds the checks that only matter to a
    /// writer (bitmaps it would invalidate).
    /// - Throws: `VImageError` naming what is refused and what to do about it.
    static func read(host: any BlockDevice, fileSize: UInt64, forWriting: Bool) throws -> (Qcow2Format, ImageHeader) {
        let q = try Qcow2Header.read(from: host, path: nil)
        func refuse(_ message: String) -> VImageError { VImageError(.unsupportedFeature, offset: 0, message: message) }
        guard q.clusterBits >= minClusterBits else {
            throw refuse("qcow2 clusters of \(q.clusterSize) bytes are smaller than the engine's 4 KiB minimum")
        }
        guard q.virtualSize % 512 == 0, q.virtualSize <= ImageHeader.maxVirtualSize else {
            throw refuse("a qcow2 virtual size of \(q.virtualSize) bytes is not a multiple of 512 up to 64 PiB")
        }
        guard q.refcountTableOffset != 0, q.refcountTableClusters >= 1 else {
            throw VImageError(.invalidImage, offset: 48, message: "the qcow2 image has no refcount table")
        }
        if forWriting {
            if q.otherExtensions.contains(where: { $0.type == Qcow2Header.bitmapsExtension }) {
                throw refuse(
                    "the image has persistent dirty bitmaps, which vdisk does not maintain in qcow2 and a write "
                        + "would invalidate: open it read-only, or remove them first ('qemu-img bitmap --remove')"
                )
            }
        }
        var tableSize: UInt32 = 0
        let format = Qcow2Format(original: q)
        if q.snapshotCount > 0 {
            tableSize = try Qcow2SnapshotTable.size(
                host: host,
                offset: q.snapshotsOffset,
                count: Int(q.snapshotCount),
                fileSize: fileSize
            )
        }
        return (format, format.engineHeader(snapshotTableSize: tableSize))
    }
}

/// qemu's fields of a qcow2 snapshot, kept so that a rewrite of the table (by another snapshot change)
/// keeps the saved VM state usable.
public struct Qcow2SnapshotFields: Sendable, Hashable {
    /// The id string as stored (qemu writes decimal numbers).
    public var id: String
    /// Bytes of saved VM state (the 64-bit field when present, else the 32-bit one).
    public var vmStateSize: UInt64
    public var vmClockNanoseconds: UInt64
    /// Extra data past the fields this build knows (icount and anything later), byte for byte.
    public var extraTail: [UInt8]
}

/// The qcow2 snapshot table: entries of 40 fixed bytes, extra data, the id string and the name, each
/// entry padded to 8 bytes.
///
///   0          8     12    14    16        20        24        32     36     40
///   | L1 offset| l1sz| idsz| nmsz| date sec| date ns | vm clock| vmst | xsz  | extra | id | name | pad |
///
///   extra: 0 vm_state_size_large (u64), 8 disk_size (u64), 16 icount (u64), later fields...
enum Qcow2SnapshotTable {
    static let maxIDLength = 65535
    static let maxExtraData = 1024

    static func encode(_ entries: [SnapshotEntry]) -> [UInt8] {
        var w = ByteWriter()
        for e in entries {
            let q =
                e.qcow2 ?? Qcow2SnapshotFields(id: String(e.id), vmStateSize: 0, vmClockNanoseconds: 0, extraTail: [])
            let name = Array(e.name.utf8)
            let id = Array(q.id.utf8)
            // icount (-1: not recorded) comes first in the tail when the snapshot is new.
            let tail = e.qcow2 == nil ? [UInt8](repeating: 0xFF, count: 8) : q.extraTail
            w.write(e.l1TableOffset.rawValue)
            w.write(e.l1Size)
            w.write(UInt16(id.count))
            w.write(UInt16(name.count))
            w.write(UInt32(e.createdNanoseconds / 1_000_000_000))
            w.write(UInt32(e.createdNanoseconds % 1_000_000_000))
            w.write(q.vmClockNanoseconds)
            w.write(UInt32(truncatingIfNeeded: min(q.vmStateSize, UInt64(UInt32.max))))
            w.write(UInt32(16 + tail.count))
            w.write(q.vmStateSize)
            w.write(e.virtualSize)
            w.write(tail)
            w.write(id)
            w.write(name)
            w.pad(toMultipleOf: 8)
        }
        return w.bytes
    }

    /// The table's size in bytes, found by walking `count` entries from `offset` (qcow2's header does not
    /// record it). Reads grow geometrically up to the engine's snapshot table limit.
    static func size(host: any BlockDevice, offset: UInt64, count: Int, fileSize: UInt64) throws -> UInt32 {
        var length = 64 << 10
        while true {
            let available = fileSize > offset ? fileSize - offset : 0
            let want = min(UInt64(length), available, UInt64(ImageHeader.maxSnapshotTableSize))
            let bytes = try host.read(count: Int(want), at: offset)
            if let size = try? walk(bytes, count: count) { return UInt32(size) }
            guard want == UInt64(length), length < Int(ImageHeader.maxSnapshotTableSize) else {
                throw VImageError(
                    .invalidImage,
                    offset: 60,
                    message: "the snapshot table (\(count) entries) runs past the end of the file or its limit"
                )
            }
            length *= 4
        }
    }

    /// The byte length of `count` entries at the start of `bytes`.
    private static func walk(_ bytes: [UInt8], count: Int) throws -> Int {
        var r = ByteReader(bytes)
        for _ in 0..<count {
            guard r.skip(12), let idLength = r.readInteger(as: UInt16.self),
                let nameLength = r.readInteger(as: UInt16.self), r.skip(20),
                let extra = r.readInteger(as: UInt32.self), extra <= maxExtraData,
                r.skip(Int(extra) + Int(idLength) + Int(nameLength))
            else { throw VImageError(.invalidImage, message: "truncated snapshot table") }
            // qemu does not write the last entry's padding when the table ends the file.
            _ = r.skip(min((8 - r.index % 8) % 8, r.remaining))
        }
        return r.index
    }

    /// Decodes `count` entries, checking every field as VIMG's table is checked. A snapshot without a
    /// disk size (version 2) has the disk's current size, as qemu reads it.
    static func decode(
        _ bytes: [UInt8],
        count: Int,
        geometry: ClusterGeometry,
        fileSize: UInt64,
        diskSize: UInt64
    ) throws -> (entries: [SnapshotEntry], size: Int) {
        var r = ByteReader(bytes)
        var entries: [SnapshotEntry] = []
        var names = Set<String>()
        var ids = Set<UInt32>()
        for i in 0..<count {
            func fail(_ message: String) -> VImageError {
                VImageError(.invalidImage, offset: UInt64(r.index), message: "snapshot \(i): \(message)")
            }
            guard let l1Offset = r.readInteger(as: UInt64.self), let l1Size = r.readInteger(as: UInt32.self),
                let idLength = r.readInteger(as: UInt16.self), let nameLength = r.readInteger(as: UInt16.self),
                let seconds = r.readInteger(as: UInt32.self), let nanoseconds = r.readInteger(as: UInt32.self),
                let vmClock = r.readInteger(as: UInt64.self), let vmState32 = r.readInteger(as: UInt32.self),
                let extraLength = r.readInteger(as: UInt32.self), extraLength <= maxExtraData,
                let extra = r.readBytes(Int(extraLength)), let idBytes = r.readBytes(Int(idLength)),
                let nameBytes = r.readBytes(Int(nameLength))
            else { throw fail("entry runs past the end of the snapshot table") }
            _ = r.skip((8 - r.index % 8) % 8)
            var x = ByteReader(extra)
            let vmStateLarge = x.readInteger(as: UInt64.self)
            let virtualSize = x.readInteger(as: UInt64.self) ?? diskSize
            let extraTail = Array(extra.dropFirst(min(extra.count, 16)))
            guard Int(nameLength) <= SnapshotEntry.maxNameLength,
                let name = String(validating: nameBytes, as: UTF8.self)
            else { throw fail("name is invalid") }
            guard let idString = String(validating: idBytes, as: UTF8.self) else { throw fail("id is not UTF-8") }
            if let problem = SnapshotTable.mappingProblem(l1Offset, l1Size, virtualSize, geometry, fileSize) {
                throw fail(problem)
            }
            guard names.insert(name).inserted else { throw fail("duplicate name '\(name)'") }
            // The engine names snapshots by a number; an id qemu would not write gets one past the others.
            var id = UInt32(idString) ?? 0
            if id == 0 || ids.contains(id) { id = (ids.max() ?? 0) + 0x1000_0000 + UInt32(i) }
            ids.insert(id)
            var entry = SnapshotEntry(
                l1TableOffset: HostOffset(l1Offset),
                l1Size: l1Size,
                virtualSize: virtualSize,
                createdNanoseconds: UInt64(seconds) * 1_000_000_000 + UInt64(nanoseconds),
                id: id,
                name: name
            )
            entry.qcow2 = Qcow2SnapshotFields(
                id: idString,
                vmStateSize: vmStateLarge ?? UInt64(vmState32),
                vmClockNanoseconds: vmClock,
                extraTail: extraTail
            )
            entries.append(entry)
        }
        return (entries, r.index)
    }
}

/// Reads, decodes and validates the header of a VIMG or qcow2 image for the engine, with the format that
/// encodes it.
/// - Throws: `VImageError` naming the field at fault, or what a writer refuses (`forWriting`).
func readEngineHeader(
    _ host: any BlockDevice,
    fileSize: UInt64,
    forWriting: Bool
) throws -> (ImageHeader, any OnDiskFormat) {
    let magic = try host.read(count: Int(min(fileSize, 4)), at: 0)
    if magic == Qcow2Header.magic {
        let (format, header) = try Qcow2Format.read(host: host, fileSize: fileSize, forWriting: forWriting)
        return (header, format)
    }
    let header = try ImageHeader.decode(try readHeaderCluster(host, fileSize: fileSize))
    try header.validate(fileSize: fileSize)
    return (header, VIMGFormat())
}
