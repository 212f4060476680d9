// Design notes
// ------------
// A server restart must look like a slow disk, not a dead one. When a request finds its connection broken
// (the server closed it, a send or receive failed, a reply timed out, or the server answered ESHUTDOWN),
// the request is held while new connections are tried, with a growing pause between attempts (50 ms,
// doubling, at most 1 s), until the outage's deadline: `timeout` after a request first found the server
// gone. Once a connection is up, the request is sent again on it. That is safe because every NBD command
// is idempotent (a write puts the same bytes at the same place again, a flush flushes again), and needed,
// because a request whose reply was lost may or may not have been carried out.
//
// When the deadline passes, the waiting requests fail with EIO and the link is `failed`: from then on a
// request makes one attempt and fails at once if it cannot connect, so a server that stays away does not
// make every request wait the whole timeout, yet the disk comes back by itself when the server does. The
// first request answered ends the outage.
//
//   connected --(a request finds its connection broken)--> reconnecting (since T) --(answered)--> connected
//                                                               |
//                                                          T + timeout
//                                                               v
//                                                            failed --(a request gets through)--> connected
//
// A restarted server may also have lost writes it had acknowledged but not yet flushed (a `vdisk serve`
// killed with -9 keeps its allocation metadata in memory until a flush; a host that lost power keeps
// nothing). The file system above considers those writes done and will never send them again, so carrying
// on would corrupt it silently. So the client keeps every change acknowledged since the last flush that
// completed (`UnflushedChanges`: write data, write-zeroes and trims, in acknowledgement order, bounded by
// flushing on its own when they exceed 64 MiB), and a new connection first writes them all again and
// flushes, before any request uses it. That runs under the exclusive side of `Gate` while every request
// runs under the shared side, so no newer write can land between the replayed ones and be overwritten by
// an older one. A flush drops the changes acknowledged before it was sent, the ones it covers.
//
// Never forever: a request's deadline is fixed at its first failure, whatever other requests do meanwhile
// (a server that accepts connections and then drops each one carrying this request cannot keep it going,
// even if other requests get through and end the outage), every connection attempt is bounded in time
// (connect, TLS and negotiation included), and `close()` ends the waits.

import BlockIO
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// How long a remote export's requests wait for a server that went away.
public struct NBDReconnectPolicy: Sendable, Hashable {
    /// How long requests wait, from the moment a request finds the connection broken, for the server to
    /// accept a new connection before they fail with EIO. Zero means no waiting: one immediate attempt.
    public var timeout: Duration

    /// The default: long enough for a restarted server (a service restart, an upgrade, a failover) to come
    /// back, and shorter than the kernel's hung-task warning (120 s), so that a server that is gone for good
    /// shows up as I/O errors before the kernel reports blocked tasks.
    public static let defaultTimeout: Duration = .seconds(60)

    /// The pause after the first failed attempt; it doubles after each further one, up to `maximumPause`.
    static let firstPause: Duration = .milliseconds(50)
    static let maximumPause: Duration = .seconds(1)
    /// A connection attempt may always take this long, even when the deadline is nearer (or past, for the
    /// one attempt of a failed link): a TCP handshake with a live server needs a moment.
    static let minimumAttemptTime: Duration = .seconds(1)

    /// - Parameter timeout: must not be negative.
    public init(timeout: Duration = Self.defaultTimeout) {
        precondition(timeout >= .zero, "a negative reconnect timeout")
        self.timeout = timeout
    }

    /// The pause before attempt `attempt` (the first attempt, 0, has none).
    static func pause(before attempt: Int) -> Duration {
        guard attempt > 0 else { return .zero }
        return min(firstPause * (1 << min(attempt - 1, 16)), maximumPause)
    }
}

/// The state of the connection to one export, shared by all its requests (see the design notes).
final class NBDLink: Sendable {
    private struct State {
        /// When a request first found the server gone, in this outage; nil while connected.
        var outageStart: ContinuousClock.Instant?
        /// The wall-clock time the current state began (reported, never computed with).
        var since: Double?
        var failed = false
        var lastError: String?
        var reconnects: UInt64 = 0
    }

    let policy: NBDReconnectPolicy
    private let state = Mutex(State())
    /// True while an outage is on: lets every answered request skip the lock when nothing needs ending.
    private let down = Atomic<Bool>(false)

    init(policy: NBDReconnectPolicy) {
        self.policy = policy
    }

