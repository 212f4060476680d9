// Design notes
// ------------
// The control protocol of the bus (docs/BUS.md): one unix stream socket, root only (mode 0600, and the
// peer's uid is checked with SO_PEERCRED). A client writes one request as a single line of JSON and reads
// one response line back; it may send several requests on one connection. Every response has `ok`; a
// failed request carries `error`, a sentence meant for the user. Unknown fields are ignored, so old
// clients keep working when fields are added.
//
//   -> {"op":"plug","plug":{"source":"/srv/disk.vimg","readOnly":false,"overlay":false,"device":"auto"}}
//   <- {"ok":true,"disk":{"name":"disk","device":"/dev/loop3",...}}

import BlockIO
import CrashSim
import Foundation
import VImage

/// Which kernel block device a plugged disk gets.
public enum DeviceKind: String, Codable, Sendable, CaseIterable {
    /// `/dev/nbdN` where the kernel has NBD, else a FUSE file behind `/dev/loopN`.
    case auto
    /// `/dev/nbdN` through the kernel NBD driver (fails where there is none).
    case nbd
    /// A FUSE-exported file behind `/dev/loopN`.
    case loop
    /// No kernel device: the disk is only an NBD export on the bus's socket.
    case none
}

/// What to plug.
public struct PlugRequest: Codable, Sendable, Hashable {
    /// An image path (VIMG, raw, qcow2) or an `nbd://` / `nbd+unix://` URI (`nbds` for TLS); nil for a RAM disk.
    public var source: String?
    /// The size of a RAM disk (with `source` nil).
    public var ramSize: UInt64?
    /// The disk's name on the bus (defaults to the file's base name, or "ramN").
    public var name: String?
    /// The image format, or nil to probe.
    public var format: String?
    public var readOnly: Bool = false
    /// Expose an internal snapshot of a VIMG image (read-only unless `overlay`).
    public var snapshot: String?
    /// A throwaway writable layer in RAM over the source, dropped on unplug.
    public var overlay: Bool = false
    public var device: DeviceKind = .auto
    /// For a remote export: how long I/O waits for a server that went away before failing with EIO, in
    /// seconds; nil for the default (`NBDReconnectPolicy.defaultTimeout`).
    public var reconnectTimeout: Double?
    /// Snapshot diffs (`FROM..TO`) the export offers as `qemu:dirty-bitmap:FROM..TO` (VIMG images only).
    public var bitmapFromSnapshots: [String]?
    /// The reconnect timeouts accepted (a day at most: waiting must end).
    public static let reconnectTimeoutRange = 0.0...86400.0
    /// Put a simulated volatile write cache in front of the disk, whose power `crash` cuts (docs/CRASH.md).
    public var crashSim: CrashSimSettings? = nil
    /// Record every write, flush and discard to this write log (an absolute path; VIMG images only).
    public var record: String? = nil
    /// For an image file: through the host page cache or with direct I/O; nil for the default (writeback).
    public var cache: FileDevice.CacheMode?
    /// For a VIMG image: punch discarded space out of the file (default), only free it, or ignore discards.
    public var discard: VImage.DiscardPolicy?

    public init(
        source: String? = nil,
        ramSize: UInt64? = nil,
        name: String? = nil,
        format: String? = nil,
        readOnly: Bool = false,
        snapshot: String? = nil,
        overlay: Bool = false,
        device: DeviceKind = .auto,
        reconnectTimeout: Double? = nil,
        bitmapFromSnapshots: [String]? = nil,
        cache: FileDevice.CacheMode? = nil,
        discard: VImage.DiscardPolicy? = nil
    ) {
        self.source = source
        self.ramSize = ramSize
        self.name = name
        self.format = format
        self.readOnly = readOnly
        self.snapshot = snapshot
        self.overlay = overlay
        self.device = device
        self.reconnectTimeout = reconnectTimeout
        self.bitmapFromSnapshots = bitmapFromSnapshots
        self.cache = cache
        self.discard = discard
    }
}

