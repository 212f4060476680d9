import ArgumentParser
import BlockIO
import ImageFormats
import RBD
import VImage

#if canImport(Glibc)
import Glibc
#endif

extension Vimg {
    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a new disk image.",
            discussion: """
                Examples:
                  vimg create disk.vimg 10G
                  vimg create -o cluster_size=4096 small.vimg 512M
                  vimg create -o checksums=on safe.vimg 10G
                  vimg create -f raw disk.raw 1G
                  vimg create -f qcow2 -o compat=0.10 vm.qcow2 20G  (qcow2 as qemu-img makes it)
                  vimg create -b base.vimg -F vimg child.vimg
                  vimg create -f raw rbd:pool/disk 10G           (an RBD image in a Ceph cluster)
                  vimg create rbd:pool/disk 10G                  (a VIMG image stored in an RBD image)
                  vimg create -b rbd:pool/golden@v1 local.vimg   (a local clone of an image in Ceph)
                """.reflowedHelp
        )

        @Option(name: .short, help: "Image format: vimg, qcow2 or raw.")
        var format: String = "vimg"

        @Option(name: .short, help: "Format options, comma separated: cluster_size=SIZE, checksums=on.")
        var options: [String] = []

        @Option(name: .short, help: "Backing file: the new image is a clone over it.")
        var backing: String?

        @Option(name: .customShort("F"), help: "Backing file format (vimg or raw).")
        var backingFormat: String?

        @Flag(name: .short, help: "Quiet: print nothing on success.")
        var quiet = false

        @Argument(help: "The image file to create, or rbd:POOL/IMAGE[:conf=PATH][:id=NAME] for one in Ceph.")
        var file: String

        @Argument(help: "Virtual size (512M, 10G, 1T...); defaults to the backing file's size.")
        var size: String?

        func validate() throws {
            guard ["vimg", "qcow2", "raw"].contains(format) else {
                throw ValidationError("unknown format '\(format)' (use vimg, qcow2 or raw)")
            }
            if format == "raw" && backing != nil { throw ValidationError("raw images cannot have a backing file") }
            if size == nil && backing == nil { throw ValidationError("missing SIZE (required without -b)") }
        }

        func run() throws {
            try runReportingErrors {
                let formatOptions = try FormatOptions(options, format: ImageFormats.format(named: format))
                guard format != "qcow2" || !RBDSpec.isRBD(file) else {
                    throw ValidationError("qcow2 images are created as files (rbd: names hold raw or VIMG)")
                }
                let clusterBits = formatOptions.clusterBits ?? 16
                var virtualSize: UInt64
                if let size {
                    virtualSize = try parseSize(size)
                } else {
                    let base = try ImageFormats.open(
                        path: resolveBacking(),
                        format: backingFormat.flatMap(ImageFormats.Format.init),
                        readOnly: true
                    )
                    virtualSize = base.size
                    try base.close()
                }
                if RBDSpec.isRBD(file) {
                    try createRBD(RBDSpec(parsing: file), virtualSize: virtualSize, clusterBits: clusterBits)
                    if format == "vimg" { virtualSize = (virtualSize + 511) & ~511 }
                } else if format == "raw" {
                    let file = try FileDevice.open(
                        path: file,
                        readOnly: false,
                        create: true,
                        growable: true,
                        lock: .exclusive
                    )
                    try file.truncate(to: virtualSize)
                    try file.close()
                } else {
                    if let backing {
                        // Fail early and clearly if the backing file cannot be opened.
                        let base = try ImageFormats.open(
                            path: resolveBacking(),
                            format: backingFormat.flatMap(ImageFormats.Format.init),
                            readOnly: true
                        )
                        try base.close()
                        _ = backing
                    }
                    try VImage.create(
                        path: file,
                        virtualSize: virtualSize,
                        options: {
                            var o = VImage.CreateOptions(
                                clusterBits: clusterBits,
                                backingFile: backing,
                                backingFormat: backingFormat,
                                checksums: formatOptions.checksums
                            )
                            if format == "qcow2" {
                                o.format = .qcow2(
                                    version: formatOptions.qcow2Version ?? 3,
                                    refcountBits: formatOptions.refcountBits ?? 16
                                )
                            }
                            return o
                        }()
                    )
                    virtualSize = (virtualSize + 511) & ~511
                }
                if !quiet {
                    var line = "Formatting '\(file)', fmt=\(format)"
                    if format != "raw" { line += " cluster_size=\(1 << clusterBits)" }
                    if formatOptions.checksums { line += " checksums=on" }
                    if let backing { line += " backing_file=\(backing)" }
                    if let backingFormat { line += " backing_fmt=\(backingFormat)" }
                    print(line + " size=\(virtualSize)")
                }
            }
        }

        /// A new RBD image: raw (the disk itself, thin) or holding a VIMG image, which then grows inside it.
        func createRBD(_ spec: RBDSpec, virtualSize: UInt64, clusterBits: Int) throws {
            guard format == "vimg" else { return try RBDDevice.create(spec, size: virtualSize) }
            if backing != nil {
                // Fail early and clearly if the backing image cannot be opened.
                try ImageFormats.open(
                    path: resolveBacking(),
                    format: backingFormat.flatMap(ImageFormats.Format.init),
                    readOnly: true
                ).close()
            }
            try RBDDevice.create(spec, size: 0)
            do {
                let device = try RBDDevice.open(spec, readOnly: false)
                device.allowGrowth()
                do {
                    try VImage.create(
                        on: device,
                        virtualSize: virtualSize,
                        options: .init(clusterBits: clusterBits, backingFile: backing, backingFormat: backingFormat)
                    )
                    try device.close()
                } catch {
                    try? device.close()
                    throw error
                }
            } catch {
                try? RBDDevice.remove(spec)
                throw error
            }
        }

        /// A relative backing name is relative to the new image's folder.
        func resolveBacking() -> String { BackingReference.resolve(backing ?? "", relativeTo: file) }
    }
}
