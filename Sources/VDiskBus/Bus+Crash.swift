// Design notes
// ------------
// Crash testing through the control protocol (docs/CRASH.md): `crash` cuts the power of a disk plugged
// with `--crash-sim` (its simulated cache settles onto the image and every later I/O fails, so the file
// system above sees a dead disk), and `mark` puts a label in the log of a disk plugged with `--record`.
// The wrappers order these against an unplug closing them (a power cut armed for a coming write is
// called off, a mark after the end of the log is refused), so the bus answers outside its operations
// lock: a power cut waiting for writes must not hold up other requests. `vdisk serve --control-socket`
// answers them for its exports with the same `CrashControl.answer`.

import BlockIO
import CrashSim
import VImage

/// A device with the crash-testing wrappers stacked on it, each closing the one below:
///
///   front ends -> WriteRecorder -> CrashSimDevice -> the disk's device
///
/// so the log holds what the front ends were told completed, and the simulated cache sits on the image
/// (the medium). The bus stacks these on plugged disks, `vdisk serve` on its exports.
public struct CrashTestingStack: Sendable, CustomStringConvertible {
    /// The top of the stack: what the front ends use.
    public var device: any BlockDevice
    public var crashSim: CrashSimDevice?
    public var recorder: WriteRecorder?

    /// - Parameters:
    ///   - image: the VIMG image under `device`, for `record` (the log starts from a snapshot of it).
    ///   - record: the log to create (an absolute path).
    /// - Throws: `BusError` for what cannot be done; errors starting the recording. Nothing is taken
    ///   from `device` when it throws (it stays the caller's to close).
    public init(on device: any BlockDevice, image: VImage?, crashSim: CrashSimSettings?, record: String?) throws {
        self.device = device
        guard crashSim != nil || record != nil else { return }
        guard !device.capabilities.contains(.readOnly) else {
            throw BusError("--crash-sim and --record need a writable disk")
        }
        if let settings = crashSim {
            let cacheSize = settings.cacheSize ?? CrashSimDevice.defaultCacheSize
            guard cacheSize >= 1 << 20 && cacheSize <= 16 << 30 else {
                throw BusError("the simulated cache must be from 1 MiB to 16 GiB")
            }
            self.crashSim = CrashSimDevice(device, seed: settings.seed, cacheSize: cacheSize)
            self.device = self.crashSim!
        }
        if let record {
            guard let image else {
                throw BusError("--record needs a VIMG image (the log starts from an internal snapshot of it)")
            }
            recorder = try WriteRecorder.start(recording: self.device, image: image, logPath: record)
            self.device = recorder!
        }
    }

    /// What is stacked, as a suffix of the disk's format ("+crash-sim+record").
    public var formatSuffix: String { (crashSim == nil ? "" : "+crash-sim") + (recorder == nil ? "" : "+record") }

    public var description: String {
        var parts: [String] = []
        if let crashSim {
            parts.append(
                "crash simulation, seed \(crashSim.seed), \(ByteSize.format(crashSim.cacheSize)) cache ('vdisk crash' cuts the power)"
            )
        }
        if let recorder { parts.append("recording to \(recorder.path)") }
        return parts.joined(separator: "; ")
    }
}

/// Answers `crash` and `mark` for one disk: the bus and `vdisk serve` alike.
public enum CrashControl {
    /// - Parameters:
    ///   - name: the disk's (or export's) name, for messages.
    ///   - crashSim, recorder: the disk's wrappers, if it has them.
    ///   - log: where a power cut is reported (the bus's log, the server's stderr).
    /// - Throws: `BusError` when the disk lacks what the request needs; the wrappers' errors.
    public static func answer(
        _ request: BusRequest,
        disk name: String,
        crashSim: CrashSimDevice?,
        recorder: WriteRecorder?,
        log: (String) -> Void
    ) throws -> BusResponse {
        switch request.op {
        case .crash:
            guard let crashSim else {
                throw BusError("'\(name)' was not plugged with --crash-sim; only such disks can lose power")
            }
            let asked = request.crash ?? CrashRequest(mode: .reorder)
            let report =
                if let writes = asked.afterWrites {
                    try crashSim.crash(
                        afterWrites: writes,
                        seed: asked.seed,
                        mode: asked.mode,
                        tearSize: asked.tearSize ?? 512,
                        timeout: asked.timeout ?? 60
                    )
                } else {
                    try crashSim.crash(seed: asked.seed, mode: asked.mode, tearSize: asked.tearSize ?? 512)
                }
            log("power cut on \(name): \(report)")
            var response = BusResponse(ok: true)
            response.crashReport = report
            return response
        case .mark:
            guard let recorder else {
                throw BusError("'\(name)' was not plugged with --record; it has no log to mark")
            }
            guard let label = request.label else { throw BusError("mark needs a label") }
            let record = try recorder.mark(label)
            return BusResponse(ok: true, notes: ["mark '\(label)' is record \(record) of \(recorder.path)"])
        default:
            throw BusError("\(request.op.rawValue) is not a crash-testing request")
        }
    }
}

extension Bus {
    /// Answers `crash` and `mark` (`handle` routes them here).
    func handleCrashTesting(_ request: BusRequest) throws -> BusResponse {
        guard let target = request.target else { return .failure("\(request.op.rawValue) needs a disk name") }
        let disk = try find(target)
        return try CrashControl.answer(
            request,
            disk: disk.name,
            crashSim: disk.backend.crashSim,
            recorder: disk.backend.recorder,
            log: log
        )
    }
}