/// The crash simulator of a plugged disk (`vdisk plug --crash-sim`).
public struct CrashSimSettings: Codable, Sendable, Hashable {
    /// The seed a power cut uses unless `vdisk crash --seed` gives another.
    public var seed: UInt64
    /// The cache's size in bytes; nil for `CrashSimDevice.defaultCacheSize`.
    public var cacheSize: UInt64?

    public init(seed: UInt64, cacheSize: UInt64? = nil) {
        self.seed = seed
        self.cacheSize = cacheSize
    }
}

/// A power cut asked for by `vdisk crash`.
public struct CrashRequest: Codable, Sendable, Hashable {
    /// The seed of the outcome; nil for the one the disk was plugged with.
    public var seed: UInt64?
    public var mode: CrashSimDevice.Mode
    /// The unit writes are torn into, for `tear` (512 or 4096).
    public var tearSize: Int?
    /// Cut the power at the N-th write from now rather than at once (the request then waits for it).
    public var afterWrites: Int?
    /// Seconds to wait for those writes (default 60).
    public var timeout: Int?

    public init(
        seed: UInt64? = nil,
        mode: CrashSimDevice.Mode,
        tearSize: Int? = nil,
        afterWrites: Int? = nil,
        timeout: Int? = nil
    ) {
        self.seed = seed
        self.mode = mode
        self.tearSize = tearSize
        self.afterWrites = afterWrites
        self.timeout = timeout
    }
}

/// I/O counters of a plugged disk, as seen by the engine (all front ends together).
public struct IOCounters: Codable, Sendable, Hashable {
    public var reads: UInt64 = 0
    public var writes: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    public var zeroes: UInt64 = 0
    public var discards: UInt64 = 0
    public var flushes: UInt64 = 0
    public var errors: UInt64 = 0
    /// Reads that failed their checksum (EIO), for a VIMG image with checksums; nil without them.
    public var checksumErrors: UInt64? = nil
    public init() {}
}

/// What `vdisk scrub` found (`VImage.scrub`).
public struct ScrubSummary: Codable, Sendable, Hashable {
    /// Where a bad block is seen by the guest: the active disk (`snapshot` nil) or a snapshot.
    public struct Place: Codable, Sendable, Hashable {
        public var snapshot: String?
        public var offset: UInt64
    }

    public struct Finding: Codable, Sendable, Hashable {
        /// data, compressed, metadata or checksum-structure.
        public var kind: String
        public var hostOffset: UInt64
        public var guestOffsets: [Place]
    }

    public var blocksVerified: UInt64
    public var blocksUnverified: UInt64
    public var findings: [Finding]

    public init(_ report: ScrubReport) {
        blocksVerified = report.blocksVerified
        blocksUnverified = report.blocksUnverified
        findings = report.findings.map { finding in
            Finding(
                kind: finding.kind.rawValue,
                hostOffset: finding.hostOffset,
                guestOffsets: finding.guestOffsets.map { Place(snapshot: $0.snapshot, offset: $0.offset) }
            )
        }
    }
}

/// One plugged disk, as `vdisk list` shows it.
public struct DiskInfo: Codable, Sendable, Hashable {
    public var name: String
    /// The kernel block device (`/dev/loop3`, `/dev/nbd0`), or nil with `--device none`.
    public var device: String?
    /// What the kernel device is: "loop", "nbd" or "none".
    public var frontEnd: String
    /// Where the data lives: an absolute path, an NBD URI, or "ram".
    public var source: String
    public var format: String
    public var size: UInt64
    public var readOnly: Bool
    public var overlay: Bool
    public var snapshot: String?
    /// The NBD URI that reaches this disk through the bus.
    public var nbdURI: String?
    /// The NBD metadata contexts that export offers besides `base:allocation` (`qemu:allocation-depth`,
    /// `qemu:dirty-bitmap:NAME` for each bitmap and snapshot diff).
    public var metaContexts: [String]?
    public var counters: IOCounters
    /// For a remote export: connected, reconnecting or failed, since when, and why.
    public var connection: ConnectionStatus?
}

/// A request to the bus.
public struct BusRequest: Codable, Sendable {
    public enum Operation: String, Codable, Sendable {
        /// Cut the power of a `--crash-sim` disk; put a label in a recorded disk's log.
        case crash, mark
        case plug, unplug, list, snapshot, ping, shutdown
        /// Read and verify every block of a plugged disk with checksums, while its I/O goes on.
        case scrub
        /// Flush and close every disk, keep each /dev/nbdN for the next bus, and exit (`bus --restart`).
        case handover
    }

