import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Amend: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change an image's format options in place.",
            discussion: """
                Options (-o, comma separated; -o help lists them for the image's format):
                  qcow2: compat=0.10|1.1, lazy_refcounts=on|off, size=SIZE, backing_file=NAME, backing_fmt=FMT
                  vimg:  size=SIZE, backing_file=NAME, backing_fmt=FMT
                Only changes that cost a header rewrite are made in place. refcount_bits and cluster_size are
                accepted at their current value only (changing them rewrites every table: convert the image), and
                a downgrade to compat=0.10 is refused while the image has zero clusters. As with qemu-img amend,
                backing_file only renames the backing file (vimg rebase changes what the disk reads), and size
                only grows the disk (vimg resize --shrink shrinks it).
                Examples:
                  vimg amend -o compat=1.1,lazy_refcounts=on vm.qcow2
                  vimg amend -o size=40G vm.qcow2
                """.reflowedHelp
        )

        @Option(name: .short, help: "Image format (vimg or qcow2); probed when omitted.")
        var format: String?
        @Option(name: .short, help: "Options to change, comma separated (-o help lists them).")
        var options: [String] = []
        @Flag(name: .short, help: "Show progress (accepted for qemu-img's habit: amend changes metadata only).")
        var progress = false
        @Flag(name: .short, help: "Quiet.")
        var quiet = false
        @Argument(help: "The image file.")
        var file: String

        static let supported: [ImageFormats.Format: String] = [
            .qcow2: "compat=0.10|1.1, lazy_refcounts=on|off, size=SIZE, backing_file=NAME, backing_fmt=FMT, "
                + "refcount_bits=N and cluster_size=SIZE (at their current values)",
            .vimg: "size=SIZE, backing_file=NAME, backing_fmt=FMT, cluster_size=SIZE (at its current value)",
        ]

        func validate() throws {
            if options.isEmpty { throw ValidationError("missing -o OPTIONS (-o help lists them)") }
        }

        func run() throws {
            try runReportingErrors {
                let kind = try formatNamed(format) ?? ImageFormats.probe(path: file)
                guard let list = Self.supported[kind] else {
                    throw VImageError(
                        .invalidArgument,
                        path: file,
                        message:
                            "\(kind.rawValue) images have no format options to amend (vimg resize changes the size)"
                    )
                }
                let items = options.flatMap { $0.split(separator: ",").map(String.init) }
                if items.contains("help") {
                    print("Options for \(kind.rawValue): \(list)")
                    return
                }
                let host = try ImageFormats.openStorage(path: file, readOnly: false, growable: true, lock: .exclusive)
                defer { try? host.close() }
                let change = try Change(items, format: kind, host: host, path: file)

                if change.size != nil || change.backingFile != nil || change.backingFormat != nil {
                    // The backing chain is not opened: only the names change, and growing reads no data.
                    let image = try VImage.open(host: host, path: file, readOnly: false, backing: MemoryDevice(size: 0))
                    do {
                        if let size = change.size {
                            guard size >= image.size else {
                                throw VImageError(
                                    .invalidArgument,
                                    path: file,
                                    message: "amend only grows the disk: use 'vimg resize --shrink' to shrink it"
                                )
                            }
                            _ = try image.resize(to: size)
                        }
                        if change.backingFile != nil || change.backingFormat != nil {
                            let current = image.currentHeader
                            let name = change.backingFile ?? current.backingFileName
                            let format =
                                change.backingFormat ?? (change.backingFile == nil ? current.backingFileFormat : nil)
                            try image.setBacking(name: name?.isEmpty == true ? nil : name, format: format)
                        }
                        try image.close()
                    } catch {
                        try? image.close()
                        throw error
                    }
                }
                if change.qcow2 != Qcow2Amendment() {
                    try VImage.amendQcow2(host: host, path: file, change.qcow2)
                }
                try host.close()
            }
        }

        /// The options asked for, checked against the format and the image's current values.
        struct Change {
            var size: UInt64?
            var backingFile: String?
            var backingFormat: String?
            var qcow2 = Qcow2Amendment()

            init(_ items: [String], format: ImageFormats.Format, host: any BlockDevice, path: String) throws {
                let qcow2Header = format == .qcow2 ? try Qcow2Header.read(from: host, path: path) : nil
                let clusterSize =
                    try qcow2Header.map { UInt64($0.clusterSize) } ?? UInt64(ImageHeader.read(from: host).clusterSize)
                func invalid(_ message: String) -> VImageError {
                    VImageError(.invalidArgument, path: path, message: message)
                }
                func onOff(_ value: String, _ name: String) throws -> Bool {
                    guard let on = ["on": true, "off": false][value] else {
                        throw invalid("\(name) must be on or off")
                    }
                    return on
                }
                for item in items {
                    let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
                    guard parts.count == 2 else { throw invalid("option '\(item)' needs a value (NAME=VALUE)") }
                    let (name, value) = (parts[0], parts[1])
                    switch name {
                    case "size":
                        size = try parseSize(value)
                    case "backing_file":
                        backingFile = value
                    case "backing_fmt":
                        guard ImageFormats.Format(rawValue: value) != nil else {
                            throw invalid("unknown backing format '\(value)' (use vimg, raw or qcow2)")
                        }
                        backingFormat = value
                    case "cluster_size":
                        guard try parseSize(value, what: "cluster size") == clusterSize else {
                            throw invalid(
                                "changing the cluster size rewrites every table: convert the image with -o cluster_size"
                            )
                        }
                    case "compat" where format == .qcow2:
                        guard let version: UInt32 = ["0.10": 2, "v2": 2, "1.1": 3, "v3": 3][value] else {
                            throw invalid("compat must be 0.10 or 1.1")
                        }
                        qcow2.version = version
                    case "lazy_refcounts" where format == .qcow2:
                        qcow2.lazyRefcounts = try onOff(value, name)
                    case "refcount_bits" where format == .qcow2:
                        guard let bits = Int(value), let header = qcow2Header,
                            bits == 1 << Int(header.refcountOrder)
                        else {
                            throw invalid(
                                "changing refcount_bits rewrites every refcount block: not done in place (the image "
                                    + "has \(1 << Int(qcow2Header?.refcountOrder ?? 4))-bit refcounts)"
                            )
                        }
                    default:
                        throw invalid(
                            "'\(name)' cannot be amended for \(format.rawValue) (supported: \(Amend.supported[format] ?? ""))"
                        )
                    }
                }
                if backingFormat != nil, backingFile?.isEmpty == true {
                    throw invalid("backing_fmt goes with a backing file")
                }
            }
        }
    }
}
