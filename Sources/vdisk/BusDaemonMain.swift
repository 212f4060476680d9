import BlockIO
import Foundation
import ImageFormats
import Logging
import NBDClient
import NBDServer
import VDiskBus
import VImage

#if canImport(Glibc)
import Glibc
#endif

/// Exports plugged disks on the bus's NBD server.
final class NBDBusExporter: BusExporter {
    let server: NBDServer
    let socketPath: String

    init(server: NBDServer, socketPath: String) {
        self.server = server
        self.socketPath = socketPath
    }

    func add(name: String, device: any BlockDevice, readOnly: Bool, offer: ExportOffer) throws -> [String] {
        let contexts = try MetaContexts.make(
            device: offer.backend,
            image: offer.image,
            bitmaps: offer.bitmaps,
            snapshotRanges: try offer.snapshotDiffs.map { try SnapshotRange(parsing: $0) },
            changing: offer.writable,
            path: offer.source
        )
        try server.addExport(
            NBDExport(
                name: name,
                description: "vdisk bus disk \(name)",
                device: device,
                readOnly: readOnly,
                metaContexts: contexts
            )
        )
        return contexts.map(\.name)
    }

    func remove(name: String) { server.removeExport(named: name) }

    func uri(for name: String) -> String { "nbd+unix:///\(name)?socket=\(socketPath)" }

    func negotiatedSocket(for name: String) throws -> NegotiatedSocket {
        let socket = try NBDNegotiatedSocket.connect(unixSocket: socketPath, export: name)
        return NegotiatedSocket(fd: socket.fd, size: socket.size, flags: socket.flags)
    }
}

/// Runs the bus in this process until it is told to stop: the control socket, the NBD server every disk is
/// exported on, and a clean unplug of everything at the end.
func runBusDaemon(paths: BusPaths, persist: Bool, toolTimeout: Double) async throws {
    // A parent may have started us with signals blocked (test runners do); the bus handles these.
    var handled = sigset_t()
    sigemptyset(&handled)
    for number in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&handled, number) }
    pthread_sigmask(SIG_UNBLOCK, &handled, nil)
    tuneAllocatorForServing()

    let log: @Sendable (String) -> Void = { printToStandardError("vdisk bus: \($0)") }
    let opener = BusOpener(
        openImage: { path, format, readOnly, snapshot, cache, discard in
            let format =
                try format.map { name -> ImageFormats.Format in
                    guard let f = ImageFormats.Format(rawValue: name) else {
                        throw BusError("unknown format '\(name)' (use vimg, raw or qcow2)")
                    }
                    return f
                } ?? ImageFormats.probe(path: path)
            return (
                try ImageFormats.open(
                    path: path,
                    format: format,
                    readOnly: readOnly,
                    snapshot: snapshot,
                    cache: cache,
                    discard: discard
                ),
                format.rawValue
            )
        },
        openRemote: { uri, readOnly, reconnectTimeout in
            try NBDClientDevice.connect(
                uri: uri,
                readOnly: readOnly,
                reconnect: NBDReconnectPolicy(
                    timeout: reconnectTimeout.map { .milliseconds(Int64($0 * 1000)) }
                        ?? NBDReconnectPolicy.defaultTimeout
                )
            )
        }
    )

    // The lock first: a second bus must fail before it touches the first one's sockets.
    let placeholder = Bus(paths: paths, opener: opener, exporter: nil, persist: false, log: log)
    let daemon = try BusDaemon(bus: placeholder)
    try daemon.prepare()

    var logger = Logger(label: "vdisk.bus.nbd")
    logger.logLevel = .warning
    let server = NBDServer(
        exports: [],
        configuration: NBDServerConfiguration(listeners: [.unixSocket(path: paths.nbdSocket)]),
        logger: logger
    )
    try await server.start()
    let bus = Bus(
        paths: paths,
        opener: opener,
        exporter: NBDBusExporter(server: server, socketPath: paths.nbdSocket),
        persist: persist,
        toolTimeout: toolTimeout,
        log: log
    )
    daemon.attach(bus)
    log("listening on \(paths.controlSocket), exporting on \(paths.nbdSocket) (pid \(getpid()))")
    bus.recover()
    bus.restoreState()
    await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
        // The control loop blocks; keep it off the cooperative pool.
        Thread.detachNewThread {
            daemon.run()
            done.resume()
        }
    }
    try? await server.shutdown()
    log("stopped")
}
