import ArgumentParser
import BlockIO
import CrashSim
import Dispatch
import ImageFormats
import Logging
import NBDServer
import NIOCore
import RBD
import VDiskBus
import VImage

#if canImport(Glibc)
import Glibc
#endif

extension Vdisk {
    struct Serve: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Export images over NBD until SIGINT or SIGTERM.",
            discussion: """
                Listens on a unix socket (--socket, mode 0600) and/or TCP (--port, on 127.0.0.1 unless
                --bind says otherwise); under systemd socket activation it adopts the passed socket instead.
                Each image is one export, named after its file (or --export for a single image); the first
                image is also the default export "". VIMG and raw images are opened read-write unless
                --read-only or --snapshot is given.

                Every export offers the NBD metadata contexts base:allocation and qemu:allocation-depth.
                --bitmap NAME adds qemu:dirty-bitmap:NAME, a live view of a persistent dirty bitmap (vimg
                bitmap); --bitmap-from-snapshots FROM..TO adds qemu:dirty-bitmap:FROM..TO, what changed
                between two snapshots (an empty TO is the exported state), for backup tools that read
                changed blocks over NBD.

                With --tls=on or --tls=require, clients can upgrade to TLS (NBD_OPT_STARTTLS) with the
                certificate and key in the --tls-certificates directory (server-cert.pem, server-key.pem);
                --tls=require refuses clients that do not, and --tls-verify-peer also demands a client
                certificate signed by the directory's ca-cert.pem.

                On SIGINT or SIGTERM the server stops accepting, finishes in-flight requests, flushes and
                closes the images, and exits 0. SIGUSR1 writes the --stats-file at once.
                See docs/NBD.md.
                """.reflowedHelp
        )

        /// `--tls`: the words nbdkit uses.
        enum TLSMode: String, ExpressibleByArgument, CaseIterable {
            case off, on, require
        }

        @Option(help: ArgumentHelp("Listen on this unix socket (created with mode 0600).", valueName: "path"))
        var socket: String?

        @Option(help: ArgumentHelp("Listen on this TCP port (0 picks a free one).", valueName: "port"))
        var port: Int?

        @Option(help: ArgumentHelp("The address for --port.", valueName: "address"))
        var bind: String?

        @Flag(help: "Export the images read-only.")
        var readOnly = false

        @Option(help: ArgumentHelp("Export this internal snapshot of each VIMG image (read-only).", valueName: "name"))
        var snapshot: String?

        @Option(
            name: .customLong("bitmap"),
            help: ArgumentHelp(
                "Offer this dirty bitmap of each image as qemu:dirty-bitmap:NAME (repeatable).",
                valueName: "name"
            )
        )
        var bitmaps: [String] = []

        @Option(
            name: .customLong("bitmap-from-snapshots"),
            help: ArgumentHelp(
                "Offer what changed from snapshot FROM to TO as qemu:dirty-bitmap:FROM..TO (repeatable).",
                valueName: "from..to"
            )
        )
        var snapshotRanges: [String] = []

        @Option(name: .customLong("export"), help: ArgumentHelp("The export name (one image only).", valueName: "name"))
        var exportName: String?

        @Option(help: "Close connections beyond this many.")
        var maxConnections: Int = 64

        @Option(
            help: ArgumentHelp(
                "Close connections that have not negotiated after this many seconds.",
                valueName: "seconds"
            )
        )
        var handshakeTimeout: Int = 10

        @Option(
            name: .customLong("tls"),
            help: ArgumentHelp("TLS: off, on (offered; plaintext clients still served) or require.", valueName: "mode")
        )
        var tlsMode: TLSMode = .off

        @Option(
            name: .customLong("tls-certificates"),
            help: ArgumentHelp(
                "Directory holding server-cert.pem and server-key.pem (and ca-cert.pem for --tls-verify-peer).",
                valueName: "dir"
            )
        )
        var tlsCertificates: String?

        @Flag(name: .customLong("tls-verify-peer"), help: "Require a client certificate signed by ca-cert.pem.")
        var tlsVerifyPeer = false

        @Option(
            help: ArgumentHelp(
                "Write per-export counters as JSON here (periodically, on SIGUSR1 and at exit).",
                valueName: "path"
            )
        )
        var statsFile: String?

        @Option(help: ArgumentHelp("Seconds between --stats-file updates.", valueName: "seconds"))
        var statsInterval: Int = 5

        @Option(
            help: ArgumentHelp(
                "The host page cache for the image files: writeback, or none for direct I/O (O_DIRECT).",
                valueName: "mode"
            )
        )
        var cache: FileDevice.CacheMode = .writeback

        @Option(
            help: ArgumentHelp(
                "What a VIMG image does with discards (trim): punch (free the clusters and punch the space out of the file), free (reuse it later, the file never shrinks) or ignore.",
                valueName: "policy"
            )
        )
        var discard: VImage.DiscardPolicy = .punch

        @Flag(name: .shortAndLong, help: "Log connections (-v) and refused requests (-vv) to stderr.")
        var verbose: Int

        @OptionGroup var crashTesting: CrashTestingOptions

        @Option(
            name: .customLong("control-socket"),
            help: ArgumentHelp(
                "Answer 'vdisk crash' and 'vdisk mark' (--control-socket PATH) on this unix socket.",
                valueName: "path"
            )
        )
        var controlSocket: String?

        @Argument(help: "The images to export.")
        var images: [String] = []

        func validate() throws {
            if images.isEmpty { throw ValidationError("give at least one image to export") }
            if bind != nil && port == nil { throw ValidationError("--bind needs --port") }
            if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
            if socket == nil && port == nil && NBDServer.socketActivationDescriptors(consume: false).isEmpty {
                throw ValidationError("give --socket PATH or --port N (or start under systemd socket activation)")
            }
            if exportName != nil && images.count > 1 { throw ValidationError("--export names a single image") }
            if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
            if handshakeTimeout < 1 { throw ValidationError("--handshake-timeout must be at least 1") }
            if statsInterval < 1 { throw ValidationError("--stats-interval must be at least 1") }
            if tlsMode == .off && (tlsCertificates != nil || tlsVerifyPeer) {
                throw ValidationError("--tls-certificates and --tls-verify-peer need --tls=on or --tls=require")
            }
            if tlsMode != .off && tlsCertificates == nil {
                throw ValidationError("--tls=\(tlsMode.rawValue) needs --tls-certificates DIR")
            }
            if snapshot != nil && !bitmaps.isEmpty {
                throw ValidationError(
                    "--bitmap describes the live disk, not snapshot '\(snapshot!)'; to serve what changed up to "
                        + "it, use --bitmap-from-snapshots FROM..\(snapshot!)"
                )
            }
            for text in snapshotRanges {
                do { _ = try SnapshotRange(parsing: text) } catch { throw ValidationError("\(error)") }
            }
            if crashTesting.crashSim || crashTesting.record != nil {
                if readOnly || snapshot != nil {
                    throw ValidationError("--crash-sim and --record need writable exports")
                }
                if crashTesting.record != nil && images.count > 1 {
                    throw ValidationError("--record records a single image")
                }
            }
            let names = exportNames
            if Set(names).count != names.count {
                throw ValidationError("two images have the same export name; rename one of them")
            }
        }

        /// One name per image: --export, else the file's base name (an rbd: image's name).
        var exportNames: [String] {
            if let exportName { return [exportName] }
            return images.map { path in
                if let spec = try? RBDSpec(parsing: path) { return spec.image }
                return path.split(separator: "/").last.map(String.init) ?? path
            }
        }

        func run() async throws {
            try await runReportingErrors { try await serve() }
        }

        private func serve() async throws {
            // A parent may have started us with signals blocked (threads inherit the mask); we rely on
            // SIGINT, SIGTERM and SIGUSR1, so unblock them before any thread exists.
            var handled = sigset_t()
            sigemptyset(&handled)
            for number in [SIGINT, SIGTERM, SIGUSR1] { sigaddset(&handled, number) }
            pthread_sigmask(SIG_UNBLOCK, &handled, nil)
            tuneAllocatorForServing()

            let level: Logger.Level = verbose >= 2 ? .debug : verbose == 1 ? .info : .notice
            LoggingSystem.bootstrap { label in
                var handler = StreamLogHandler.standardError(label: label)
                handler.logLevel = level
                return handler
            }
            let logger = Logger(label: "vdisk.serve")

            // Certificates first: a bad file should stop us before any image is opened and locked.
            var tls: NBDTLSConfiguration?
            if let directory = tlsCertificates, tlsMode != .off {
                let mode: NBDTLSConfiguration.Mode = tlsMode == .require ? .required : .optional
                tls = try NBDTLSConfiguration.load(directory: directory, mode: mode, verifyPeer: tlsVerifyPeer)
            }

            let writable = !readOnly && snapshot == nil
            var exports: [NBDExport] = []
            var crashTestedExports: [String: CrashTestingStack] = [:]
            let crashSettings = crashTesting.settings()
            do {
                for (path, name) in zip(images, exportNames) {
                    let readOnly = !writable
                    let opened = try ImageFormats.open(
                        path: path,
                        readOnly: readOnly,
                        snapshot: snapshot,
                        cache: cache,
                        discard: discard
                    )
                    let stack: CrashTestingStack
                    let contexts: [NBDMetaContext]
                    do {
                        contexts = try MetaContexts.make(
                            device: opened,
                            image: opened as? VImage,
                            bitmaps: bitmaps,
                            snapshotRanges: try snapshotRanges.map { try SnapshotRange(parsing: $0) },
                            changing: !readOnly,
                            path: path
                        )
                        stack = try CrashTestingStack(
                            on: opened,
                            image: opened as? VImage,
                            crashSim: crashSettings,
                            record: crashTesting.recordPath
                        )
                    } catch {
                        try? opened.close()
                        throw error
                    }
                    if stack.crashSim != nil || stack.recorder != nil { crashTestedExports[name] = stack }
                    exports.append(
                        NBDExport(
                            name: name,
                            description: (try? RBDSpec(parsing: path).description) ?? path,  // never a key=
                            device: stack.device,
                            readOnly: readOnly,
                            metaContexts: contexts
                        )
                    )
                }
            } catch {
                for export in exports { try? export.device.close() }
                throw error
            }

            var listeners: [NBDServerConfiguration.Listener] = NBDServer.socketActivationDescriptors().map {
                .inherited(fileDescriptor: $0)
            }
            if listeners.isEmpty {
                if let socket { listeners.append(.unixSocket(path: socket)) }
                if let port { listeners.append(.tcp(host: bind ?? "127.0.0.1", port: port)) }
            }
            var configuration = NBDServerConfiguration(listeners: listeners)
            if images.contains(where: RBDSpec.isRBD) {
                // A request to a cluster waits a network round trip on its pool thread (the device API is
                // synchronous): enough threads to keep a client's whole queue (depth 32 and more) in flight.
                configuration.deviceThreads = max(configuration.deviceThreads, 64)
            }
            configuration.maximumConnections = maxConnections
            configuration.handshakeTimeout = .seconds(Int64(handshakeTimeout))
            configuration.tls = tls
            // The exports are local images: their calls answer from the page cache or a local disk. 5 ms is
            // far beyond an SSD's read, and a thread that merely lost its CPU on a busy machine rarely waits
            // that long twice in a row (with 1 ms it did, often, at a load of 10 on 2 cores).
            configuration.inlineBudget = .milliseconds(5)
            let server = NBDServer(exports: exports, configuration: configuration, logger: logger)

            // Signals become an async stream before the server starts, so none is lost.
            let (signals, sources) = Self.watchSignals([SIGINT, SIGTERM, SIGUSR1])
            do {
                try await server.start()
            } catch {
                for export in exports { try? export.device.close() }
                throw error
            }

            // The contexts a backup client must ask for by name; base:allocation and depth go unsaid.
            let bitmapContexts = (bitmaps + snapshotRanges).map { ", qemu:dirty-bitmap:\($0)" }.joined()
            let mode = writable ? "read-write" : "read-only"
            let what =
                exports.count == 1
                ? "\(images[0]) as '\(exports[0].name)' (\(mode), \(ByteSize.format(exports[0].device.size))\(bitmapContexts))"
                : "\(exports.count) images as \(exports.map { "'\($0.name)'" }.joined(separator: ", ")) (\(mode)\(bitmapContexts))"
            var security = ""
            if let tls {
                security = tls.mode == .required ? " (TLS required" : " (TLS offered"
                security += tls.verifiesPeer ? ", client certificates verified)" : ")"
            }
            let addresses = server.boundAddresses.joined(separator: ", ")
            printToStandardError("vdisk: serving \(what) on \(addresses)\(security)")
            for (name, wrapped) in crashTestedExports.sorted(by: { $0.key < $1.key }) {
                printToStandardError("vdisk: '\(name)': \(wrapped)")
            }
            var control: ControlServer?
            if let controlSocket {
                do {
                    let exports = crashTestedExports
                    control = try ControlServer(path: controlSocket) { request in
                        Self.answerControl(request, exports: exports, logger: logger)
                    }
                } catch {
                    try? await server.shutdown()
                    throw error
                }
            }
            defer { control?.stop() }

            let statsTask: Task<Void, Never>? = statsFile.map { path in
                let interval = statsInterval
                return Task {
                    while !Task.isCancelled {
                        try? await Task.sleep(for: .seconds(interval))
                        Self.writeStats(server.statsJSON(), to: path)
                    }
                }
            }
            for await signal in signals {
                if signal == SIGUSR1 {
                    if let statsFile { Self.writeStats(server.statsJSON(), to: statsFile) }
                    continue
                }
                logger.notice("stopping on signal \(signal)")
                break
            }
            statsTask?.cancel()
            defer { withExtendedLifetime(sources) {} }
            try await server.shutdown()
            if let statsFile { Self.writeStats(server.statsJSON(), to: statsFile) }
        }

        /// Answers a control request (`vdisk crash`, `vdisk mark`, a ping) for the exports.
        private static func answerControl(
            _ request: BusRequest,
            exports: [String: CrashTestingStack],
            logger: Logger
        ) -> BusResponse {
            if request.op == .ping { return BusResponse(ok: true, pid: getpid()) }
            guard let name = request.target, let export = exports[name] else {
                let known = exports.keys.sorted().map { "'\($0)'" }.joined(separator: ", ")
                return .failure(
                    "no export named '\(request.target ?? "")' is served with --crash-sim or --record"
                        + (known.isEmpty ? "" : " (these are: \(known))")
                )
            }
            do {
                return try CrashControl.answer(
                    request,
                    disk: name,
                    crashSim: export.crashSim,
                    recorder: export.recorder,
                    log: { logger.notice("\($0)") }
                )
            } catch {
                return .failure("\(error)")
            }
        }

        /// Delivers the given signals as a stream instead of letting them kill the process.
        private static func watchSignals(_ numbers: [Int32]) -> (AsyncStream<Int32>, [any DispatchSourceSignal]) {
            let (stream, continuation) = AsyncStream<Int32>.makeStream()
            var sources: [any DispatchSourceSignal] = []
            for number in numbers {
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
                source.setEventHandler { continuation.yield(number) }
                source.resume()
                sources.append(source)
            }
            return (stream, sources)
        }

        /// Replaces the stats file atomically (write a temporary file, then rename).
        private static func writeStats(_ text: String, to path: String) {
            let temporary = path + ".tmp"
            let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            guard fd >= 0 else { return }
            var bytes = Array(text.utf8)
            _ = Glibc.write(fd, &bytes, bytes.count)
            close(fd)
            rename(temporary, path)
        }
    }
}
