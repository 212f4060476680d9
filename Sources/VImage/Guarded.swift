// Design notes
// ------------
// The engine's mutable state is one value, `Metadata`, stored inside a `Guarded`: the only way to reach it
// is `withLock { state in ... }`, so code outside the lock cannot touch it by accident (the compiler, not a
// comment, keeps it there). Waiting is part of taking the lock, never done in the middle of a critical
// section: `withLock(waitingUntil:)` re-checks a predicate on the state each time it wakes and runs the
// body once it holds, so a body always sees the state in one piece.

import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// A value reachable only while its lock is held, with a condition to wait on.
final class Guarded<State>: @unchecked Sendable {
    private let monitor = Monitor()
    private var state: State

    init(_ state: State) { self.state = state }

    /// Runs `body` with the lock held. With `broadcast`, wakes every waiter before unlocking (after a
    /// change that may satisfy a `waitingUntil` predicate).
    @inline(__always)
    func withLock<R>(broadcast: Bool = false, _ body: (inout State) throws -> R) rethrows -> R {
        monitor.lock()
        defer {
            if broadcast { monitor.broadcast() }
            monitor.unlock()
        }
        return try body(&state)
    }

    /// Takes the lock, waits (releasing it meanwhile) until `ready` holds, then runs `body`.
    @inline(__always)
    func withLock<R>(
        waitingUntil ready: (borrowing State) -> Bool,
        broadcast: Bool = false,
        _ body: (inout State) throws -> R
    ) rethrows -> R {
        monitor.lock()
        defer {
            if broadcast { monitor.broadcast() }
            monitor.unlock()
        }
        while !Self.holds(ready, &state) { monitor.wait() }
        return try body(&state)
    }

    /// Evaluates `ready` on the state in place: passed straight from the stored property, the state would
    /// be copied (a retain of every reference in it, on every request).
    @inline(__always)
    private static func holds(_ ready: (borrowing State) -> Bool, _ state: inout State) -> Bool {
        ready(state)
    }

    /// Wakes every waiter.
    func broadcast() {
        monitor.lock()
        monitor.broadcast()
        monitor.unlock()
    }
}
