// Design notes
// ------------
// A device *under* the engine that can stop one chosen request in its tracks, so a test forces the
// interleaving it wants to check instead of hoping a sleep lands it:
//
//   test:    let hold = device.hold(.write) { $0.overlaps(range) }
//   thread:  image.write(...)      ──► engine plans ──► device.write ── blocks here ──┐
//   test:    hold.waitUntilReached()                                                   │
//   test:    ... runs the racing operation on another thread ...                       │
//   test:    hold.release()        ─────────────────────────────────────────────────── ┘ ──► write lands
//
// The device also keeps a log of every call (kind, range, and whether it started or completed), so a
// test can check the order in which things reached the "disk", e.g. that a close's final flush came
// after a write that was in flight when the close began.

import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// A wrapper device that can hold a chosen request until the test releases it, and logs every call.
public final class HoldingDevice: BlockDevice, @unchecked Sendable {
    public enum Kind: String, Sendable { case read, write, writeZeroes, discard, flush, close }

    /// One call as it reached the device.
    public struct Call: Sendable, CustomStringConvertible {
        public var kind: Kind
        public var offset: UInt64
        public var count: UInt64
        /// False when the call began, true when it returned.
        public var completed: Bool

        public func overlaps(_ range: Range<UInt64>) -> Bool {
            offset < range.upperBound && range.lowerBound < offset + count
        }

        public var description: String { "\(kind) \(offset)+\(count)\(completed ? " done" : "")" }
    }

    /// A pending hold: the first call of its kind that matches blocks until `release()`.
    public final class Hold: @unchecked Sendable {
        fileprivate let kind: Kind
        fileprivate let matches: @Sendable (Call) -> Bool
        fileprivate var reached = false
        fileprivate var released = false
        fileprivate var call: Call?
        fileprivate unowned let device: HoldingDevice

        fileprivate init(device: HoldingDevice, kind: Kind, matches: @escaping @Sendable (Call) -> Bool) {
            self.device = device
            self.kind = kind
            self.matches = matches
        }

        /// Waits until a matching call is blocked on this hold. Returns false after `seconds` (a test
        /// failure, never a timing assumption: the deadline only stops a broken test from hanging).
        @discardableResult
        public func waitUntilReached(seconds: Double = 30) -> Bool {
            device.waitFor(seconds: seconds) { self.reached }
        }

        /// Lets the held call (and any later one) proceed.
        public func release() {
            device.monitor.withLock {
                released = true
                device.monitor.broadcast()
            }
        }

        /// The call that was held, once reached.
        public var heldCall: Call? { device.monitor.withLock { call } }
    }

    public let inner: any BlockDevice
    fileprivate let monitor = Monitor()
    private var holds: [Hold] = []
    private var calls: [Call] = []

    public init(_ inner: any BlockDevice) { self.inner = inner }

    /// Arms a hold on the next call of `kind` for which `matches` is true.
    public func hold(_ kind: Kind, where matches: @escaping @Sendable (Call) -> Bool = { _ in true }) -> Hold {
        monitor.withLock {
            let hold = Hold(device: self, kind: kind, matches: matches)
            holds.append(hold)
            return hold
        }
    }

    /// Every call so far, in the order it began or completed.
    public var log: [Call] { monitor.withLock { calls } }

    /// Waits until `condition` (evaluated under the device's lock) holds, or `seconds` pass.
    fileprivate func waitFor(seconds: Double, _ condition: () -> Bool) -> Bool {
        let deadline = Deadline(seconds: seconds)
        return monitor.withLock {
            while !condition() {
                if !monitor.wait(until: deadline) { return condition() }
            }
            return true
        }
    }

    private func perform<T>(_ kind: Kind, _ offset: UInt64, _ count: UInt64, _ body: () throws -> T) rethrows -> T {
        let call = Call(kind: kind, offset: offset, count: count, completed: false)
        monitor.withLock {
            calls.append(call)
            if let index = holds.firstIndex(where: { $0.kind == kind && $0.matches(call) }) {
                let hold = holds.remove(at: index)
                hold.reached = true
                hold.call = call
                monitor.broadcast()
                while !hold.released { monitor.wait() }
            }
        }
        defer {
            monitor.withLock {
                var done = call
                done.completed = true
                calls.append(done)
                monitor.broadcast()
            }
        }
        return try body()
    }

