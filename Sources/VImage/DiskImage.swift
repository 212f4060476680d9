import BlockIO

/// Opens any supported disk image file as a `BlockDevice`: the one entry point that front ends
/// (`vdisk serve`, `vdisk plug`, `vimg`) use, so format probing lives in one place.
public enum DiskImage {
    /// The formats vdisk reads and writes.
    public enum Format: String, Sendable, CaseIterable {
        case vimg, raw, qcow2
    }

    /// Opens the image at `path`.
    /// - Parameters:
    ///   - format: the format, or nil to probe it from the first bytes (a file that is not VIMG or qcow2 is raw).
    ///   - readOnly: open without write access; the image takes a shared lock instead of an exclusive one.
    ///   - snapshot: for VIMG, expose an internal snapshot instead of the active state (read-only).
    /// - Returns: a device whose `size` is the guest (virtual) size.
    /// - Throws: `VImageError` or `BlockIOError` with a clear message.
    public static func open(
        path: String,
        format: Format? = nil,
        readOnly: Bool,
        snapshot: String? = nil
    ) throws -> any BlockDevice {
        let format = try format ?? probe(path: path)
        switch format {
        case .raw:
            if snapshot != nil {
                throw VImageError(.invalidArgument, path: path, message: "raw images have no snapshots")
            }
            return try FileDevice.open(path: path, readOnly: readOnly, lock: readOnly ? .shared : .exclusive)
        case .vimg:
            return try VImage.open(path: path, readOnly: readOnly || snapshot != nil, snapshot: snapshot)
        case .qcow2:
            throw VImageError(.unsupportedFeature, path: path, message: "qcow2 images are not supported yet")
        }
    }

    /// Guesses a file's format from its magic bytes.
    public static func probe(path: String) throws -> Format {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        let length = file.size
        guard length >= 4 else { return .raw }
        let magic = try file.read(count: 4, at: 0)
        if magic == ImageHeader.magicBytes { return .vimg }
        if magic == [0x51, 0x46, 0x49, 0xFB] { return .qcow2 }
        return .raw
    }
}
