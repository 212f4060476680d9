import ArgumentParser
import BlockIO
import CrashSim
import ImageFormats

#if canImport(Glibc)
import Glibc
#endif

extension Vimg {
    struct Replay: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Rebuild a recorded disk at any point of its write log (vdisk plug --record).",
            discussion: """
                Copies the log's start state (the internal snapshot of IMAGE taken when the recording started)
                into a new image OUTPUT, then applies the log's records up to the point asked for: a record
                number, the N-th flush (the state a power cut right after it leaves), or a mark (vdisk mark).
                IMAGE is only read. A log that is damaged, cut short or from another image is refused, and
                OUTPUT is then not created.
                  vimg replay --until-flush 3 disk.log disk.vimg at-flush-3.vimg
                  vimg replay -O raw --until-mark 'after commit 42' disk.log disk.vimg commit42.raw
                  vimg replay --list disk.log            # flush points and marks (--output=json for scripts)
                See docs/CRASH.md.
                """.reflowedHelp
        )

        @Option(help: ArgumentHelp("Stop after record N (0: the start state).", valueName: "N"))
        var until: UInt64?

        @Option(help: ArgumentHelp("Stop after the N-th flush (0: the start state).", valueName: "N"))
        var untilFlush: Int?

        @Option(help: ArgumentHelp("Stop after the first mark with this label.", valueName: "LABEL"))
        var untilMark: String?

        @Option(name: .customShort("O"), help: "Output format: vimg (default) or raw.")
        var outputFormat: String = "vimg"

        @Flag(help: "List the log's records: counts, flush points and marks (no IMAGE or OUTPUT).")
        var list = false

        @OptionGroup var output: OutputOptions

        @Argument(help: "The write log.")
        var log: String

        @Argument(help: "The recorded VIMG image, holding the log's start snapshot.")
        var image: String?

        @Argument(help: "The image to create.")
        var destination: String?

        func validate() throws {
            let stops = [until != nil, untilFlush != nil, untilMark != nil].filter { $0 }.count
            if stops > 1 { throw ValidationError("give one of --until, --until-flush and --until-mark") }
            if let untilFlush, untilFlush < 0 { throw ValidationError("--until-flush counts from 0") }
            if list {
                if stops > 0 || image != nil { throw ValidationError("--list takes the log alone") }
            } else if image == nil || destination == nil {
                throw ValidationError("give the log, the recorded image and the image to create (or --list LOG)")
            }
            guard ["vimg", "raw"].contains(outputFormat) else {
                throw ValidationError("unknown output format '\(outputFormat)' (use vimg or raw)")
            }
        }

        var stop: ReplayStop {
            if let until { return .record(until) }
            if let untilFlush { return .flush(untilFlush) }
            if let untilMark { return .mark(untilMark) }
            return .end
        }

        func run() throws {
            try runReportingErrors {
                do {
                    if list { return try listLog() }
                    let summary = try WriteLogReplay.replay(
                        log: log,
                        image: image!,
                        output: destination!,
                        format: try formatNamed(outputFormat)!,
                        until: stop
                    )
                    print(
                        "\(destination!): the disk at \(stop) (records 1-\(summary.records): \(summary.writes) writes, "
                            + "\(summary.writeZeroes) write-zeroes, \(summary.discards) discards, "
                            + "\(summary.flushes.count) flushes, \(summary.marks.count) marks)"
                    )
                } catch let error as CrashSimError {
                    printError(error.description)
                    throw ExitCode.failure
                }
            }
        }

        func listLog() throws {
            let summary = try WriteLogReplay.summarize(path: log)
            let header = summary.header
            if output.format == .json {
                var fields: [(String, JSON)] = [
                    ("log", .string(log)),
                    ("version", .uint(UInt64(header.version))),
                    ("image-uuid", .string(header.imageUUID.description)),
                    ("disk-size", .uint(header.deviceSize)),
                    ("start-snapshot", .string(header.snapshotName)),
                    ("created-ns", .uint(header.createdNanoseconds)),
                    ("records", .uint(summary.records)),
                    ("writes", .int(Int64(summary.writes))),
                    ("bytes-written", .uint(summary.bytesWritten)),
                    ("write-zeroes", .int(Int64(summary.writeZeroes))),
                    ("discards", .int(Int64(summary.discards))),
                    ("flushes", .array(summary.flushes.map { .uint($0) })),
                    (
                        "marks",
                        .array(
                            summary.marks.map { .object([("label", .string($0.label)), ("record", .uint($0.record))]) }
                        )
                    ),
                    ("ended", .bool(summary.ended)),
                ]
                fields.append(("problem", summary.problem.map { .string($0.description) } ?? .null))
                print(JSON.object(fields).render())
            } else {
                print("log: \(log) (format version \(header.version))")
                print(
                    "recorded on: image \(header.imageUUID) (\(ByteSize.format(header.deviceSize))), "
                        + "from snapshot '\(header.snapshotName)', \(utcTime(header.createdNanoseconds))"
                )
                print(
                    "records: \(summary.records) (\(summary.writes) writes of \(ByteSize.format(summary.bytesWritten)), "
                        + "\(summary.writeZeroes) write-zeroes, \(summary.discards) discards, "
                        + "\(summary.flushes.count) flushes, \(summary.marks.count) marks)"
                )
                for (n, record) in summary.flushes.enumerated() { print("flush \(n + 1): record \(record)") }
                for mark in summary.marks { print("mark '\(mark.label)': record \(mark.record)") }
                if summary.ended { print("ended cleanly") }
            }
            if let problem = summary.problem {
                printError(problem.description)
                throw ExitCode.failure
            }
        }

        /// `2026-11-30 12:00:00 UTC`.
        func utcTime(_ nanoseconds: UInt64) -> String {
            var seconds = time_t(nanoseconds / 1_000_000_000)
            var parts = tm()
            gmtime_r(&seconds, &parts)
            var text = [CChar](repeating: 0, count: 64)
            let n = strftime(&text, text.count, "%Y-%m-%d %H:%M:%S UTC", &parts)
            return String(decoding: text[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }
}
