// Design notes
// ------------
// A read-only consistency check of a qcow2 image's refcounts, in qemu-img check's terms: count every
// reference the metadata makes (header, L1 tables, L2 tables, data and compressed clusters, the refcount
// table and blocks, the snapshot table), then compare with the stored refcounts. A stored count lower
// than the references is a corruption (a write could free a cluster still in use); a higher one is a
// leak. References that point outside the file are corruptions. Work and memory are bounded by the
// file's size (one counter per host cluster) and the limits of `Qcow2Header`.

import BlockIO
import VImage

public enum Qcow2Check {
    /// Checks the qcow2 image at `path` (read-only; the backing chain is not opened).
    public static func check(path: String) throws -> CheckReport {
        let file = try withPath(path) { try FileDevice.open(path: path, readOnly: true, lock: .shared) }
        let image: Qcow2Image
        do {
            image = try Qcow2Image(file: file, path: path, backing: nil)
        } catch {
            try? file.close()
            throw error
        }
        defer { try? image.close() }
        return try check(image)
    }

    public static func check(_ image: Qcow2Image) throws -> CheckReport {
        var report = CheckReport()
        let h = image.header
        let cs = UInt64(h.clusterSize)
        let fileSize = image.fileSize
        let fileClusters = (fileSize + cs - 1) / cs
        var expected = [UInt32](repeating: 0, count: Int(fileClusters))
        report.isDirty = h.isDirty
        report.isMarkedCorrupt = h.isCorrupt
        report.totalClusters = (image.header.virtualSize + cs - 1) / cs
        report.imageEndOffset = fileSize

        func reference(_ offset: UInt64, _ length: UInt64, _ what: String) {
            guard length > 0 else { return }
            let first = offset / cs
            let last = (offset + length - 1) / cs
            guard last < fileClusters else {
                report.add(
                    .corruption,
                    "outside-file",
                    "\(what) at offset \(offset) lies past the end of the file (\(fileSize) bytes)",
                    at: offset
                )
                return
            }
            for c in first...last { expected[Int(c)] &+= 1 }
        }

        reference(0, cs, "header")
        reference(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs, "refcount table")
        if h.snapshotCount > 0 { reference(h.snapshotsOffset, image.snapshotTableBytes, "snapshot table") }
        // qemu's persistent bitmaps: their directory, tables and bits are in use, not leaked.
        if let ext = h.otherExtensions.first(where: { $0.type == Qcow2Header.bitmapsExtension }) {
            let bitmaps = try withPath(image.path) {
                try Qcow2BitmapClusters.read(extension: ext.data, host: image.file, clusterSize: Int(cs))
            }
            for t in bitmaps.tables { reference(t.offset, t.length, t.what) }
            for d in bitmaps.data { reference(d.offset, cs, d.what) }
        }

        let rtBytes = try withPath(image.path) {
            try image.file.read(count: Int(UInt64(h.refcountTableClusters) * cs), at: h.refcountTableOffset)
        }
        let refcountTable = rtBytes.withUnsafeBytes { decodeTable($0, as: UInt64.self) }
        for (i, entry) in refcountTable.enumerated() {
            let offset = entry & qcow2OffsetMask
            if offset == 0 { continue }
            if offset % cs != 0 {
                report.add(
                    .corruption,
                    "unaligned",
                    "refcount block \(i) at offset \(offset) is not cluster aligned",
                    at: offset
                )
                continue
            }
            reference(offset, cs, "refcount block \(i)")
        }

        // Every L1 table: the active one and each snapshot's.
        var l1Tables: [(offset: UInt64, size: UInt32, name: String)] = [(h.l1TableOffset, h.l1Size, "active L1 table")]
        for s in image.snapshots { l1Tables.append((s.l1TableOffset, s.l1Size, "L1 table of snapshot '\(s.name)'")) }
        var dataSeen = Set<UInt64>()
        var lastHost: UInt64? = nil
        for (l1Offset, l1Size, name) in l1Tables where l1Size > 0 {
            reference(l1Offset, UInt64(l1Size) * 8, name)
            let l1 = try withPath(image.path) { try image.file.read(count: Int(l1Size) * 8, at: l1Offset) }
                .withUnsafeBytes { decodeTable($0, as: UInt64.self) }
            let isActive = l1Offset == h.l1TableOffset
            for (i, entry) in l1.enumerated() {
                let l2Offset = entry & qcow2OffsetMask
                if l2Offset == 0 { continue }
                lastHost = nil  // qemu-img counts fragmentation within each L2 table
                guard l2Offset % cs == 0, l2Offset < fileSize, fileSize - l2Offset >= cs else {
                    report.add(
                        .corruption,
                        "outside-file",
                        "\(name) entry \(i): L2 table at \(l2Offset) is unaligned or past the end of the file",
                        at: l2Offset
                    )
                    continue
                }
                reference(l2Offset, cs, "L2 table")
                let l2 = try withPath(image.path) { try image.file.read(count: Int(cs), at: l2Offset) }.withUnsafeBytes
                { decodeTable($0, as: UInt64.self) }
                for (j, raw) in l2.enumerated() {
                    let guestCluster = UInt64(i) * UInt64(h.l2Entries) + UInt64(j)
                    switch Qcow2Cluster(l2Entry: raw, clusterBits: h.clusterBits) {
                    case .unallocated:
                        break
                    case .zero:
                        let host = raw & qcow2OffsetMask
                        if host != 0 { reference(host, cs, "preallocated zero cluster") }
                        if host != 0 && isActive {  // allocated, as qemu counts it
                            if dataSeen.insert(guestCluster).inserted { report.allocatedClusters += 1 }
                            if let lastHost, host != lastHost + cs { report.fragmentedClusters += 1 }
                            lastHost = host
                        }
                    case .normal(let host):
                        if host % cs != 0 {
                            report.add(
                                .corruption,
                                "unaligned",
                                "L2 entry for guest cluster \(guestCluster) points at unaligned offset \(host)",
                                at: host
                            )
                            continue
                        }
                        reference(host, cs, "data cluster")
                        if isActive {
                            if dataSeen.insert(guestCluster).inserted { report.allocatedClusters += 1 }
                            if let lastHost, host != lastHost + cs { report.fragmentedClusters += 1 }
                            lastHost = host
                        }
                    case .compressed(let host, let length):
                        reference(host & ~511, (host & 511) + length, "compressed cluster")
                        if isActive {
                            if dataSeen.insert(guestCluster).inserted { report.allocatedClusters += 1 }
                            report.compressedClusters += 1
                            report.fragmentedClusters += 1  // re-read sectors: fragmented, as qemu counts it
                        }
                    }
                }
            }
        }

        // Stored refcounts, any width from 1 to 64 bits.
        let bits = UInt64(1) << UInt64(h.refcountOrder)
        let perBlock = cs * 8 / bits
        var checked: UInt64 = 0
        var highest: UInt64? = nil
        for (i, entry) in refcountTable.enumerated() {
            let first = UInt64(i) * perBlock
            if first >= fileClusters { break }
            let offset = entry & qcow2OffsetMask
            var block: [UInt8] = []
            if offset != 0 && offset % cs == 0 && offset < fileSize && fileSize - offset >= cs {
                block = try withPath(image.path) { try image.file.read(count: Int(cs), at: offset) }
            }
            for k in 0..<min(perBlock, fileClusters - first) {
                let cluster = first + k
                var stored: UInt64 = 0
                if !block.isEmpty {
                    let bitIndex = k * bits
                    if bits >= 8 {
                        let start = Int(bitIndex / 8)
                        for b in 0..<Int(bits / 8) { stored = stored << 8 | UInt64(block[start + b]) }
                    } else {
                        stored = UInt64(block[Int(bitIndex / 8)] >> UInt8(bitIndex % 8)) & ((1 << bits) - 1)
                    }
                }
                let want = UInt64(expected[Int(cluster)])
                if stored > 0 || want > 0 { highest = cluster }
                if stored < want {
                    report.add(
                        .corruption,
                        "refcount-too-low",
                        "cluster \(cluster) has refcount \(stored) but \(want) references",
                        at: cluster * cs
                    )
                } else if stored > want {
                    report.add(
                        .leak,
                        "leaked-cluster",
                        "cluster \(cluster) has refcount \(stored) but \(want) references",
                        at: cluster * cs
                    )
                }
                checked += 1
            }
        }
        // Clusters no refcount block covers.
        if checked < fileClusters {
            for cluster in checked..<fileClusters where expected[Int(cluster)] > 0 {
                highest = cluster
                report.add(
                    .corruption,
                    "refcount-too-low",
                    "cluster \(cluster) is referenced but no refcount block covers it",
                    at: cluster * cs
                )
            }
        }
        // As qemu-img reports it: the end of the last cluster that is counted or referenced.
        report.imageEndOffset = highest.map { ($0 + 1) * cs } ?? 0
        return report
    }
}
