// Entry layouts (docs/FORMAT.md, "L1 entries", "L2 entries", "Refcount table"):
//
//   L1 / refcount table entry
//   63       56 55                                   9 8       0
//   |C|reserved|        host offset (cluster aligned)  | reserved |
//
//   L2 entry, standard                              L2 entry, compressed
//   63 62 61  56 55                    9 8   1 0     63 62 61          47 46              0
//   |C |0 | res |     host offset       | res |Z|   |0 |1 | sectors - 1 |  host sector     |

/// Bits 9...55: a cluster-aligned host offset.
let hostOffsetMask: UInt64 = 0x00FF_FFFF_FFFF_FE00
/// Bit 63: the referenced cluster's refcount is exactly one, so it may be modified in place.
let copiedFlag: UInt64 = 1 << 63
/// Bit 62 of an L2 entry: the cluster is stored compressed.
let compressedFlag: UInt64 = 1 << 62
/// Bit 0 of an L2 entry: the cluster reads as zeroes.
let zeroFlag: UInt64 = 1

/// A decoded L1 entry.
public struct L1Entry: RawRepresentable, Hashable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public init(l2Table: HostOffset, copied: Bool) {
        rawValue = l2Table.rawValue | (copied ? copiedFlag : 0)
    }

    public static let empty = L1Entry(rawValue: 0)

    /// The L2 table's host offset, or nil if the range has no L2 table.
    public var l2Table: HostOffset? {
        let offset = rawValue & hostOffsetMask
        return offset == 0 ? nil : HostOffset(offset)
    }
    public var isCopied: Bool { rawValue & copiedFlag != 0 }
    /// Bits that must be zero.
    public var reservedBits: UInt64 { rawValue & ~(hostOffsetMask | copiedFlag) }
}

/// A compressed cluster's location: a record from `hostOffset` to the end of the `sectors`th 512-byte sector
/// counted from the one holding `hostOffset` (VIMG records start on a sector; qcow2's need not).
public struct CompressedDescriptor: Hashable, Sendable {
    public var hostOffset: UInt64
    public var sectors: UInt64
    public var byteLength: UInt64 { sectors * 512 - hostOffset % 512 }

    public static let maxSectors: UInt64 = 1 << 15
}

/// A decoded L2 entry.
public enum L2Entry: Hashable, Sendable {
    /// Reads from the backing image (or as zeroes without one).
    case unallocated
    /// Reads as zeroes; `preallocated` keeps a host cluster for later writes.
    case zero(preallocated: HostOffset?, copied: Bool)
    /// Data at a host cluster.
    case normal(HostOffset, copied: Bool)
    /// LZ4-compressed data.
    case compressed(CompressedDescriptor)

    public init(raw: UInt64) {
        if raw & compressedFlag != 0 {
            let sector = raw & ((1 << 47) - 1)
            let count = ((raw >> 47) & ((1 << 15) - 1)) + 1
            self = .compressed(CompressedDescriptor(hostOffset: sector * 512, sectors: count))
            return
        }
        let offset = raw & hostOffsetMask
        let copied = raw & copiedFlag != 0
        if raw & zeroFlag != 0 {
            self = .zero(preallocated: offset == 0 ? nil : HostOffset(offset), copied: copied)
        } else if offset == 0 {
            self = .unallocated
        } else {
            self = .normal(HostOffset(offset), copied: copied)
        }
    }

    public var rawValue: UInt64 {
        switch self {
        case .unallocated: return 0
        case .zero(let host, let copied):
            return (host?.rawValue ?? 0) | zeroFlag | (copied && host != nil ? copiedFlag : 0)
        case .normal(let host, let copied): return host.rawValue | (copied ? copiedFlag : 0)
        case .compressed(let d): return compressedFlag | ((d.sectors - 1) << 47) | (d.hostOffset / 512)
        }
    }

    /// Bits that must be zero in a raw entry.
    public static func reservedBits(_ raw: UInt64) -> UInt64 {
        if raw & compressedFlag != 0 { return raw & copiedFlag }
        return raw & ~(hostOffsetMask | copiedFlag | zeroFlag)
    }

    /// Whether the entry points at a compressed record (which holds references on every cluster it spans).
    public var isCompressed: Bool {
        if case .compressed = self { return true }
        return false
    }

    /// The host cluster this entry owns a reference to (normal or preallocated zero), if any.
    public var hostCluster: HostOffset? {
        switch self {
        case .normal(let host, _): return host
        case .zero(let host, _): return host
        default: return nil
        }
    }

    /// Whether this entry reads without consulting the backing image.
    public var isAllocated: Bool {
        if case .unallocated = self { return false }
        return true
    }
}
