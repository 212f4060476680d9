import ArgumentParser
import BlockIO
import CrashSim
import Foundation
import ImageFormats
import VDiskBus

/// The crash-testing options `vdisk plug` and `vdisk serve` share (docs/CRASH.md).
struct CrashTestingOptions: ParsableArguments {
    @Flag(
        name: .customLong("crash-sim"),
        help: """
            Put a simulated volatile write cache in front of the disk; 'vdisk crash' cuts its power. \
            --crash-sim=SEED sets the seed of the outcome (default: a random one, printed).
            """
    )
    var crashSim = false

    /// `--crash-sim=SEED` arrives here (`Vdisk.main` splits it, as the parser has no optional values).
    @Option(name: .customLong("crash-seed"), help: .hidden)
    var crashSeed: UInt64?

    @Option(
        name: .customLong("crash-cache"),
        help: ArgumentHelp("The simulated cache's size (default 64M).", valueName: "SIZE")
    )
    var crashCache: String?

    @Option(
        help: ArgumentHelp(
            "Record every write, flush and discard to this new write log (VIMG images; 'vimg replay' reads it).",
            valueName: "LOG"
        )
    )
    var record: String?

    func validate() throws {
        if crashSeed != nil && !crashSim { throw ValidationError("--crash-seed goes with --crash-sim") }
        if let crashCache {
            guard crashSim else { throw ValidationError("--crash-cache goes with --crash-sim") }
            guard ByteSize.parse(crashCache) != nil else {
                throw ValidationError("invalid size '\(crashCache)': use bytes or a suffix such as 64M")
            }
        }
    }

    /// The simulator's settings, with a seed chosen now when none was given.
    func settings() -> CrashSimSettings? {
        guard crashSim else { return nil }
        return CrashSimSettings(
            seed: crashSeed ?? UInt64.random(in: 1...UInt64(UInt32.max)),
            cacheSize: crashCache.flatMap(ByteSize.parse)
        )
    }

    /// The log's absolute path (the bus runs in another folder).
    var recordPath: String? { record.map { URL(fileURLWithPath: $0).standardizedFileURL.path } }

    /// `--crash-sim=SEED` as `--crash-sim --crash-seed SEED`, for the parser, up to a `--`.
    static func splittingOptionalValues(_ arguments: [String]) -> [String] {
        var result: [String] = []
        for (index, argument) in arguments.enumerated() {
            if argument == "--" { return result + arguments[index...] }
            if argument.hasPrefix("--crash-sim=") {
                result += ["--crash-sim", "--crash-seed", String(argument.dropFirst("--crash-sim=".count))]
            } else {
                result.append(argument)
            }
        }
        return result
    }
}

/// Where `vdisk crash` and `vdisk mark` send their request: the bus, or a `vdisk serve` control socket.
struct CrashTargetOptions: ParsableArguments {
    @Option(
        name: .customLong("control-socket"),
        help: ArgumentHelp("Talk to 'vdisk serve --control-socket PATH' instead of the bus.", valueName: "PATH")
    )
    var controlSocket: String?

    @OptionGroup var bus: BusOptions

    func send(_ request: BusRequest) throws -> BusResponse {
        guard let controlSocket else { return try bus.send(request) }
        let response = try BusClient.send(request, toSocket: controlSocket)
        guard response.ok else {
            printError(response.error ?? "the server refused the request")
            throw ExitCode.failure
        }
        return response
    }
}

extension CrashSimDevice.Mode: ExpressibleByArgument {}

extension Vdisk {
    struct Crash: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Cut the power of a disk plugged (or served) with --crash-sim.",
            discussion: """
                The writes still in the disk's simulated cache settle onto the image as the mode and seed
                decide, and every later I/O fails (the file system above sees a dead disk). Unplug the disk
                (or stop the server): the image then holds the post-crash state, ready to plug again.

                  drop     the image keeps what was flushed only
                  reorder  each cached write lands whole or not, in any order (the default)
                  tear     each cached write is cut at --tear-size (512 or 4K) and each piece lands or not

                With --after-writes N the power goes right after the N-th write from now reaches the disk,
                wherever the workload then is; the command waits for it (--timeout, 60 s by default).
                Prints what happened, with the seed that replays it. See docs/CRASH.md.
                """.reflowedHelp
        )

        @Argument(help: "The disk's name (or device path); for --control-socket, the export's name.")
        var target: String

        @Option(help: "The seed of the outcome (default: the one the disk was plugged with).")
        var seed: UInt64?

        @Option(help: "What happens to the cached writes: drop, reorder or tear.")
        var mode: CrashSimDevice.Mode = .reorder

        @Option(help: ArgumentHelp("For --mode tear: the unit a write is torn into (512 or 4K).", valueName: "SIZE"))
        var tearSize: String?

        @Option(
            help: ArgumentHelp(
                "Cut the power at the N-th write from now (wherever the workload then is), and wait for it.",
                valueName: "N"
            )
        )
        var afterWrites: Int?

        @Option(help: ArgumentHelp("Seconds to wait for --after-writes (default 60).", valueName: "S"))
        var timeout: Int?

        @Option(help: "Output format: human or json.")
        var output: OutputFormat = .human

        @OptionGroup var options: CrashTargetOptions

        func validate() throws {
            if let afterWrites, afterWrites < 1 { throw ValidationError("--after-writes counts from 1") }
            if let timeout {
                guard afterWrites != nil else { throw ValidationError("--timeout goes with --after-writes") }
                guard timeout >= 1 else { throw ValidationError("--timeout is at least 1 second") }
            }
            if let tearSize {
                guard mode == .tear else { throw ValidationError("--tear-size goes with --mode tear") }
                guard let size = ByteSize.parse(tearSize), CrashSimDevice.tearSizes.contains(Int(size)) else {
                    throw ValidationError("--tear-size is a power of two from 512 to 64K (512 or 4K for real disks)")
                }
            }
        }

        func run() throws {
            try runBusCommand {
                var request = BusRequest(op: .crash, target: target)
                request.crash = CrashRequest(
                    seed: seed,
                    mode: mode,
                    tearSize: tearSize.flatMap(ByteSize.parse).map(Int.init),
                    afterWrites: afterWrites,
                    timeout: timeout
                )
                let response = try options.send(request)
                guard let report = response.crashReport else { return }
                switch output {
                case .json: print(try jsonString(report))
                case .human: print("power cut on \(target): \(report)")
                }
            }
        }
    }

    struct Mark: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Put a label in the write log of a disk plugged (or served) with --record.",
            discussion: """
                The label sits between the requests completed before and after it; 'vimg replay
                --until-mark LABEL' rebuilds the disk as it was there. Prints the mark's record number.
                """.reflowedHelp
        )

        @Argument(help: "The disk's name (or device path); for --control-socket, the export's name.")
        var target: String

        @Argument(help: "The label (up to 255 bytes, e.g. \"after commit 42\").")
        var label: String

        @OptionGroup var options: CrashTargetOptions

        func run() throws {
            try runBusCommand {
                var request = BusRequest(op: .mark, target: target)
                request.label = label
                for note in try options.send(request).notes ?? [] { print(note) }
            }
        }
    }
}
