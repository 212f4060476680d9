import BlockIO
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

// Design notes
// ------------
// The server owns: one event loop group (sockets and protocol), one `NIOThreadPool` (blocking device
// calls), the listening channels, the table of live connections, and the exports' devices.
//
//   listener (unix / TCP / systemd fd 3) --accept--> connection pipeline:
//       NBDHandshakeHandler                     (negotiation, 10 s timeout)
//   after STARTTLS (with `configuration.tls`), in front of everything:
//       NIOSSLServerHandler
//   then
//       NBDReplyWriter <- ByteToMessageHandler(NBDRequestDecoder) <- NBDTransmissionHandler --> thread pool
//
// The TLS rules are the same on every listener, unix sockets included: a client cannot see which listener
// a proxy or a socket-activation unit put it on, so one rule per server is the only one it can rely on.
//
// Lifecycle: `start()` binds every listener (and fails as a whole if one cannot bind); `shutdown()` stops
// accepting, asks every connection to drain (in-flight requests finish and are answered), waits for them
// (forcing the stragglers closed after `drainTimeout`), then flushes and closes every device so images
// are left clean. Exports' devices belong to the server from `init` on.

/// How `NBDServer` listens and how much it accepts.
public struct NBDServerConfiguration: Sendable {
    public enum Listener: Sendable, Hashable, CustomStringConvertible {
        /// A unix socket created with mode 0600. A stale socket file is replaced, a live one is an error.
        case unixSocket(path: String)
        /// TCP on `host:port`; port 0 picks a free port (see `NBDServer.boundAddresses`).
        case tcp(host: String, port: Int)
        /// An already bound and listening socket, such as systemd's fd 3.
        case inherited(fileDescriptor: CInt)

        public var description: String {
            switch self {
            case .unixSocket(let path): return "unix:\(path)"
            case .tcp(let host, let port): return "tcp:\(host):\(port)"
            case .inherited(let fd): return "fd:\(fd)"
            }
        }
    }

    public var listeners: [Listener]
    /// Connections beyond this are closed on accept.
    public var maximumConnections: Int = 64
    /// A connection that has not finished negotiating after this long is closed.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// How long shutdown waits for connections to drain before closing them hard.
    public var drainTimeout: TimeAmount = .seconds(30)
    /// Threads running device calls.
    public var deviceThreads: Int = max(4, System.coreCount * 2)
    /// Requests of one connection running at once before the server stops reading from it.
    public var maximumInFlightPerConnection: Int = 64
    /// When set, a small READ or WRITE that is alone in flight on its connection (depth 1) runs on the
    /// event loop instead of the thread pool, saving two thread wake-ups per request, and two such calls in
    /// a row that take longer than this send the connection back to the pool for a second. Only for devices
    /// that answer from memory or local storage: a call that waits on a network would stall every
    /// connection of that event loop. nil (the default): every request goes through the pool.
    public var inlineBudget: TimeAmount?
    /// TLS through NBD_OPT_STARTTLS, optional or required; nil for none (STARTTLS is then unsupported).
    public var tls: NBDTLSConfiguration?

    public init(listeners: [Listener]) {
        self.listeners = listeners
    }
}

/// A failure to start or run the server (listeners, sockets), with a message for humans.
public struct NBDServerError: Error, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// An NBD server exporting block devices (see the design notes above).
public final class NBDServer: Sendable {
    /// The exports, in order; the first is also served under the empty name. The bus adds and removes
    /// exports while the server runs; a connection sees the list as it was when it connected.
    public var exports: [NBDExport] { exportTable.withLock { $0 } }
    private let exportTable: Mutex<[NBDExport]>
    public let configuration: NBDServerConfiguration
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let threadPool: NIOThreadPool

    private struct State {
        var serverChannels: [any Channel] = []
        var connections: [ObjectIdentifier: any Channel] = [:]
        /// The export each connection in transmission uses (for `removeExport`).
        var connectionExports: [ObjectIdentifier: String] = [:]
        var boundAddresses: [String] = []
        var stopping = false
        var stopped = false
    }

    private let state = Mutex(State())

