import BlockIO
import CrashSim
import Foundation
import ImageFormats
import RBD
import VImage

/// An opened backend: the device the front ends see, and what must be closed (top first) on unplug.
struct OpenedBackend {
    var device: any BlockDevice
    var format: String
    /// The VIMG image, when snapshots of the plugged disk are possible.
    var image: VImage?
    /// Devices to close on unplug, in order.
    var owned: [any BlockDevice]
    /// The canonical source: an absolute path, a URI, or "ram".
    var source: String
    /// The simulated write cache in front of the disk (`--crash-sim`).
    var crashSim: CrashSimDevice? = nil
    /// The write recorder in front of the disk (`--record`).
    var recorder: WriteRecorder? = nil

    func close() -> [String] {
        var problems: [String] = []
        for device in owned {
            do { try device.close() } catch { problems.append("\(error)") }
        }
        return problems
    }
}

enum Backends {
    /// Sources that name a remote NBD export rather than a file (the `nbds` ones over TLS).
    static let remoteSchemes = ["nbd://", "nbd+unix://", "nbds://", "nbds+unix://"]

    /// Opens what `request` names, with the crash simulator and the write recorder in front of it when
    /// asked for. Nothing is left open when it throws.
    /// - Parameter alongside: whether the bus already has this path open as a VIMG image (a snapshot of it
    ///   is then opened without the image's lock).
    static func open(_ request: PlugRequest, opener: BusOpener, alongside: (String) -> Bool) throws -> OpenedBackend {
        let base = try openSource(request, opener: opener, alongside: alongside)
        do {
            return try wrapForCrashTesting(base, request)
        } catch {
            _ = base.close()
            throw error
        }
    }

    /// Stacks the crash-testing wrappers (`CrashTestingStack`) on an opened backend.
    static func wrapForCrashTesting(_ base: OpenedBackend, _ request: PlugRequest) throws -> OpenedBackend {
        guard request.crashSim != nil || request.record != nil else { return base }
        guard !request.readOnly && request.snapshot == nil else {
            throw BusError("--crash-sim and --record need a writable disk")
        }
        let stack = try CrashTestingStack(
            on: base.device,
            image: base.image,
            crashSim: request.crashSim,
            record: request.record
        )
        var wrapped = base
        wrapped.device = stack.device
        wrapped.crashSim = stack.crashSim
        wrapped.recorder = stack.recorder
        // The top of the stack closes everything below it, down to the backend's own device.
        wrapped.owned = [stack.device] + base.owned.dropFirst()
        wrapped.format += stack.formatSuffix
        return wrapped
    }

    /// Opens what `request` names. Nothing is left open when it throws.
    private static func openSource(
        _ request: PlugRequest,
        opener: BusOpener,
        alongside: (String) -> Bool
    ) throws -> OpenedBackend {
        var base: OpenedBackend
        let isFile = request.ramSize == nil && !Self.remoteSchemes.contains { request.source?.hasPrefix($0) == true }
        if request.cache == FileDevice.CacheMode.direct && !isFile {
            throw BusError("--cache=none is for image files, not RAM disks or remote exports")
        }
        let cache = request.cache ?? .writeback
        if let size = request.ramSize {
            guard request.source == nil else { throw BusError("give either a source or --ram, not both") }
            guard size > 0, size % 512 == 0, size <= 1 << 44 else {
                throw BusError("a RAM disk needs a size that is a positive multiple of 512 bytes (at most 16 TiB)")
            }
            guard request.snapshot == nil, !request.overlay else {
                throw BusError("a RAM disk has no snapshots or overlays")
            }
            let ram = MemoryDevice(size: size, growable: false, readOnly: request.readOnly)
            return OpenedBackend(device: ram, format: "ram", image: nil, owned: [ram], source: "ram")
        }
        guard let source = request.source, !source.isEmpty else {
            throw BusError("nothing to plug: give an image, an nbd:// URI or --ram SIZE")
        }
        if RBDSpec.isRBD(source) {
            base = try openRBD(request, source: source)
            return try request.overlay ? addOverlay(to: base) : base
        }
        if Self.remoteSchemes.contains(where: { source.hasPrefix($0) }) {
            guard request.snapshot == nil else { throw BusError("--snapshot needs a VIMG image, not an NBD export") }
            if let timeout = request.reconnectTimeout, !PlugRequest.reconnectTimeoutRange.contains(timeout) {
                throw BusError("--reconnect-timeout must be between 0 and 86400 seconds")
            }
            let remote = try opener.openRemote(source, request.readOnly || request.overlay, request.reconnectTimeout)
            base = OpenedBackend(device: remote, format: "nbd", image: nil, owned: [remote], source: source)
        } else {
            guard request.reconnectTimeout == nil else {
                throw BusError("--reconnect-timeout is for remote exports (nbd:// URIs), not files")
            }
            let path = URL(fileURLWithPath: source).standardizedFileURL.resolvingSymlinksInPath().path
            guard FileManager.default.fileExists(atPath: path) else { throw BusError("\(source): no such file") }
            let readOnly = request.readOnly || request.overlay || request.snapshot != nil
            let (device, format): (any BlockDevice, String)
            if let snapshot = request.snapshot, alongside(path) {
                var options = VImage.OpenOptions()
                options.cache = cache
                let view = try ImageFormats.openVImage(
                    path: path,
                    readOnly: true,
                    snapshot: snapshot,
                    options: options,
                    alongsideWriter: true
                )
                (device, format) = (view, view.formatName)
            } else {
                (device, format) = try opener.openImage(
                    path,
                    request.format,
                    readOnly,
                    request.snapshot,
                    cache,
                    request.discard ?? .punch
                )
            }
            base = OpenedBackend(
                device: device,
                format: format,
                image: device as? VImage,
                owned: [device],
                source: path
            )
            if request.snapshot != nil && !request.readOnly && !request.overlay {
                _ = base.close()
                throw BusError("a snapshot plugs read-only; add --read-only, or --overlay to write on top of it")
            }
        }
        guard request.overlay else { return base }
        return try addOverlay(to: base)
    }

