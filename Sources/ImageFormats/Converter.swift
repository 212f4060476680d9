// Design notes
// ------------
// `ImageConverter` copies the guest content of any readable image into a new raw, VIMG or qcow2 file:
//
//   1. plan:   walk the source's extents (and the backing file's, for a clone with -B) and list the
//              units of work: output clusters (VIMG, qcow2) or 1 MiB pieces (raw) that hold data.
//              Holes and zero ranges are never read.
//   2. copy:   worker threads (one per core) claim batches of units, read them from the source, drop
//              all-zero ones (and, for a clone, ones equal to the backing file), and write the rest:
//              raw at the same offset (skipping zero runs of at least `sparseSize` bytes), VIMG through
//              `write` or `writeCompressed` (LZ4, one cluster per call, compressed in parallel), qcow2
//              through `Qcow2Writer`.
//   3. finish: the output is written under a temporary name in the destination's folder and renamed
//              over the destination only when complete; on any failure the temporary file is removed.
//              An `rbd:` destination (raw or VIMG) is a new RBD image, created under its own name (an
//              existing one is refused) and removed again on any failure.
//
// The output is sparse: a unit that reads as zeroes is never allocated (raw files are ftruncated to size
// first, so skipped ranges are holes).

import BlockIO
import Dispatch
import RBD
import Synchronization
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// What `ImageConverter.convert` produces.
public struct ConvertOptions: Sendable {
    public var sourceFormat: ImageFormats.Format? = nil
    public var outputFormat: ImageFormats.Format = .raw
    /// Store clusters compressed (VIMG output: LZ4).
    public var compress = false
    /// Zero runs of at least this many bytes are left unallocated; 0 writes every byte (raw) or every
    /// allocated source cluster (VIMG, qcow2).
    public var sparseSize: UInt64 = 4096
    /// log2 of the output cluster size (default 16).
    public var clusterBits: Int? = nil
    /// End-to-end checksums in a VIMG output.
    public var checksums = false
    /// Read this internal snapshot of the source.
    public var snapshot: String? = nil
    /// Make the output a clone over this backing file (VIMG, qcow2), holding only clusters that differ.
    public var backingFile: String? = nil
    public var backingFormat: ImageFormats.Format? = nil
    /// Worker threads; nil = one per online CPU.
    public var threads: Int? = nil
    /// Sync a VIMG output as the engine normally does (`-t writeback`); off by default, like qemu-img
    /// convert, which never syncs its output's data.
    public var syncOutput = false
    /// `.direct` writes the output with direct I/O (`-t none`; its file is synced when closed).
    public var outputCache: FileDevice.CacheMode = .writeback
    /// `.direct` reads the source (and the `-B` backing file) with direct I/O (`-T none`).
    public var sourceCache: FileDevice.CacheMode = .writeback

    public init() {}
}

public enum ImageConverter {
    /// Converts `source` into a new image at `destination` (replacing it if it exists).
    /// - Parameters:
    ///   - progress: called (serialized) with bytes done and the total as work completes.
    /// - Throws: `ImageFormatError`, `VImageError` or `BlockIOError`; the destination is then untouched.
    public static func convert(
        source: String,
        destination: String,
        options: ConvertOptions,
        progress: (@Sendable (UInt64, UInt64) -> Void)? = nil
    ) throws {
        if options.compress && options.outputFormat != .vimg {
            throw ImageFormatError(.invalidArgument, message: "compression (-c) is supported for VIMG output only")
        }
        if options.backingFile != nil && options.outputFormat == .raw {
            throw ImageFormatError(.invalidArgument, message: "raw images cannot have a backing file (-B)")
        }
        let input = try ImageFormats.open(
            path: source,
            format: options.sourceFormat,
            readOnly: true,
            snapshot: options.snapshot,
            cache: options.sourceCache
        )
        defer { try? input.close() }
        var backing: (any BlockDevice)? = nil
        if let name = options.backingFile {
            backing = try ImageFormats.open(
                path: BackingReference.resolve(name, relativeTo: destination),
                format: options.backingFormat,
                readOnly: true,
                cache: options.sourceCache
            )
        }
        defer { try? backing?.close() }

        if RBDSpec.isRBD(destination) {
            try convert(
                input,
                backing: backing,
                toRBD: RBDSpec(parsing: destination),
                options: options,
                progress: progress
            )
            return
        }
        let temporary = temporaryName(for: destination)
        unlink(temporary)
        do {
            let sink = try makeSink(path: temporary, size: input.size, options: options, backing: backing)
            try fill(sink, from: input, backing: backing, options: options, progress: progress)
            guard rename(temporary, destination) == 0 else {
                throw ImageFormatError(
                    .io,
                    path: destination,
                    message: "cannot rename the finished image into place: \(describeErrno(errno))"
                )
            }
        } catch {
            unlink(temporary)
            throw error
        }
    }

