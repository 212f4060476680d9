import ArgumentParser
import BlockIO
import ImageFormats
import VImage

/// `-o` format options of create and convert.
struct FormatOptions {
    var clusterBits: Int? = nil
    /// End-to-end checksums (VIMG only).
    var checksums = false
    /// qcow2 only (`vimg create -f qcow2`): 2 for compat=0.10, 3 for compat=1.1.
    var qcow2Version: Int? = nil
    /// qcow2 only: refcount_bits (1 to 64, a power of two).
    var refcountBits: Int? = nil

    static let supported = "cluster_size=SIZE, checksums=on|off; qcow2: compat=0.10|1.1, refcount_bits=N"

    /// Parses `-o` items (comma separated; others are refused by name).
    init(_ options: [String], format: ImageFormats.Format) throws {
        for item in options.flatMap({ $0.split(separator: ",") }) {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            switch (parts.first, parts.count) {
            case ("cluster_size", 2):
                let value = try parseSize(parts[1], what: "cluster size")
                let minimum: UInt64 = format == .qcow2 ? 512 : 4096
                guard value.nonzeroBitCount == 1, value >= minimum, value <= 2 << 20 else {
                    throw ValidationError(
                        "cluster_size must be a power of two from \(minimum == 512 ? "512" : "4K") to 2M for \(format.rawValue)"
                    )
                }
                clusterBits = value.trailingZeroBitCount
            case ("checksums", 2):
                guard ["on", "off"].contains(parts[1]) else { throw ValidationError("checksums must be on or off") }
                guard format == .vimg || parts[1] == "off" else {
                    throw ValidationError("checksums are a VIMG feature (not available for \(format.rawValue))")
                }
                checksums = parts[1] == "on"
            case ("compat", 2) where format == .qcow2:
                guard let version = ["0.10": 2, "v2": 2, "1.1": 3, "v3": 3][parts[1]] else {
                    throw ValidationError("compat must be 0.10 or 1.1")
                }
                qcow2Version = version
            case ("refcount_bits", 2) where format == .qcow2:
                guard let bits = Int(parts[1]), bits > 0, bits <= 64, bits.nonzeroBitCount == 1 else {
                    throw ValidationError("refcount_bits must be a power of two from 1 to 64")
                }
                refcountBits = bits
            default:
                throw ValidationError("unknown option '\(item)' (supported: \(Self.supported))")
            }
        }
    }
}

/// The progress bar, shared with the converter's worker threads (which call it serialized).
final class SharedProgress: @unchecked Sendable {
    var bar: Progress? = nil
    func update(_ done: UInt64, _ total: UInt64) {
        if bar == nil { bar = Progress(total: total) }
        bar?.advance(by: done - (bar?.done ?? 0))
    }
}

