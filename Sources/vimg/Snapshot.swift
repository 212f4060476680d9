import ArgumentParser
import BlockIO
import ImageFormats
import RBD
import VImage

#if canImport(Glibc)
import Glibc
#endif

extension Vimg {
    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create, list, apply or delete internal snapshots.",
            discussion: """
                Examples:
                  vimg snapshot -c before-upgrade disk.vimg
                  vimg snapshot -l disk.vimg
                  vimg snapshot -a before-upgrade disk.vimg
                  vimg snapshot -d before-upgrade disk.vimg
                  vimg snapshot -c v1 rbd:pool/golden            (a raw RBD image: an RBD snapshot)
                """.reflowedHelp
        )

        @Option(name: .customShort("c"), help: "Create a snapshot with this name.")
        var create: String?
        @Flag(name: .customShort("l"), help: "List snapshots.")
        var list = false
        @Option(name: .customShort("a"), help: "Apply (revert to) this snapshot.")
        var apply: String?
        @Option(name: .customShort("d"), help: "Delete this snapshot.")
        var delete: String?

        @OptionGroup var output: OutputOptions

        @Argument(help: "The image file.")
        var file: String

        func validate() throws {
            let chosen = [create != nil, list, apply != nil, delete != nil].filter { $0 }.count
            guard chosen == 1 else { throw ValidationError("choose exactly one of -c, -l, -a, -d") }
        }

        func run() throws {
            try runReportingErrors {
                if RBDSpec.isRBD(file), try ImageFormats.probe(path: file) == .raw {
                    return try rbdSnapshots(RBDSpec(parsing: file))
                }
                let image = try ImageFormats.openVImage(path: file, readOnly: list)
                defer { try? image.close() }
                if let create { try image.createSnapshot(named: create) }
                if let apply { try image.applySnapshot(named: apply) }
                if let delete { try image.deleteSnapshot(named: delete) }
                try image.close()
                guard list else { return }
                let snapshots = image.snapshotList
                if output.format == .json {
                    print(
                        JSON.array(
                            snapshots.map { s in
                                .object([
                                    ("id", .string(String(s.id))), ("name", .string(s.name)),
                                    ("virtual-size", .uint(s.virtualSize)),
                                    ("date-sec", .uint(s.createdNanoseconds / 1_000_000_000)),
                                    ("date-nsec", .uint(s.createdNanoseconds % 1_000_000_000)),
                                ])
                            }
                        ).render()
                    )
                    return
                }
                guard !snapshots.isEmpty else { return }
                print("Snapshot list:")
                print(pad("ID", 8) + pad("TAG", 24) + pad("SIZE", 12) + "DATE")
                for s in snapshots {
                    print(
                        pad(String(s.id), 8) + pad(s.name, 24) + pad(ByteSize.format(s.virtualSize), 12)
                            + formatDate(s.createdNanoseconds)
                    )
                }
            }
        }

        /// -c/-l/-a/-d on a raw RBD image: its RBD snapshots (the same ones `rbd snap` and qemu see).
        func rbdSnapshots(_ spec: RBDSpec) throws {
            let device = try RBDDevice.open(spec, readOnly: list)
            defer { try? device.close() }
            if let create { try device.createSnapshot(named: create) }
            if let apply { try device.rollback(toSnapshot: apply) }
            if let delete { try device.deleteSnapshot(named: delete) }
            guard list else { return try device.close() }
            let snapshots = try device.snapshots()
            if output.format == .json {
                let rows = snapshots.map { s in
                    JSON.object([
                        ("id", .string(String(s.id))), ("name", .string(s.name)), ("virtual-size", .uint(s.size)),
                    ])
                }
                return print(JSON.array(rows).render())
            }
            guard !snapshots.isEmpty else { return }
            print("Snapshot list:")
            print(pad("ID", 8) + pad("TAG", 24) + "SIZE")
            for s in snapshots { print(pad(String(s.id), 8) + pad(s.name, 24) + ByteSize.format(s.size)) }
        }

        func pad(_ s: String, _ width: Int) -> String {
            s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
        }

        func formatDate(_ nanoseconds: UInt64) -> String {
            var seconds = time_t(nanoseconds / 1_000_000_000)
            var parts = tm()
            localtime_r(&seconds, &parts)
            var buffer = [Int8](repeating: 0, count: 64)
            let n = strftime(&buffer, buffer.count, "%Y-%m-%d %H:%M:%S", &parts)
            return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
    }

    struct Clone: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a linked clone: a new image that reads through to BASE until written.",
            discussion:
                "Same as 'vimg create -b BASE -F FMT CHILD'. A relative BASE path is stored relative to CHILD's folder."
        )

        @Option(name: .customShort("F"), help: "Base format (vimg or raw); probed when omitted.")
        var baseFormat: String?

        @Option(name: .short, help: "Format options, comma separated: cluster_size=SIZE.")
        var options: [String] = []

        @Argument(help: "The base image.")
        var base: String
        @Argument(help: "The clone to create.")
        var child: String

        func run() throws {
            let create = try Create.parse(
                ["-b", base, child] + (baseFormat.map { ["-F", $0] } ?? []) + options.flatMap { ["-o", $0] }
            )
            try create.validate()
            try create.run()
        }
    }
}
