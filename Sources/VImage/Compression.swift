// Design notes
// ------------
// LZ4-compressed clusters (docs/FORMAT.md, "Compressed clusters"). A compressed cluster is a record:
//
//   +-----------------+----------------------------+----------------------+
//   | u32 length L    | L bytes: one raw LZ4 block  | unspecified padding  |
//   +-----------------+----------------------------+----------------------+
//   ^ 512-byte aligned host offset                  ^ span = sectors * 512
//
// Records are packed one after another into clusters set aside for them; a record may run into the next
// cluster when that one follows directly. Each record holds one reference on every cluster its span
// touches. Records are never written in place: a guest write to a compressed cluster copies it into a
// fresh cluster first (see fillOldContent). A cluster that LZ4 cannot shrink by at least a sector is
// stored uncompressed. liblz4 is reached only through this file.

import BlockIO
import CLZ4

/// LZ4 block compression (liblz4), wrapped so the rest of the engine never sees C.
public enum LZ4 {
    /// Compresses `input`; returns nil if the result would not be smaller than `limit` bytes.
    public static func compress(_ input: UnsafeRawBufferPointer, limit: Int) -> [UInt8]? {
        guard limit > 0, input.count <= Int(Int32.max) else { return nil }
        var output = [UInt8](repeating: 0, count: limit)
        let n = output.withUnsafeMutableBytes { out in
            LZ4_compress_default(
                input.baseAddress!.assumingMemoryBound(to: CChar.self),
                out.baseAddress!.assumingMemoryBound(to: CChar.self),
                Int32(input.count),
                Int32(limit)
            )
        }
        guard n > 0 else { return nil }
        output.removeSubrange(Int(n)...)
        return output
    }

    /// Decompresses `input` into exactly `output.count` bytes; false if the data is malformed or decodes
    /// to any other size (liblz4's safe decoder never reads or writes out of bounds).
    public static func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard input.count <= Int(Int32.max), output.count <= Int(Int32.max), let src = input.baseAddress,
            let dst = output.baseAddress
        else {
            return false
        }
        let n = LZ4_decompress_safe(
            src.assumingMemoryBound(to: CChar.self),
            dst.assumingMemoryBound(to: CChar.self),
            Int32(input.count),
            Int32(output.count)
        )
        return Int(n) == output.count
    }
}

extension VImage {
    /// The uncompressed content of a compressed cluster.
    func decompress(_ d: CompressedDescriptor) throws -> [UInt8] {
        let span = Int(d.byteLength)
        guard d.sectors <= CompressedDescriptor.maxSectors, span > 4 else {
            throw VImageError(
                .corrupt,
                path: path,
                offset: d.hostOffset,
                message: "compressed cluster descriptor is invalid"
            )
        }
        if case .qcow2(let type) = format.compression { return try decompressQcow2(d, type: type) }
        let record = try host.read(count: span, at: d.hostOffset)
        let length = Int(UInt32(record[0]) << 24 | UInt32(record[1]) << 16 | UInt32(record[2]) << 8 | UInt32(record[3]))
        guard length >= 1, length <= span - 4 else {
            throw VImageError(
                .corrupt,
                path: path,
                offset: d.hostOffset,
                message: "compressed record length \(length) does not fit its \(span)-byte span"
            )
        }
        var output = [UInt8](repeating: 0, count: geometry.clusterSize)
        let ok = record.withUnsafeBytes { input in
            output.withUnsafeMutableBytes {
                LZ4.decompress(UnsafeRawBufferPointer(rebasing: input[4..<4 + length]), into: $0)
            }
        }
        guard ok else {
            throw VImageError(
                .corrupt,
                path: path,
                offset: d.hostOffset,
                message: "compressed cluster does not decompress to \(geometry.clusterSize) bytes"
            )
        }
        return output
    }

    /// qcow2's deflate or zstd stream of one cluster; its span may run into the next record, or past the
    /// end of the file when it is the last.
    private func decompressQcow2(_ d: CompressedDescriptor, type: Qcow2CompressionType) throws -> [UInt8] {
        let fileSize = host.size
        guard d.hostOffset < fileSize else {
            throw VImageError(.corrupt, path: path, offset: d.hostOffset, message: "compressed cluster is past the end")
        }
        let input = try host.read(count: Int(min(d.byteLength, fileSize - d.hostOffset)), at: d.hostOffset)
        var output = [UInt8](repeating: 0, count: geometry.clusterSize)
        let ok = input.withUnsafeBytes { i in
            output.withUnsafeMutableBytes { Qcow2Decompressor.decompress(type, i, into: $0) }
        }
        guard ok else {
            throw VImageError(
                .corrupt,
                path: path,
                offset: d.hostOffset,
                message: "compressed cluster does not decompress to \(geometry.clusterSize) bytes"
            )
        }
        return output
    }

