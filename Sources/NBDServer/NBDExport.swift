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
    public let stats = NBDExportStats()

    /// - Parameters:
    ///   - name: the export name clients ask for (the first export is also the default, "").
    ///   - description: shown by `nbdinfo --list`.
    ///   - readOnly: export read-only even if the device is writable.
    public init(name: String, description: String = "", device: any BlockDevice, readOnly: Bool = false) {
        self.name = name
        self.description = description
        self.device = device
        self.isReadOnly = readOnly || device.capabilities.contains(.readOnly)
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
        NBDExportDescription(name: name, description: description, size: device.size, flags: transmissionFlags)
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
