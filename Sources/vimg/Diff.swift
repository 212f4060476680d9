import ArgumentParser
import BlockIO
import ImageFormats
import VImage

#if canImport(Glibc)
import Glibc
#endif

extension Vimg {
    struct Diff: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "List the ranges that changed between two snapshots, from the image's tables alone.",
            discussion: """
                Like rbd diff: without --from-snap, everything the target state holds; without --to-snap, up to
                the active state. No data is read. Ranges that read as zeroes in the target are "zero".
                """.reflowedHelp
        )

        @Option(help: "The snapshot to compare from (default: an empty disk).")
        var fromSnap: String?
        @Option(help: "The snapshot to compare to (default: the active state).")
        var toSnap: String?
        @OptionGroup var output: OutputOptions
        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            try runReportingErrors {
                let image = try ImageFormats.openVImage(path: file, readOnly: true, snapshot: toSnap)
                defer { try? image.close() }
                let extents = try image.changes(from: fromSnap, to: nil)
                if output.format == .json {
                    print(
                        JSON.array(
                            extents.map {
                                .object([
                                    ("offset", .uint($0.offset)), ("length", .uint($0.length)),
                                    ("type", .string($0.isZero ? "zero" : "data")),
                                ])
                            }
                        ).render()
                    )
                } else {
                    print("Offset".padding(16) + "Length".padding(16) + "Type")
                    for e in extents {
                        print(
                            String(e.offset).padding(16) + String(e.length).padding(16) + (e.isZero ? "zero" : "data")
                        )
                    }
                }
            }
        }
    }

    struct ExportDiff: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "export-diff",
            abstract: "Write the changes between two snapshots as an rbd diff v1 stream.",
            discussion: """
                The stream format of rbd export-diff (docs/FORMAT.md, appendix), so rbd merge-diff and
                rbd import-diff accept it. OUT "-" writes to standard output.
                """.reflowedHelp
        )

        @Option(help: "The snapshot to start from (default: an empty disk).")
        var fromSnap: String?
        @Option(help: "The snapshot to end at (default: the active state).")
        var toSnap: String?
        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @Argument(help: "The image file.")
        var file: String
        @Argument(help: "The diff file to write (\"-\" for standard output).")
        var out: String

        func run() throws {
            try runReportingErrors {
                let image = try ImageFormats.openVImage(path: file, readOnly: true, snapshot: toSnap)
                defer { try? image.close() }
                let sink: FileDevice? =
                    out == "-" ? nil : try FileDevice.open(path: out, readOnly: false, create: true, growable: true)
                defer { try? sink?.close() }
                try sink?.truncate(to: 0)
                var position: UInt64 = 0
                var bar: Progress? = nil
                try RBDDiff.export(
                    image: image,
                    from: fromSnap,
                    to: toSnap,
                    progress: { done, total in
                        guard progress else { return }
                        if bar == nil { bar = Progress(total: total) }
                        bar?.advance(by: done - (bar?.done ?? 0))
                    }
                ) { bytes in
                    if let sink {
                        try sink.write(bytes, at: position, fua: false)
                    } else {
                        try writeAll(1, bytes)
                    }
                    position += UInt64(bytes.count)
                }
                bar?.finish()
                try sink?.close()
            }
        }
    }

    struct ImportDiff: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "import-diff",
            abstract: "Apply an rbd diff v1 stream (from vimg or rbd export-diff) to an image.",
            discussion: """
                As rbd import-diff: the image must have the diff's starting snapshot and not yet its ending
                one, which is created after the changes are applied. Stricter than rbd: the image's live state
                must not have changed since the starting snapshot (--force applies anyway). If the stream is
                malformed or cut short, the image is reverted to its state before the command.
                DIFF "-" reads standard input.
                """.reflowedHelp
        )

        @Flag(help: "Apply even if the image changed since the diff's starting snapshot.")
        var force = false
        @Argument(help: "The diff file (\"-\" for standard input).")
        var diff: String
        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            try runReportingErrors {
                let fd: Int32 = diff == "-" ? 0 : open(diff, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else {
                    throw ImageFormatError(.notFound, path: diff, message: String(cString: strerror(errno)))
                }
                defer { if fd != 0 { close(fd) } }
                let image = try ImageFormats.openVImage(path: file, readOnly: false)
                defer { try? image.close() }
                var source = FileDescriptorSource(fd: fd)
                do {
                    try RBDDiff.apply(&source, to: image, force: force)
                } catch var error as ImageFormatError {
                    if error.path == nil { error.path = diff }
                    throw error
                }
                try image.close()
            }
        }
    }
}

/// Writes all of `bytes` to a file descriptor.
func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) throws {
    var done = 0
    while done < bytes.count {
        let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
        if n < 0 {
            if errno == EINTR { continue }
            throw ImageFormatError(.io, message: "cannot write: \(String(cString: strerror(errno)))")
        }
        done += n
    }
}
