// Design notes
// ------------
// Guest I/O is split at cluster boundaries into runs that share one plan:
//
//   guest:  |  head  |   body (whole clusters)   |  tail  |
//   plan:   in place (cluster owned, refcount 1): write straight to the host cluster
//           allocate (unallocated, zero, compressed, shared): new clusters, fill head and tail from the old
//           content (backing, zeroes, decompressed, shared copy), write, then commit the L2 entries
//
// A run never crosses an L2 table, so a plan touches one table. Plans are made under the engine lock and
// counted in the I/O gate until their host I/O completes (IOGate.swift); the I/O itself runs unlocked.
//
// Every change of guest content passes `Metadata.guestWillChange` while its request is planned: the one
// hook where tracking of written ranges lives (dirty bitmaps, Bitmaps.swift), whatever the request
// (write, write-zeroes, discard, compressed write).

import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// How a piece of a guest read is satisfied.
enum ReadSource {
    case host(HostOffset)
    case zero
    /// From the backing image at this guest offset.
    case backing(UInt64)
    case compressed(CompressedDescriptor, inCluster: Int)
}

/// One cluster of a write that needs a new host cluster.
struct Allocation {
    var guestCluster: GuestCluster
    var hostCluster: HostCluster
    var old: L2Entry
    /// Taken from past the old end of the file, so it reads as zeroes without being written.
    var isFresh: Bool
}

enum WritePlan {
    /// Write `length` bytes straight to `host`.
    case inPlace(host: HostOffset, length: Int)
    /// Write `length` bytes into newly allocated clusters, filling the rest of each cluster.
    case allocate([Allocation], length: Int)

    var length: Int {
        switch self {
        case .inPlace(_, let length), .allocate(_, let length): return length
        }
    }
}

