import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Sparsify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Turn clusters that hold only zeroes into zero clusters and give their space back.",
            discussion: """
                Reads every allocated cluster; one that reads as zeroes becomes a zero cluster, and its storage
                is freed and punched out of the file (the file's allocated size shrinks; its length does not:
                vimg compact moves clusters and truncates). Snapshots keep what they reference.
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
                let zeroed = try image.sparsify { done, total in
                    guard progress else { return }
                    if bar == nil { bar = Progress(total: total) }
                    bar?.advance(by: done - (bar?.done ?? 0))
                }
                bar?.finish()
                try image.close()
                let allocatedAfter = try allocatedBytes(file)
                let freed = allocatedBefore > allocatedAfter ? allocatedBefore - allocatedAfter : 0
                if output.format == .json {
                    print(
                        JSON.object([
                            ("clusters-zeroed", .uint(zeroed)), ("allocated-before", .uint(allocatedBefore)),
                            ("allocated-after", .uint(allocatedAfter)), ("bytes-freed", .uint(freed)),
                        ]).render()
                    )
                } else {
                    print(
                        "Zeroed \(zeroed) clusters; the file's allocated size went from \(ByteSize.format(allocatedBefore)) to \(ByteSize.format(allocatedAfter))."
                    )
                }
            }
        }
    }
}

/// The bytes a file occupies on the host (its allocated blocks).
func allocatedBytes(_ path: String) throws -> UInt64 {
    let file = try FileDevice.open(path: path, readOnly: true)
    defer { try? file.close() }
    return file.allocatedBytes()
}
