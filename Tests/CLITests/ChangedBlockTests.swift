import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

// Changed-block tracking over NBD, checked with the clients backup tools are built on: nbdinfo's maps of
// qemu:dirty-bitmap:NAME and qemu:allocation-depth, qemu-img map with x-dirty-bitmap (what libvirt's
// pull-mode backups read), nbdcopy for full copies and libnbd (nbdsh, as virtnbdbackup uses it) for
// incrementals that read only the dirty extents, on `vdisk serve` and on the bus's exports.

/// The built `vimg` with arguments.
@discardableResult
private func vimg(_ arguments: [String]) -> ProcessResult {
    run(TestEnvironment.product("vimg"), arguments)
}

/// `nbdinfo --map=CONTEXT URI` as (offset, length, flags, description) rows.
private func nbdinfoMap(_ uri: String, _ context: String) -> [(range: Range<UInt64>, flags: UInt32, text: String)] {
    let result = run(Clients.nbdinfo!, ["--map=\(context)", uri])
    #expect(result.status == 0, "nbdinfo --map=\(context): \(result.stderr)")
    return result.stdout.split(separator: "\n").compactMap { line in
        let words = line.split(separator: " ", omittingEmptySubsequences: true)
        guard words.count >= 3, let offset = UInt64(words[0]), let length = UInt64(words[1]),
            let flags = UInt32(words[2])
        else { return nil }
        return (offset..<offset + length, flags, words.dropFirst(3).joined(separator: " "))
    }
}

/// The dirty ranges of a `qemu:dirty-bitmap:` context as nbdinfo reports them (merged).
private func dirtyRanges(_ uri: String, _ context: String) -> [Range<UInt64>] {
    merged(nbdinfoMap(uri, context).filter { $0.flags & 1 != 0 }.map(\.range))
}

/// The dirty ranges qemu-img sees through x-dirty-bitmap: qemu reads the bitmap's dirty bit as
/// base:allocation's hole bit, so dirty ranges are the ones it reports as `"data": false`.
private func qemuDirtyRanges(socket: String, export: String = "", context: String) -> [Range<UInt64>] {
    let options = "driver=nbd,server.type=unix,server.path=\(socket),export=\(export),x-dirty-bitmap=\(context)"
    let result = run(Clients.qemuImg!, ["map", "--output=json", "--image-opts", options])
    #expect(result.status == 0, "qemu-img map: \(result.stderr)")
    var ranges: [Range<UInt64>] = []
    for line in result.stdout.split(separator: "\n") where line.contains("\"start\"") {
        func number(_ key: String) -> UInt64? {
            guard let at = line.firstRange(of: "\"\(key)\": ") else { return nil }
            return UInt64(line[at.upperBound...].prefix { $0.isNumber })
        }
        guard let start = number("start"), let length = number("length") else { continue }
        if line.contains("\"data\": false") { ranges.append(start..<start + length) }
    }
    return merged(ranges)
}

private func merged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
    var out: [Range<UInt64>] = []
    for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
        if let last = out.last, last.upperBound >= range.lowerBound {
            out[out.count - 1] = last.lowerBound..<max(last.upperBound, range.upperBound)
        } else {
            out.append(range)
        }
    }
    return out
}

/// An incremental backup as virtnbdbackup takes one, with libnbd: the dirty extents of `context` (block
/// status), and only those read from the export into a sparse file the size of the disk. Prints each
/// extent as "OFFSET LENGTH" and the bytes read as "read N".
private func incrementalBackup(uri: String, context: String, to file: String) -> ProcessResult {
    let script = """
        ctx = \(Clients.pythonString(context))
        h.add_meta_context(ctx)
        h.connect_uri(\(Clients.pythonString(uri)))
        assert h.can_meta_context(ctx), 'the server does not offer ' + ctx
        size = h.get_size()
        extents = []
        covered = [0]
        def status(metacontext, offset, entries, err):
            if metacontext != ctx:
                return 0
            position = offset
            for i in range(0, len(entries), 2):
                if entries[i + 1] & 1:
                    extents.append((position, entries[i]))
                position += entries[i]
            covered[0] = position
            return 0
        while covered[0] < size:
            h.block_status(min(size - covered[0], 1 << 30), covered[0], status)
        total = 0
        with open(\(Clients.pythonString(file)), 'wb') as out:
            out.truncate(size)
            for offset, length in extents:
                done = 0
                while done < length:
                    n = min(length - done, 8 << 20)
                    out.seek(offset + done)
                    out.write(h.pread(n, offset + done))
                    done += n
                total += length
                print(offset, length)
        print('read', total)
        h.shutdown()
        """
    return run(Clients.nbdsh!, ["-c", script], environment: ["PATH": "/usr/bin:/bin"])
}

