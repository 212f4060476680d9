import ArgumentParser
import BlockIO
import ImageFormats
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Opens a format name given with -f/-F/-B.
func formatNamed(_ name: String?) throws -> ImageFormats.Format? {
    guard let name else { return nil }
    guard let format = ImageFormats.Format(rawValue: name) else {
        throw ValidationError("unknown format '\(name)' (use vimg, raw or qcow2)")
    }
    return format
}

/// Opens a VIMG image read-write over an explicitly opened backing device.
func openVImage(path: String, backing: any BlockDevice) throws -> VImage {
    let host = try ImageFormats.openStorage(path: path, readOnly: false, growable: true, lock: .exclusive)
    do {
        return try VImage.open(host: host, path: path, readOnly: false, backing: backing)
    } catch {
        try? host.close()
        throw error
    }
}

/// A calm one-line progress bar on stderr (only when asked with -p).
final class Progress {
    let total: UInt64
    var done: UInt64 = 0
    var lastPercent = -1

    init(total: UInt64) {
        self.total = max(total, 1)
        draw()
    }

    func advance(by bytes: UInt64) {
        done += bytes
        draw()
    }

    func draw() {
        let percent = Int(min(100, done * 100 / total))
        guard percent != lastPercent else { return }
        lastPercent = percent
        var stderr = StandardError()
        print("    (\(percent).00/100%)\r", terminator: "", to: &stderr)
    }

    func finish() {
        done = total
        draw()
        var stderr = StandardError()
        print("", to: &stderr)
    }
}

