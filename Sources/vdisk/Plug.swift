import ArgumentParser
import BlockIO
import Foundation
import NBDClient
import VDiskBus

#if canImport(Glibc)
import Glibc
#endif

/// Options every bus client command shares.
struct BusOptions: ParsableArguments {
    @Option(
        name: .customLong("runtime-dir"),
        help: ArgumentHelp("The bus's runtime folder (default /run/vdisk, or $VDISK_RUNTIME_DIR).", valueName: "DIR")
    )
    var runtimeDirectory: String?

    var paths: BusPaths { BusPaths(runtimeDirectory: runtimeDirectory) }

    /// Sends a request, turning a failed response into an error line and exit code 1.
    func send(_ request: BusRequest) throws -> BusResponse {
        let response = try BusClient(paths: paths).send(request)
        guard response.ok else {
            printError(response.error ?? "the bus refused the request")
            throw ExitCode.failure
        }
        return response
    }

    /// Starts a bus in the background if none answers, and waits until it does.
    func ensureBus() throws {
        let client = BusClient(paths: paths)
        if client.isRunning { return }
        let paths = self.paths
        if mkdir(paths.runtimeDirectory, 0o700) != 0 && errno != EEXIST {
            throw BusError("cannot create \(paths.runtimeDirectory): \(String(cString: strerror(errno)))")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        process.arguments = ["bus", "--runtime-dir", paths.runtimeDirectory, "--detach"]
        let log =
            FileHandle(forWritingAtPath: paths.logFile)
            ?? {
                _ = FileManager.default.createFile(
                    atPath: paths.logFile,
                    contents: nil,
                    attributes: [.posixPermissions: 0o600]
                )
                return FileHandle(forWritingAtPath: paths.logFile)
            }()
        log?.seekToEndOfFile()
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = log
        process.standardError = log
        try process.run()
        for _ in 0..<200 {
            if client.isRunning { return }
            if !process.isRunning && process.terminationStatus != 0 {
                throw BusError("the bus did not start (see \(paths.logFile))")
            }
            usleep(50_000)
        }
        throw BusError("the bus did not answer within 10 seconds (see \(paths.logFile))")
    }
}

extension Vdisk {
    struct Plug: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Plug a disk into the bus and attach it to a kernel block device.",
            discussion: """
                Prints the new device path (/dev/nbdN where the kernel has NBD, else /dev/loopN over a FUSE
                file), or with --device none the disk's NBD URI. Starts the bus if none is running.

                  vdisk plug disk.vimg
                  vdisk plug --ram 1G --name scratch
                  vdisk plug --read-only --snapshot monday disk.vimg
                  vdisk plug --overlay base.qcow2
                  vdisk plug nbd+unix:///disk?socket=/run/other.sock
                  vdisk plug 'nbds://server.example/disk?tls-certificates=/etc/vdisk/client-pki'

                An nbds:// or nbds+unix:// URI requires TLS: tls-certificates=DIR names the directory holding
                ca-cert.pem (and client-cert.pem and client-key.pem if the server asks for a client
                certificate); tls-verify-peer=false skips checking the server's certificate.
                """
        )

        @Argument(help: "An image (VIMG, raw, qcow2) or an nbd[s]:// / nbd[s]+unix:// URI.")
        var source: String?

        @Option(help: ArgumentHelp("Plug a RAM disk of this size instead (512M, 4G...).", valueName: "SIZE"))
        var ram: String?

        @Option(help: "The disk's name on the bus (default: the file's base name).")
        var name: String?

        @Option(name: .shortAndLong, help: "The image format (vimg, raw, qcow2); probed when omitted.")
        var format: String?

        @Flag(help: "Refuse writes.")
        var readOnly = false

        @Option(help: "Expose this internal snapshot of a VIMG image (read-only unless --overlay).")
        var snapshot: String?

        @Flag(help: "Add a throwaway writable layer in RAM, dropped on unplug.")
        var overlay = false

        @Option(help: "The kernel device: auto, nbd, loop or none.")
        var device: DeviceKind = .auto

        @Option(help: "Output format: human or json.")
        var output: OutputFormat = .human

        @OptionGroup var crashTesting: CrashTestingOptions

        @OptionGroup var bus: BusOptions

        func validate() throws {
            if (source == nil) == (ram == nil) { throw ValidationError("give an image or URI to plug, or --ram SIZE") }
            if let ram, ByteSize.parse(ram) == nil {
                throw ValidationError("invalid size '\(ram)': use bytes or a suffix such as 512M, 1G")
            }
        }