    /// A request found its connection broken at `now`: the deadline for its reconnecting. A failed link
    /// gives the request no time (one attempt); otherwise the outage's deadline. An outage begins with its
    /// first failure, so no request waits longer than `timeout` after its own.
    func brokenConnectionFound(at now: ContinuousClock.Instant) -> ContinuousClock.Instant {
        state.withLock { state in
            down.store(true, ordering: .relaxed)
            if state.failed { return now }
            if state.outageStart == nil {
                state.outageStart = now
                state.since = wallClock()
            }
            return state.outageStart! + policy.timeout
        }
    }

    func attemptFailed(_ error: any Error) {
        state.withLock { $0.lastError = "\(error)" }
    }

    func reconnected() {
        state.withLock { $0.reconnects += 1 }
    }

    /// A request waited until its deadline: the link is failed (from now, if it was not already).
    func gaveUp() {
        state.withLock { state in
            guard !state.failed else { return }
            state.failed = true
            state.since = wallClock()
        }
    }

    /// A request was answered: any outage is over.
    func requestAnswered() {
        guard down.load(ordering: .relaxed) else { return }
        state.withLock { state in
            state.outageStart = nil
            state.failed = false
            state.since = nil
            state.lastError = nil
            down.store(false, ordering: .relaxed)
        }
    }

    var lastError: String? { state.withLock { $0.lastError } }

    var status: ConnectionStatus {
        state.withLock { state in
            let current: ConnectionStatus.State =
                state.failed ? .failed : state.outageStart == nil ? .connected : .reconnecting
            return ConnectionStatus(
                state: current,
                since: state.since,
                lastError: current == .connected ? nil : state.lastError,
                reconnects: state.reconnects,
                reconnectTimeout: policy.timeout.seconds
            )
        }
    }

    private func wallClock() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
    }
}

extension Duration {
    /// The duration in seconds, as a floating-point number.
    var seconds: Double {
        let (seconds, attoseconds) = components
        return Double(seconds) + Double(attoseconds) / 1e18
    }

    /// The duration as a `timeval`, for socket timeouts (at least 1 µs: zero would mean "no timeout").
    var timeval: timeval {
        let microseconds = max(1, Int64(seconds * 1e6))
        return Glibc.timeval(tv_sec: Int(microseconds / 1_000_000), tv_usec: Int(microseconds % 1_000_000))
    }
}

/// The changes to the export acknowledged since the last flush that completed, in acknowledgement order:
/// what a new connection writes again, in case the server lost them (see the design notes).
struct UnflushedChanges {
    enum Change {
        case write(offset: UInt64, data: [UInt8])
        case zeroes(offset: UInt64, length: UInt32, noHole: Bool)
        case trim(offset: UInt64, length: UInt32)
    }

    private(set) var changes: [(sequence: UInt64, change: Change)] = []
    /// The write data held.
    private(set) var bytes = 0
    private var nextSequence: UInt64 = 1

    /// The sequence number of the newest change (0 before the first).
    var lastSequence: UInt64 { nextSequence - 1 }

    mutating func append(_ change: Change) {
        if case .write(_, let data) = change { bytes += data.count }
        changes.append((nextSequence, change))
        nextSequence += 1
    }

    /// Forgets the changes up to `sequence`: a flush sent after them completed.
    mutating func dropThrough(_ sequence: UInt64) {
        let count = changes.prefix { $0.sequence <= sequence }.count
        for (_, change) in changes[..<count] {
            if case .write(_, let data) = change { bytes -= data.count }
        }
        changes.removeFirst(count)
    }
}

/// A shared/exclusive lock that prefers the exclusive side: requests hold it shared while they talk to the
/// server, a replay holds it alone (see the design notes). Never held while waiting to reconnect.
final class Gate: Sendable {
    private struct State {
        var sharers = 0
        var exclusive = false
        var exclusiveWaiting = 0
    }

    private let monitor = Monitor()
    // Only touched with `monitor` held.
    nonisolated(unsafe) private var state = State()

    func shared<T>(_ body: () throws -> T) rethrows -> T {
        monitor.withLock {
            while state.exclusive || state.exclusiveWaiting > 0 { monitor.wait() }
            state.sharers += 1
        }
        defer {
            monitor.withLock {
                state.sharers -= 1
                if state.sharers == 0 { monitor.broadcast() }
            }
        }
        return try body()
    }

    func exclusive<T>(_ body: () throws -> T) rethrows -> T {
        monitor.withLock {
            state.exclusiveWaiting += 1
            while state.exclusive || state.sharers > 0 { monitor.wait() }
            state.exclusiveWaiting -= 1
            state.exclusive = true
        }
        defer {
            monitor.withLock {
                state.exclusive = false
                monitor.broadcast()
            }
        }
        return try body()
    }
}