    /// Converts into a new RBD image (raw: the guest's bytes; VIMG: an image file inside the RBD image).
    private static func convert(
        _ input: any BlockDevice,
        backing: (any BlockDevice)?,
        toRBD spec: RBDSpec,
        options: ConvertOptions,
        progress: (@Sendable (UInt64, UInt64) -> Void)?
    ) throws {
        guard options.outputFormat != .qcow2 else {
            throw ImageFormatError(
                .invalidArgument,
                path: spec.description,
                message: "qcow2 output into RBD is not supported"
            )
        }
        // A new RBD image reads as zeroes, so raw output only writes data; VIMG output grows from nothing.
        try RBDDevice.create(spec, size: options.outputFormat == .raw ? input.size : 0)
        do {
            let device = try RBDDevice.open(spec, readOnly: false)
            let sink: any ConvertSink
            do {
                if options.outputFormat == .raw {
                    sink = RawSink(
                        device: device,
                        path: spec.description,
                        sparseSize: Int(min(options.sparseSize, 1 << 20))
                    )
                } else {
                    device.allowGrowth()
                    sink = try VImageSink(
                        host: device,
                        path: spec.description,
                        size: input.size,
                        options: options,
                        backing: backing
                    )
                }
            } catch {
                try? device.close()
                throw error
            }
            try fill(sink, from: input, backing: backing, options: options, progress: progress)
        } catch {
            try? RBDDevice.remove(spec)
            throw error
        }
    }

    /// Copies `input` into `sink` and finishes it; on failure the sink is abandoned.
    private static func fill(
        _ sink: any ConvertSink,
        from input: any BlockDevice,
        backing: (any BlockDevice)?,
        options: ConvertOptions,
        progress: (@Sendable (UInt64, UInt64) -> Void)?
    ) throws {
        do {
            try copy(from: input, backing: backing, to: sink, options: options, progress: progress)
            try sink.finish()
        } catch {
            sink.abandon()
            throw error
        }
    }

    static func temporaryName(for destination: String) -> String {
        let slash = destination.lastIndex(of: "/")
        let folder = slash.map { String(destination[...$0]) } ?? ""
        let base = slash.map { String(destination[destination.index(after: $0)...]) } ?? destination
        return "\(folder).\(base).convert-\(getpid())"
    }

    // MARK: Planning

    /// Half-open ranges of unit indexes, in order, each at most `batch` long.
    static func plan(
        _ device: any BlockDevice,
        unit: UInt64,
        batch: UInt64,
        wholeDisk: Bool,
        into ranges: inout [Range<UInt64>],
        limit: UInt64
    ) throws {
        let size = min(device.size, limit)
        if wholeDisk {
            add(&ranges, 0..<(size + unit - 1) / unit, batch: batch)
            return
        }
        var position: UInt64 = 0
        while position < size {
            let extents = try device.extents(at: position, count: size - position)
            guard let last = extents.last, last.end > position else { break }
            for e in extents where !e.flags.contains(.zero) {
                add(&ranges, e.offset / unit..<(min(e.end, size) + unit - 1) / unit, batch: batch)
            }
            position = last.end
        }
    }

