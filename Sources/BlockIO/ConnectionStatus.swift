/// The state of the connection behind a device whose storage is elsewhere (a remote NBD export), as the
/// last request found it. A device that never had a connection has none.
public struct ConnectionStatus: Codable, Sendable, Hashable {
    public enum State: String, Codable, Sendable {
        /// The last request was answered.
        case connected
        /// A connection broke; requests wait while new ones are tried, until the reconnect timeout.
        case reconnecting
        /// The reconnect timeout passed without a connection; requests fail at once (each still tries to
        /// connect once, so the device comes back when the server does).
        case failed
    }

    public var state: State
    /// When the current `reconnecting` or `failed` state began, in seconds since 1970 (nil when connected).
    public var since: Double?
    /// Why the last attempt to connect failed, while not connected.
    public var lastError: String?
    /// How many times a broken connection has been replaced by a new one.
    public var reconnects: UInt64
    /// How long requests wait for a lost server, in seconds.
    public var reconnectTimeout: Double

    public init(
        state: State,
        since: Double? = nil,
        lastError: String? = nil,
        reconnects: UInt64 = 0,
        reconnectTimeout: Double
    ) {
        self.state = state
        self.since = since
        self.lastError = lastError
        self.reconnects = reconnects
        self.reconnectTimeout = reconnectTimeout
    }
}

/// A device that reaches its storage over a connection which can break, and says how it is doing.
public protocol ConnectionStatusReporting: Sendable {
    var connectionStatus: ConnectionStatus { get }
}
