// Design notes
// ------------
// The one place that turns a path and an optional format name into a `BlockDevice`, for every format
// vdisk reads: raw and VIMG through `DiskImage`, qcow2 through `Qcow2Image` (read-only).
//
// A qcow2 backing chain is opened without recursion, so a crafted chain cannot deepen the stack: walk
// the headers top-down (resolving each name against its image's folder, probing formats, refusing loops
// and chains deeper than 32), then open the levels bottom-up, each over the one below. A VIMG or raw
// level ends the walk: VIMG opens its own chain.

import BlockIO
import VImage

#if canImport(Glibc)
import Glibc
#endif

public enum ImageFormats {
    public typealias Format = DiskImage.Format

    /// The deepest backing chain an image may have.
    public static let maxBackingDepth = 32

    /// Opens the image at `path`.
    /// - Parameters:
    ///   - format: the format, or nil to probe it (a file that is not VIMG or qcow2 is raw).
    ///   - readOnly: qcow2 images must be opened read-only.
    ///   - snapshot: read an internal snapshot (by name or id) instead of the active state (read-only).
    /// - Returns: a device whose `size` is the guest (virtual) size.
    /// - Throws: `ImageFormatError`, `VImageError` or `BlockIOError` with a clear message.
    public static func open(
        path: String,
        format: Format? = nil,
        readOnly: Bool,
        snapshot: String? = nil
    ) throws -> any BlockDevice {
        let format = try format ?? probe(path: path)
        switch format {
        case .raw:
            return try DiskImage.open(path: path, format: format, readOnly: readOnly, snapshot: snapshot)
        case .vimg:
            if snapshot == nil, let backing = try qcow2Backing(ofVImage: path) {
                // VImage opens VIMG and raw backing files itself; a qcow2 one is opened here and handed in.
                let device = try openQcow2(path: backing)
                let host: FileDevice
                do {
                    host = try withPath(path) {
                        try FileDevice.open(
                            path: path,
                            readOnly: readOnly,
                            growable: true,
                            lock: readOnly ? .shared : .exclusive
                        )
                    }
                } catch {
                    try? device.close()
                    throw error
                }
                do {
                    return try VImage.open(host: host, path: path, readOnly: readOnly, backing: device)
                } catch {
                    try? host.close()
                    try? device.close()
                    throw error
                }
            }
            return try DiskImage.open(path: path, format: format, readOnly: readOnly, snapshot: snapshot)
        case .qcow2:
            guard readOnly else {
                throw ImageFormatError(
                    .readOnly,
                    path: path,
                    message: "qcow2 images can only be opened read-only (convert them to VIMG to write)"
                )
            }
            return try openQcow2(path: path, snapshot: snapshot)
        }
    }

    /// The resolved path of a VIMG image's backing file when that file is qcow2.
    static func qcow2Backing(ofVImage path: String) throws -> String? {
        let header = try withPath(path) { () -> ImageHeader? in
            let file = try FileDevice.open(path: path, readOnly: true)
            defer { try? file.close() }
            let bytes = try file.read(count: Int(min(file.size, 2 << 20)), at: 0)
            return try? ImageHeader.decode(bytes)
        }
        guard let header, let name = header.backingFileName else { return nil }
        let resolved = ImageConverter.resolve(name, relativeTo: path)
        if let format = header.backingFileFormat { return format == "qcow2" ? resolved : nil }
        guard access(resolved, F_OK) == 0 else { return nil }
        return try probe(path: resolved) == .qcow2 ? resolved : nil
    }

    /// Guesses a file's format from its magic bytes.
    public static func probe(path: String) throws -> Format {
        try withPath(path) { try DiskImage.probe(path: path) }
    }

    /// Parses a format name (`raw`, `vimg`, `qcow2`).
    public static func format(named name: String) throws -> Format {
        guard let format = Format(rawValue: name) else {
            throw ImageFormatError(.invalidArgument, message: "unknown format '\(name)' (use raw, vimg or qcow2)")
        }
        return format
    }

    /// Opens a qcow2 image and its backing chain.
    public static func openQcow2(path: String, snapshot: String? = nil) throws -> Qcow2Image {
        // Walk down: every level's path, format, and (for qcow2) its already-validated header.
        var levels: [(path: String, format: Format)] = [(path, .qcow2)]
        var seen: Set<String> = [realPath(path) ?? path]
        var current = path
        while true {
            let header = try withPath(current) { () -> Qcow2Header in
                let file = try FileDevice.open(path: current, readOnly: true)
                defer { try? file.close() }
                return try Qcow2Header.read(from: file, path: current)
            }
            guard let name = header.backingFile else { break }
            var resolved = name
            if !name.hasPrefix("/"), let slash = current.lastIndex(of: "/") {
                resolved = String(current[...slash]) + name
            }
            guard access(resolved, F_OK) == 0 else {
                throw ImageFormatError(
                    .notFound,
                    path: current,
                    message: "backing file '\(name)' not found (looked for \(resolved))"
                )
            }
            let canonical = realPath(resolved) ?? resolved
            guard seen.insert(canonical).inserted else {
                throw ImageFormatError(
                    .invalidImage,
                    path: current,
                    message: "backing chain loops back to \(canonical)"
                )
            }
            guard levels.count <= maxBackingDepth else {
                throw ImageFormatError(
                    .limitExceeded,
                    path: path,
                    message: "backing chain is deeper than \(maxBackingDepth) images"
                )
            }
            let kind: Format
            if let text = header.backingFormat {
                guard let f = Format(rawValue: text) else {
                    throw ImageFormatError(
                        .unsupportedFeature,
                        path: current,
                        message: "unsupported backing format '\(text)'"
                    )
                }
                kind = f
            } else {
                kind = try probe(path: resolved)
            }
            levels.append((resolved, kind))
            if kind != .qcow2 { break }
            current = resolved
        }
        // Open up: each level over the one below; the top level reads the snapshot, if any.
        var device: (any BlockDevice)? = nil
        do {
            for (index, level) in levels.enumerated().reversed() {
                switch level.format {
                case .raw:
                    device = try withPath(level.path) {
                        try FileDevice.open(path: level.path, readOnly: true, lock: .shared)
                    }
                case .vimg:
                    device = try VImage.open(path: level.path, readOnly: true)
                case .qcow2:
                    let file = try withPath(level.path) {
                        try FileDevice.open(path: level.path, readOnly: true, lock: .shared)
                    }
                    do {
                        device = try Qcow2Image(
                            file: file,
                            path: level.path,
                            snapshot: index == 0 ? snapshot : nil,
                            backing: device
                        )
                    } catch {
                        try? file.close()
                        throw error
                    }
                }
            }
        } catch {
            try? device?.close()
            throw error
        }
        return device as! Qcow2Image
    }
}

func realPath(_ path: String) -> String? {
    guard let resolved = realpath(path, nil) else { return nil }
    defer { free(resolved) }
    return String(cString: resolved)
}