    private static func add(_ ranges: inout [Range<UInt64>], _ range: Range<UInt64>, batch: UInt64) {
        var start = range.lowerBound
        if let last = ranges.last, last.upperBound > start {
            start = last.upperBound  // extents are in order; a unit shared by two extents is listed once
        }
        while start < range.upperBound {
            let end = min(range.upperBound, (start / batch + 1) * batch)
            if let last = ranges.last, last.upperBound == start, last.count < batch,
                (last.lowerBound / batch) == (start / batch)
            {
                ranges[ranges.count - 1] = last.lowerBound..<end
            } else {
                ranges.append(start..<end)
            }
            start = end
        }
    }

    /// The union of two sorted lists of ranges, split again into batches.
    static func union(_ a: [Range<UInt64>], _ b: [Range<UInt64>], batch: UInt64) -> [Range<UInt64>] {
        let all = (a + b).sorted { $0.lowerBound < $1.lowerBound }
        var result: [Range<UInt64>] = []
        for r in all { add(&result, r, batch: batch) }
        return result
    }

    // MARK: Copying

    private static func copy(
        from input: any BlockDevice,
        backing: (any BlockDevice)?,
        to sink: any ConvertSink,
        options: ConvertOptions,
        progress: (@Sendable (UInt64, UInt64) -> Void)?
    ) throws {
        let unit = UInt64(sink.unitSize)
        let size = input.size
        let batch: UInt64 = max(1, (1 << 20) / unit)
        let rawFull = options.outputFormat == .raw && options.sparseSize == 0
        var ranges: [Range<UInt64>] = []
        try plan(input, unit: unit, batch: batch, wholeDisk: rawFull, into: &ranges, limit: size)
        if let backing {
            var backingRanges: [Range<UInt64>] = []
            try plan(backing, unit: unit, batch: batch, wholeDisk: false, into: &backingRanges, limit: size)
            ranges = union(ranges, backingRanges, batch: batch)
        }
        let total = ranges.reduce(UInt64(0)) { $0 + UInt64($1.count) * unit }
        let cpus = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        let workers = max(1, min(options.threads ?? max(cpus, 1), 64, ranges.count))
        let cursor = Atomic<Int>(0)
        let failure = Mutex<(any Error)?>(nil)
        let done = Mutex<UInt64>(0)
        let checkZeroes = options.sparseSize > 0
        progress?(0, total)
        let rangeList = ranges
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(unit), alignment: 4096)
            defer { buffer.deallocate() }
            let other =
                backing == nil ? nil : UnsafeMutableRawBufferPointer.allocate(byteCount: Int(unit), alignment: 4096)
            defer { other?.deallocate() }
            while failure.withLock({ $0 == nil }) {
                let claimed = cursor.wrappingAdd(1, ordering: .relaxed).oldValue
                guard claimed < rangeList.count else { return }
                do {
                    for index in rangeList[claimed] {
                        let offset = index * unit
                        let length = Int(min(unit, size - offset))
                        let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                        try input.read(into: data, at: offset)
                        if length < Int(unit) {
                            UnsafeMutableRawBufferPointer(rebasing: buffer[length...]).initializeMemory(
                                as: UInt8.self,
                                repeating: 0
                            )
                        }
                        if let backing, let other {
                            let inside = offset < backing.size ? Int(min(UInt64(length), backing.size - offset)) : 0
                            if inside > 0 {
                                try backing.read(
                                    into: UnsafeMutableRawBufferPointer(rebasing: other[0..<inside]),
                                    at: offset
                                )
                            }
                            UnsafeMutableRawBufferPointer(rebasing: other[inside...]).initializeMemory(
                                as: UInt8.self,
                                repeating: 0
                            )
                            if memcmp(buffer.baseAddress!, other.baseAddress!, Int(unit)) == 0 { continue }
                            if isAllZero(UnsafeRawBufferPointer(buffer)) {
                                try sink.writeZeroes(unit: index, length: length)
                                continue
                            }
                        } else if checkZeroes && isAllZero(UnsafeRawBufferPointer(buffer)) {
                            continue
                        }
                        try sink.write(unit: index, data: UnsafeRawBufferPointer(buffer), length: length)
                    }
                    let bytes = UInt64(rangeList[claimed].count) * unit
                    if let progress {
                        done.withLock {
                            $0 += bytes
                            progress($0, total)
                        }
                    }
                } catch {
                    failure.withLock { if $0 == nil { $0 = error } }
                    return
                }
            }
        }
        if let error = failure.withLock({ $0 }) { throw error }
    }

    // MARK: Outputs

    private static func makeSink(
        path: String,
        size: UInt64,
        options: ConvertOptions,
        backing: (any BlockDevice)?
    ) throws -> any ConvertSink {
        switch options.outputFormat {
        case .raw:
            return try RawSink(
                path: path,
                size: size,
                sparseSize: Int(min(options.sparseSize, 1 << 20)),
                cache: options.outputCache
            )
        case .vimg:
            return try VImageSink(path: path, size: size, options: options, backing: backing)
        case .qcow2:
            return try Qcow2Sink(path: path, size: size, options: options)
        }
    }
}