/// Applies incremental backups (each a sparse file and the "OFFSET LENGTH" lines of its extents) over a
/// copy of the full backup.
private func restore(full: String, incrementals: [(file: String, extents: String)], to output: String) -> ProcessResult
{
    // The listings are multi-line; a Python string literal takes the newlines escaped.
    let pairs = incrementals.map {
        "(\(Clients.pythonString($0.file)), \(Clients.pythonString($0.extents.replacingAll("\n", with: "\\n"))))"
    }
    let script = """
        import shutil
        shutil.copyfile(\(Clients.pythonString(full)), \(Clients.pythonString(output)))
        with open(\(Clients.pythonString(output)), 'r+b') as out:
            for data, listing in [\(pairs.joined(separator: ", "))]:
                with open(data, 'rb') as source:
                    for line in listing.splitlines():
                        words = line.split()
                        if len(words) != 2 or words[0] == 'read':
                            continue
                        offset, length = int(words[0]), int(words[1])
                        source.seek(offset)
                        out.seek(offset)
                        out.write(source.read(length))
        print('ok')
        """
    return run("/usr/bin/python3", ["-c", script])
}

/// The extents an incremental backup printed, merged.
private func backedUp(_ output: String) -> [Range<UInt64>] {
    merged(
        output.split(separator: "\n").compactMap { line in
            let words = line.split(separator: " ")
            guard words.count == 2, let offset = UInt64(words[0]), let length = UInt64(words[1]) else { return nil }
            return offset..<offset + length
        }
    )
}

private let k: UInt64 = 1024
private let m: UInt64 = 1 << 20

