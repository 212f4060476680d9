import ArgumentParser
import BlockIO
import ImageFormats
import RBD
import VImage

extension Vimg {
    struct Info: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show an image's format, sizes and header.")

        @OptionGroup var output: OutputOptions

        @Option(name: .short, help: "Image format (vimg or raw); probed when omitted.")
        var format: String?

        @Flag(help: "Show every image of the backing chain, top first.")
        var backingChain = false

        @Flag(
            name: [.customShort("U"), .customLong("force-share")],
            help: "Read the image even while another process writes it (as qemu-img info -U); it may be changing."
        )
        var forceShare = false

        @Argument(help: "The image file.")
        var file: String

        /// A shared lock, as any reader takes; none with -U.
        var lock: FileDevice.LockMode { forceShare ? .none : .shared }

        func run() throws {
            try runReportingErrors {
                // Headers only: info works on a clone whose backing file is missing, as qemu-img's does.
                let top = try formatNamed(format) ?? ImageFormats.probe(path: file)
                var levels = [ImageFormats.ChainLevel(path: file, format: top)]
                if backingChain, let reference = try ImageFormats.backingReference(of: file, format: top) {
                    levels += try ImageFormats.backingLevels(from: reference, excluding: [ImageFormats.identity(file)])
                }
                let outputs = try levels.map { try describe($0.path, $0.format) }
                if output.format == .json {
                    print(
                        backingChain
                            ? JSON.array(outputs.map { .object($0.fields) }).render()
                            : JSON.object(outputs[0].fields).render()
                    )
                } else {
                    print(outputs.map { $0.lines.joined(separator: "\n") }.joined(separator: "\n\n"))
                }
            }
        }

