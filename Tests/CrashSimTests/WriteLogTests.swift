import BlockIO
import CCrashSim
import CrashSim
import ImageFormats
import Testing
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The write recorder and the log: what is recorded replays to the same disk at every point, and a log
/// that is damaged, cut short or from another image is refused with a clear message, never a trap.
struct WriteLogTests {
    static let diskSize = 2 << 20

    /// A recorded session on a fresh VIMG image: random writes, zeroes, discards, flushes and marks, with
    /// the disk's content at each flush and mark.
    struct Session {
        var directory: String
        var image: String
        var log: String
        /// The disk's content after each flush (index 0: before any record).
        var atFlush: [[UInt8]] = []
        /// Record number -> the disk's content after it, for a few records.
        var atRecord: [UInt64: [UInt8]] = [:]
        var marks: [String: [UInt8]] = [:]
        var final: [UInt8] = []
    }

    static func record(seed: UInt64, steps: Int = 300) throws -> Session {
        // In RAM where there is a tmpfs: the session syncs often, and the host's disk is not under test.
        let directory =
            access("/dev/shm", W_OK) == 0
            ? TestEnvironment.temporaryDirectory("../dev/shm/vdisk-writelog")
            : TestEnvironment.temporaryDirectory("vdisk-writelog")
        var session = Session(directory: directory, image: directory + "/disk.vimg", log: directory + "/disk.log")
        try VImage.create(path: session.image, virtualSize: UInt64(diskSize))
        let image = try ImageFormats.openVImage(path: session.image, readOnly: false)
        // Content from before the recording: the log's start snapshot must hold it.
        var reference = ReferenceDisk(size: diskSize)
        let before = Pattern.bytes(count: 100_000, offset: 0, seed: seed)
        try image.write(before, at: 0)
        reference.write(before, at: 0)
        let recorder = try WriteRecorder.start(recording: image, image: image, logPath: session.log)
        session.atFlush.append(reference.bytes)
        var random = SeededRandom(seed: seed)
        var record: UInt64 = 0
        for step in 0..<steps {
            let offset = Int.random(in: 0..<diskSize - 140_000, using: &random)
            let count = Int.random(in: 1...(step % 10 == 0 ? 140_000 : 16_384), using: &random)
            switch Int.random(in: 0..<12, using: &random) {
            case 0:
                try recorder.flush()
                session.atFlush.append(reference.bytes)
            case 1:
                try recorder.writeZeroes(at: UInt64(offset), count: UInt64(count), mayUnmap: step % 2 == 0, fast: false)
                reference.zero(at: offset, count: count)
            case 2:
                // Whole clusters: a discard of part of one is advisory (VIMG keeps the data).
                let start = offset / 65_536 * 65_536
                let length = max(1, count / 65_536) * 65_536
                try recorder.discard(at: UInt64(start), count: UInt64(length))
                reference.zero(at: start, count: length)
            case 3:
                let label = "step \(step)"
                try recorder.mark(label)
                session.marks[label] = reference.bytes
            default:
                let data = Pattern.bytes(count: count, offset: UInt64(offset), seed: seed &+ UInt64(step))
                try recorder.write(data, at: UInt64(offset), fua: step % 5 == 0)
                reference.write(data, at: offset)
            }
            record += 1
            if step % 37 == 0 { session.atRecord[record] = reference.bytes }
        }
        try recorder.close()
        session.final = reference.bytes
        return session
    }

    static func contents(_ path: String) throws -> [UInt8] {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        return try file.read(count: Int(file.size), at: 0)
    }

    /// Replays `log` onto a RAM disk holding `start`, up to `stop`.
    static func replayInMemory(_ log: String, start: [UInt8], until stop: ReplayStop) throws -> [UInt8] {
        let disk = MemoryDevice(size: UInt64(start.count))
        try disk.write(start, at: 0)
        _ = try WriteLogReplay.apply(try WriteLogReader(path: log), to: disk, until: stop)
        return disk.snapshotBytes()
    }