/// Where converted units go. Calls come from several threads, for different units.
protocol ConvertSink: Sendable {
    /// Bytes per unit of work (the output cluster size, or 1 MiB for raw files).
    var unitSize: Int { get }
    /// Writes unit `index`: `data` is a whole unit (zero-padded), of which `length` bytes are inside the disk.
    func write(unit index: UInt64, data: UnsafeRawBufferPointer, length: Int) throws
    /// Makes unit `index` read as zeroes even where the backing file has data.
    func writeZeroes(unit index: UInt64, length: Int) throws
    func finish() throws
    /// Releases the output after a failure (the caller removes the file).
    func abandon()
}

/// A sparse raw output: only non-zero runs written, on a new device that reads as zeroes. A file is created
/// and sized first, then opened at that fixed size (direct I/O never writes past it), and closed without a
/// sync (like qemu-img convert, this leaves writeback to the kernel), except with direct I/O (`-t none`),
/// whose file is synced at close as qemu's cache=none does. Or an RBD image, written the same way.
final class RawSink: ConvertSink, @unchecked Sendable {
    let path: String
    let device: any BlockDevice
    let sparseSize: Int
    var unitSize: Int { 1 << 20 }

    init(device: any BlockDevice, path: String, sparseSize: Int) {
        self.path = path
        self.device = device
        self.sparseSize = sparseSize
    }

    init(path: String, size: UInt64, sparseSize: Int, cache: FileDevice.CacheMode) throws {
        try withPath(path) {
            let created = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
            defer { try? created.close(flushing: false) }
            try created.truncate(to: size)
        }
        self.path = path
        device = try withPath(path) { try FileDevice.open(path: path, readOnly: false, cache: cache) }
        self.sparseSize = sparseSize
    }

    private func put(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try withPath(path) { try device.write(data, at: offset, fua: false) }
    }

    func write(unit index: UInt64, data: UnsafeRawBufferPointer, length: Int) throws {
        let base = index * UInt64(unitSize)
        guard sparseSize > 0 else {
            try put(UnsafeRawBufferPointer(rebasing: data[0..<length]), at: base)
            return
        }
        // Write the non-zero runs; zero blocks of `sparseSize` bytes (aligned) stay holes.
        var start: Int? = nil
        var position = 0
        while position < length {
            let end = min(length, (position / sparseSize + 1) * sparseSize)
            let zero = isAllZero(UnsafeRawBufferPointer(rebasing: data[position..<end]))
            if zero, let s = start {
                try put(UnsafeRawBufferPointer(rebasing: data[s..<position]), at: base + UInt64(s))
                start = nil
            } else if !zero && start == nil {
                start = position
            }
            position = end
        }
        if let s = start {
            try put(UnsafeRawBufferPointer(rebasing: data[s..<length]), at: base + UInt64(s))
        }
    }

    func writeZeroes(unit index: UInt64, length: Int) throws {}

    func finish() throws {
        guard let file = device as? FileDevice else { return try device.close() }
        try withPath(path) { try file.close(flushing: file.cacheMode == .direct) }
    }

    func abandon() {
        if let file = device as? FileDevice { try? file.close(flushing: false) } else { try? device.close() }
    }
}