    public var op: Operation
    public var plug: PlugRequest?
    /// A disk's name or device path (unplug, snapshot).
    public var target: String?
    /// Unplug even while mounted (unmounting first).
    public var force: Bool?
    /// Unplug every disk.
    public var all: Bool?
    /// The snapshot name (snapshot).
    public var snapshotName: String?
    /// Snapshot without freezing file systems (each is synced; the snapshot is crash-consistent).
    public var noFreeze: Bool?
    /// How to cut the power (crash).
    public var crash: CrashRequest? = nil
    /// The label (mark).
    public var label: String? = nil

    public init(
        op: Operation,
        plug: PlugRequest? = nil,
        target: String? = nil,
        force: Bool? = nil,
        all: Bool? = nil,
        snapshotName: String? = nil,
        noFreeze: Bool? = nil
    ) {
        self.op = op
        self.plug = plug
        self.target = target
        self.force = force
        self.all = all
        self.snapshotName = snapshotName
        self.noFreeze = noFreeze
    }
}

/// The bus's answer.
public struct BusResponse: Codable, Sendable {
    public var ok: Bool
    public var error: String?
    public var disk: DiskInfo?
    public var disks: [DiskInfo]?
    /// Informational lines for the user (what a forced unplug unmounted, ...).
    public var notes: [String]?
    /// The bus's process id (ping).
    public var pid: Int32?
    /// What this bus found from a predecessor that stopped without unplugging, and did about it (list).
    public var recovered: [String]?
    /// What a power cut did (crash).
    public var crashReport: CrashSimDevice.CrashReport? = nil
    /// What a scrub found (scrub).
    public var scrub: ScrubSummary? = nil

    public init(
        ok: Bool,
        error: String? = nil,
        disk: DiskInfo? = nil,
        disks: [DiskInfo]? = nil,
        notes: [String]? = nil,
        pid: Int32? = nil,
        recovered: [String]? = nil
    ) {
        self.ok = ok
        self.error = error
        self.disk = disk
        self.disks = disks
        self.notes = notes
        self.pid = pid
        self.recovered = recovered
    }

    public static func failure(_ message: String) -> BusResponse { BusResponse(ok: false, error: message) }
}

/// The errors of the bus library: a sentence for the user.
public struct BusError: Error, CustomStringConvertible, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Where a bus keeps its sockets, mountpoints and state.
public struct BusPaths: Sendable, Hashable {
    /// The runtime folder (default `/run/vdisk`, or `$VDISK_RUNTIME_DIR`).
    public var runtimeDirectory: String

    public init(runtimeDirectory: String? = nil) {
        if let runtimeDirectory {
            self.runtimeDirectory = runtimeDirectory
        } else if let env = ProcessInfo.processInfo.environment["VDISK_RUNTIME_DIR"], !env.isEmpty {
            self.runtimeDirectory = env
        } else {
            self.runtimeDirectory = "/run/vdisk"
        }
    }

    /// The control socket.
    public var controlSocket: String { runtimeDirectory + "/bus.sock" }
    /// The NBD socket every plugged disk is exported on.
    public var nbdSocket: String { runtimeDirectory + "/nbd.sock" }
    /// Held (flock) by the running bus.
    public var lockFile: String { runtimeDirectory + "/bus.lock" }
    /// The bus's log when it was started on demand.
    public var logFile: String { runtimeDirectory + "/bus.log" }
    /// FUSE mountpoints, one folder per disk.
    public var mountDirectory: String { runtimeDirectory + "/mnt" }
    /// The remembered disks (with `vdisk bus --persist`).
    public var stateFile: String { runtimeDirectory + "/disks.json" }
}

enum Wire {
    static func encode<T: Encodable>(_ value: T) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return Array(try encoder.encode(value)) + [0x0A]
    }

    static func decode<T: Decodable>(_ type: T.Type, from line: [UInt8]) throws -> T {
        try JSONDecoder().decode(type, from: Data(line))
    }
}
