// Design notes
// ------------
// One fuzz iteration over a hostile image, shared by the libFuzzer target (Fuzz/FuzzVImage.swift, built
// by Tools/fuzz.sh, which compiles this file beside it) and by FixtureTests, which replays every saved
// crasher (Fixtures/fuzz/crashers) through it. Nothing here may trap on any input: bad images end in
// thrown errors or findings. The one deliberate trap is the repair invariant at the end: an image that
// `-r all` declares clean must stay clean after a write, or the repair (or the engine) has a bug.
//
// The input never reaches a file: the image lives in a MemoryDevice and a clone's backing is an empty
// MemoryDevice, so a backing file name in the input is never resolved against the file system.

import BlockIO
import VImage

public enum FuzzHarness {
    /// Reads issued per iteration: offsets (fractions of the virtual size) and lengths.
    static let readLength = 8192

    /// Opens `data` read-only, reads a few ranges and their extents, checks it, writes to a copy opened
    /// read-write (and snapshots it), then repairs another copy with `-r all` and, if that leaves it
    /// clean, writes to it and checks again.
    public static func exercise(_ data: [UInt8]) {
        let host = MemoryDevice(size: 0, growable: true)
        try? host.write(data, at: 0)
        let backing = MemoryDevice(size: 1 << 20)

        if let image = try? VImage.open(host: host, readOnly: true, backing: backing) {
            let size = image.size
            for offset in [0, size / 3, size / 2, size &- UInt64(readLength)] where size > 0 {
                let start = min(offset, size - 1)
                let count = Int(min(UInt64(readLength), size - start))
                _ = try? image.read(count: count, at: start)
                _ = try? image.extents(at: start, count: UInt64(count))
            }
            _ = image.snapshotList
            try? image.close()
        }

        _ = ImageCheck.check(host: host)

        // Writing to a damaged image (what a guest does before anyone runs check) must fail cleanly too.
        let scratch = MemoryDevice(size: 0, growable: true)
        try? scratch.write(data, at: 0)
        if let image = try? VImage.open(host: scratch, readOnly: false, backing: backing) {
            let size = image.size
            if size > 0 {
                let count = Int(min(UInt64(readLength), size))
                let data = Pattern.bytes(count: count, offset: 0, seed: 4)
                _ = try? image.write(data, at: 0)
                _ = try? image.write(data, at: size - UInt64(count))
                _ = try? image.discard(at: size / 2, count: UInt64(count))
            }
            _ = try? image.createSnapshot(named: "fuzz")
            _ = try? image.write(Pattern.bytes(count: min(4096, Int(size)), offset: 0, seed: 5), at: 0)
            try? image.close()
        }

        let copy = MemoryDevice(size: 0, growable: true)
        try? copy.write(data, at: 0)
        guard let result = try? ImageCheck.repair(host: copy, mode: .all), result.after.isClean else { return }
        guard let image = try? VImage.open(host: copy, readOnly: false, backing: backing) else { return }
        let size = image.size
        if size > 0 {
            let count = Int(min(UInt64(readLength), size))
            _ = try? image.write(Pattern.bytes(count: count, offset: 0, seed: 3), at: 0)
            _ = try? image.write(
                Pattern.bytes(count: count, offset: size / 2, seed: 3),
                at: min(size / 2, size - UInt64(count))
            )
        }
        guard (try? image.close()) != nil else { return }
        let again = ImageCheck.check(host: copy)
        if !again.isClean {
            fatalError(
                "an image repaired clean by -r all is not clean after a write: \(again.findings.prefix(3).map(\.message))"
            )
        }
    }
}