extension VImage {
    // MARK: Read

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try checkRange(offset: offset, count: UInt64(buffer.count), operation: .read)
        guard let base = buffer.baseAddress else { return }
        if geometry.offsetInCluster(offset) + buffer.count <= geometry.clusterSize {
            try readWithinCluster(into: buffer, at: offset)
            return
        }
        var done = 0
        while done < buffer.count {
            // Plan a batch of pieces under the lock, then do the I/O outside it.
            let (pieces, ticket) = try plan { m in try m.planRead(at: offset + UInt64(done), count: buffer.count - done)
            }
            defer { leave(ticket) }
            for (source, length) in pieces {
                let target = UnsafeMutableRawBufferPointer(start: base + done, count: length)
                try wrapIO(path) { try readPiece(source, into: target, guestOffset: offset + UInt64(done)) }
                done += length
            }
        }
    }

    /// The common small read inside one cluster: no plan array, one lookup per level. Down a clone chain
    /// it walks the levels here instead of recursing through each one's read(), which keeps reads
    /// through deep chains cheap. Only this image can change under the read (backing levels are
    /// read-only), so only its gate counts it.
    private func readWithinCluster(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var ticket: IOGate.Ticket? = nil
        defer { leave(ticket) }
        try wrapIO(path) {
            var level = self
            while true {
                let isTop = level === self
                let source = try level.state.withLock(waitingUntil: { $0.acceptsRequests }) { m -> ReadSource in
                    try m.checkOpen()
                    let source = try m.readSource(at: offset)
                    if isTop && !isReadOnly { ticket = gate.enter(epoch: m.gateEpoch) }
                    return source
                }
                if case .backing = source, let next = level.backingImage, offset + UInt64(buffer.count) <= next.size {
                    level = next
                    continue
                }
                try level.readPiece(source, into: buffer, guestOffset: offset)
                return
            }
        }
    }

    func readPiece(_ source: ReadSource, into target: UnsafeMutableRawBufferPointer, guestOffset: UInt64) throws {
        do {
            try readPieceUnchecked(source, into: target, guestOffset: guestOffset)
        } catch let mismatch as ChecksumMismatch {
            // Never returned as data: an I/O error naming where, and the image's observer told.
            var guestOffset = guestOffset
            if case .host(let start) = source, mismatch.hostOffset >= start.rawValue,
                mismatch.hostOffset - start.rawValue < UInt64(target.count)
            {
                guestOffset += mismatch.hostOffset - start.rawValue
            }
            let error = VImageError(
                .checksum,
                path: path,
                offset: mismatch.hostOffset,
                message:
                    "data at guest offset \(guestOffset) (host block 0x\(String(mismatch.hostOffset, radix: 16))) fails its checksum"
            )
            checksumObserver.withLock { $0 }?(error)
            throw error
        }
    }

    private func readPieceUnchecked(
        _ source: ReadSource,
        into target: UnsafeMutableRawBufferPointer,
        guestOffset: UInt64
    )
        throws
    {
        switch source {
        case .host(let offset): try host.read(into: target, at: offset.rawValue)
        case .zero: target.initializeMemory(as: UInt8.self, repeating: 0)
        case .backing(let offset): try readBacking(into: target, at: offset)
        case .compressed(let d, let inCluster):
            let cluster = try decompress(d)
            cluster.withUnsafeBytes {
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inCluster..<inCluster + target.count]))
            }
        }
    }

    /// Reads from the backing image; what lies past its end reads as zeroes.
    func readBacking(into target: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        guard let backing else {
            target.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let backingSize = backing.size
        let available = offset >= backingSize ? 0 : Int(min(UInt64(target.count), backingSize - offset))
        if available > 0 {
            try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: target[0..<available]), at: offset)
        }
        if available < target.count {
            UnsafeMutableRawBufferPointer(rebasing: target[available...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    // MARK: Write

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try checkWritable(offset: offset, count: UInt64(buffer.count), operation: .write)
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let position = offset + UInt64(done)
            let first = geometry.guestCluster(containing: position)
            // A cluster being allocated by another request is waited for: two partial writes to one new
            // cluster must not both fill it from the old content.
            let ready = { (m: borrowing Metadata) in m.acceptsRequest(touching: first...first) }
            let (plan, ticket) = try plan(waitingUntil: ready) { m in
                if done == 0 { try m.guestWillChange(offset: offset, count: UInt64(buffer.count)) }
                return try m.planWrite(at: position, count: buffer.count - done)
            }
            let chunk = UnsafeRawBufferPointer(start: base + done, count: plan.length)
            try execute(plan, ticket: ticket, data: chunk, at: position)
            done += plan.length
        }
        if fua { try flush() }
    }

    func checkWritable(offset: UInt64, count: UInt64, operation: BlockIOError.Operation) throws {
        if isReadOnly { throw VImageError(.readOnly, path: path, message: "image is read-only") }
        try checkRange(offset: offset, count: count, operation: operation)
    }

    func execute(_ plan: WritePlan, ticket: IOGate.Ticket?, data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        defer { leave(ticket) }
        switch plan {
        case .inPlace(let hostOffset, _):
            try wrapIO(path) { try host.write(data, at: hostOffset.rawValue, fua: false) }
            changeCompleted()
        case .allocate(let allocations, _):
            do {
                try wrapIO(path) { try writeAllocated(allocations, data: data, at: offset) }
            } catch {
                state.withLock(broadcast: true) { m in
                    // Never referenced: the clusters can be released at once.
                    for a in allocations {
                        try? m.decrementRefcount(a.hostCluster)
                        m.inflight.remove(a.guestCluster)
                    }
                }
                throw error
            }
            try state.withLock(broadcast: true) { m in
                defer { for a in allocations { m.inflight.remove(a.guestCluster) } }
                try wrapIO(path) { try m.commit(allocations) }
            }
            changeCompleted()
        }
    }

    /// Writes guest data into new clusters, completing partial head and tail clusters with their old content.
    func writeAllocated(_ allocations: [Allocation], data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let cs = geometry.clusterSize
        let inFirst = geometry.offsetInCluster(offset)
        let runBytes = allocations.count * cs
        let tailGap = runBytes - inFirst - data.count
        let hostStart = geometry.offset(of: allocations[0].hostCluster).rawValue
        func readsZero(_ a: Allocation) -> Bool {
            switch a.old {
            case .zero: return true
            case .unallocated: return backing == nil
            default: return false
            }
        }
        // Fresh clusters past the old end of file already read as zeroes: write only the guest bytes.
        let headNeedsFill = inFirst > 0 && !(readsZero(allocations[0]) && allocations[0].isFresh)
        let tailNeedsFill =
            tailGap > 0
            && !(readsZero(allocations[allocations.count - 1]) && allocations[allocations.count - 1].isFresh)
        if !headNeedsFill && !tailNeedsFill {
            try host.write(data, at: hostStart + UInt64(inFirst), fua: false)
            return
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: runBytes, alignment: 4096)
        defer { buffer.deallocate() }
        if headNeedsFill {
            try fillOldContent(allocations[0], into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<cs]))
        }
        if tailNeedsFill && (allocations.count > 1 || !headNeedsFill) {
            try fillOldContent(
                allocations[allocations.count - 1],
                into: UnsafeMutableRawBufferPointer(rebasing: buffer[(runBytes - cs)...])
            )
        }
        if !headNeedsFill && inFirst > 0 {
            UnsafeMutableRawBufferPointer(rebasing: buffer[0..<inFirst]).initializeMemory(as: UInt8.self, repeating: 0)
        }
        if !tailNeedsFill && tailGap > 0 {
            UnsafeMutableRawBufferPointer(rebasing: buffer[(runBytes - tailGap)...]).initializeMemory(
                as: UInt8.self,
                repeating: 0
            )
        }
        UnsafeMutableRawBufferPointer(rebasing: buffer[inFirst..<inFirst + data.count]).copyMemory(from: data)
        try host.write(UnsafeRawBufferPointer(buffer), at: hostStart, fua: false)
    }

    /// The content a cluster had before this write: backing data, zeroes, decompressed or shared bytes.
    /// The old cluster stays referenced until the commit, and the guest cluster is in flight, so nothing
    /// changes it meanwhile.
    func fillOldContent(_ a: Allocation, into target: UnsafeMutableRawBufferPointer) throws {
        do {
            try fillOldContentUnchecked(a, into: target)
        } catch let mismatch as ChecksumMismatch {
            // The old content of a partial write fails its checksum: the write fails rather than spread it.
            let error = VImageError(
                .checksum,
                path: path,
                offset: mismatch.hostOffset,
                message:
                    "data of guest cluster \(a.guestCluster.rawValue) (host block 0x\(String(mismatch.hostOffset, radix: 16))) fails its checksum"
            )
            checksumObserver.withLock { $0 }?(error)
            throw error
        }
    }

    private func fillOldContentUnchecked(_ a: Allocation, into target: UnsafeMutableRawBufferPointer) throws {
        switch a.old {
        case .unallocated: try readBacking(into: target, at: geometry.guestOffset(of: a.guestCluster))
        case .zero: target.initializeMemory(as: UInt8.self, repeating: 0)
        case .normal(let host, _): try self.host.read(into: target, at: host.rawValue)
        case .compressed(let d): try decompress(d).withUnsafeBytes { target.copyMemory(from: $0) }
        }
    }

    // MARK: Zeroes and discard

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try checkWritable(offset: offset, count: count, operation: .writeZeroes)
        try zeroRange(offset: offset, count: count, mode: mayUnmap ? .unmap : .keep)
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try checkWritable(offset: offset, count: count, operation: .discard)
        guard discardPolicy != .ignore else { return }
        try zeroRange(offset: offset, count: count, mode: .discard)
    }

    /// Punches a discarded part of one cluster out of the file, when this image owns the cluster (its data
    /// in a shared, compressed or unallocated cluster is left alone: a discard is advisory). Counted in the
    /// I/O gate like a write in place, so the cluster cannot be freed and reused under the punch.
    private func punchPartial(at offset: UInt64, count: UInt64) throws {
        // With checksums, durable data is never changed in place (not even by a punch).
        guard discardPolicy == .punch, !(host is ChecksummedHost) else { return }
        var position = offset
        while position < offset + count {
            // One cluster at a time: its host cluster's neighbours on disk belong to other guest clusters.
            let cluster = geometry.guestCluster(containing: position)
            let piece = min(offset + count, geometry.guestOffset(of: cluster + 1)) - position
            let at = position
            let ready = { (m: borrowing Metadata) in m.acceptsRequest(touching: cluster...cluster) }
            let (target, ticket) = try plan(waitingUntil: ready) { m -> HostOffset? in
                guard case .normal(let host, copied: true) = try m.l2Entry(cluster) else { return nil }
                try m.guestWillChange(offset: at, count: piece)
                return HostOffset(host.rawValue + UInt64(geometry.offsetInCluster(at)))
            }
            defer { leave(ticket) }
            if let target {
                try wrapIO(path) { try host.discard(at: target.rawValue, count: piece) }
                changeCompleted()
            }
            position += piece
        }
    }

    enum ZeroMode { case keep, unmap, discard }

    /// Whole clusters become zero (or unallocated) entries; partial clusters get zeroes written, except
    /// for discard, which is advisory and leaves them alone.
    func zeroRange(offset: UInt64, count: UInt64, mode: ZeroMode) throws {
        guard count > 0 else { return }
        var mode = mode
        if !format.hasZeroEntries {
            // qcow2 version 2 has no zero entries: over a backing image only written zeroes hide its data;
            // without one an unallocated cluster reads as zeroes (its storage is not kept).
            if backing != nil {
                var position = offset
                while position < offset + count {
                    let piece = min(offset + count - position, 1 << 20)
                    try writeZeroBytes(at: position, count: piece)
                    position += piece
                }
                return
            }
            if mode == .keep { mode = .unmap }
        }
        let end = offset + count
        let cs = UInt64(geometry.clusterSize)
        let alignedStart = (offset + cs - 1) / cs * cs
        let alignedEnd = end / cs * cs
        // Partial clusters, except where the range ends at the end of the disk.
        let wholeEnd = end == size ? max(alignedStart, (end + cs - 1) / cs * cs) : alignedEnd
        if alignedStart >= wholeEnd {
            if mode != .discard {
                try writeZeroBytes(at: offset, count: count)
            } else {
                try punchPartial(at: offset, count: count)
            }
            return
        }
        if mode != .discard {
            if offset < alignedStart { try writeZeroBytes(at: offset, count: alignedStart - offset) }
            if wholeEnd < end { try writeZeroBytes(at: wholeEnd, count: end - wholeEnd) }
        } else {
            if offset < alignedStart { try punchPartial(at: offset, count: alignedStart - offset) }
            if wholeEnd < end { try punchPartial(at: wholeEnd, count: end - wholeEnd) }
        }
        var cluster = geometry.guestCluster(containing: alignedStart)
        let last = geometry.guestCluster(containing: wholeEnd - 1)
        let perTable = UInt64(geometry.l2Entries)
        while cluster <= last {
            // One L2 table at a time, waiting for in-flight allocations in it.
            let tableLast = min(last, GuestCluster((cluster.rawValue / perTable + 1) * perTable - 1))
            let range = cluster...tableLast
            let ready = { (m: borrowing Metadata) in m.acceptsRequest(touching: range) }
            try state.withLock(waitingUntil: ready) { m in
                try m.checkOpen()
                try wrapIO(path) { try m.zeroClusters(range, mode: mode) }
            }
            changeCompleted()
            cluster = tableLast + 1
        }
    }

    private func writeZeroBytes(at offset: UInt64, count: UInt64) throws {
        let zeroes = [UInt8](repeating: 0, count: Int(count))
        try zeroes.withUnsafeBytes { try write($0, at: offset, fua: false) }
    }

    // MARK: Extents

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try checkRange(offset: offset, count: count, operation: .extents)
        var result: [Extent] = []
        for m in try mapping(at: offset, count: count) {
            let flags: ExtentFlags
            switch m.kind {
            case .data, .compressed: flags = []
            case .zero(let allocated): flags = allocated ? [.zero] : [.hole, .zero]
            case .unallocated:
                if let backing {
                    for e in try backingExtents(backing, at: m.offset, count: m.length) { result.appendMerging(e) }
                    continue
                }
                flags = [.hole, .zero]
            }
            result.appendMerging(Extent(offset: m.offset, length: m.length, flags: flags))
        }
        return result
    }

    private func backingExtents(_ backing: any BlockDevice, at offset: UInt64, count: UInt64) throws -> [Extent] {
        let size = backing.size
        var result: [Extent] = []
        if offset < size {
            let n = min(count, size - offset)
            var position = offset
            while position < offset + n {
                let chunk = try backing.extents(at: position, count: offset + n - position)
                guard let last = chunk.last, last.end > position else { break }
                // A backing hole is not ours either; but "allocated" data there is data for us.
                result += chunk.map { Extent(offset: $0.offset, length: $0.length, flags: $0.flags) }
                position = last.end
            }
        }
        if offset + count > max(offset, size) {
            let start = max(offset, size)
            result.append(Extent(offset: start, length: offset + count - start, flags: [.hole, .zero]))
        }
        return result
    }

    /// One run of guest clusters with the same kind of mapping in this image (not its backing chain).
    public struct MappingExtent: Sendable, Hashable {
        public enum Kind: Sendable, Hashable {
            /// Data at a host offset (contiguous across the run).
            case data(host: UInt64)
            case compressed
            case zero(allocated: Bool)
            /// Not allocated here: from the backing image, or zeroes without one.
            case unallocated
        }
        public var offset: UInt64
        public var length: UInt64
        public var kind: Kind

        public init(offset: UInt64, length: UInt64, kind: Kind) {
            self.offset = offset
            self.length = length
            self.kind = kind
        }
    }

    /// How `offset ..< offset + count` maps onto this image's file, merged into runs.
    public func mapping(at offset: UInt64, count: UInt64) throws -> [MappingExtent] {
        try checkRange(offset: offset, count: count, operation: .extents)
        var result: [MappingExtent] = []
        var position = offset
        let end = offset + count
        while position < end {
            // A bounded number of steps per lock hold, so a huge map does not stall requests.
            try state.withLock { m in
                try m.checkOpen()
                try wrapIO(path) { try m.map(from: &position, to: end, steps: 65536, into: &result) }
            }
        }
        return result
    }
}

