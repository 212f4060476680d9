import ArgumentParser
import BlockIO
import ImageFormats
import VImage

extension Vimg {
    struct Map: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show how the virtual disk maps onto the image file (data, zero, unallocated).",
            discussion: "The JSON form has qemu-img map's fields: start, length, depth, present, zero, data, offset."
        )

        @OptionGroup var output: OutputOptions

        @Argument(help: "The image file.")
        var file: String

        struct Row {
            var start: UInt64
            var length: UInt64
            var depth: Int
            var present: Bool
            var zero: Bool
            var data: Bool
            var offset: UInt64?
            var file: String
        }

        func run() throws {
            try runReportingErrors {
                let kind = try ImageFormats.probe(path: file)
                guard kind != .raw else {
                    throw VImageError(
                        .unsupportedFeature,
                        path: file,
                        message: "map reads VIMG and qcow2 images (this is \(kind.rawValue))"
                    )
                }
                let image = try ImageFormats.open(path: file, format: kind, readOnly: true)
                defer { try? image.close() }
                var rows: [Row] = []
                try collect(image, name: file, depth: 0, offset: 0, count: image.size, into: &rows)
                if output.format == .json {
                    print(
                        JSON.array(
                            rows.map { r in
                                var fields: [(String, JSON)] = [
                                    ("start", .uint(r.start)), ("length", .uint(r.length)),
                                    ("depth", .int(Int64(r.depth))),
                                    ("present", .bool(r.present)), ("zero", .bool(r.zero)), ("data", .bool(r.data)),
                                ]
                                if let offset = r.offset { fields.append(("offset", .uint(offset))) }
                                return .object(fields)
                            }
                        ).render()
                    )
                } else {
                    func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
                    func col(_ s: String) -> String {
                        s.count >= 16 ? s + " " : s + String(repeating: " ", count: 16 - s.count)
                    }
                    print(col("Offset") + col("Length") + col("Mapped to") + "File")
                    for r in rows where r.data {
                        print(col(hex(r.start)) + col(hex(r.length)) + col(r.offset.map(hex) ?? "-") + r.file)
                    }
                }
            }
        }

        /// Walks this image's mapping, descending into the backing chain for unallocated runs.
        func collect(
            _ device: any BlockDevice,
            name: String,
            depth: Int,
            offset: UInt64,
            count: UInt64,
            into rows: inout [Row]
        ) throws {
            guard count > 0 else { return }
            // VIMG and qcow2 images report their own mapping; unallocated runs descend into the backing file.
            if let layer = try ImageFormats.layer(of: device, at: offset, count: count) {
                for m in layer.runs {
                    switch m.kind {
                    case .data(let host):
                        add(
                            &rows,
                            Row(
                                start: m.offset,
                                length: m.length,
                                depth: depth,
                                present: true,
                                zero: false,
                                data: true,
                                offset: host,
                                file: name
                            )
                        )
                    case .compressed:
                        add(
                            &rows,
                            Row(
                                start: m.offset,
                                length: m.length,
                                depth: depth,
                                present: true,
                                zero: false,
                                data: true,
                                offset: nil,
                                file: name
                            )
                        )
                    case .zero:
                        add(
                            &rows,
                            Row(
                                start: m.offset,
                                length: m.length,
                                depth: depth,
                                present: true,
                                zero: true,
                                data: false,
                                offset: nil,
                                file: name
                            )
                        )
                    case .unallocated:
                        if let backing = layer.backing {
                            let size = backing.size
                            let inside = m.offset < size ? min(m.length, size - m.offset) : 0
                            try collect(
                                backing,
                                name: layer.backingPath ?? "backing",
                                depth: depth + 1,
                                offset: m.offset,
                                count: inside,
                                into: &rows
                            )
                            if inside < m.length {
                                add(
                                    &rows,
                                    Row(
                                        start: m.offset + inside,
                                        length: m.length - inside,
                                        depth: depth + 1,
                                        present: false,
                                        zero: true,
                                        data: false,
                                        offset: nil,
                                        file: name
                                    )
                                )
                            }
                        } else {
                            add(
                                &rows,
                                Row(
                                    start: m.offset,
                                    length: m.length,
                                    depth: depth,
                                    present: false,
                                    zero: true,
                                    data: false,
                                    offset: nil,
                                    file: name
                                )
                            )
                        }
                    }
                }
            } else {
                for e in try device.extents(at: offset, count: count) {
                    let isData = !e.flags.contains(.zero)
                    add(
                        &rows,
                        Row(
                            start: e.offset,
                            length: e.length,
                            depth: depth,
                            present: !e.flags.contains(.hole) || true,
                            zero: !isData,
                            data: isData,
                            offset: isData ? e.offset : nil,
                            file: name
                        )
                    )
                }
            }
        }

        func add(_ rows: inout [Row], _ row: Row) {
            if var last = rows.last, last.start + last.length == row.start, last.depth == row.depth,
                last.present == row.present,
                last.zero == row.zero, last.data == row.data, last.file == row.file,
                last.offset.map({ $0 + last.length }) == row.offset
            {
                last.length += row.length
                rows[rows.count - 1] = last
                return
            }
            rows.append(row)
        }
    }
}
