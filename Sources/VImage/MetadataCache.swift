// Design notes
// ------------
// L2 tables and refcount blocks are cached decoded (host byte order) and written back lazily. The cache
// never writes on its own: the engine decides when a dirty table may reach disk, because write order is
// what makes the format crash-safe (docs/FORMAT.md, "Write ordering"): a dirty L2 table may only be
// written after the refcount blocks it depends on are durable.
//
// Callers must not hold a `CachedTable` across a call that can load another table of the same cache,
// since loading may evict it.

/// One cached metadata cluster.
final class CachedTable<Entry: FixedWidthInteger> {
    let offset: UInt64
    var entries: [Entry]
    var isDirty = false
    var lastUse: UInt64 = 0

    init(offset: UInt64, entries: [Entry]) {
        self.offset = offset
        self.entries = entries
    }
}

/// An LRU cache of metadata clusters keyed by host offset.
struct TableCache<Entry: FixedWidthInteger> {
    private(set) var tables: [UInt64: CachedTable<Entry>] = [:]
    let capacity: Int
    private var clock: UInt64 = 0
    /// A direct-mapped front for the dictionary: most lookups are an array index and one compare. It
    /// matters on reads through deep clone chains, which look up one table per level.
    private var hot: [CachedTable<Entry>?] = Array(repeating: nil, count: 256)

    init(capacity: Int) { self.capacity = max(4, capacity) }

    private static func slot(_ offset: UInt64) -> Int { Int(truncatingIfNeeded: (offset >> 12) ^ (offset >> 20)) & 255 }

    var isFull: Bool { tables.count >= capacity }

    mutating func lookup(_ offset: UInt64) -> CachedTable<Entry>? {
        let slot = Self.slot(offset)
        clock &+= 1
        if let table = hot[slot], table.offset == offset {
            table.lastUse = clock
            return table
        }
        guard let table = tables[offset] else { return nil }
        table.lastUse = clock
        hot[slot] = table
        return table
    }

    mutating func insert(_ table: CachedTable<Entry>) {
        clock &+= 1
        table.lastUse = clock
        tables[table.offset] = table
        hot[Self.slot(table.offset)] = table
    }

    mutating func remove(_ offset: UInt64) {
        tables[offset] = nil
        let slot = Self.slot(offset)
        if hot[slot]?.offset == offset { hot[slot] = nil }
    }

    /// The least recently used table (linear scan: eviction is rare next to lookups).
    func leastRecentlyUsed() -> CachedTable<Entry>? { tables.values.min { $0.lastUse < $1.lastUse } }

    /// The least recently used table among those `condition` accepts.
    func leastRecentlyUsed(where condition: (CachedTable<Entry>) -> Bool) -> CachedTable<Entry>? {
        tables.values.filter(condition).min { $0.lastUse < $1.lastUse }
    }

    /// Dirty tables in host order, so write-back is sequential.
    func dirtyTables() -> [CachedTable<Entry>] { tables.values.filter(\.isDirty).sorted { $0.offset < $1.offset } }

    var hasDirty: Bool { tables.values.contains { $0.isDirty } }

    mutating func removeAll() {
        tables.removeAll()
        hot = Array(repeating: nil, count: 256)
    }
}