        /// Text lines and JSON fields for one image.
        func describe(_ file: String, _ kind: ImageFormats.Format) throws -> (lines: [String], fields: [(String, JSON)])
        {
            // What the file occupies (an RBD image's usage is the cluster's business: not shown).
            let actual =
                (RBDSpec.isRBD(file) ? nil : try? FileDevice.open(path: file, readOnly: true)).map { f -> UInt64 in
                    defer { try? f.close() }
                    return f.allocatedBytes()
                } ?? 0
            var fields: [(String, JSON)] = []
            var lines: [String] = ["image: \(file)", "file format: \(kind.rawValue)"]
            switch kind {
            case .vimg:
                let (h, bitmaps) = try withFile(file) { () -> (ImageHeader, [BitmapInfo]) in
                    let device = try ImageFormats.openStorage(path: file, readOnly: true, lock: lock)
                    defer { try? device.close() }
                    let header = try ImageHeader.read(from: device, path: file)
                    return (header, VImage.listBitmaps(host: device, header: header))
                }
                let dirty = h.incompatibleFeatures.contains(.dirty)
                let corrupt = h.incompatibleFeatures.contains(.corrupt)
                lines += imageLines(
                    virtualSize: h.virtualSize,
                    actual: actual,
                    clusterSize: h.clusterSize,
                    backing: h.backingFileName,
                    format: h.backingFileFormat
                )
                lines += [
                    "Format specific information:",
                    "    version: \(h.version)",
                    "    uuid: \(h.uuid.map { "\($0)" } ?? "none")",
                    "    refcount bits: \(1 << h.refcountOrder)",
                    "    snapshots: \(h.snapshotCount)",
                    "    dirty: \(dirty ? "yes (not closed cleanly; 'vimg check' reports leaked space)" : "no")",
                    "    corrupt: \(corrupt ? "yes (writes refused until 'vimg check -r all')" : "no")",
                    "    checksums: \(h.incompatibleFeatures.contains(.checksums) ? "crc32c per 4 KiB block (verified on every read; 'vimg scrub' reads all)" : "no")",
                ]
                if !bitmaps.isEmpty {
                    lines.append("    bitmaps:")
                    for b in bitmaps {
                        let state = b.consistent ? (b.enabled ? "recording" : "disabled") : "inconsistent (remove it)"
                        lines.append("        \(b.name): granularity \(b.granularity), \(state)")
                    }
                }
                fields = [
                    ("virtual-size", .uint(h.virtualSize)), ("filename", .string(file)),
                    ("cluster-size", .uint(UInt64(h.clusterSize))), ("format", .string("vimg")),
                    ("actual-size", .uint(actual)), ("dirty-flag", .bool(dirty)),
                ]
                if let uuid = h.uuid { fields.append(("uuid", .string("\(uuid)"))) }
                if let backing = h.backingFileName {
                    fields.append(("backing-filename", .string(backing)))
                    if let f = h.backingFileFormat { fields.append(("backing-filename-format", .string(f))) }
                }
                fields.append(
                    (
                        "format-specific",
                        .object([
                            ("type", .string("vimg")),
                            (
                                "data",
                                .object([
                                    ("version", .uint(UInt64(h.version))),
                                    ("refcount-bits", .uint(1 << UInt64(h.refcountOrder))),
                                    ("snapshots", .uint(UInt64(h.snapshotCount))), ("corrupt", .bool(corrupt)),
                                    ("checksums", .bool(h.incompatibleFeatures.contains(.checksums))),
                                    ("incompatible-features", .uint(h.incompatibleFeatures.rawValue)),
                                    ("compatible-features", .uint(h.compatibleFeatures)),
                                    ("autoclear-features", .uint(h.autoclearFeatures)),
                                    (
                                        "bitmaps",
                                        .array(
                                            bitmaps.map { b in
                                                // qemu-img's flags: "in-use" marks an inconsistent bitmap, "auto" an enabled one.
                                                var flags: [JSON] = []
                                                if !b.consistent { flags.append(.string("in-use")) }
                                                if b.enabled { flags.append(.string("auto")) }
                                                return .object([
                                                    ("flags", .array(flags)), ("name", .string(b.name)),
                                                    ("granularity", .uint(b.granularity)),
                                                ])
                                            }
                                        )
                                    ),
                                ])
                            ),
                        ])
                    )
                )
            case .raw:
                let device = try ImageFormats.openStorage(path: file, readOnly: true)
                defer { try? device.close() }
                lines += [
                    "virtual size: \(ByteSize.format(device.size)) (\(device.size) bytes)",
                    "disk size: \(ByteSize.format(actual))",
                ]
                fields = [
                    ("virtual-size", .uint(device.size)), ("filename", .string(file)), ("format", .string("raw")),
                    ("actual-size", .uint(actual)), ("dirty-flag", .bool(false)),
                ]
            case .qcow2:
                let device = try ImageFormats.openStorage(path: file, readOnly: true, lock: lock)
                let image: Qcow2Image
                do {
                    image = try Qcow2Image(file: device, path: file, backing: nil)
                } catch {
                    try? device.close()
                    throw error
                }
                defer { try? image.close() }
                let h = image.header
                lines += imageLines(
                    virtualSize: h.virtualSize,
                    actual: actual,
                    clusterSize: h.clusterSize,
                    backing: h.backingFile,
                    format: h.backingFormat
                )
                if !image.snapshots.isEmpty {
                    lines.append("Snapshot list:")
                    lines.append("ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT")
                    for s in image.snapshots {
                        lines.append(
                            "\(s.id.padding(10))\(s.name.padding(18))\(ByteSize.format(s.vmStateSize).padding(23))\(s.dateSeconds)"
                        )
                    }
                }
                let compat = h.version == 2 ? "0.10" : "1.1"
                lines += ["Format specific information:", "    compat: \(compat)"]
                if h.version >= 3 { lines.append("    compression type: \(h.compressionType)") }
                lines += [
                    "    lazy refcounts: \(h.compatibleFeatures & 1 != 0)",
                    "    refcount bits: \(1 << h.refcountOrder)",
                    "    corrupt: \(h.isCorrupt)",
                    "    extended l2: false",
                ]
                fields = [
                    ("virtual-size", .uint(h.virtualSize)), ("filename", .string(file)),
                    ("cluster-size", .uint(UInt64(h.clusterSize))), ("format", .string("qcow2")),
                    ("actual-size", .uint(actual)), ("dirty-flag", .bool(h.isDirty)),
                ]
                if let backing = h.backingFile {
                    fields.append(("backing-filename", .string(backing)))
                    if let f = h.backingFormat { fields.append(("backing-filename-format", .string(f))) }
                }
                if !image.snapshots.isEmpty {
                    fields.append(
                        (
                            "snapshots",
                            .array(
                                image.snapshots.map { s in
                                    .object([
                                        ("id", .string(s.id)), ("name", .string(s.name)),
                                        ("vm-state-size", .uint(s.vmStateSize)),
                                        ("date-sec", .uint(UInt64(s.dateSeconds))),
                                        ("date-nsec", .uint(UInt64(s.dateNanoseconds))),
                                        ("vm-clock-nsec", .uint(s.vmClockNanoseconds)),
                                    ])
                                }
                            )
                        )
                    )
                }
                fields.append(
                    (
                        "format-specific",
                        .object([
                            ("type", .string("qcow2")),
                            (
                                "data",
                                .object([
                                    ("compat", .string(compat)), ("compression-type", .string("\(h.compressionType)")),
                                    ("lazy-refcounts", .bool(h.compatibleFeatures & 1 != 0)),
                                    ("refcount-bits", .uint(1 << UInt64(h.refcountOrder))),
                                    ("corrupt", .bool(h.isCorrupt)),
                                    ("extended-l2", .bool(false)),
                                ])
                            ),
                        ])
                    )
                )
            }
            return (lines, fields)
        }
    }
}

extension String {
    /// Left-aligned in a column of `width` characters (at least one space after).
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}

/// Runs a file operation, giving a plain error for a missing file.
func withFile<T>(_ path: String, _ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let error as BlockIOError {
        throw VImageError(.io, path: path, message: error.message)
    }
}

/// The lines `vimg info` prints for every image format: sizes, cluster size and backing file.
private func imageLines(
    virtualSize: UInt64,
    actual: UInt64,
    clusterSize: Int,
    backing: String?,
    format: String?
) -> [String] {
    var lines = [
        "virtual size: \(ByteSize.format(virtualSize)) (\(virtualSize) bytes)",
        "disk size: \(ByteSize.format(actual))",
        "cluster_size: \(clusterSize)",
    ]
    if let backing {
        lines.append("backing file: \(backing)")
        if let format { lines.append("backing file format: \(format)") }
    }
    return lines
}