extension Metadata {
    // MARK: Planning reads

    /// Up to 64 pieces, coalescing host-contiguous clusters; each L2 table is looked up once per run of
    /// clusters it maps.
    mutating func planRead(at offset: UInt64, count: Int) throws -> [(ReadSource, Int)] {
        var pieces: [(ReadSource, Int)] = []
        var position = offset
        let end = offset + UInt64(count)
        let perTable = UInt64(geometry.l2Entries)
        while position < end && pieces.count < 64 {
            let cluster = geometry.guestCluster(containing: position)
            let l1Index = geometry.l1Index(of: cluster)
            let tableEnd = min(end, geometry.offset(ofCluster: (cluster.rawValue / perTable + 1) * perTable))
            var table: [UInt64]? = nil
            if l1Index < l1.count, let tableOffset = L1Entry(rawValue: l1[l1Index]).l2Table {
                table = try l2Table(at: tableOffset, mayWrite: false).entries
            }
            while position < tableEnd && pieces.count < 64 {
                let inCluster = geometry.offsetInCluster(position)
                let length = Int(min(UInt64(geometry.clusterSize - inCluster), tableEnd - position))
                let entry =
                    table.map { entries.decode($0[geometry.l2Index(of: geometry.guestCluster(containing: position))]) }
                    ?? .unallocated
                let source = readSource(entry, guestOffset: position)
                position += UInt64(length)
                if let (last, lastLength) = pieces.last {
                    var merge = false
                    switch (last, source) {
                    case (.host(let a), .host(let b)): merge = a.rawValue + UInt64(lastLength) == b.rawValue
                    case (.backing(let a), .backing(let b)): merge = a + UInt64(lastLength) == b
                    case (.zero, .zero): merge = true
                    default: break
                    }
                    if merge {
                        pieces[pieces.count - 1].1 += length
                        continue
                    }
                }
                pieces.append((source, length))
            }
        }
        return pieces
    }

