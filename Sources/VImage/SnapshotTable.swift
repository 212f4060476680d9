// The snapshot table (docs/FORMAT.md, "Snapshot table"): a list of variable-length, 8-byte aligned
// entries, each naming an L1 table that is a frozen copy of the active one.
//
//   0      8     12     16        24         32   36     38      40
//   | L1   |l1sz | flags| vsize    | created  | id | nlen | xlen | extra... | name... | pad |

/// One internal snapshot.
public struct SnapshotEntry: Sendable, Hashable {
    public var l1TableOffset: HostOffset
    public var l1Size: UInt32
    public var virtualSize: UInt64
    /// Nanoseconds since the Unix epoch.
    public var createdNanoseconds: UInt64
    public var id: UInt32
    public var name: String
    /// Extra data a later version may add; kept byte for byte.
    public var extra: [UInt8] = []
    /// qemu's VM-state fields, for a snapshot in a qcow2 image.
    public var qcow2: Qcow2SnapshotFields? = nil

    public static let maxNameLength = 1023

    public init(
        l1TableOffset: HostOffset,
        l1Size: UInt32,
        virtualSize: UInt64,
        createdNanoseconds: UInt64,
        id: UInt32,
        name: String
    ) {
        self.l1TableOffset = l1TableOffset
        self.l1Size = l1Size
        self.virtualSize = virtualSize
        self.createdNanoseconds = createdNanoseconds
        self.id = id
        self.name = name
    }
}

/// Encoding and decoding of the whole table.
public enum SnapshotTable {
    /// What is wrong with a snapshot's size and L1 table fields (the same rules in VIMG and qcow2), if anything.
    static func mappingProblem(
        _ l1Offset: UInt64,
        _ l1Size: UInt32,
        _ virtualSize: UInt64,
        _ geometry: ClusterGeometry,
        _ fileSize: UInt64
    ) -> String? {
        guard virtualSize <= ImageHeader.maxVirtualSize, l1Size <= ImageHeader.maxL1Entries,
            UInt64(l1Size) >= geometry.l1Entries(forVirtualSize: virtualSize)
        else { return "size fields are invalid" }
        let (end, overflow) = l1Offset.addingReportingOverflow(UInt64(l1Size) * 8)
        guard geometry.isAligned(l1Offset), l1Offset != 0 || l1Size == 0, !overflow, end <= fileSize else {
            return "L1 table at 0x\(String(l1Offset, radix: 16)) is misaligned or outside the file"
        }
        return nil
    }

    public static func encode(_ entries: [SnapshotEntry]) -> [UInt8] {
        var w = ByteWriter()
        for e in entries {
            let name = Array(e.name.utf8)
            w.write(e.l1TableOffset.rawValue)
            w.write(e.l1Size)
            w.write(UInt32(0))
            w.write(e.virtualSize)
            w.write(e.createdNanoseconds)
            w.write(e.id)
            w.write(UInt16(name.count))
            w.write(UInt16(e.extra.count))
            w.write(e.extra)
            w.write(name)
            w.pad(toMultipleOf: 8)
        }
        return w.bytes
    }

    /// Decodes `count` entries, checking every field against the format's limits.
    /// - Throws: `VImageError.invalidImage` naming the entry.
    public static func decode(
        _ bytes: [UInt8],
        count: Int,
        geometry: ClusterGeometry,
        fileSize: UInt64
    ) throws -> [SnapshotEntry] {
        var r = ByteReader(bytes)
        var entries: [SnapshotEntry] = []
        var names = Set<String>()
        var ids = Set<UInt32>()
        for i in 0..<count {
            func fail(_ message: String) -> VImageError {
                VImageError(.invalidImage, offset: UInt64(r.index), message: "snapshot \(i): \(message)")
            }
            guard let l1Offset = r.readInteger(as: UInt64.self), let l1Size = r.readInteger(as: UInt32.self),
                let flags = r.readInteger(as: UInt32.self), let virtualSize = r.readInteger(as: UInt64.self),
                let created = r.readInteger(as: UInt64.self), let id = r.readInteger(as: UInt32.self),
                let nameLength = r.readInteger(as: UInt16.self), let extraLength = r.readInteger(as: UInt16.self),
                let extra = r.readBytes(Int(extraLength)), let nameBytes = r.readBytes(Int(nameLength))
            else { throw fail("entry runs past the end of the snapshot table") }
            _ = r.skip((8 - r.index % 8) % 8)
            guard flags == 0 else { throw fail("reserved flags are set") }
            guard nameLength >= 1, Int(nameLength) <= SnapshotEntry.maxNameLength else {
                throw fail("name length \(nameLength) is invalid")
            }
            guard let name = String(validating: nameBytes, as: UTF8.self) else { throw fail("name is not UTF-8") }
            if let problem = SnapshotTable.mappingProblem(l1Offset, l1Size, virtualSize, geometry, fileSize) {
                throw fail(problem)
            }
            guard names.insert(name).inserted else { throw fail("duplicate name '\(name)'") }
            guard ids.insert(id).inserted else { throw fail("duplicate id \(id)") }
            var entry = SnapshotEntry(
                l1TableOffset: HostOffset(l1Offset),
                l1Size: l1Size,
                virtualSize: virtualSize,
                createdNanoseconds: created,
                id: id,
                name: name
            )
            entry.extra = extra
            entries.append(entry)
        }
        return entries
    }
}