    public var size: UInt64 { inner.size }
    public var capabilities: BlockDeviceCapabilities { inner.capabilities }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try perform(.read, offset, UInt64(buffer.count)) { try inner.read(into: buffer, at: offset) }
    }

    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64, fua: Bool) throws {
        try perform(.write, offset, UInt64(buffer.count)) { try inner.write(buffer, at: offset, fua: fua) }
    }

    public func writeZeroes(at offset: UInt64, count: UInt64, mayUnmap: Bool, fast: Bool) throws {
        try perform(.writeZeroes, offset, count) {
            try inner.writeZeroes(at: offset, count: count, mayUnmap: mayUnmap, fast: fast)
        }
    }

    public func discard(at offset: UInt64, count: UInt64) throws {
        try perform(.discard, offset, count) { try inner.discard(at: offset, count: count) }
    }

    public func flush() throws { try perform(.flush, 0, 0) { try inner.flush() } }

    public func extents(at offset: UInt64, count: UInt64) throws -> [Extent] {
        try inner.extents(at: offset, count: count)
    }

    public func close() throws { try perform(.close, 0, 0) { try inner.close() } }
}

/// A point in time on the monotonic clock, for bounded waits in tests.
public struct Deadline: Sendable {
    let time: timespec

    public init(seconds: Double) {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        let nanoseconds = Int(now.tv_nsec) + Int((seconds - seconds.rounded(.down)) * 1e9)
        time = timespec(
            tv_sec: now.tv_sec + Int(seconds.rounded(.down)) + nanoseconds / 1_000_000_000,
            tv_nsec: nanoseconds % 1_000_000_000
        )
    }

    public var hasPassed: Bool {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return now.tv_sec > time.tv_sec || (now.tv_sec == time.tv_sec && now.tv_nsec >= time.tv_nsec)
    }
}

extension Monitor {
    /// Waits for `broadcast()` or `deadline`; false once the deadline has passed. Lock held.
    func wait(until deadline: Deadline) -> Bool {
        if deadline.hasPassed { return false }
        // pthread_cond_timedwait takes CLOCK_REALTIME by default; a short wait and a re-check of the
        // monotonic deadline keeps this independent of the condition's clock.
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        var until = now
        until.tv_nsec += 10_000_000
        if until.tv_nsec >= 1_000_000_000 {
            until.tv_sec += 1
            until.tv_nsec -= 1_000_000_000
        }
        timedWait(until: until)
        return !deadline.hasPassed
    }
}

/// A thread for tests: runs a throwing body, keeps its error instead of crashing the test runner.
public final class TestThread: @unchecked Sendable {
    private let monitor = Monitor()
    private var finished = false
    private var failure: (any Error)?
    private var thread = pthread_t()
    private let body: @Sendable () throws -> Void

    /// Starts `body` on a new thread.
    public init(_ body: @escaping @Sendable () throws -> Void) {
        self.body = body
        let box = Unmanaged.passRetained(self).toOpaque()
        pthread_create(
            &thread,
            nil,
            { raw in
                let me = Unmanaged<TestThread>.fromOpaque(raw!).takeRetainedValue()
                var error: (any Error)?
                do { try me.body() } catch let e { error = e }
                me.monitor.withLock {
                    me.failure = error
                    me.finished = true
                    me.monitor.broadcast()
                }
                return nil
            },
            box
        )
    }

    /// Whether the body has returned.
    public var isFinished: Bool { monitor.withLock { finished } }

    /// Waits for the body to return and rethrows its error.
    public func join() throws {
        pthread_join(thread, nil)
        if let failure = monitor.withLock({ failure }) { throw failure }
    }

    /// Runs `body(i)` on `count` threads, waits for all, and rethrows the first error.
    public static func run(_ count: Int, _ body: @escaping @Sendable (Int) throws -> Void) throws {
        let threads = (0..<count).map { i in TestThread { try body(i) } }
        var first: (any Error)?
        for t in threads {
            do { try t.join() } catch { first = first ?? error }
        }
        if let first { throw first }
    }
}

/// Waits until `condition` holds, checking it every millisecond, for at most `seconds`. For conditions
/// the test cannot be told about (state inside another component): a marker to wait on, not a delay.
@discardableResult
public func waitUntil(seconds: Double = 30, _ condition: () -> Bool) -> Bool {
    let deadline = Deadline(seconds: seconds)
    while !condition() {
        if deadline.hasPassed { return false }
        usleep(1000)
    }
    return true
}
