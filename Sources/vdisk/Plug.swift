import ArgumentParser
import BlockIO
import Foundation
import ImageFormats
import NBDClient
import RBD
import VDiskBus
import VImage

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

    /// Starts a bus when the last one died without cleaning up (its lock file is still there: a bus that
    /// stops removes it), so that the new one removes what the dead one left and says so.
    func recoverIfCrashed() throws {
        if access(paths.lockFile, F_OK) == 0 && !BusClient(paths: paths).isRunning { try ensureBus() }
    }

    /// Starts a bus in the background if none answers, and waits until it does.
    func ensureBus() throws {
        let client = BusClient(paths: paths)
        if client.isRunning { return }
        let paths = self.paths
        if mkdir(paths.runtimeDirectory, 0o700) != 0 && errno != EEXIST {
            throw BusError("cannot create \(paths.runtimeDirectory): \(String(cString: strerror(errno)))")
        }
        let log = open(paths.logFile, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
        guard log >= 0 else { throw BusError("cannot open \(paths.logFile): \(String(cString: strerror(errno)))") }
        defer { close(log) }
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        let pid = try Subprocess.spawn(
            executable,
            ["bus", "--runtime-dir", paths.runtimeDirectory, "--detach"],
            stdout: log,
            newGroup: true
        )
        for _ in 0..<400 {
            if client.isRunning { return }
            var status: Int32 = 0
            if waitpid(pid, &status, WNOHANG) == pid { throw BusError("the bus did not start (see \(paths.logFile))") }
            usleep(50_000)
        }
        throw BusError("the bus did not answer within 20 seconds (see \(paths.logFile))")
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
                  vdisk plug vm.qcow2
                  vdisk plug --overlay base.qcow2
                  vdisk plug nbd+unix:///disk?socket=/run/other.sock
                  vdisk plug 'nbds://server.example/disk?tls-certificates=/etc/vdisk/client-pki'
                  vdisk plug rbd:pool/disk:conf=/etc/ceph/ceph.conf:id=vdisk

                An rbd: image (qemu's spelling, rbd:POOL/IMAGE[@SNAP][:conf=PATH][:id=NAME][:key=SECRET]) may
                hold a raw disk or a VIMG image; a writer takes its exclusive lock, so the image is plugged
                on one host at a time (see 'vimg rbd-break-lock' for a host that died). See docs/CEPH.md.

                The disk's NBD export on the bus offers qemu:allocation-depth, and for a VIMG image
                qemu:dirty-bitmap:NAME for each of its consistent dirty bitmaps; --bitmap-from-snapshots
                FROM..TO adds a snapshot diff (see docs/BUS.md, "Changed blocks").

                An nbds:// or nbds+unix:// URI requires TLS: tls-certificates=DIR names the directory holding
                ca-cert.pem (and client-cert.pem and client-key.pem if the server asks for a client
                certificate); tls-verify-peer=false skips checking the server's certificate.
                """.reflowedHelp
        )

        @Argument(help: "An image (VIMG, raw, qcow2), an rbd:POOL/IMAGE, or an nbd[s]:// / nbd[s]+unix:// URI.")
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

        @Option(
            help: ArgumentHelp(
                "For a remote export: how long I/O waits for a server that went away (a restart) before failing with EIO (default 60).",
                valueName: "SECONDS"
            )
        )
        var reconnectTimeout: Double?

        @Option(
            name: .customLong("bitmap-from-snapshots"),
            help: ArgumentHelp(
                "Offer what changed from snapshot FROM to TO as qemu:dirty-bitmap:FROM..TO on the disk's NBD export (repeatable).",
                valueName: "FROM..TO"
            )
        )
        var snapshotRanges: [String] = []

        @Option(
            help: ArgumentHelp(
                "For an image file: the host page cache, writeback or none (direct I/O, O_DIRECT).",
                valueName: "mode"
            )
        )
        var cache: FileDevice.CacheMode?

        @Option(
            help: ArgumentHelp(
                "For a VIMG image: what discards (fstrim) do: punch (give the space back to the host, the default), free (reuse it later) or ignore.",
                valueName: "policy"
            )
        )
        var discard: VImage.DiscardPolicy?

        @Option(help: "Output format: human or json.")
        var output: OutputFormat = .human

        @OptionGroup var crashTesting: CrashTestingOptions

        @OptionGroup var bus: BusOptions

        func validate() throws {
            if (source == nil) == (ram == nil) { throw ValidationError("give an image or URI to plug, or --ram SIZE") }
            if cache == FileDevice.CacheMode.direct && source?.contains("://") != false {
                throw ValidationError("--cache=none is for image files, not RAM disks or remote exports")
            }
            if let ram, ByteSize.parse(ram) == nil {
                throw ValidationError("invalid size '\(ram)': use bytes or a suffix such as 512M, 1G")
            }
            if let reconnectTimeout {
                guard PlugRequest.reconnectTimeoutRange.contains(reconnectTimeout) else {
                    throw ValidationError("--reconnect-timeout must be between 0 and 86400 seconds")
                }
                guard source?.contains("://") == true || source.map(RBDSpec.isRBD) == true else {
                    throw ValidationError("--reconnect-timeout is for remote exports (nbd:// URIs) and rbd: images")
                }
            }
            for text in snapshotRanges {
                do { _ = try SnapshotRange(parsing: text) } catch { throw ValidationError("\(error)") }
            }
        }

        func run() throws {
            try runBusCommand {
                try bus.ensureBus()
                var source = self.source
                // The bus has another working folder: make paths, and a URI's certificates folder, absolute.
                if let s = source, RBDSpec.isRBD(s) {
                    source = try RBDSpec(parsing: s).resolvingConf(against: FileManager.default.currentDirectoryPath)
                        .text
                } else if let s = source, !s.contains("://") {
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
                    device: device,
                    reconnectTimeout: reconnectTimeout,
                    bitmapFromSnapshots: snapshotRanges.isEmpty ? nil : snapshotRanges,
                    cache: cache,
                    discard: discard
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
                try bus.recoverIfCrashed()
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
                try bus.recoverIfCrashed()
                let client = BusClient(paths: bus.paths)
                let response = client.isRunning ? try bus.send(BusRequest(op: .list)) : BusResponse(ok: true)
                let disks = response.disks ?? []
                // What the bus cleaned up after a predecessor that died, on stderr so stdout stays the table.
                for line in response.recovered ?? [] { printToStandardError("vdisk: bus: \(line)") }
                switch output {
                case .json:
                    print(try jsonString(disks))
                case .human:
                    guard !disks.isEmpty else {
                        print("No disks are plugged.")
                        return
                    }
                    var rows = [["NAME", "DEVICE", "SIZE", "MODE", "FORMAT", "READS", "WRITES", "LINK", "SOURCE"]]
                    for d in disks {
                        // A checksummed image shows as vimg+crc; reads that failed their checksum are reported.
                        let checksumErrors = d.counters.checksumErrors
                        if let checksumErrors, checksumErrors > 0 {
                            printToStandardError(
                                "vdisk: \(d.name): \(checksumErrors) reads failed their checksum (see the bus log; vdisk scrub \(d.name))"
                            )
                        }
                        rows.append([
                            d.name, d.device ?? "-", ByteSize.format(d.size), d.readOnly ? "ro" : "rw",
                            d.format + (checksumErrors == nil ? "" : "+crc"),
                            ByteSize.format(d.counters.bytesRead), ByteSize.format(d.counters.bytesWritten),
                            d.connection.map(describe) ?? "-", d.source,
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
            discussion: """
                File systems mounted from the disk (its partitions, LVM on them) are frozen while the snapshot
                is taken; one that cannot be frozen (a FUSE file system such as ntfs-3g) is synced instead, and
                its snapshot is crash-consistent. Prints which consistency each file system got.
                """.reflowedHelp
        )

        @Argument(help: "The disk's name or device path.")
        var target: String

        @Argument(help: "The snapshot's name.")
        var snapshot: String

        @Flag(help: "Do not freeze file systems: sync them and take a crash-consistent snapshot.")
        var noFreeze = false

        @OptionGroup var bus: BusOptions

        func run() throws {
            try runBusCommand {
                let response = try bus.send(
                    BusRequest(op: .snapshot, target: target, snapshotName: snapshot, noFreeze: noFreeze)
                )
                for note in response.notes ?? [] { print(note) }
            }
        }
    }

    struct DiskScrub: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "scrub",
            abstract: "Read and verify every block of a plugged disk that has checksums, while it is in use.",
            discussion: """
                For a VIMG image created with -o checksums=on: reads the data of the disk and of its snapshots,
                and its metadata, and checks each 4 KiB block against its checksum without stopping the disk's
                I/O (what vimg scrub does offline). Bad blocks are also in the bus's log. Exit codes: 0 every
                block verifies, 1 the scrub could not run, 2 bad blocks (repair them with the disk unplugged:
                vimg check --repair-from OTHER).
                """.reflowedHelp
        )

        @Argument(help: "The disk's name or device path.")
        var target: String

        @Option(help: "Output format: human or json.")
        var output: OutputFormat = .human

        @OptionGroup var bus: BusOptions

        func run() throws {
            var summary: ScrubSummary? = nil
            try runBusCommand { summary = try bus.send(BusRequest(op: .scrub, target: target)).scrub }
            guard let summary else { throw ExitCode.failure }
            switch output {
            case .json:
                print(try jsonString(summary))
            case .human:
                for finding in summary.findings {
                    let places = finding.guestOffsets.map {
                        "\($0.snapshot.map { "snapshot \($0) " } ?? "")guest offset \($0.offset)"
                    }
                    print(
                        "ERROR \(finding.kind) block at host offset 0x\(String(finding.hostOffset, radix: 16))"
                            + (places.isEmpty ? "" : " (\(places.joined(separator: ", ")))") + " fails its checksum"
                    )
                }
                print(
                    "\(summary.findings.isEmpty ? "No errors were found" : "\(summary.findings.count) blocks fail their checksum"): \(summary.blocksVerified) blocks verified"
                        + (summary.blocksUnverified > 0 ? ", \(summary.blocksUnverified) without a checksum yet" : "")
                        + "."
                )
            }
            if !summary.findings.isEmpty { throw ExitCode(2) }
        }
    }

    struct BusCommand: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "bus",
            abstract: "Run the bus daemon (started on demand by 'vdisk plug').",
            discussion: """
                Holds the plugged disks, serves the root-only control socket <runtime-dir>/bus.sock and exports
                every disk over NBD on <runtime-dir>/nbd.sock. SIGINT or SIGTERM unplugs every disk cleanly.
                """.reflowedHelp
        )

        @Flag(help: "Remember plugged disks and re-plug them when the bus starts again.")
        var persist = false

        @Flag(help: "Ask a running bus to unplug everything and exit.")
        var stop = false

        @Flag(
            help: """
                Replace a running bus with a new one (this program), keeping /dev/nbdN disks plugged and \
                mounted: the old bus flushes and closes every disk, the new one takes them over.
                """
        )
        var restart = false

        @Option(help: .hidden)
        var toolTimeout: Double = 30

        @Flag(help: .hidden)
        var detach = false

        @OptionGroup var bus: BusOptions

        func run() async throws {
            do {
                if stop {
                    try bus.recoverIfCrashed()
                    let client = BusClient(paths: bus.paths)
                    guard client.isRunning else { return }
                    _ = try bus.send(BusRequest(op: .shutdown))
                    // Wait for the lock to go away, so "stop" returns once everything is unplugged.
                    for _ in 0..<600 where access(bus.paths.lockFile, F_OK) == 0 { usleep(50_000) }
                    return
                }
                if restart {
                    try restartBus()
                    return
                }
                if detach { setsid() }
                try await runBusDaemon(paths: bus.paths, persist: persist, toolTimeout: toolTimeout)
            } catch let error as ExitCode {
                throw error
            } catch {
                printError("\(error)")
                throw ExitCode.failure
            }
        }
    }
}

extension Vdisk.BusCommand {
    /// Hands the running bus's disks over to a new bus started from this executable.
    func restartBus() throws {
        let client = BusClient(paths: bus.paths)
        if client.isRunning {
            let pid = try bus.send(BusRequest(op: .ping)).pid ?? 0
            let response = try bus.send(BusRequest(op: .handover))
            for note in response.notes ?? [] { printToStandardError("vdisk: \(note)") }
            // The old bus exits right after answering; the new one needs its lock.
            for _ in 0..<600 where pid > 0 && kill(pid, 0) == 0 { usleep(20_000) }
        }
        try bus.ensureBus()
        let taken = try bus.send(BusRequest(op: .list)).recovered ?? []
        for line in taken { printToStandardError("vdisk: \(line)") }
        if taken.contains(where: { $0.hasPrefix("could not") }) { throw ExitCode.failure }
    }
}

/// A remote disk's link for `vdisk list`: "connected", "reconnecting since 14:02:07", "failed since ...".
func describe(_ status: ConnectionStatus) -> String {
    guard status.state != .connected, let since = status.since else { return status.state.rawValue }
    let formatter = DateFormatter()
    formatter.dateFormat = "HH:mm:ss"
    return "\(status.state.rawValue) since \(formatter.string(from: Date(timeIntervalSince1970: since)))"
}

enum OutputFormat: String, ExpressibleByArgument {
    case human, json
}

extension DeviceKind: ExpressibleByArgument {}
extension FileDevice.CacheMode: ExpressibleByArgument {}
extension VImage.DiscardPolicy: ExpressibleByArgument {}

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
