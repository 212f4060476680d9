import BlockIO
import NBDProtocol
import Synchronization

/// A device offered to NBD clients under a name.
///
/// Several connections may use one export at once; the device is thread-safe by contract. The export does
/// not own the device's lifetime: `NBDServer` flushes and closes every export's device once the last
/// connection is gone.
public final class NBDExport: Sendable {
    public let name: String
    public let description: String
    public let device: any BlockDevice
    /// Refuse writes even if the device accepts them.
    public let isReadOnly: Bool
    /// The metadata contexts offered besides `base:allocation` (which comes from the device's extents).
    public let metaContexts: [NBDMetaContext]
    public let stats = NBDExportStats()

    /// - Parameters:
    ///   - name: the export name clients ask for (the first export is also the default, "").
    ///   - description: shown by `nbdinfo --list`.
    ///   - readOnly: export read-only even if the device is writable.
    ///   - metaContexts: more contexts for `NBD_CMD_BLOCK_STATUS`, such as dirty bitmaps; names are unique,
    ///     not `base:allocation`, and valid NBD strings (at most 4096 bytes).
    public init(
        name: String,
        description: String = "",
        device: any BlockDevice,
        readOnly: Bool = false,
        metaContexts: [NBDMetaContext] = []
    ) {
        let names = [NBDBaseAllocation.name] + metaContexts.map(\.name)
        precondition(Set(names).count == names.count, "metadata context names must be unique")
        precondition(names.allSatisfy { $0.utf8.count <= NBDLimits.maximumString }, "context name too long")
        self.name = name
        self.description = description
        self.device = device
        self.isReadOnly = readOnly || device.capabilities.contains(.readOnly)
        self.metaContexts = metaContexts
    }

    /// The transmission flags this export advertises, derived from the device's capabilities.
    ///
    /// Write-side flags (FUA, TRIM, WRITE_ZEROES, FAST_ZERO) are only sent for writable exports, the way
    /// clients expect (`nbdinfo --can trim` is false on a read-only export).
    public var transmissionFlags: NBDTransmissionFlags {
        let capabilities = device.capabilities
        var flags: NBDTransmissionFlags = [.hasFlags, .sendCache]
        if capabilities.contains(.flush) { flags.insert(.sendFlush) }
        if capabilities.contains(.multiConnection) { flags.insert(.canMultiConn) }
        if isReadOnly {
            flags.insert(.readOnly)
        } else {
            flags.insert(.sendWriteZeroes)
            if capabilities.contains(.flush) { flags.insert(.sendFUA) }
            if capabilities.contains(.discard) { flags.insert(.sendTrim) }
            if capabilities.contains(.fastZero) { flags.insert(.sendFastZero) }
        }
        return flags
    }

    /// What the handshake tells clients about this export.
    public var negotiationDescription: NBDExportDescription {
        NBDExportDescription(
            name: name,
            description: description,
            size: device.size,
            flags: transmissionFlags,
            metaContexts: metaContexts.map(\.name)
        )
    }

    /// The status runs of the context with this id (see `NBDExportDescription.allMetaContexts`) for
    /// `offset ..< offset + count`; called on a thread-pool thread.
    func status(contextID: UInt32, at offset: UInt64, count: UInt64) throws -> [NBDStatusRun] {
        if contextID == NBDBaseAllocation.contextID {
            return try device.extents(at: offset, count: count).map { extent in
                var flags: UInt32 = 0
                if extent.flags.contains(.hole) { flags |= NBDBaseAllocation.hole }
                if extent.flags.contains(.zero) { flags |= NBDBaseAllocation.zero }
                return NBDStatusRun(offset: extent.offset, length: extent.length, flags: flags)
            }
        }
        let index = Int(contextID) - 2
        guard index >= 0, index < metaContexts.count else {
            throw NBDRequestRejection(code: .EINVAL, message: "no metadata context \(contextID)")
        }
        return try metaContexts[index].status(offset, count)
    }
}

/// A metadata context an export offers besides `base:allocation`: its name, and how to describe a range.
///
/// The name must start with a namespace and a colon (`qemu:dirty-bitmap:NAME`, `qemu:allocation-depth`).
/// `status(offset, count)` runs on a thread-pool thread, concurrently with the export's other requests,
/// and returns runs that start at `offset` and follow each other; it may stop early but describes at least
/// the first byte. It may throw (an `ErrnoConvertible` error becomes its NBD code, anything else `EIO`).
public struct NBDMetaContext: Sendable {
    public let name: String
    public let status: @Sendable (_ offset: UInt64, _ count: UInt64) throws -> [NBDStatusRun]

    public init(name: String, status: @escaping @Sendable (_ offset: UInt64, _ count: UInt64) throws -> [NBDStatusRun])
    {
        self.name = name
        self.status = status
    }
}

/// A run of an export with one status value of a metadata context (its flags, or a number such as a depth).
public struct NBDStatusRun: Sendable, Hashable {
    public var offset: UInt64
    public var length: UInt64
    public var flags: UInt32

    public init(offset: UInt64, length: UInt64, flags: UInt32) {
        self.offset = offset
        self.length = length
        self.flags = flags
    }
}

/// Per-export counters, updated by every connection and read by `--stats-file`.
public final class NBDExportStats: Sendable {
    /// A consistent copy of the counters.
    public struct Snapshot: Sendable, Hashable {
        public var requests: UInt64 = 0
        public var reads: UInt64 = 0
        public var writes: UInt64 = 0
        public var bytesRead: UInt64 = 0
        public var bytesWritten: UInt64 = 0
        /// Requests answered with an error (validation or device failure).
        public var errors: UInt64 = 0
        /// The sum of request latencies, from decoding to the reply being queued, in nanoseconds.
        public var totalLatencyNanoseconds: UInt64 = 0
        /// Connections that reached transmission for this export.
        public var connections: UInt64 = 0
    }

    private let counters = Mutex(Snapshot())

    public init() {}

    public var snapshot: Snapshot { counters.withLock { $0 } }

    func connectionOpened() {
        counters.withLock { $0.connections &+= 1 }
    }

    func record(command: NBDCommand, bytes: UInt32, failed: Bool, latencyNanoseconds: UInt64) {
        counters.withLock { c in
            c.requests &+= 1
            c.totalLatencyNanoseconds &+= latencyNanoseconds
            if failed {
                c.errors &+= 1
                return
            }
            if command == .read {
                c.reads &+= 1
                c.bytesRead &+= UInt64(bytes)
            } else if command == .write {
                c.writes &+= 1
                c.bytesWritten &+= UInt64(bytes)
            }
        }
    }
}