    /// An image in a Ceph cluster (raw, or an image format inside the RBD image), opened through the one
    /// opener with the request's reconnect timeout. The source kept is the full name (conf, id), so that a
    /// persistent bus can plug it again; listings show it without options.
    static func openRBD(_ request: PlugRequest, source: String) throws -> OpenedBackend {
        var options = RBDOptions()
        if let timeout = request.reconnectTimeout {
            guard (0...86400).contains(timeout) else {
                throw BusError("--reconnect-timeout must be between 0 and 86400 seconds")
            }
            options.reconnectTimeout = .milliseconds(Int64(timeout * 1000))
        }
        let readOnly = request.readOnly || request.overlay || request.snapshot != nil
        if request.snapshot != nil && !request.readOnly && !request.overlay {
            throw BusError("a snapshot plugs read-only; add --read-only, or --overlay to write on top of it")
        }
        let device = try ImageFormats.open(
            path: source,
            format: try request.format.map(ImageFormats.format(named:)),
            readOnly: readOnly,
            snapshot: request.snapshot,
            rbd: options
        )
        let format = (device as? VImage)?.formatName ?? (device is RBDDevice ? "rbd" : "qcow2")
        return OpenedBackend(device: device, format: format, image: device as? VImage, owned: [device], source: source)
    }

    /// The overlay: a VIMG image in RAM whose backing device is the source, opened read-only.
    static func addOverlay(to base: OpenedBackend) throws -> OpenedBackend {
        do {
            let host = MemoryDevice(size: 0, growable: true)
            try VImage.create(on: host, virtualSize: base.device.size)
            let overlay = try VImage.open(host: host, path: nil, readOnly: false, backing: base.device)
            return OpenedBackend(
                device: overlay,
                format: base.format + "+overlay",
                image: nil,
                owned: [overlay] + base.owned,
                source: base.source
            )
        } catch {
            _ = base.close()
            throw error
        }
    }

}

/// How the bus opens sources: injected by the executable, which knows every image format and the NBD client.
public struct BusOpener: Sendable {
    /// (absolute path, format or nil to probe, read-only, snapshot, cache mode, discard policy) -> (device,
    /// its format's name)
    public var openImage:
        @Sendable (String, String?, Bool, String?, FileDevice.CacheMode, VImage.DiscardPolicy) throws -> (
            any BlockDevice, String
        )
    /// (nbd://, nbd+unix://, nbds:// or nbds+unix:// URI, read-only, reconnect timeout in seconds or nil for
    /// the default) -> device
    public var openRemote: @Sendable (String, Bool, Double?) throws -> any BlockDevice

    public init(
        openImage:
            @escaping @Sendable (String, String?, Bool, String?, FileDevice.CacheMode, VImage.DiscardPolicy) throws -> (
                any BlockDevice, String
            ),
        openRemote: @escaping @Sendable (String, Bool, Double?) throws -> any BlockDevice
    ) {
        self.openImage = openImage
        self.openRemote = openRemote
    }
}