/// A new VIMG image, optionally LZ4-compressed, optionally a clone over the backing file.
final class VImageSink: ConvertSink, @unchecked Sendable {
    let image: VImage
    let compress: Bool
    let unitSize: Int
    let size: UInt64

    convenience init(path: String, size: UInt64, options: ConvertOptions, backing: (any BlockDevice)?) throws {
        let file = try withPath(path) {
            try FileDevice.open(
                path: path,
                readOnly: false,
                create: true,
                growable: true,
                lock: .exclusive,
                cache: options.outputCache
            )
        }
        try self.init(host: file, path: path, size: size, options: options, backing: backing)
    }

    /// A new image on `host` (empty, growable), which the sink then owns.
    init(
        host file: any BlockDevice,
        path: String,
        size: UInt64,
        options: ConvertOptions,
        backing: (any BlockDevice)?
    )
        throws
    {
        let bits = options.clusterBits ?? 16
        do {
            try VImage.create(
                on: file,
                virtualSize: size,
                options: .init(
                    clusterBits: bits,
                    backingFile: options.backingFile,
                    backingFormat: options.backingFormat?.rawValue,
                    checksums: options.checksums
                )
            )
        } catch {
            try? file.close()
            throw error
        }
        // The output is unusable until complete (renamed into place, or removed on failure), so by default
        // (as qemu-img convert's cache=unsafe) its metadata steps are not synced one by one; `syncOutput`
        // makes them durable.
        let host: any BlockDevice = options.syncOutput ? file : UnsyncedDevice(file)
        do {
            // The backing device is opened by the converter (it may be qcow2, which VImage cannot open).
            image = try VImage.open(host: host, path: path, readOnly: false, backing: backing)
        } catch {
            try? host.close()
            throw error
        }
        hostFile = host
        filePath = path
        compress = options.compress
        unitSize = 1 << bits
        self.size = image.size
    }
    let hostFile: any BlockDevice
    let filePath: String

    func write(unit index: UInt64, data: UnsafeRawBufferPointer, length: Int) throws {
        let offset = index * UInt64(unitSize)
        if compress && offset + UInt64(unitSize) <= size {
            try image.writeCompressed(cluster: index, data: data)
        } else {
            try image.write(
                UnsafeRawBufferPointer(rebasing: data[0..<Int(min(UInt64(unitSize), size - offset))]),
                at: offset,
                fua: false
            )
        }
    }

    func writeZeroes(unit index: UInt64, length: Int) throws {
        let offset = index * UInt64(unitSize)
        try image.writeZeroes(at: offset, count: min(UInt64(unitSize), size - offset), mayUnmap: true, fast: false)
    }

    func finish() throws {
        try image.close()
        try withPath(filePath) { try hostFile.close() }
    }

    func abandon() {
        try? image.close()
        try? hostFile.close()
    }
}

/// A new qcow2 version 3 image.
final class Qcow2Sink: ConvertSink, @unchecked Sendable {
    let writer: Qcow2Writer
    let file: FileDevice

    var unitSize: Int { writer.clusterSize }

    init(path: String, size: UInt64, options: ConvertOptions) throws {
        file = try withPath(path) {
            try FileDevice.open(
                path: path,
                readOnly: false,
                create: true,
                growable: true,
                lock: .exclusive,
                cache: options.outputCache
            )
        }
        do {
            writer = try Qcow2Writer(
                file: file,
                path: path,
                virtualSize: size,
                clusterBits: options.clusterBits ?? 16,
                backingFile: options.backingFile,
                backingFormat: options.backingFormat?.rawValue
            )
        } catch {
            try? file.close()
            throw error
        }
    }

    func write(unit index: UInt64, data: UnsafeRawBufferPointer, length: Int) throws {
        try writer.writeCluster(index, data: data)
    }

    func writeZeroes(unit index: UInt64, length: Int) throws {
        try writer.writeZeroCluster(index)
    }

    func finish() throws {
        try writer.finish()
        try withPath(file.path) { try file.close() }
    }

    func abandon() { try? file.close() }
}