    /// Where the byte at guest `offset` comes from.
    mutating func readSource(at offset: UInt64) throws -> ReadSource {
        // Two statements on purpose: `readSource(try l2Entry(...))` evaluates the non-mutating call's `self`
        // before its mutating argument, which copies the whole state (a retain of each of its references)
        // on every read.
        let entry = try l2Entry(geometry.guestCluster(containing: offset), mayWrite: false)
        return readSource(entry, guestOffset: offset)
    }

    func readSource(_ entry: L2Entry, guestOffset offset: UInt64) -> ReadSource {
        let inCluster = geometry.offsetInCluster(offset)
        switch entry {
        case .unallocated: return hasBacking ? .backing(offset) : .zero
        case .zero: return .zero
        case .normal(let host, _): return .host(HostOffset(host.rawValue + UInt64(inCluster)))
        case .compressed(let d): return .compressed(d, inCluster: inCluster)
        }
    }

    // MARK: Planning writes

    /// Plans a prefix of a write: a run of clusters that are all owned and host-contiguous, or all need
    /// allocation. The caller has waited until the first cluster is not being allocated by another request.
    mutating func planWrite(at offset: UInt64, count: Int) throws -> WritePlan {
        let geometry = self.geometry
        let first = geometry.guestCluster(containing: offset)
        let end = offset + UInt64(count)
        let lastCluster = geometry.guestCluster(containing: end - 1)
        // Stay inside one L2 table, and bound a single plan to 32 MiB.
        let perTable = UInt64(geometry.l2Entries)
        let tableEnd = GuestCluster((first.rawValue / perTable + 1) * perTable - 1)
        let maxClusters = UInt64(max(1, (32 << 20) >> geometry.clusterBits))
        let runEnd = min(lastCluster, tableEnd, first + (maxClusters - 1))
        let lengthThrough = { (cluster: GuestCluster) -> Int in
            Int(min(end, geometry.guestOffset(of: cluster + 1)) - offset)
        }

        let entry = try l2Entry(first)
        if case .normal(let host, copied: true) = entry, writableInPlace(host) {
            let start = HostOffset(host.rawValue + UInt64(geometry.offsetInCluster(offset)))
            var cluster = first
            var expected = host.rawValue
            while cluster < runEnd {
                expected += UInt64(geometry.clusterSize)
                guard !inflight.contains(cluster + 1),
                    case .normal(let next, copied: true) = try l2Entry(cluster + 1),
                    next.rawValue == expected, writableInPlace(next)
                else { break }
                cluster = cluster + 1
            }
            return .inPlace(host: start, length: lengthThrough(cluster))
        }

        // Allocation run: every cluster that is not owned in place, up to the first that is (or is busy).
        _ = try writableL2Table(first)  // allocate or unshare the table before its clusters
        var allocations: [Allocation] = []
        var cluster = first
        var previousHost: HostCluster? = nil
        while cluster <= runEnd {
            if cluster != first {
                if inflight.contains(cluster) { break }
                if case .normal(let host, copied: true) = try l2Entry(cluster), writableInPlace(host) { break }
            }
            let old = try l2Entry(cluster)
            // Only a cluster taken from the end of the file is known to read as zeroes (a reused one holds old data).
            let endBefore = hostEnd
            let newHost = try allocateCluster(after: previousHost)
            if let previousHost, newHost != previousHost + 1 {
                // Not contiguous: give it back (it was never referenced) and end the run here.
                try decrementRefcount(newHost)
                break
            }
            allocations.append(
                Allocation(guestCluster: cluster, hostCluster: newHost, old: old, isFresh: newHost >= endBefore)
            )
            inflight.insert(cluster)
            if checked != nil { freshClusters.insert(newHost) }
            previousHost = newHost
            cluster = cluster + 1
        }
        return .allocate(allocations, length: lengthThrough(allocations.last!.guestCluster))
    }