    /// Invariant: replaying up to every flush, every mark, some records and the end rebuilds the disk
    /// exactly as it was there; the replay onto the recorded image's start snapshot (a new image) does too.
    @Test(arguments: TestSeeds.seeds(0..<2, test: "replayRebuildsEveryPoint"))
    func replayRebuildsEveryPoint(seed: UInt64) throws {
        let session = try Self.record(seed: seed)
        defer { TestEnvironment.remove(session.directory) }
        let start = session.atFlush[0]
        for (n, expected) in session.atFlush.enumerated() {
            let got = try Self.replayInMemory(session.log, start: start, until: .flush(n))
            #expect(difference(got, expected) == nil, "seed \(seed): flush \(n)")
        }
        for (label, expected) in session.marks {
            let got = try Self.replayInMemory(session.log, start: start, until: .mark(label))
            #expect(difference(got, expected) == nil, "seed \(seed): mark \(label)")
        }
        for (record, expected) in session.atRecord {
            let got = try Self.replayInMemory(session.log, start: start, until: .record(record))
            #expect(difference(got, expected) == nil, "seed \(seed): record \(record)")
        }
        // Through the recorded image: the start snapshot, copied, then the whole log.
        for format in [ImageFormats.Format.vimg, .raw] {
            let output = session.directory + "/out.\(format.rawValue)"
            let summary = try WriteLogReplay.replay(
                log: session.log,
                image: session.image,
                output: output,
                format: format,
                until: .end
            )
            #expect(summary.ended && summary.flushes.count == session.atFlush.count - 1)
            let device = try ImageFormats.open(path: output, format: format, readOnly: true)
            let got = try device.read(count: Self.diskSize, at: 0)
            try device.close()
            #expect(difference(got, session.final) == nil, "seed \(seed): \(format)")
        }
        let listed = try WriteLogReplay.summarize(path: session.log)
        #expect(listed.ended && listed.problem == nil && listed.marks.count == session.marks.count)
    }

