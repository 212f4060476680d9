import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Compact: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move clusters from the end of an image into free space and truncate the file.",
            discussion: """
                Crash-safe at every step: a power cut leaves an image that checks clean except for leaked
                clusters, with every byte as it was. Snapshots, clones, compressed clusters and bitmaps are kept;
                a clone's backing file is not touched. Run vimg sparsify first to turn zero-filled clusters into
                holes as well.
                """.reflowedHelp
        )

        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @OptionGroup var output: OutputOptions
        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            try runReportingErrors {
                let allocatedBefore = try allocatedBytes(file)
                let image = try ImageFormats.openVImage(path: file, readOnly: false)
                defer { try? image.close() }
                var bar: Progress? = nil
                let result = try image.compact { done, total in
                    guard progress else { return }
                    if bar == nil { bar = Progress(total: total) }
                    bar?.advance(by: done - (bar?.done ?? 0))
                }
                bar?.finish()
                try image.close()
                let allocatedAfter = try allocatedBytes(file)
                if output.format == .json {
                    print(
                        JSON.object([
                            ("clusters-moved", .uint(result.clustersMoved)),
                            ("length-before", .uint(result.bytesBefore)),
                            ("length-after", .uint(result.bytesAfter)), ("allocated-before", .uint(allocatedBefore)),
                            ("allocated-after", .uint(allocatedAfter)),
                        ]).render()
                    )
                } else {
                    print(
                        "Moved \(result.clustersMoved) clusters; the file went from \(ByteSize.format(result.bytesBefore)) to \(ByteSize.format(result.bytesAfter)) (allocated \(ByteSize.format(allocatedBefore)) to \(ByteSize.format(allocatedAfter)))."
                    )
                }
            }
        }
    }
}
