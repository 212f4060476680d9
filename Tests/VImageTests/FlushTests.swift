import BlockIO
import Testing
import VImageTestSupport

@testable import VImage

/// What a guest flush costs in host syncs, and group commit of concurrent flushes.
@Suite struct FlushTests {
    func setUp() throws -> (HoldingDevice, VImage) {
        let device = HoldingDevice(MemoryDevice(size: 0, growable: true))
        try VImage.create(on: device, virtualSize: 1 << 30, options: .init(clusterBits: 16))
        let image = try VImage.open(host: device, readOnly: false)
        // The session's first metadata write sets the dirty bit (one more sync, once): get it done.
        try image.write([UInt8](repeating: 1, count: 4096), at: 0)
        try image.flush()
        return (device, image)
    }

    func syncs(_ device: HoldingDevice) -> Int { device.log.filter { $0.kind == .flush && !$0.completed }.count }

    /// Invariant: a flush after allocating writes costs two host syncs (data and refcounts, then the L2
    /// tables), three when a new L2 table needs an L1 entry; after writes in place one; with nothing to
    /// make durable none.
    @Test func syncsPerFlush() throws {
        let (device, image) = try setUp()
        var before = syncs(device)
        try image.flush()
        #expect(syncs(device) == before, "nothing written")

        try image.write([UInt8](repeating: 2, count: 4096), at: 8192)  // in place (cluster 0 is owned)
        before = syncs(device)
        try image.flush()
        #expect(syncs(device) - before == 1, "in place")

        try image.write([UInt8](repeating: 3, count: 4096), at: 1 << 20)  // allocates in the same L2 table
        before = syncs(device)
        try image.flush()
        #expect(syncs(device) - before == 2, "allocating")

        try image.write([UInt8](repeating: 4, count: 4096), at: 600 << 20)  // needs a new L2 table (512 MiB each)
        before = syncs(device)
        try image.flush()
        #expect(syncs(device) - before == 3, "allocating a new table")
        try image.close()
    }

    /// Invariant: flushes that wait while another flush syncs, with no change completed since it began,
    /// return without syncing again (group commit).
    @Test func concurrentFlushesShareOneSync() throws {
        let (device, image) = try setUp()
        try image.write([UInt8](repeating: 5, count: 4096), at: 8192)
        let hold = device.hold(.flush)
        let first = TestThread { try image.flush() }
        #expect(hold.waitUntilReached())
        let before = syncs(device)
        let others = (0..<4).map { _ in TestThread { try image.flush() } }
        hold.release()
        try first.join()
        for t in others { try t.join() }
        #expect(syncs(device) == before, "the waiting flushes synced again")
        // A change completed after the shared sync needs a sync of its own.
        try image.write([UInt8](repeating: 6, count: 4096), at: 8192)
        try image.flush()
        #expect(syncs(device) == before + 1)
        try image.close()
    }
}