    /// Writes whole guest cluster `guestCluster` compressed (or uncompressed when LZ4 cannot shrink it by
    /// a sector). Used by `convert -c`; the data must be exactly one cluster. Safe to call from several
    /// threads for different clusters. A qcow2 image gets the cluster uncompressed (this engine writes
    /// only LZ4 records, which qcow2 cannot hold).
    public func writeCompressed(cluster guestCluster: UInt64, data: UnsafeRawBufferPointer) throws {
        let cs = geometry.clusterSize
        precondition(data.count == cs, "writeCompressed takes exactly one cluster")
        let offset = geometry.offset(ofCluster: guestCluster)
        try checkWritable(offset: offset, count: UInt64(cs), operation: .write)
        guard case .lz4Record = format.compression else {
            try write(data, at: offset, fua: false)
            return
        }
        guard let payload = LZ4.compress(data, limit: cs - 512 - 4) else {
            try write(data, at: offset, fua: false)
            return
        }
        var record = [UInt8](repeating: 0, count: (4 + payload.count + 511) / 512 * 512)
        let length = UInt32(payload.count)
        record[0] = UInt8(length >> 24)
        record[1] = UInt8((length >> 16) & 0xff)
        record[2] = UInt8((length >> 8) & 0xff)
        record[3] = UInt8(length & 0xff)
        record.replaceSubrange(4..<4 + payload.count, with: payload)
        // Reserve the record's span (and the guest cluster) under the lock, write it outside, then commit.
        let guest = GuestCluster(guestCluster)
        let ready = { (m: borrowing Metadata) in m.acceptsRequest(touching: guest...guest) }
        let (descriptor, ticket) = try plan(waitingUntil: ready) { m in
            try m.guestWillChange(offset: offset, count: UInt64(cs))
            let d = try m.reserveCompressedSpan(bytes: record.count)
            m.inflight.insert(guest)
            if m.checked != nil { for c in m.clusters(of: d) { m.freshClusters.insert(c) } }
            return d
        }
        defer { leave(ticket) }
        do {
            try wrapIO(path) { try host.write(record, at: descriptor.hostOffset) }
        } catch {
            state.withLock(broadcast: true) { _ = $0.inflight.remove(guest) }
            throw error  // the reserved span stays counted: a leak at worst, never a bad reference
        }
        try state.withLock(broadcast: true) { m in
            defer { m.inflight.remove(guest) }
            try wrapIO(path) {
                let table = try m.writableL2Table(guest)
                let index = geometry.l2Index(of: guest)
                m.queueFree(m.entries.decode(table.entries[index]))
                table.entries[index] = m.entries.encode(.compressed(descriptor))
                table.isDirty = true
            }
        }
        changeCompleted()
    }
}

extension Metadata {
    /// Finds room for a record of `bytes` (a multiple of 512, less than a cluster) in the clusters set
    /// aside for compressed data, counting one reference on every cluster it touches. Lock held.
    ///
    /// The first record in a fresh cluster uses the reference its allocation made; later records add one.
    mutating func reserveCompressedSpan(bytes: Int) throws -> CompressedDescriptor {
        let cs = UInt64(geometry.clusterSize)
        let length = UInt64(bytes)
        var fresh: HostCluster? = nil
        if let cursor = compressedCursor, cursor.rawValue % cs != 0 {
            let current = geometry.cluster(containing: cursor)
            if cursor.rawValue + length <= geometry.offset(of: current + 1).rawValue {
                try incrementRefcount(current)
                compressedCursor = HostOffset(cursor.rawValue + length)
                return CompressedDescriptor(hostOffset: cursor.rawValue, sectors: length / 512)
            }
            let next = try allocateCluster(after: current)
            if next == current + 1 {
                try incrementRefcount(current)  // `next` holds its reference from the allocation
                compressedCursor = HostOffset(cursor.rawValue + length)
                return CompressedDescriptor(hostOffset: cursor.rawValue, sectors: length / 512)
            }
            fresh = next  // not contiguous: start the record there instead
        }
        let start = geometry.offset(of: try fresh ?? allocateCluster())
        compressedCursor = HostOffset(start.rawValue + length)
        return CompressedDescriptor(hostOffset: start.rawValue, sectors: length / 512)
    }
}