extension Vimg {
    struct Commit: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Merge a clone's changes into its backing image.",
            discussion: "Writes every cluster allocated in IMAGE into its backing file, then empties IMAGE (unless -d)."
        )

        @Option(name: .short, help: "The backing image to commit into (must be IMAGE's backing file).")
        var base: String?
        @Flag(name: .short, help: "Do not empty IMAGE after committing.")
        var dontEmpty = false
        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @Flag(name: .short, help: "Quiet.")
        var quiet = false
        @Argument(help: "The clone whose changes to commit.")
        var file: String

        func run() throws {
            try runReportingErrors {
                guard
                    let reference = try ImageFormats.backingReference(of: file, format: ImageFormats.probe(path: file))
                else {
                    throw VImageError(.invalidArgument, path: file, message: "image has no backing file to commit into")
                }
                let backingPath = reference.resolvedPath
                let backingFormat = try formatNamed(reference.format)
                if let base, canonicalPath(base) != canonicalPath(backingPath) {
                    throw VImageError(
                        .invalidArgument,
                        path: file,
                        message:
                            "'\(base)' is not the image's backing file (\(backingPath)); commit one level at a time"
                    )
                }
                let target = try ImageFormats.open(path: backingPath, format: backingFormat, readOnly: false)
                let image: VImage
                do {
                    image = try openVImage(path: file, backing: target)
                } catch {
                    try? target.close()
                    throw error
                }
                defer {
                    try? image.close()
                    try? target.close()
                }
                var bar: Progress? = nil
                try image.commit(into: target) { done, total in
                    guard progress else { return }
                    if bar == nil { bar = Progress(total: total) }
                    bar?.advance(by: done - (bar?.done ?? 0))
                }
                if !dontEmpty { try image.unallocateAll() }
                bar?.finish()
                try image.close()
                try target.close()
                if !quiet { print("Image committed.") }
            }
        }
    }

    struct Rebase: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change a clone's backing file.",
            discussion: """
                Safe mode (default) first copies into IMAGE every cluster whose content would change, so the guest
                sees the same disk. -u only rewrites the name (for a moved or renamed file with the same content).
                -b "" makes IMAGE standalone.
                """.reflowedHelp
        )

        @Option(name: .short, help: "The new backing file (\"\" for none).")
        var base: String
        @Option(name: .customShort("F"), help: "The new backing file's format.")
        var baseFormat: String?
        @Flag(name: .short, help: "Unsafe: change the name only.")
        var unsafe = false
        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @Argument(help: "The clone to rebase.")
        var file: String

        func run() throws {
            try runReportingErrors {
                let newName: String? = base.isEmpty ? nil : base
                let resolved = BackingReference.resolve(base, relativeTo: file)
                if unsafe {
                    let host = try ImageFormats.openStorage(
                        path: file,
                        readOnly: false,
                        growable: true,
                        lock: .exclusive
                    )
                    let image = try VImage.open(host: host, path: file, readOnly: false, backing: MemoryDevice(size: 0))
                    defer {
                        try? image.close()
                        try? host.close()
                    }
                    try image.setBacking(name: newName, format: baseFormat)
                    return
                }
                let image = try ImageFormats.openVImage(path: file, readOnly: false)
                defer { try? image.close() }
                let newBase: (any BlockDevice)? = try newName.map { _ in
                    try ImageFormats.open(path: resolved, format: formatNamed(baseFormat), readOnly: true)
                }
                defer { try? newBase?.close() }
                var bar: Progress? = nil
                try image.rebase(onto: newBase, name: newName, format: baseFormat) { done, total in
                    guard progress else { return }
                    if bar == nil { bar = Progress(total: total) }
                    bar?.advance(by: done - (bar?.done ?? 0))
                }
                bar?.finish()
                try image.close()
            }
        }
    }

    struct Resize: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Change an image's virtual size.",
            discussion:
                "SIZE is absolute (10G) or relative (+1G, -512M). Shrinking needs --shrink and discards data past the new end."
        )

        @Option(name: .short, help: "Image format (vimg or raw); probed when omitted.")
        var format: String?
        @Flag(help: "Allow shrinking (data past the new end is discarded).")
        var shrink = false
        @Flag(name: .short, help: "Quiet.")
        var quiet = false
        @Argument(help: "The image file.")
        var file: String
        @Argument(help: "New size: 10G, +1G or -512M.")
        var size: String

        func run() throws {
            try runReportingErrors {
                let kind = try formatNamed(format) ?? ImageFormats.probe(path: file)
                let device = try ImageFormats.open(path: file, format: kind, readOnly: false)
                defer { try? device.close() }
                let current = device.size
                var target: UInt64
                if size.hasPrefix("+") {
                    let (sum, overflow) = current.addingReportingOverflow(try parseSize(String(size.dropFirst())))
                    guard !overflow else { throw ValidationError("size overflows") }
                    target = sum
                } else if size.hasPrefix("-") {
                    let delta = try parseSize(String(size.dropFirst()))
                    guard delta <= current else { throw ValidationError("cannot shrink below zero") }
                    target = current - delta
                } else {
                    target = try parseSize(size)
                }
                if let image = device as? VImage {
                    let dropped = try image.resize(to: target, allowShrink: shrink)
                    if dropped > 0 && !quiet {
                        print("Discarded \(ByteSize.format(dropped)) of allocated data past the new end.")
                    }
                } else {
                    guard target >= current || shrink else {
                        throw VImageError(
                            .invalidArgument,
                            path: file,
                            message: "shrinking discards data past the new end; use --shrink to confirm"
                        )
                    }
                    try (device as? any TruncatableDevice)?.truncate(to: target)  // a raw file or RBD image
                }
                try device.close()
                if !quiet { print("Image resized.") }
            }
        }
    }

    struct Compare: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Compare the guest content of two images.",
            discussion:
                "Exit codes as qemu-img compare: 0 identical, 1 different, 2 error. Without -s, the larger image's extra part must read as zeroes."
        )

        @Option(name: .customShort("f"), help: "Format of the first image.")
        var firstFormat: String?
        @Option(name: .customShort("F"), help: "Format of the second image.")
        var secondFormat: String?
        @Flag(name: .short, help: "Strict: images of different sizes differ.")
        var strict = false
        @Flag(name: .short, help: "Quiet: exit code only.")
        var quiet = false
        @Flag(name: .short, help: "Show progress.")
        var progress = false
        @Argument var first: String
        @Argument var second: String

        func run() throws {
            var code: Int32 = 0
            do {
                let a = try ImageFormats.open(path: first, format: formatNamed(firstFormat), readOnly: true)
                defer { try? a.close() }
                let b = try ImageFormats.open(path: second, format: formatNamed(secondFormat), readOnly: true)
                defer { try? b.close() }
                code = try compare(a, b)
            } catch let error as ExitCode {
                throw error
            } catch let error as ValidationError {
                printError(error.message)
                throw ExitCode(2)
            } catch {
                printError("\(error)")
                throw ExitCode(2)
            }
            if code != 0 { throw ExitCode(code) }
        }

        func compare(_ a: any BlockDevice, _ b: any BlockDevice) throws -> Int32 {
            if a.size != b.size {
                if strict {
                    if !quiet { print("Strict mode: Image size mismatch!") }
                    return 1
                }
                if !quiet { print("Warning: Image size mismatch!") }
            }
            let common = min(a.size, b.size)
            let bar = progress ? Progress(total: max(a.size, b.size)) : nil
            let chunk = 1 << 20
            var x = [UInt8](repeating: 0, count: chunk)
            var y = [UInt8](repeating: 0, count: chunk)
            var offset: UInt64 = 0
            while offset < common {
                let n = Int(min(UInt64(chunk), common - offset))
                try x.withUnsafeMutableBytes {
                    try a.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset)
                }
                try y.withUnsafeMutableBytes {
                    try b.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset)
                }
                if x[0..<n] != y[0..<n] {
                    let i = (0..<n).first { x[$0] != y[$0] }!
                    if !quiet { print("Content mismatch at offset \(offset + UInt64(i))!") }
                    return 1
                }
                offset += UInt64(n)
                bar?.advance(by: UInt64(n))
            }
            let longer = a.size > b.size ? a : b
            while offset < longer.size {
                let n = Int(min(UInt64(chunk), longer.size - offset))
                try x.withUnsafeMutableBytes {
                    try longer.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: offset)
                }
                if let i = x[0..<n].firstIndex(where: { $0 != 0 }) {
                    if !quiet { print("Content mismatch at offset \(offset + UInt64(i))!") }
                    return 1
                }
                offset += UInt64(n)
                bar?.advance(by: UInt64(n))
            }
            bar?.finish()
            if !quiet { print("Images are identical.") }
            return 0
        }
    }
}