    /// Whether an owned data cluster may be overwritten in place: always without checksums; with them only
    /// when it was allocated since the last write-back began (its data is not durable yet, so a torn write
    /// cannot break a checksum anything durable relies on: FORMAT.md "Writing and crashes", rule 1).
    func writableInPlace(_ host: HostOffset) -> Bool {
        checked == nil || freshClusters.contains(geometry.cluster(containing: host))
    }

    /// Points the L2 entries at the written clusters and queues the old references for release.
    mutating func commit(_ allocations: [Allocation]) throws {
        let table = try writableL2Table(allocations[0].guestCluster)
        for a in allocations {
            let index = geometry.l2Index(of: a.guestCluster)
            // Re-read: a snapshot or another table copy may have changed the entry since planning.
            queueFree(entries.decode(table.entries[index]))
            table.entries[index] = entries.encode(.normal(geometry.offset(of: a.hostCluster), copied: true))
        }
        table.isDirty = true
        if hasManyPendingFrees { try writeBack() }
    }

    // MARK: Zeroes

    /// Makes whole clusters of one L2 table read as zeroes (or as nothing allocated here), queueing frees.
    mutating func zeroClusters(_ range: ClosedRange<GuestCluster>, mode: VImage.ZeroMode) throws {
        try guestWillChange(
            offset: geometry.guestOffset(of: range.lowerBound),
            count: geometry.guestOffset(of: range.upperBound + 1) - geometry.guestOffset(of: range.lowerBound)
        )
        let l1Index = geometry.l1Index(of: range.lowerBound)
        let hasTable = L1Entry(rawValue: l1[l1Index]).l2Table != nil
        // No table and no backing: already reads as zeroes and holds nothing.
        if !hasTable && !hasBacking { return }
        let table = try writableL2Table(range.lowerBound)
        for c in range {
            let index = geometry.l2Index(of: c)
            let old = entries.decode(table.entries[index])
            let new: L2Entry
            switch (mode, old) {
            case (.keep, .normal(let host, copied: true)),
                (.keep, .zero(preallocated: .some(let host), copied: true)):
                new = .zero(preallocated: host, copied: true)  // keep the storage for later writes
            default:
                new = hasBacking ? .zero(preallocated: nil, copied: false) : .unallocated
            }
            if new == old { continue }
            // A compressed record has no `hostCluster` but holds references all the same.
            if new.hostCluster != old.hostCluster || old.isCompressed { queueFree(old) }
            table.entries[index] = entries.encode(new)
            table.isDirty = true
        }
        if hasManyPendingFrees { try writeBack() }
    }

