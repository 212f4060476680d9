import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Bitmap: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Add, remove, clear, enable, disable or merge persistent dirty bitmaps.",
            discussion: """
                As qemu-img bitmap. Several operations may be given; they run in this order: --add, --clear,
                --merge, --enable, --disable, --remove. Bitmaps record which granules of the disk changed since
                they were added or cleared (for incremental backup: vdisk serve --bitmap NAME exports one as
                qemu:dirty-bitmap:NAME). A bitmap left in use by a crash is inconsistent and can only be removed.
                Examples:
                  vimg bitmap --add disk.vimg nightly
                  vimg bitmap --clear disk.vimg nightly
                  vimg bitmap --merge other -b old.vimg disk.vimg nightly
                """.reflowedHelp
        )

        @Flag(help: "Add the bitmap (empty, enabled unless --disable).")
        var add = false
        @Flag(help: "Remove the bitmap.")
        var remove = false
        @Flag(help: "Clear every bit.")
        var clear = false
        @Flag(help: "Record changes in the bitmap.")
        var enable = false
        @Flag(help: "Stop recording changes in the bitmap.")
        var disable = false
        @Option(help: "Merge this bitmap (of -b SOURCE, or of the same image) into the bitmap.")
        var merge: String?
        @Option(name: .customShort("b"), help: "The image holding the --merge source bitmap.")
        var sourceFile: String?
        @Option(name: .customShort("g"), help: "Granularity of a new bitmap (default 64K; 512 to 2G, a power of two).")
        var granularity: String?
        @Option(name: .customShort("f"), help: "Image format (vimg).")
        var format: String?
        @Argument(help: "The image file.")
        var file: String
        @Argument(help: "The bitmap's name.")
        var name: String

        func validate() throws {
            guard add || remove || clear || enable || disable || merge != nil else {
                throw ValidationError("give at least one of --add, --remove, --clear, --enable, --disable, --merge")
            }
            if let format, format != "vimg" { throw ValidationError("bitmaps are a VIMG feature (-f vimg)") }
            if granularity != nil && !add { throw ValidationError("-g only applies to --add") }
            if sourceFile != nil && merge == nil { throw ValidationError("-b only applies to --merge") }
        }

        func run() throws {
            try runReportingErrors {
                let image = try ImageFormats.openVImage(path: file, readOnly: false)
                defer { try? image.close() }
                if add {
                    let bytes = try granularity.map { try parseSize($0, what: "granularity") } ?? 65536
                    try image.addBitmap(named: name, granularity: bytes, enabled: !disable)
                }
                if clear { try image.clearBitmap(named: name) }
                if let merge {
                    if let sourceFile {
                        let source = try ImageFormats.openVImage(path: sourceFile, readOnly: true)
                        defer { try? source.close() }
                        try image.mergeBitmap(named: name, from: try source.bitmapContents(named: merge))
                    } else {
                        try image.mergeBitmap(named: name, from: try image.bitmapContents(named: merge))
                    }
                }
                if enable { try image.setBitmap(named: name, enabled: true) }
                if disable && !add { try image.setBitmap(named: name, enabled: false) }
                if remove { try image.removeBitmap(named: name) }
                try image.close()
            }
        }
    }
}