extension Vimg {
    struct Convert: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Convert an image to another format (raw, vimg, qcow2).",
            discussion: """
                Reads only the source's allocated ranges and keeps the output sparse. The output is written under
                a temporary name next to DST and renamed when complete.
                Examples:
                  vimg convert -O vimg -c disk.raw disk.vimg   # LZ4, on all cores
                  vimg convert -f qcow2 -O raw -l snap1 vm.qcow2 snap1.raw
                  vimg convert -O vimg -B base.vimg new.raw clone.vimg
                """.reflowedHelp
        )

        @Option(name: .customShort("f"), help: "Source format (raw, vimg, qcow2); probed when omitted.")
        var sourceFormat: String?
        @Option(name: .customShort("O"), help: "Output format: raw (default), vimg or qcow2.")
        var outputFormat: String = "raw"
        @Flag(name: .customShort("c"), help: "Compress the output (VIMG: LZ4 clusters).")
        var compress = false
        @Flag(name: .customShort("p"), help: "Show progress.")
        var progress = false
        @Option(name: .customShort("S"), help: "Minimum run of zero bytes to leave sparse (default 4K; 0 disables).")
        var sparseSize: String = "4096"
        @Option(name: .customShort("o"), help: "Output format options: cluster_size=SIZE, checksums=on (VIMG).")
        var options: [String] = []
        @Option(name: .customShort("l"), help: "Convert this internal snapshot (name or id) of the source.")
        var snapshot: String?
        @Option(
            name: .customShort("B"),
            help: "Make the output a clone over this backing file, holding only what differs."
        )
        var backing: String?
        @Option(name: .customShort("F"), help: "Backing file format.")
        var backingFormat: String?
        @Option(
            name: .customShort("t"),
            help:
                "Output cache mode: unsafe (default, as qemu-img convert: no syncs), writeback (the VIMG output is synced as it is written) or none (writeback with direct I/O, O_DIRECT)."
        )
        var cache = "unsafe"
        @Option(
            name: .customShort("T"),
            help: "Source cache mode: writeback (default) or none (direct I/O, O_DIRECT)."
        )
        var sourceCache: FileDevice.CacheMode = .writeback
        @Flag(name: .short, help: "Quiet.")
        var quiet = false
        @Flag(help: "Also copy the source's persistent dirty bitmaps (VIMG to VIMG).")
        var bitmaps = false
        @Flag(help: "With --bitmaps: leave out inconsistent bitmaps instead of failing.")
        var skipBrokenBitmaps = false
        @Argument(help: "The source image.")
        var source: String
        @Argument(help: "The image to write.")
        var destination: String

        func validate() throws {
            guard ["raw", "vimg", "qcow2"].contains(outputFormat) else {
                throw ValidationError("unknown output format '\(outputFormat)' (use raw, vimg or qcow2)")
            }
            if compress && outputFormat != "vimg" {
                throw ValidationError("-c (compression) is supported for -O vimg only")
            }
            if backing != nil && outputFormat == "raw" {
                throw ValidationError("raw images cannot have a backing file (-B)")
            }
            if backingFormat != nil && backing == nil { throw ValidationError("-F goes with -B") }
            if bitmaps && outputFormat != "vimg" { throw ValidationError("--bitmaps needs -O vimg") }
            if skipBrokenBitmaps && !bitmaps { throw ValidationError("--skip-broken-bitmaps goes with --bitmaps") }
            guard ["unsafe", "writeback", "none"].contains(cache) else {
                throw ValidationError("unknown cache mode '\(cache)' (use unsafe, writeback or none)")
            }
        }

        func run() throws {
            try runReportingErrors {
                var opts = ConvertOptions()
                opts.sourceFormat = try formatNamed(sourceFormat)
                opts.outputFormat = try formatNamed(outputFormat)!
                opts.compress = compress
                opts.sparseSize = try parseSize(sparseSize, what: "sparse size")
                let formatOptions = try FormatOptions(options, format: opts.outputFormat)
                guard formatOptions.qcow2Version == nil && formatOptions.refcountBits == nil else {
                    throw ValidationError(
                        "convert writes qcow2 version 3 with 16-bit refcounts (compat and refcount_bits are for create)"
                    )
                }
                opts.clusterBits = formatOptions.clusterBits
                opts.checksums = formatOptions.checksums
                opts.snapshot = snapshot
                opts.backingFile = backing
                opts.backingFormat = try formatNamed(backingFormat)
                opts.syncOutput = cache != "unsafe"
                opts.outputCache = cache == "none" ? .direct : .writeback
                opts.sourceCache = sourceCache
                let shared = progress ? SharedProgress() : nil
                var callback: (@Sendable (UInt64, UInt64) -> Void)? = nil
                if let shared {
                    callback = { done, total in shared.update(done, total) }
                }
                // Bitmaps are checked before the conversion, so a broken one fails early.
                let sourceImage = bitmaps ? try ImageFormats.openVImage(path: source, readOnly: true) : nil
                defer { try? sourceImage?.close() }
                let copied =
                    try sourceImage.map { image in
                        try image.bitmapList.filter { info in
                            guard info.consistent else {
                                if skipBrokenBitmaps { return false }
                                throw VImageError(
                                    .invalidArgument,
                                    path: source,
                                    message:
                                        "bitmap '\(info.name)' is inconsistent; remove it, or pass --skip-broken-bitmaps"
                                )
                            }
                            return true
                        }.map { (info: $0, contents: try image.bitmapContents(named: $0.name)) }
                    } ?? []
                try ImageConverter.convert(source: source, destination: destination, options: opts, progress: callback)
                shared?.bar?.finish()
                if !copied.isEmpty {
                    let output = try ImageFormats.openVImage(path: destination, readOnly: false)
                    defer { try? output.close() }
                    for (info, contents) in copied {
                        try output.addBitmap(named: info.name, granularity: info.granularity, enabled: info.enabled)
                        try output.mergeBitmap(named: info.name, from: contents)
                    }
                    try output.close()
                }
            }
        }
    }
}
