// Design notes
// ------------
// The I/O gate counts every request of a writable image from the moment it is planned (under the engine
// lock) until its host I/O completes (outside it): reads, writes in place and allocating writes alike.
// Two things rely on it.
//
// 1. Operations that change what a planned request relies on — snapshot create/apply/delete, resize,
//    commit's unallocation, rebase, close — *drain* it: they stop new requests from being planned, wait
//    until every counted request has completed, run, and let planning resume. So a write planned in place
//    cannot land in a cluster a snapshot has just made shared, and close never closes the file under a
//    running write.
//
// 2. Reuse of freed clusters. A flush must not wait for all I/O, so frees are not drained; instead a
//    freed cluster is not reused until every request planned before it was unlinked has completed.
//    Requests are counted in two buckets by epoch:
//
//       epoch e:    new requests enter bucket e % 2;  unlinks made now are tagged e
//       advance:    e -> e + 1 only when bucket (e - 1) % 2 is empty (so bucket (e + 1) % 2 starts empty)
//       reuse:      a free tagged t is applied once the epoch has reached t + 2: by then the buckets of
//                   t - 1 and t have both drained, and those hold every request planned before the unlink
//
//    With no concurrent requests both advances happen at once, so a lone writer frees exactly as before.
//
// Entering happens under the engine lock (so epochs and unlinks are ordered by it); leaving is one atomic
// decrement with no lock, unless a drain is waiting, in which case the last request out wakes it.

import Synchronization

/// Counts requests in flight by epoch bucket (see the design notes above).
final class IOGate: Sendable {
    private let bucket0 = Atomic<Int>(0)
    private let bucket1 = Atomic<Int>(0)
    /// Set while an operation waits for the gate to empty; the last request out then wakes it.
    let drainWaiting = Atomic<Bool>(false)

    /// A request's place in the gate.
    struct Ticket: Sendable {
        fileprivate let bucket: Int
    }

    /// Counts a request planned in `epoch`. Engine lock held.
    @inline(__always)
    func enter(epoch: UInt64) -> Ticket {
        let bucket = Int(epoch & 1)
        if bucket == 0 {
            bucket0.add(1, ordering: .sequentiallyConsistent)
        } else {
            bucket1.add(1, ordering: .sequentiallyConsistent)
        }
        return Ticket(bucket: bucket)
    }

    /// Uncounts a request whose I/O has completed. Returns true when a drain may be waiting for it.
    @inline(__always)
    func leave(_ ticket: Ticket) -> Bool {
        let left =
            ticket.bucket == 0
            ? bucket0.subtract(1, ordering: .sequentiallyConsistent).newValue
            : bucket1.subtract(1, ordering: .sequentiallyConsistent).newValue
        return left == 0 && drainWaiting.load(ordering: .sequentiallyConsistent)
    }

    /// Whether no request is in flight.
    var isEmpty: Bool {
        count(0) == 0 && count(1) == 0
    }

    /// Moves `epoch` on as far as the buckets allow (at most two steps). Engine lock held.
    func advance(_ epoch: inout UInt64) {
        for _ in 0..<2 {
            guard count(Int((epoch &+ 1) & 1)) == 0 else { return }
            epoch &+= 1
        }
    }

    /// Requests in flight in one bucket.
    func count(_ bucket: Int) -> Int {
        bucket == 0
            ? bucket0.load(ordering: .sequentiallyConsistent) : bucket1.load(ordering: .sequentiallyConsistent)
    }
}
