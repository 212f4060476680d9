import ArgumentParser
import BlockIO
import VImage

extension Vimg {
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show an image's format, sizes and header.")

        @OptionGroup var output: OutputOptions

        @Option(name: .short, help: "Image format (vimg or raw); probed when omitted.")
        var format: String?

        @Argument(help: "The image file.")
        var file: String

        func run() throws {
            try runReportingErrors {
                let kind = try format.map { name -> DiskImage.Format in
                    guard let f = DiskImage.Format(rawValue: name) else { throw ValidationError("unknown format '\(name)'") }
                    return f
                } ?? DiskImage.probe(path: file)
                let actual = (try? FileDevice.open(path: file, readOnly: true)).map { f -> UInt64 in
                    defer { try? f.close() }
                    return f.allocatedBytes()
                } ?? 0
                var fields: [(String, JSON)] = []
                var lines: [String] = ["image: \(file)", "file format: \(kind.rawValue)"]
                switch kind {
                case .vimg:
                    let image = try VImage.open(path: file, readOnly: true)
                    defer { try? image.close() }
                    let h = image.currentHeader
                    let dirty = h.incompatibleFeatures.contains(.dirty)
                    let corrupt = h.incompatibleFeatures.contains(.corrupt)
                    lines += [
                        "virtual size: \(ByteSize.format(h.virtualSize)) (\(h.virtualSize) bytes)",
                        "disk size: \(ByteSize.format(actual))",
                        "cluster_size: \(h.clusterSize)",
                    ]
                    if let backing = h.backingFileName {
                        lines.append("backing file: \(backing)")
                        if let f = h.backingFileFormat { lines.append("backing file format: \(f)") }
                    }
                    lines += [
                        "Format specific information:",
                        "    version: \(h.version)",
                        "    refcount bits: \(1 << h.refcountOrder)",
                        "    snapshots: \(h.snapshotCount)",
                        "    dirty: \(dirty ? "yes (not closed cleanly; 'vimg check' reports leaked space)" : "no")",
                        "    corrupt: \(corrupt ? "yes (writes refused until 'vimg check -r all')" : "no")",
                    ]
                    fields = [
                        ("virtual-size", .uint(h.virtualSize)), ("filename", .string(file)),
                        ("cluster-size", .uint(UInt64(h.clusterSize))), ("format", .string("vimg")),
                        ("actual-size", .uint(actual)), ("dirty-flag", .bool(dirty)),
                    ]
                    if let backing = h.backingFileName {
                        fields.append(("backing-filename", .string(backing)))
                        if let f = h.backingFileFormat { fields.append(("backing-filename-format", .string(f))) }
                    }
                    fields.append(("format-specific", .object([
                        ("type", .string("vimg")),
                        ("data", .object([
                            ("version", .uint(UInt64(h.version))), ("refcount-bits", .uint(1 << UInt64(h.refcountOrder))),
                            ("snapshots", .uint(UInt64(h.snapshotCount))), ("corrupt", .bool(corrupt)),
                            ("incompatible-features", .uint(h.incompatibleFeatures.rawValue)),
                            ("compatible-features", .uint(h.compatibleFeatures)),
                            ("autoclear-features", .uint(h.autoclearFeatures)),
                        ])),
                    ])))
                case .raw:
                    let device = try FileDevice.open(path: file, readOnly: true)
                    defer { try? device.close() }
                    lines += ["virtual size: \(ByteSize.format(device.size)) (\(device.size) bytes)", "disk size: \(ByteSize.format(actual))"]
                    fields = [
                        ("virtual-size", .uint(device.size)), ("filename", .string(file)), ("format", .string("raw")),
                        ("actual-size", .uint(actual)), ("dirty-flag", .bool(false)),
                    ]
                case .qcow2:
                    throw VImageError(.unsupportedFeature, path: file, message: "qcow2 images are not supported by info yet")
                }
                print(output.format == .json ? JSON.object(fields).render() : lines.joined(separator: "\n"))
            }
        }
    }
}
