/// A byte offset in the virtual disk (what the guest sees).
public struct GuestOffset: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "guest:\(rawValue)" }
}

/// A byte offset in the image file (where metadata and cluster data live).
public struct HostOffset: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static let zero = HostOffset(0)
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "host:0x\(String(rawValue, radix: 16))" }
}

/// The index of a cluster in the image file (host offset >> cluster_bits): what refcounts count.
public struct HostCluster: RawRepresentable, Hashable, Comparable, Strideable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public func distance(to other: Self) -> Int64 { Int64(bitPattern: other.rawValue &- rawValue) }
    public func advanced(by n: Int64) -> Self { Self(rawValue &+ UInt64(bitPattern: n)) }
    public static func + (a: Self, n: UInt64) -> Self { Self(a.rawValue + n) }
    public static func - (a: Self, n: UInt64) -> Self { Self(a.rawValue - n) }
    public var description: String { "host cluster \(rawValue)" }
}

/// The index of a cluster of the virtual disk (guest offset >> cluster_bits): what L1/L2 tables map.
public struct GuestCluster: RawRepresentable, Hashable, Comparable, Strideable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { self.rawValue = value }
    public static func < (a: Self, b: Self) -> Bool { a.rawValue < b.rawValue }
    public func distance(to other: Self) -> Int64 { Int64(bitPattern: other.rawValue &- rawValue) }
    public func advanced(by n: Int64) -> Self { Self(rawValue &+ UInt64(bitPattern: n)) }
    public static func + (a: Self, n: UInt64) -> Self { Self(a.rawValue + n) }
    public var description: String { "guest cluster \(rawValue)" }
}

/// The geometry of an image, derived from `cluster_bits`: every index computation lives here.
public struct ClusterGeometry: Sendable, Hashable {
    public let clusterBits: Int
    public var clusterSize: Int { 1 << clusterBits }
    /// Entries in one L2 table (one cluster of u64).
    public var l2Entries: Int { clusterSize / 8 }
    /// Refcounts in one refcount block (one cluster of u16).
    public var refcountBlockEntries: Int { clusterSize / 2 }
    /// Guest bytes mapped by one L2 table.
    public var bytesPerL2: UInt64 { UInt64(clusterSize) * UInt64(l2Entries) }

    public init(clusterBits: Int) { self.clusterBits = clusterBits }

    public func clusterIndex(_ offset: UInt64) -> UInt64 { offset >> UInt64(clusterBits) }
    public func offset(ofCluster index: UInt64) -> UInt64 { index << UInt64(clusterBits) }
    public func offsetInCluster(_ offset: UInt64) -> Int { Int(offset & UInt64(clusterSize - 1)) }
    public func isAligned(_ offset: UInt64) -> Bool { offset & UInt64(clusterSize - 1) == 0 }
    public func clusters(covering bytes: UInt64) -> UInt64 { (bytes + UInt64(clusterSize) - 1) >> UInt64(clusterBits) }

    // Typed conversions, used where guest and host values meet (the engine's plans and allocator).

    /// The host cluster holding `offset`.
    public func cluster(containing offset: HostOffset) -> HostCluster {
        HostCluster(offset.rawValue >> UInt64(clusterBits))
    }
    /// The first byte of a host cluster.
    public func offset(of cluster: HostCluster) -> HostOffset { HostOffset(cluster.rawValue << UInt64(clusterBits)) }
    /// The guest cluster holding guest byte `offset`.
    public func guestCluster(containing offset: UInt64) -> GuestCluster { GuestCluster(offset >> UInt64(clusterBits)) }
    /// The first guest byte of a guest cluster.
    public func guestOffset(of cluster: GuestCluster) -> UInt64 { cluster.rawValue << UInt64(clusterBits) }
    /// L1 index and L2 index of a guest cluster.
    public func l1Index(of cluster: GuestCluster) -> Int { Int(cluster.rawValue / UInt64(l2Entries)) }
    public func l2Index(of cluster: GuestCluster) -> Int { Int(cluster.rawValue % UInt64(l2Entries)) }

    /// L1 index and L2 index of a guest cluster.
    public func l1Index(guestCluster: UInt64) -> Int { Int(guestCluster / UInt64(l2Entries)) }
    public func l2Index(guestCluster: UInt64) -> Int { Int(guestCluster % UInt64(l2Entries)) }

    /// L1 entries needed to map `virtualSize` bytes.
    public func l1Entries(forVirtualSize virtualSize: UInt64) -> UInt64 {
        (virtualSize + bytesPerL2 - 1) / bytesPerL2
    }
}