    /// Invariant: the log's checksum is CRC-32C, the hardware path and the table agree (the standard check
    /// value, and odd lengths and alignments through both).
    @Test func checksumIsCRC32C() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        let bytes = Pattern.bytes(count: 1000, offset: 0, seed: 3)
        var whole = CRC32C.checksum(bytes)
        for split in [0, 1, 7, 9, 500, 999] {
            let resumed = CRC32C.update(CRC32C.checksum(Array(bytes[..<split])), Array(bytes[split...]))
            #expect(resumed == whole, "split at \(split)")
        }
        whole = CRC32C.update(whole, [])
        #expect(whole == CRC32C.checksum(bytes))
        for start in 0..<9 {
            let part = Array(bytes[start...])
            let table = part.withUnsafeBytes { CCrashSim_crc32c_table(0, $0.baseAddress, $0.count) }
            #expect(table == CRC32C.checksum(part), "from byte \(start)")
        }
    }

    /// Invariant: a log is refused with a clear message when it is cut short, from another image, when
    /// its start snapshot is gone, when it is not a log or from a newer format, and when asked for a point
    /// it does not have.
    @Test func badLogsAreRefused() throws {
        let session = try Self.record(seed: 5, steps: 60)
        defer { TestEnvironment.remove(session.directory) }
        let bytes = try Self.contents(session.log)
        let output = session.directory + "/out.vimg"
        func refusal(_ log: [UInt8]?, image: String? = nil, until stop: ReplayStop = .end) -> CrashSimError? {
            let path = session.directory + "/bad.log"
            unlink(path)
            if let log {
                let file = try! FileDevice.open(path: path, readOnly: false, create: true, growable: true)
                try! file.write(log, at: 0)
                try! file.close()
            }
            do {
                _ = try WriteLogReplay.replay(
                    log: log == nil ? session.log : path,
                    image: image ?? session.image,
                    output: output,
                    format: .vimg,
                    until: stop
                )
                Issue.record("a bad log was replayed")
                return nil
            } catch let error as CrashSimError {
                #expect(access(output, F_OK) != 0, "a refused replay left its output behind")
                return error
            } catch {
                Issue.record("not a CrashSimError: \(error)")
                return nil
            }
        }
        let cut = refusal(Array(bytes.dropLast(100)))
        #expect(cut?.code == .truncatedLog && "\(cut!)".contains("truncated"), "\(String(describing: cut))")
        let noEnd = refusal(Array(bytes.dropLast(WriteLogRecord.headSize)))
        #expect(noEnd?.code == .truncatedLog && "\(noEnd!)".contains("without its end record"))
        var flipped = bytes
        flipped[flipped.count / 2] ^= 0x10
        #expect(refusal(flipped)?.code == .corruptLog)
        #expect(refusal(Array("not a log at all".utf8))?.code == .notALog)
        var newer = bytes
        newer[11] = 2
        let version = refusal(newer)
        #expect(version?.code == .unsupportedVersion && "\(version!)".contains("version 2"))
        // Another image: same size, its own UUID.
        let other = session.directory + "/other.vimg"
        try VImage.create(path: other, virtualSize: UInt64(Self.diskSize))
        let wrong = refusal(nil, image: other)
        #expect(wrong?.code == .wrongImage && "\(wrong!)".contains("recorded on image"), "\(String(describing: wrong))")
        // Points the log does not have.
        #expect(refusal(nil, until: .flush(10_000))?.code == .notFound)
        #expect(refusal(nil, until: .mark("never"))?.code == .notFound)
        // The start snapshot deleted.
        let image = try ImageFormats.openVImage(path: session.image, readOnly: false)
        let header = try WriteLogReader(path: session.log).header
        try image.deleteSnapshot(named: header.snapshotName)
        try image.close()
        let gone = refusal(nil)
        #expect(gone?.code == .notFound && "\(gone!)".contains("start state"))
    }

    /// Invariant: random corruptions of a valid log (flipped bytes, truncation, records dropped, repeated
    /// or swapped, garbage inserted, another log's records spliced in) are all refused with a
    /// `CrashSimError` and a message, never a trap or a silent replay.
    @Test(arguments: TestSeeds.seeds(0..<2, test: "fuzzedLogsAreRefused"))
    func fuzzedLogsAreRefused(seed: UInt64) throws {
        let session = try Self.record(seed: 9, steps: 80)
        let other = try Self.record(seed: 10, steps: 80)
        defer {
            TestEnvironment.remove(session.directory)
            TestEnvironment.remove(other.directory)
        }
        let valid = try Self.contents(session.log)
        let foreign = try Self.contents(other.log)
        var random = SeededRandom(seed: seed)
        let path = session.directory + "/fuzzed.log"
        var kinds: [String: Int] = [:]
        for iteration in 0..<300 {
            var bytes = valid
            let kind = Int.random(in: 0..<6, using: &random)
            switch kind {
            case 0:
                for _ in 0..<Int.random(in: 1...4, using: &random) {
                    bytes[Int.random(in: 0..<bytes.count, using: &random)] ^= UInt8.random(in: 1...255, using: &random)
                }
            case 1:
                bytes.removeLast(Int.random(in: 1..<bytes.count, using: &random))
            case 2:
                // A chunk dropped, or repeated.
                let start = Int.random(in: WriteLogHeader.size..<bytes.count - 1, using: &random)
                let end = Int.random(in: start + 1...min(bytes.count, start + 5000), using: &random)
                if Bool.random(using: &random) {
                    bytes.removeSubrange(start..<end)
                } else {
                    bytes.insert(contentsOf: bytes[start..<end], at: end)
                }
            case 3:
                let at = Int.random(in: 0...bytes.count, using: &random)
                bytes.insert(
                    contentsOf: (0..<Int.random(in: 1...64, using: &random)).map { _ in
                        UInt8.random(in: 0...255, using: &random)
                    },
                    at: at
                )
            case 4:
                // Another log's tail spliced on after this log's header: same layout, other image.
                let cut = Int.random(in: WriteLogHeader.size..<foreign.count, using: &random)
                bytes = Array(bytes[0..<WriteLogHeader.size]) + foreign[WriteLogHeader.size..<cut]
            default:
                // Two bytes swapped somewhere in the records.
                let a = Int.random(in: WriteLogHeader.size..<bytes.count, using: &random)
                let b = Int.random(in: WriteLogHeader.size..<bytes.count, using: &random)
                bytes.swapAt(a, b)
            }
            guard bytes != valid else { continue }
            kinds["\(kind)", default: 0] += 1
            unlink(path)
            let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
            try file.write(bytes, at: 0)
            try file.close()
            do {
                _ = try Self.replayInMemory(path, start: session.atFlush[0], until: .end)
                Issue.record("seed \(seed), iteration \(iteration): a corrupted log (kind \(kind)) was replayed")
            } catch let error as CrashSimError {
                #expect(!error.message.isEmpty)
            }
            let summary = try? WriteLogReplay.summarize(path: path)
            #expect(
                summary == nil || summary?.problem != nil,
                "seed \(seed), iteration \(iteration): summary missed it"
            )
        }
        #expect(kinds.count == 6, "\(kinds)")
    }
}
