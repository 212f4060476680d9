import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Scrub: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Read every block an image uses and verify its checksum.",
            discussion: """
                For images created with -o checksums=on. Reads the data of the disk and of every snapshot, and
                all metadata; --backing-chain also scrubs the backing images. Exit codes: 0 every block verifies,
                1 the scrub could not complete, 2 blocks fail their checksum (repair them with
                vimg check --repair-from OTHER).
                """.reflowedHelp
        )

        @Flag(help: "Also scrub the backing images.")
        var backingChain = false
        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @OptionGroup var output: OutputOptions
        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            var code: Int32 = 0
            try runReportingErrors {
                let image = try ImageFormats.openVImage(path: file, readOnly: true)
                defer { try? image.close() }
                var bar: Progress? = nil
                let started = ContinuousClock.now
                let report = try image.scrub(backingChain: backingChain) { done, total in
                    guard progress else { return }
                    if bar == nil { bar = Progress(total: total) }
                    bar?.advance(by: done - (bar?.done ?? 0))
                }
                bar?.finish()
                let seconds =
                    Double((ContinuousClock.now - started).components.attoseconds) / 1e18
                    + Double((ContinuousClock.now - started).components.seconds)
                let bytes = report.blocksVerified * 4096
                if output.format == .json {
                    print(
                        JSON.object([
                            ("images", .array(report.images.map { .string($0) })),
                            ("blocks-verified", .uint(report.blocksVerified)),
                            ("blocks-unverified", .uint(report.blocksUnverified)),
                            ("bad-blocks", .uint(UInt64(report.findings.count))),
                            ("findings", .array(report.findings.map(Self.json))),
                        ]).render()
                    )
                } else {
                    for f in report.findings { print("ERROR \(Self.describe(f)) fails its checksum") }
                    let rate = seconds > 0 ? " at \(ByteSize.format(UInt64(Double(bytes) / seconds)))/s" : ""
                    print(
                        "\(report.findings.isEmpty ? "No errors were found" : "\(report.findings.count) blocks fail their checksum"): \(report.blocksVerified) blocks (\(ByteSize.format(bytes))) verified\(rate)"
                            + (report.blocksUnverified > 0 ? ", \(report.blocksUnverified) without a checksum yet" : "")
                            + "."
                    )
                }
                code = report.isClean ? 0 : 2
            }
            if code != 0 { throw ExitCode(code) }
        }

        static func describe(_ f: ScrubFinding) -> String {
            let host = "0x\(String(f.hostOffset, radix: 16))"
            let image = f.image.map { "\($0): " } ?? ""
            switch f.kind {
            case .checksumStructure: return "\(image)checksum structure sector at \(host)"
            case .metadata: return "\(image)metadata block at host offset \(host)"
            case .data, .compressed:
                let uses = f.guestOffsets.map {
                    "\($0.snapshot.map { "snapshot \($0) " } ?? "")guest offset \($0.offset)"
                }
                let what = f.kind == .data ? "data" : "compressed data"
                return
                    "\(image)\(what) block at host offset \(host) (\(uses.isEmpty ? "unreferenced" : uses.joined(separator: ", ")))"
            }
        }

        static func json(_ f: ScrubFinding) -> JSON {
            var fields: [(String, JSON)] = [("kind", .string(f.kind.rawValue)), ("host-offset", .uint(f.hostOffset))]
            if let image = f.image { fields.append(("image", .string(image))) }
            fields.append(
                (
                    "guest-offsets",
                    .array(
                        f.guestOffsets.map {
                            .object(
                                [("offset", .uint($0.offset))] + ($0.snapshot.map { [("snapshot", .string($0))] } ?? [])
                            )
                        }
                    )
                )
            )
            return .object(fields)
        }
    }
}
