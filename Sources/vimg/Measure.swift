import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Measure: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show how much space an image of a format needs (as qemu-img measure).",
            discussion:
                "With FILE: the space its data needs after 'vimg convert -O FMT'. With --size: a new image of that size."
        )

        @OptionGroup var output: OutputOptions
        @Option(name: .customShort("O"), help: "Output format: raw, vimg or qcow2 (default raw).")
        var outputFormat: String = "raw"
        @Option(name: .customShort("f"), help: "Format of FILE; probed when omitted.")
        var format: String?
        @Option(name: .customShort("o"), help: "Output format options: cluster_size=SIZE.")
        var options: [String] = []
        @Option(help: "Measure a new, empty image of this size instead of FILE.")
        var size: String?
        @Option(name: .customShort("l"), help: "Measure this snapshot of FILE.")
        var snapshot: String?
        @Argument(help: "The image to measure.")
        var file: String?

        func validate() throws {
            if (size == nil) == (file == nil) { throw ValidationError("give either --size SIZE or FILE") }
            guard ["raw", "vimg", "qcow2"].contains(outputFormat) else {
                throw ValidationError("unknown output format '\(outputFormat)'")
            }
        }

        func run() throws {
            try runReportingErrors {
                let kind = try formatNamed(outputFormat)!
                let bits = try FormatOptions(options, format: kind).clusterBits
                var source: (any BlockDevice)? = nil
                if let file {
                    source = try ImageFormats.open(
                        path: file,
                        format: formatNamed(format),
                        readOnly: true,
                        snapshot: snapshot
                    )
                }
                defer { try? source?.close() }
                let result = try ImageMeasure.measure(
                    source: source,
                    size: try size.map { try parseSize($0) },
                    format: kind,
                    clusterBits: bits
                )
                if output.format == .json {
                    print(
                        JSON.object([
                            ("required", .uint(result.required)), ("fully-allocated", .uint(result.fullyAllocated)),
                        ]).render()
                    )
                } else {
                    print("required size: \(result.required)")
                    print("fully allocated size: \(result.fullyAllocated)")
                }
            }
        }
    }
}
