// How big a converted image will be, as `qemu-img measure` reports it: the size the file needs for the
// source's data (`required`) and with every cluster allocated (`fullyAllocated`). VIMG and qcow2 share a
// layout here (header cluster, L1 table, L2 tables, data, 16-bit refcount table and blocks), and the
// numbers are exactly what `Qcow2Writer` produces; without a source, `required` counts the metadata of a
// fully allocated image, as qemu-img does.

import BlockIO

public struct MeasureResult: Sendable, Hashable {
    public var required: UInt64
    public var fullyAllocated: UInt64
}

public enum ImageMeasure {
    /// Measures an image of `format` holding `source` (or an empty one of `size` bytes).
    public static func measure(
        source: (any BlockDevice)?,
        size: UInt64?,
        format: ImageFormats.Format,
        clusterBits: Int? = nil
    ) throws -> MeasureResult {
        let virtualSize = (source?.size ?? size ?? 0)
        if format == .raw {
            return MeasureResult(required: virtualSize, fullyAllocated: virtualSize)
        }
        let bits = clusterBits ?? 16
        let cs = UInt64(1) << UInt64(bits)
        let rounded = (virtualSize + 511) & ~511
        let allClusters = (rounded + cs - 1) / cs
        let perTable = cs / 8
        let allTables = (allClusters + perTable - 1) / perTable
        let full = Qcow2Writer.fileSize(
            virtualSize: rounded,
            clusterBits: bits,
            dataClusters: allClusters,
            l2Tables: allTables
        )
        guard let source else {
            return MeasureResult(required: full - allClusters * cs, fullyAllocated: full)
        }
        var dataClusters: UInt64 = 0
        var tables = Set<UInt64>()
        var lastCluster: UInt64? = nil
        var position: UInt64 = 0
        while position < virtualSize {
            let extents = try source.extents(at: position, count: virtualSize - position)
            guard let last = extents.last, last.end > position else { break }
            for e in extents where !e.flags.contains(.zero) && e.length > 0 {
                var first = e.offset / cs
                let end = (e.end - 1) / cs
                if let lastCluster, first <= lastCluster { first = lastCluster + 1 }
                if first <= end {
                    dataClusters += end - first + 1
                    for t in (first / perTable)...(end / perTable) { tables.insert(t) }
                    lastCluster = end
                }
            }
            position = last.end
        }
        let required = Qcow2Writer.fileSize(
            virtualSize: rounded,
            clusterBits: bits,
            dataClusters: dataClusters,
            l2Tables: UInt64(tables.count)
        )
        return MeasureResult(required: required, fullyAllocated: full)
    }
}
