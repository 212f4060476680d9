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

    init(capacity: Int) { self.capacity = max(4, capacity) }

    var isFull: Bool { tables.count >= capacity }

    mutating func lookup(_ offset: UInt64) -> CachedTable<Entry>? {
        guard let table = tables[offset] else { return nil }
        clock &+= 1
        table.lastUse = clock
        return table
    }

    mutating func insert(_ table: CachedTable<Entry>) {
        clock &+= 1
        table.lastUse = clock
        tables[table.offset] = table
    }

    mutating func remove(_ offset: UInt64) { tables[offset] = nil }

    /// The least recently used table (linear scan: eviction is rare next to lookups).
    func leastRecentlyUsed() -> CachedTable<Entry>? { tables.values.min { $0.lastUse < $1.lastUse } }

    /// Dirty tables in host order, so write-back is sequential.
    func dirtyTables() -> [CachedTable<Entry>] { tables.values.filter(\.isDirty).sorted { $0.offset < $1.offset } }

    var hasDirty: Bool { tables.values.contains { $0.isDirty } }

    mutating func removeAll() { tables.removeAll() }
}