    // MARK: Mapping

    /// Appends the mapping of `position ..< end` to `result`, advancing `position`, for at most `steps` clusters.
    mutating func map(
        from position: inout UInt64,
        to end: UInt64,
        steps: Int,
        into result: inout [VImage.MappingExtent]
    )
        throws
    {
        var steps = steps
        while position < end && steps > 0 {
            steps -= 1
            let cluster = geometry.guestCluster(containing: position)
            let l1Index = geometry.l1Index(of: cluster)
            if l1Index < l1.count, L1Entry(rawValue: l1[l1Index]).l2Table == nil {
                // No table: the whole table range is unallocated.
                let rangeEnd = min(end, UInt64(l1Index + 1) * geometry.bytesPerL2)
                Self.add(
                    &result,
                    VImage.MappingExtent(offset: position, length: rangeEnd - position, kind: .unallocated)
                )
                position = rangeEnd
                continue
            }
            let inCluster = UInt64(geometry.offsetInCluster(position))
            let length = min(UInt64(geometry.clusterSize) - inCluster, end - position)
            let kind: VImage.MappingExtent.Kind
            switch try l2Entry(cluster, mayWrite: false) {
            case .unallocated: kind = .unallocated
            case .zero(let host, _): kind = .zero(allocated: host != nil)
            case .normal(let host, _): kind = .data(host: host.rawValue + inCluster)
            case .compressed: kind = .compressed
            }
            Self.add(&result, VImage.MappingExtent(offset: position, length: length, kind: kind))
            position += length
        }
    }

    private static func add(_ result: inout [VImage.MappingExtent], _ m: VImage.MappingExtent) {
        if var last = result.last, last.offset + last.length == m.offset {
            var merge = false
            switch (last.kind, m.kind) {
            case (.data(let a), .data(let b)): merge = a + last.length == b
            default: merge = last.kind == m.kind
            }
            if merge {
                last.length += m.length
                result[result.count - 1] = last
                return
            }
        }
        result.append(m)
    }
}