        func run() throws {
            try runBusCommand {
                try bus.ensureBus()
                var source = self.source
                // The bus has another working folder: make paths, and a URI's certificates folder, absolute.
                if let s = source, !s.contains("://") {
                    source = URL(fileURLWithPath: s).standardizedFileURL.path
                } else if let s = source {
                    source = NBDURI.resolvingCertificatesDirectory(
                        in: s,
                        against: FileManager.default.currentDirectoryPath
                    )
                }
                var request = PlugRequest(
                    source: source,
                    ramSize: ram.flatMap(ByteSize.parse),
                    name: name,
                    format: format,
                    readOnly: readOnly,
                    snapshot: snapshot,
                    overlay: overlay,
                    device: device
                )
                request.crashSim = crashTesting.settings()
                request.record = crashTesting.recordPath
                let response = try bus.send(BusRequest(op: .plug, plug: request))
                guard let disk = response.disk else { return }
                if let seed = request.crashSim?.seed {
                    printToStandardError(
                        "vdisk: \(disk.name): crash simulation, seed \(seed) ('vdisk crash \(disk.name)' cuts the power)"
                    )
                }
                switch output {
                case .json: print(try jsonString(disk))
                case .human: print(disk.device ?? disk.nbdURI ?? disk.name)
                }
            }
        }
    }

    struct Unplug: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Flush, detach and close a plugged disk.",
            discussion: "Refuses while a file system on the disk is mounted, unless --force (which unmounts it first)."
        )

        @Argument(help: "The disk's name or device path.")
        var target: String?

        @Flag(help: "Unplug every disk.")
        var all = false

        @Flag(help: "Unmount file systems on the disk first.")
        var force = false

        @OptionGroup var bus: BusOptions

        func validate() throws {
            if (target == nil) == !all { throw ValidationError("give a disk name or device, or --all") }
        }

        func run() throws {
            try runBusCommand {
                let client = BusClient(paths: bus.paths)
                if all && !client.isRunning { return }  // nothing is plugged
                let response = try bus.send(BusRequest(op: .unplug, target: target, force: force, all: all))
                for note in response.notes ?? [] where note.hasPrefix("unmounted") {
                    printToStandardError("vdisk: \(note)")
                }
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List plugged disks.")

        @Option(help: "Output format: human or json.")
        var output: OutputFormat = .human

        @OptionGroup var bus: BusOptions

        func run() throws {
            try runBusCommand {
                let client = BusClient(paths: bus.paths)
                let disks = client.isRunning ? (try bus.send(BusRequest(op: .list)).disks ?? []) : []
                switch output {
                case .json:
                    print(try jsonString(disks))
                case .human:
                    guard !disks.isEmpty else {
                        print("No disks are plugged.")
                        return
                    }
                    var rows = [["NAME", "DEVICE", "SIZE", "MODE", "FORMAT", "READS", "WRITES", "SOURCE"]]
                    for d in disks {
                        rows.append([
                            d.name, d.device ?? "-", ByteSize.format(d.size), d.readOnly ? "ro" : "rw", d.format,
                            ByteSize.format(d.counters.bytesRead), ByteSize.format(d.counters.bytesWritten), d.source,
                        ])
                    }
                    let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max()! }
                    for row in rows {
                        print(
                            row.enumerated().map { c, cell in
                                c == row.count - 1
                                    ? cell : cell.padding(toLength: widths[c], withPad: " ", startingAt: 0)
                            }
                            .joined(separator: "  ")
                        )
                    }
                }
            }
        }
    }

    struct DiskSnapshot: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "snapshot",
            abstract: "Take a consistent internal snapshot of a plugged VIMG disk.",
            discussion: "File systems mounted from the disk are frozen (fsfreeze) while the snapshot is taken."
        )

        @Argument(help: "The disk's name or device path.")
        var target: String

        @Argument(help: "The snapshot's name.")
        var snapshot: String

        @OptionGroup var bus: BusOptions

        func run() throws {
            try runBusCommand {
                _ = try bus.send(BusRequest(op: .snapshot, target: target, snapshotName: snapshot))
            }
        }
    }

    struct BusCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "bus",
            abstract: "Run the bus daemon (started on demand by 'vdisk plug').",
            discussion: """
                Holds the plugged disks, serves the root-only control socket <runtime-dir>/bus.sock and exports
                every disk over NBD on <runtime-dir>/nbd.sock. SIGINT or SIGTERM unplugs every disk cleanly.
                """
        )

        @Flag(help: "Remember plugged disks and re-plug them when the bus starts again.")
        var persist = false

        @Flag(help: "Ask a running bus to unplug everything and exit.")
        var stop = false

        @Flag(help: .hidden)
        var detach = false

        @OptionGroup var bus: BusOptions

        func run() async throws {
            do {
                if stop {
                    let client = BusClient(paths: bus.paths)
                    guard client.isRunning else { return }
                    _ = try bus.send(BusRequest(op: .shutdown))
                    // Wait for the lock to go away, so "stop" returns once everything is unplugged.
                    for _ in 0..<600 where access(bus.paths.lockFile, F_OK) == 0 { usleep(50_000) }
                    return
                }
                if detach { setsid() }
                try await runBusDaemon(paths: bus.paths, persist: persist)
            } catch let error as ExitCode {
                throw error
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
        }
    }
}

enum OutputFormat: String, ExpressibleByArgument {
    case human, json
}

extension DeviceKind: ExpressibleByArgument {}

func jsonString<T: Encodable>(_ value: T) throws -> String {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    return String(decoding: try encoder.encode(value), as: UTF8.self)
}

/// Runs a bus client command: bus errors become one line on stderr and exit code 1.
func runBusCommand(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as ExitCode {
        throw error
    } catch let error as BusError {
        printError(error.message)
        throw ExitCode.failure
    } catch {
        printError("\(error)")
        throw ExitCode.failure
    }
}
