#if canImport(Glibc)
import Glibc
#endif

/// A mutex with a condition variable: the engine keeps metadata state under it and lets requests that
/// touch a cluster being allocated by another request wait for it.
///
/// `Synchronization.Mutex` has no condition variable, so this wraps pthreads directly.
public final class Monitor: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>

    public init() {
        mutex = .allocate(capacity: 1)
        condition = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        condition.deallocate()
    }

    public func lock() { pthread_mutex_lock(mutex) }
    public func unlock() { pthread_mutex_unlock(mutex) }

    /// Waits for `broadcast()`; call with the lock held.
    public func wait() { pthread_cond_wait(condition, mutex) }
    /// Waits for `broadcast()` or until `deadline` (CLOCK_REALTIME) passes; call with the lock held.
    public func timedWait(until deadline: timespec) {
        var deadline = deadline
        _ = pthread_cond_timedwait(condition, mutex, &deadline)
    }
    /// Wakes every waiter; call with the lock held.
    public func broadcast() { pthread_cond_broadcast(condition) }

    @inlinable
    public func withLock<T>(_ body: () throws -> T) rethrows -> T {
        lock()
        defer { unlock() }
        return try body()
    }
}