    /// - Parameters:
    ///   - exports: the first is also served under the empty name. Names are unique. `vdisk serve` passes at
    ///     least one; the bus starts with none and adds them with `addExport`.
    ///   - configuration: listeners and limits.
    ///   - logger: connection-level events go to `info`, refused requests to `debug`, device errors to
    ///     `warning`.
    public init(exports: [NBDExport], configuration: NBDServerConfiguration, logger: Logger) {
        precondition(Set(exports.map(\.name)).count == exports.count, "export names must be unique")
        self.exportTable = Mutex(exports)
        self.configuration = configuration
        self.logger = logger
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: min(2, System.coreCount))
        self.threadPool = NIOThreadPool(numberOfThreads: max(1, configuration.deviceThreads))
    }

    /// Where the server listens, one human-readable address per listener (`unix:/path`, `tcp:127.0.0.1:10809`).
    public var boundAddresses: [String] { state.withLock { $0.boundAddresses } }

    /// The TCP port of the first TCP listener (useful with port 0), or nil.
    public var tcpPort: Int? {
        state.withLock { s in s.serverChannels.lazy.compactMap { $0.localAddress?.port }.first }
    }

    /// Adds an export; clients that connect from now on can use it.
    /// - Throws: `NBDServerError` if the name is taken.
    public func addExport(_ export: NBDExport) throws {
        try exportTable.withLock { table in
            guard !table.contains(where: { $0.name == export.name }) else {
                throw NBDServerError("an export named '\(export.name)' already exists")
            }
            table.append(export)
        }
    }

    /// Withdraws an export and closes the connections using it. Its device is left open: whoever added
    /// the export owns it (the bus flushes and closes it on unplug).
    public func removeExport(named name: String) {
        exportTable.withLock { $0.removeAll { $0.name == name } }
        let victims = state.withLock { s in
            s.connectionExports.filter { $0.value == name }.compactMap { s.connections[$0.key] }
        }
        for channel in victims { channel.close(promise: nil) }
    }

    /// Number of connections currently open.
    public var connectionCount: Int { state.withLock { $0.connections.count } }

    /// Binds every listener and starts accepting.
    /// - Throws: `NBDServerError` if a listener cannot be set up; nothing is left listening then.
    public func start() async throws {
        threadPool.start()
        var channels: [any Channel] = []
        do {
            for listener in configuration.listeners {
                let channel = try await bind(listener)
                channels.append(channel)
                let address = describe(listener, channel)
                state.withLock {
                    $0.serverChannels.append(channel)
                    $0.boundAddresses.append(address)
                }
                logger.info("listening", metadata: ["address": "\(address)"])
            }
        } catch {
            for channel in channels { try? await channel.close() }
            try? await threadPool.shutdownGracefully()
            try? await group.shutdownGracefully()
            state.withLock { $0.stopped = true }
            if let error = error as? NBDServerError { throw error }
            throw NBDServerError("cannot listen: \(error)")
        }
    }

    private func describe(_ listener: NBDServerConfiguration.Listener, _ channel: any Channel) -> String {
        switch listener {
        case .unixSocket(let path): return "unix:\(path)"
        case .tcp(let host, _): return "tcp:\(host):\(channel.localAddress?.port ?? 0)"
        case .inherited(let fd): return "fd:\(fd)"
        }
    }

    private func bind(_ listener: NBDServerConfiguration.Listener) async throws -> any Channel {
        let isTCP: Bool
        if case .tcp = listener { isTCP = true } else { isTCP = false }
        var bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .childChannelInitializer { [self] channel in
                self.initialize(channel)
            }
        if isTCP {
            bootstrap = bootstrap.serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
        }
        switch listener {
        case .tcp(let host, let port):
            return try await bootstrap.bind(host: host, port: port).get()
        case .inherited(let fd):
            return try await bootstrap.withBoundSocket(fd).get()
        case .unixSocket(let path):
            try UnixSocketPath.prepare(path)
            // The socket file must never exist with looser permissions, even briefly: create it under a
            // restrictive umask, then chmod in case the file system ignored it.
            let previous = umask(0o177)
            defer { umask(previous) }
            let channel = try await bootstrap.bind(unixDomainSocketPath: path).get()
            chmod(path, 0o600)
            return channel
        }
    }

    /// Sets up a new connection; runs on its event loop.
    private func initialize(_ channel: any Channel) -> EventLoopFuture<Void> {
        let id = ObjectIdentifier(channel)
        let limit = configuration.maximumConnections
        let accepted = state.withLock { s -> Bool in
            guard !s.stopping, s.connections.count < limit else { return false }
            s.connections[id] = channel
            return true
        }
        var connectionLogger = self.logger
        connectionLogger[metadataKey: "peer"] = "\(channel.remoteAddress?.description ?? "unix")"
        let logger = connectionLogger
        guard accepted else {
            logger.warning("refusing connection: \(limit) connections already open or shutting down")
            return channel.close()
        }
        channel.closeFuture.whenComplete { [self] _ in
            state.withLock {
                $0.connections.removeValue(forKey: id)
                $0.connectionExports.removeValue(forKey: id)
            }
            logger.info("connection closed")
        }
        let exports = self.exports
        let threadPool = self.threadPool
        let inFlight = configuration.maximumInFlightPerConnection
        let deviceThreads = configuration.deviceThreads
        let inlineBudget = configuration.inlineBudget
        let handshake = NBDHandshakeHandler(
            exports: exports.map(\.negotiationDescription),
            tls: configuration.tls,
            timeout: configuration.handshakeTimeout,
            logger: logger
        ) { session in
            guard let export = exports.first(where: { $0.name == session.export.name }) else { return nil }
            self.state.withLock { $0.connectionExports[id] = export.name }
            export.stats.connectionOpened()
            var connectionLogger = logger
            connectionLogger[metadataKey: "export"] = "\(export.name)"
            return [
                NBDReplyWriter(),
                ByteToMessageHandler(NBDRequestDecoder()),
                NBDTransmissionHandler(
                    session: session,
                    export: export,
                    threadPool: threadPool,
                    logger: connectionLogger,
                    maximumInFlight: inFlight,
                    parallelism: deviceThreads,
                    inlineBudget: inlineBudget
                ),
            ]
        }
        do {
            try channel.pipeline.syncOperations.addHandler(handshake)
            return channel.eventLoop.makeSucceededFuture(())
        } catch {
            return channel.eventLoop.makeFailedFuture(error)
        }
    }

    /// Stops the server gracefully: no new connections, in-flight requests finish and are answered, then
    /// every device is flushed and closed. Safe to call more than once.
    /// - Throws: the first error from flushing or closing a device (every device is still closed).
    public func shutdown() async throws {
        let (servers, alreadyStopping) = state.withLock { s -> ([any Channel], Bool) in
            defer { s.stopping = true }
            return (s.serverChannels, s.stopping)
        }
        guard !alreadyStopping else { return }
        logger.info("shutting down")
        for channel in servers { try? await channel.close() }
        for (path) in configuration.listeners.compactMap({ listener -> String? in
            if case .unixSocket(let path) = listener { return path }
            return nil
        }) {
            unlink(path)
        }

        let connections = state.withLock { Array($0.connections.values) }
        for channel in connections {
            channel.pipeline.fireUserInboundEventTriggered(NBDServerShutdownEvent())
        }
        let deadline = NIODeadline.now() + configuration.drainTimeout
        for channel in connections {
            let timeout = channel.eventLoop.scheduleTask(deadline: deadline) { channel.close(promise: nil) }
            try? await channel.closeFuture.get()
            timeout.cancel()
        }

        var firstError: (any Error)?
        for export in exports {
            do {
                let device = export.device
                // close() flushes (the BlockDevice contract); a device whose own flush now fails (a
                // simulated disk after its power cut) is still closed.
                try await threadPool.runIfActive { try device.close() }
            } catch {
                logger.error("cannot close export", metadata: ["export": "\(export.name)", "error": "\(error)"])
                if firstError == nil { firstError = error }
            }
        }
        try? await threadPool.shutdownGracefully()
        try? await group.shutdownGracefully()
        state.withLock { $0.stopped = true }
        if let firstError { throw firstError }
    }

    /// The sockets systemd passed (`LISTEN_PID` is us, `LISTEN_FDS` ≥ 1): fd 3 onwards. The variables are
    /// removed (unless `consume` is false) so child processes do not adopt them too.
    public static func socketActivationDescriptors(consume: Bool = true) -> [CInt] {
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
            let fdsText = getenv("LISTEN_FDS").map({ String(cString: $0) }),
            let pid = Int32(pidText), pid == getpid(), let count = Int32(fdsText), count >= 1
        else { return [] }
        guard consume else { return (0..<count).map { 3 + $0 } }
        unsetenv("LISTEN_PID")
        unsetenv("LISTEN_FDS")
        unsetenv("LISTEN_FDNAMES")
        return (0..<count).map { 3 + $0 }
    }

    /// The counters of every export as a JSON document (for `vdisk serve --stats-file`).
    public func statsJSON() -> String {
        var lines: [String] = []
        for export in exports {
            let s = export.stats.snapshot
            let average = s.requests == 0 ? 0 : s.totalLatencyNanoseconds / s.requests
            let fields: [(String, String)] = [
                ("name", export.name.jsonQuoted), ("size", "\(export.device.size)"),
                ("connections", "\(s.connections)"), ("requests", "\(s.requests)"), ("reads", "\(s.reads)"),
                ("writes", "\(s.writes)"), ("bytes-read", "\(s.bytesRead)"), ("bytes-written", "\(s.bytesWritten)"),
                ("errors", "\(s.errors)"), ("total-latency-ns", "\(s.totalLatencyNanoseconds)"),
                ("average-latency-ns", "\(average)"),
            ]
            lines.append("    {" + fields.map { "\"\($0.0)\": \($0.1)" }.joined(separator: ", ") + "}")
        }
        return "{\n  \"connections\": \(connectionCount),\n  \"exports\": [\n" + lines.joined(separator: ",\n")
            + "\n  ]\n}\n"
    }
}

/// Checks around a unix socket path before binding.
enum UnixSocketPath {
    /// Removes a stale socket file at `path` (one nothing listens on); refuses to touch anything else.
    /// - Throws: `NBDServerError` if the path is a live socket or not a socket at all.
    static func prepare(_ path: String) throws {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }  // nothing there
        guard info.st_mode & S_IFMT == S_IFSOCK else {
            throw NBDServerError("\(path) exists and is not a socket")
        }
        if isListening(path) {
            throw NBDServerError("\(path) is in use by another server")
        }
        if unlink(path) != 0 && errno != ENOENT {
            throw NBDServerError("cannot remove stale socket \(path): \(describeErrno(errno))")
        }
    }

    /// True if connecting to the socket at `path` succeeds.
    static func isListening(_ path: String) -> Bool {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return false }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        return result == 0
    }
}