@Suite(.serialized, .enabled(if: Clients.vdiskBuilt)) struct ChangedBlockTests {
    /// Invariant: a bitmap exported by `vdisk serve --bitmap` (written through the same export) shows
    /// exactly the granules written, write-zeroed and trimmed, to nbdinfo and to qemu-img's x-dirty-bitmap
    /// alike, and is a live view: writes made while it is exported appear in the next map.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuImg != nil && Clients.qemuIO != nil))
    func dirtyBitmapMaps() throws {
        let served = try ServedImage(start: false)
        #expect(vimg(["bitmap", "--add", served.image, "b"]).status == 0)
        #expect(vimg(["bitmap", "--add", "-g", "4K", served.image, "fine"]).status == 0)
        try served.start(["--bitmap", "b", "--bitmap", "fine"])
        #expect(served.server?.banner.contains("qemu:dirty-bitmap:b") == true)
        let context = "qemu:dirty-bitmap:b"
        #expect(dirtyRanges(served.uri, context) == [])
        let write = qemuIO(
            served.uri,
            [
                "write -P 0x11 1M 64k", "write -P 0x22 5000 10", "write -z 20M 2M", "discard 40M 64k",
                "write -P 3 63M 4k",
            ]
        )
        #expect(write.status == 0, "\(write.stderr)")
        let expected = [
            1 * m..<1 * m + 64 * k, 0..<64 * k, 20 * m..<22 * m, 40 * m..<40 * m + 64 * k, 63 * m..<63 * m + 64 * k,
        ]
        #expect(dirtyRanges(served.uri, context) == merged(expected))
        #expect(qemuDirtyRanges(socket: served.socket, context: context) == merged(expected))
        // The 4 KiB bitmap is as exact as its granules: the 10-byte write marks one 4 KiB granule.
        #expect(dirtyRanges(served.uri, "qemu:dirty-bitmap:fine").contains(4 * k..<8 * k))
        #expect(dirtyRanges(served.uri, "qemu:dirty-bitmap:fine").contains(63 * m..<63 * m + 4 * k))

        // Live: a write made now is in the next answer.
        #expect(qemuIO(served.uri, ["write -P 4 30M 4k"]).status == 0)
        #expect(dirtyRanges(served.uri, context) == merged(expected + [30 * m..<30 * m + 64 * k]))
        #expect(served.stop() == 0)

        // After a clean close the bits are on disk: a read-only export shows the same.
        try served.start(["--read-only", "--bitmap", "b"])
        #expect(dirtyRanges(served.uri, context) == merged(expected + [30 * m..<30 * m + 64 * k]))
        #expect(served.stop() == 0)
        #expect(vimg(["check", served.image]).status == 0)
    }

    /// Invariant: a client lists every context of an export (base:allocation, qemu:allocation-depth and
    /// the bitmaps asked for), an unknown bitmap or one of a raw image stops `vdisk serve` with one line
    /// naming it, and `--bitmap` with `--snapshot` is a usage error.
    @Test(.enabled(if: Clients.nbdinfo != nil)) func contextsAndRefusals() throws {
        let served = try ServedImage(start: false)
        #expect(vimg(["bitmap", "--add", served.image, "nightly"]).status == 0)
        try served.start(["--bitmap", "nightly"])
        let info = run(Clients.nbdinfo!, ["--json", served.uri])
        #expect(info.status == 0)
        for name in ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:nightly"] {
            #expect(info.stdout.contains("\"\(name)\""), "\(name) in \(info.stdout)")
        }
        #expect(served.stop() == 0)

        let vdisk = TestEnvironment.product("vdisk")
        let socket = ["--socket", served.socket]
        let missing = run(vdisk, ["serve"] + socket + ["--bitmap", "weekly", served.image])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("has no bitmap 'weekly' (it has 'nightly')"), "\(missing.stderr)")
        let raw = served.directory + "/disk.raw"
        #expect(vimg(["create", "-f", "raw", raw, "1M"]).status == 0)
        let rawBitmap = run(vdisk, ["serve"] + socket + ["--bitmap", "nightly", raw])
        #expect(rawBitmap.status == 1 && rawBitmap.stderr.contains("not a VIMG image"), "\(rawBitmap.stderr)")
        let withSnapshot = run(vdisk, ["serve"] + socket + ["--snapshot", "s", "--bitmap", "nightly", served.image])
        #expect(withSnapshot.status == 64 && withSnapshot.stderr.contains("--bitmap-from-snapshots"))
        let badRange = run(vdisk, ["serve"] + socket + ["--bitmap-from-snapshots", "a", served.image])
        #expect(badRange.status == 64 && badRange.stderr.contains("FROM..TO"), "\(badRange.stderr)")
    }

    /// Invariant: `nbdinfo --map=qemu:allocation-depth` on a clone says which level holds each range:
    /// written in the clone (local, 1), in its base (backing depth 2), or nowhere (absent, 0).
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func allocationDepthOfAClone() throws {
        let served = try ServedImage(start: false)
        try served.start()
        #expect(qemuIO(served.uri, ["write -P 1 0 4M", "write -P 2 8M 1M"]).status == 0)
        #expect(served.stop() == 0)
        let clone = served.directory + "/clone.vimg"
        #expect(vimg(["clone", served.image, clone]).status == 0)
        try served.start(images: [clone])
        #expect(qemuIO(served.uri, ["write -P 3 1M 64k", "write -z 8M 64k"]).status == 0)
        let map = nbdinfoMap(served.uri, "qemu:allocation-depth")
        let expected: [(Range<UInt64>, UInt32)] = [
            (0..<1 * m, 2), (1 * m..<1 * m + 64 * k, 1), (1 * m + 64 * k..<4 * m, 2), (4 * m..<8 * m, 0),
            (8 * m..<8 * m + 64 * k, 1), (8 * m + 64 * k..<9 * m, 2), (9 * m..<64 * m, 0),
        ]
        #expect(map.map(\.range) == expected.map(\.0), "\(map)")
        #expect(map.map(\.flags) == expected.map(\.1), "\(map)")
        #expect(map.first?.text == "backing depth 2" && map.last?.text == "absent", "\(map)")
        #expect(map[1].text == "local", "\(map)")
        #expect(served.stop() == 0)
    }

    /// Invariant: a full backup (nbdcopy) and two incrementals that read only the extents a bitmap marks
    /// (libnbd, as virtnbdbackup) restore a disk byte-identical to the image, with the bitmap cleared after
    /// the first and rotated (a new one added, the old one removed) after the second; each incremental
    /// read exactly what nbdinfo and qemu-img reported dirty, and far less than the disk.
    @Test(
        .enabled(if: Clients.nbdcopy != nil && Clients.nbdsh != nil && Clients.qemuIO != nil && Clients.qemuImg != nil)
    )
    func fullAndTwoIncrementals() throws {
        let served = try ServedImage(start: false)
        let dir = served.directory
        #expect(vimg(["bitmap", "--add", served.image, "b0"]).status == 0)

        // Day 0: data, then a full backup from a read-only export.
        try served.start()
        #expect(
            qemuIO(served.uri, ["write -P 0x10 0 8M", "write -P 0x11 30M 3M", "write -P 0x12 60M 512k"]).status == 0
        )
        #expect(served.stop() == 0)
        try served.start(["--read-only", "--bitmap", "b0"])
        let full = dir + "/full.raw"
        let copy = run(Clients.nbdcopy!, [served.uri, full])
        #expect(copy.status == 0, "\(copy.stderr)")
        #expect(served.stop() == 0)
        #expect(vimg(["bitmap", "--clear", served.image, "b0"]).status == 0)

        // Day 1: changes of every kind, then the first incremental.
        try served.start()
        let day1 = qemuIO(
            served.uri,
            [
                "write -P 0x21 1M 100k", "write -P 0x22 31M 4k", "write -z 60M 128k", "discard 4M 1M",
                "write -P 0x23 50M 1",
            ]
        )
        #expect(day1.status == 0, "\(day1.stderr)")
        #expect(served.stop() == 0)
        try served.start(["--read-only", "--bitmap", "b0"])
        let dirty1 = dirtyRanges(served.uri, "qemu:dirty-bitmap:b0")
        #expect(qemuDirtyRanges(socket: served.socket, context: "qemu:dirty-bitmap:b0") == dirty1)
        let inc1 = incrementalBackup(uri: served.uri, context: "qemu:dirty-bitmap:b0", to: dir + "/inc1.raw")
        #expect(inc1.status == 0, "\(inc1.stdout)\(inc1.stderr)")
        #expect(backedUp(inc1.stdout) == dirty1)
        #expect(
            dirty1
                == merged([
                    1 * m..<1 * m + 128 * k, 31 * m..<31 * m + 64 * k, 60 * m..<60 * m + 128 * k, 4 * m..<5 * m,
                    50 * m..<50 * m + 64 * k,
                ])
        )
        #expect(served.stop() == 0)
        // Rotate: a new bitmap records from here, the old one goes.
        #expect(vimg(["bitmap", "--add", served.image, "b1"]).status == 0)
        #expect(vimg(["bitmap", "--remove", served.image, "b0"]).status == 0)

        // Day 2: more changes, overlapping day 1's, then the second incremental.
        try served.start()
        let day2 = qemuIO(served.uri, ["write -P 0x31 1M 4k", "write -P 0x32 4M 64k", "write -P 0x33 63M 1M"])
        #expect(day2.status == 0, "\(day2.stderr)")
        #expect(served.stop() == 0)
        try served.start(["--read-only", "--bitmap", "b1"])
        let inc2 = incrementalBackup(uri: served.uri, context: "qemu:dirty-bitmap:b1", to: dir + "/inc2.raw")
        #expect(inc2.status == 0, "\(inc2.stdout)\(inc2.stderr)")
        #expect(backedUp(inc2.stdout) == merged([1 * m..<1 * m + 64 * k, 4 * m..<4 * m + 64 * k, 63 * m..<64 * m]))
        #expect(inc2.stdout.contains("read \(64 * k + 64 * k + 1 * m)"), "\(inc2.stdout)")
        #expect(served.stop() == 0)

        // Restore and compare with the image itself.
        let restored = dir + "/restored.raw"
        let applied = restore(
            full: full,
            incrementals: [(dir + "/inc1.raw", inc1.stdout), (dir + "/inc2.raw", inc2.stdout)],
            to: restored
        )
        #expect(applied.status == 0, "\(applied.stderr)")
        let compare = vimg(["compare", served.image, restored])
        #expect(compare.status == 0, "\(compare.stdout)\(compare.stderr)")
        // And the incrementals mattered: the full backup alone differs.
        #expect(vimg(["compare", served.image, full]).status == 1)
        #expect(vimg(["check", served.image]).status == 0)
    }

    /// Invariant: a snapshot diff served as a bitmap (`--bitmap-from-snapshots`) marks exactly the
    /// clusters that changed between the snapshots, for nbdinfo and qemu-img; a backup of the later
    /// snapshot made of the earlier one's full copy plus the diff's extents is byte-identical to it; a diff
    /// ending at a live writable export is refused.
    @Test(
        .enabled(
            if: Clients.nbdinfo != nil && Clients.nbdcopy != nil && Clients.nbdsh != nil && Clients.qemuIO != nil
                && Clients.qemuImg != nil
        )
    )
    func snapshotDiffBackup() throws {
        let served = try ServedImage(start: false)
        let dir = served.directory
        try served.start()
        #expect(qemuIO(served.uri, ["write -P 1 0 16M"]).status == 0)
        #expect(served.stop() == 0)
        #expect(vimg(["snapshot", "-c", "monday", served.image]).status == 0)
        try served.start()
        #expect(qemuIO(served.uri, ["write -P 2 2M 8k", "write -z 8M 1M", "write -P 3 40M 64k"]).status == 0)
        #expect(served.stop() == 0)
        #expect(vimg(["snapshot", "-c", "tuesday", served.image]).status == 0)
        try served.start()
        #expect(qemuIO(served.uri, ["write -P 4 12M 64k"]).status == 0)  // after tuesday: not in the diff
        #expect(served.stop() == 0)

        // The full backup of monday.
        try served.start(["--snapshot", "monday"])
        let full = dir + "/monday.raw"
        #expect(run(Clients.nbdcopy!, [served.uri, full]).status == 0)
        #expect(served.stop() == 0)

        // Tuesday, with what changed since monday.
        try served.start([
            "--snapshot", "tuesday", "--bitmap-from-snapshots", "monday..", "--bitmap-from-snapshots",
            "monday..tuesday",
        ])
        let expected = [2 * m..<2 * m + 64 * k, 8 * m..<9 * m, 40 * m..<40 * m + 64 * k]
        #expect(dirtyRanges(served.uri, "qemu:dirty-bitmap:monday..") == expected)
        #expect(dirtyRanges(served.uri, "qemu:dirty-bitmap:monday..tuesday") == expected)
        #expect(qemuDirtyRanges(socket: served.socket, context: "qemu:dirty-bitmap:monday..") == expected)
        let inc = incrementalBackup(uri: served.uri, context: "qemu:dirty-bitmap:monday..", to: dir + "/inc.raw")
        #expect(inc.status == 0, "\(inc.stderr)")
        let tuesday = dir + "/tuesday.raw"
        #expect(run(Clients.nbdcopy!, [served.uri, tuesday]).status == 0)
        #expect(served.stop() == 0)
        let restored = dir + "/restored.raw"
        #expect(restore(full: full, incrementals: [(dir + "/inc.raw", inc.stdout)], to: restored).status == 0)
        #expect(run("/usr/bin/cmp", [restored, tuesday]).status == 0)

        // A diff to the live disk of a writable export would go stale: refused. Read-only, it is served.
        let vdisk = TestEnvironment.product("vdisk")
        let live = run(
            vdisk,
            ["serve", "--socket", served.socket, "--bitmap-from-snapshots", "tuesday..", served.image]
        )
        #expect(live.status == 1 && live.stderr.contains("--read-only"), "\(live.stderr)")
        try served.start(["--read-only", "--bitmap-from-snapshots", "tuesday.."])
        #expect(dirtyRanges(served.uri, "qemu:dirty-bitmap:tuesday..") == [12 * m..<12 * m + 64 * k])
        #expect(served.stop() == 0)
        let unknown = run(
            vdisk,
            ["serve", "--socket", served.socket, "--read-only", "--bitmap-from-snapshots", "sunday..", served.image]
        )
        #expect(unknown.status == 1 && unknown.stderr.contains("sunday"), "\(unknown.stderr)")
    }

    /// Invariant: after `kill -9` of the writer, a bitmap it was recording is reported inconsistent by
    /// `vimg info`, and `vdisk serve --bitmap` refuses to export it (exit 1, one line saying why and what
    /// to do), so no backup tool is told that changed data is clean.
    @Test(.enabled(if: Clients.qemuIO != nil)) func bitmapAfterKill9IsStale() throws {
        let served = try ServedImage(start: false)
        #expect(vimg(["bitmap", "--add", served.image, "b"]).status == 0)
        try served.start(["--bitmap", "b"])
        #expect(qemuIO(served.uri, ["write -P 7 1M 4k"]).status == 0)
        let server = try #require(served.server)
        #expect(server.stop(SIGKILL) == 128 + SIGKILL)
        let info = vimg(["info", served.image])
        #expect(info.stdout.contains("b: granularity 65536, inconsistent"), "\(info.stdout)")
        #expect(vimg(["info", "--output=json", served.image]).stdout.contains("in-use"))
        let refused = run(
            TestEnvironment.product("vdisk"),
            ["serve", "--socket", served.socket, "--bitmap", "b", served.image]
        )
        #expect(refused.status == 1)
        let lines = refused.stderr.split(separator: "\n")
        #expect(
            lines.count == 1 && lines[0].contains("bitmap 'b'") && lines[0].contains("inconsistent"),
            "\(refused.stderr)"
        )
        #expect(refused.stderr.contains("full backup"), "\(refused.stderr)")
        // Nothing else is lost: the image serves without the bitmap and still has the write.
        try served.start()
        #expect(qemuIO(served.uri, ["read -P 7 1M 4k"]).status == 0)
        #expect(served.stop() == 0)
    }

    /// Invariant: the bus's export of a plugged VIMG disk offers each of its consistent bitmaps (live, as
    /// the disk is written through the bus) and qemu:allocation-depth with no option; a snapshot plugged
    /// beside it with --bitmap-from-snapshots offers the diff, and `vdisk list --output=json` names the
    /// contexts of each export.
    @Test(.enabled(if: Clients.nbdinfo != nil && Clients.qemuIO != nil)) func busExports() throws {
        let bus = BusTests.Harness(vdisk: TestEnvironment.product("vdisk"))
        defer { bus.stopAndCheckClean() }
        let image = bus.dir + "/disk.vimg"
        #expect(vimg(["create", image, "64M"]).status == 0)
        #expect(vimg(["bitmap", "--add", image, "b"]).status == 0)
        let uri = try bus.plug(["--device", "none", "--name", "disk", image])
        #expect(uri.hasPrefix("nbd+unix:///disk?socket="), "\(uri)")
        #expect(qemuIO(uri, ["write -P 5 3M 64k"]).status == 0)
        #expect(dirtyRanges(uri, "qemu:dirty-bitmap:b") == [3 * m..<3 * m + 64 * k])
        #expect(nbdinfoMap(uri, "qemu:allocation-depth").map(\.flags) == [0, 1, 0])
        #expect(bus.vd(["snapshot", "disk", "s1"]).status == 0)
        #expect(qemuIO(uri, ["write -P 6 7M 64k"]).status == 0)
        #expect(bus.vd(["snapshot", "disk", "s2"]).status == 0)
        let view = try bus.plug(
            [
                "--device", "none", "--name", "view", "--read-only", "--snapshot", "s2", "--bitmap-from-snapshots",
                "s1..", image,
            ]
        )
        #expect(dirtyRanges(view, "qemu:dirty-bitmap:s1..") == [7 * m..<7 * m + 64 * k])
        let list = bus.vd(["list", "--output=json"])
        #expect(list.stdout.contains("qemu:dirty-bitmap:b") && list.stdout.contains("qemu:dirty-bitmap:s1.."))
        // A diff that cannot be made fails the plug and leaves nothing plugged.
        let bad = bus.vd([
            "plug", "--device", "none", "--name", "bad", "--read-only", "--snapshot", "s2", "--bitmap-from-snapshots",
            "nope..", image,
        ])
        #expect(bad.status == 1 && bad.stderr.contains("nope"), "\(bad.stderr)")
        #expect(!bus.vd(["list"]).stdout.contains("bad"))
        #expect(bus.vd(["unplug", "view"]).status == 0)
        #expect(bus.vd(["unplug", "disk"]).status == 0)
        #expect(vimg(["check", image]).status == 0)
    }
}
