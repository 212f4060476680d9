// Design notes
// ------------
// The write log (docs/CRASH.md, "The write log format"): what a recorded disk was asked to do, in the
// order it completed, so a disk can be rebuilt as it was at any record. Big-endian, a 512-byte header and
// then records, each a 40-byte head and a payload:
//
//   header  | "VDISKLOG" | version | header size | device size | image UUID | log id | created |
//           | start kind | name length | snapshot name (256) | reserved | CRC-32C |
//   record  | "VREC" | type | flags | reserved | sequence | offset | length | payload length | CRC-32C |
//           | payload (write data, or a mark's label) |
//
// Every record's CRC covers the header too (the CRC-32C of header + payload + head with its CRC field
// zero), so a record spliced in from another log, a flipped bit or a torn tail is found, and the
// sequence numbers (1, 2, 3...) find a record dropped or repeated whole. A log that ends cleanly ends with
// an `end` record; one without it was cut short (its recorder died, or the file was truncated).
// Everything read is hostile: every field is checked before use and sizes are bounded.

import BlockIO
import CCrashSim
import VImage

/// The header of a write log.
public struct WriteLogHeader: Sendable, Hashable {
    public static let magic: [UInt8] = Array("VDISKLOG".utf8)
    public static let currentVersion: UInt32 = 1
    /// The header's size in bytes, and where the first record starts.
    public static let size = 512
    /// The longest start snapshot name the header holds.
    public static let maximumNameLength = 255

    /// What the disk held when the recording started.
    public enum Start: Sendable, Hashable {
        /// An internal snapshot of the recorded VIMG image, taken just before the first record.
        case snapshot(String)
    }

    public var version: UInt32 = currentVersion
    /// The recorded disk's size in bytes; every record lies inside it.
    public var deviceSize: UInt64
    /// The UUID of the recorded image.
    public var imageUUID: ImageUUID
    /// Random, to tell recordings of one image apart (it names the start snapshot).
    public var logID: UInt64
    /// When the recording started, in nanoseconds since 1970.
    public var createdNanoseconds: UInt64
    public var start: Start

    public init(deviceSize: UInt64, imageUUID: ImageUUID, logID: UInt64, createdNanoseconds: UInt64, start: Start) {
        self.deviceSize = deviceSize
        self.imageUUID = imageUUID
        self.logID = logID
        self.createdNanoseconds = createdNanoseconds
        self.start = start
    }

    /// The start snapshot's name.
    public var snapshotName: String {
        switch start {
        case .snapshot(let name): return name
        }
    }

    /// The 512 bytes of the header, its CRC included.
    public func encode() -> [UInt8] {
        var out = ByteWriter(capacity: Self.size)
        out.write(Self.magic)
        out.write(version)
        out.write(UInt32(Self.size))
        out.write(deviceSize)
        out.write(imageUUID.bytes)
        out.write(logID)
        out.write(createdNanoseconds)
        let name = Array(snapshotName.utf8.prefix(Self.maximumNameLength))
        out.write(UInt8(1))
        out.write(UInt8(name.count))
        out.write(UInt16(0))
        out.write(name + [UInt8](repeating: 0, count: 256 - name.count))
        out.write([UInt8](repeating: 0, count: Self.size - 4 - out.bytes.count))
        out.write(CRC32C.checksum(out.bytes))
        return out.bytes
    }

    /// Decodes and checks a header.
    /// - Throws: `CrashSimError` `.notALog`, `.unsupportedVersion`, `.corruptLog` or `.truncatedLog`.
    public static func decode(_ bytes: [UInt8], path: String? = nil) throws -> WriteLogHeader {
        func corrupt(_ message: String) -> CrashSimError {
            CrashSimError(.corruptLog, path: path, offset: 0, message: "the log's header is corrupt: \(message)")
        }
        guard bytes.count >= magic.count, Array(bytes[0..<magic.count]) == magic else {
            throw CrashSimError(.notALog, path: path, message: "not a vdisk write log (no VDISKLOG magic)")
        }
        guard bytes.count >= size else {
            throw CrashSimError(
                .truncatedLog,
                path: path,
                message: "the log is truncated: \(bytes.count) bytes, shorter than its \(size)-byte header"
            )
        }
        var cursor = ByteReader(Array(bytes[0..<size]), at: magic.count)
        let version = cursor.readInteger(as: UInt32.self)!
        guard version == currentVersion else {
            throw CrashSimError(
                .unsupportedVersion,
                path: path,
                message: "the log has format version \(version); this vdisk reads version \(currentVersion)"
            )
        }
        let stored =
            UInt32(bytes[size - 4]) << 24 | UInt32(bytes[size - 3]) << 16 | UInt32(bytes[size - 2]) << 8
            | UInt32(bytes[size - 1])
        guard CRC32C.checksum(Array(bytes[0..<size - 4])) == stored else {
            throw corrupt("its checksum does not match")
        }
        guard cursor.readInteger(as: UInt32.self)! == UInt32(size) else { throw corrupt("wrong header size") }
        let deviceSize = cursor.readInteger(as: UInt64.self)!
        let uuid = ImageUUID(bytes: cursor.readBytes(16)!)!
        let logID = cursor.readInteger(as: UInt64.self)!
        let created = cursor.readInteger(as: UInt64.self)!
        let kind = cursor.readInteger(as: UInt8.self)!
        let nameLength = Int(cursor.readInteger(as: UInt8.self)!)
        let reserved = cursor.readInteger(as: UInt16.self)!
        let nameField = cursor.readBytes(256)!
        let tail = cursor.readBytes(size - 4 - cursor.index)!
        guard kind == 1 else { throw corrupt("unknown start kind \(kind)") }
        guard reserved == 0, tail.allSatisfy({ $0 == 0 }), nameField[nameLength...].allSatisfy({ $0 == 0 }) else {
            throw corrupt("reserved bytes are not zero")
        }
        guard nameLength > 0, let name = String(validating: nameField[0..<nameLength], as: UTF8.self) else {
            throw corrupt("the start snapshot's name is not valid UTF-8")
        }
        guard deviceSize > 0 else { throw corrupt("the device size is zero") }
        var header = WriteLogHeader(
            deviceSize: deviceSize,
            imageUUID: uuid,
            logID: logID,
            createdNanoseconds: created,
            start: .snapshot(name)
        )
        header.version = version
        return header
    }
}

/// One record of a write log.
public struct WriteLogRecord: Sendable, Hashable {
    public enum Kind: UInt8, Sendable, CaseIterable {
        /// `length` bytes of data at `offset`; the payload is the data.
        case write = 1
        /// `length` bytes at `offset` read as zero from here.
        case writeZeroes = 2
        /// `length` bytes at `offset` were discarded (they read as zero on every vdisk device).
        case discard = 3
        /// A flush completed: every write before it is durable.
        case flush = 4
        /// A label put in the log (`vdisk mark`); the payload is the label, UTF-8.
        case mark = 5
        /// The recording stopped cleanly; nothing follows.
        case end = 6
    }

    public struct Flags: OptionSet, Sendable, Hashable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// A write with FUA: durable when it completed.
        public static let fua = Flags(rawValue: 1 << 0)
        /// Write-zeroes that allowed the device to release storage.
        public static let mayUnmap = Flags(rawValue: 1 << 1)
    }

    public static let magic: UInt32 = 0x5652_4543  // "VREC"
    /// The size of a record's head, before its payload.
    public static let headSize = 40
    /// The largest write a record holds (a request is at most 32 MiB on every front end).
    public static let maximumWrite: UInt64 = 64 << 20
    /// The longest mark label, in bytes of UTF-8.
    public static let maximumLabelLength = 255

    public var kind: Kind
    public var flags: Flags = []
    /// 1 for the first record, then each one more.
    public var sequence: UInt64
    public var offset: UInt64 = 0
    public var length: UInt64 = 0
    /// Bytes following the head: the data of a write, the label of a mark.
    public var payloadLength: UInt32 = 0

    public init(
        kind: Kind,
        flags: Flags = [],
        sequence: UInt64,
        offset: UInt64 = 0,
        length: UInt64 = 0,
        payloadLength: UInt32 = 0
    ) {
        self.kind = kind
        self.flags = flags
        self.sequence = sequence
        self.offset = offset
        self.length = length
        self.payloadLength = payloadLength
    }

    /// The 40-byte head with `checksum` in its CRC field.
    public func encodeHead(checksum: UInt32) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: Self.headSize) { buffer, count in
            encodeHead(into: UnsafeMutableRawBufferPointer(buffer), checksum: checksum)
            count = Self.headSize
        }
    }

    /// Writes the 40-byte head into `out` (at least `headSize` bytes) with `checksum` in its CRC field:
    /// the recorder's path, which allocates nothing per record.
    public func encodeHead(into out: UnsafeMutableRawBufferPointer, checksum: UInt32) {
        out.storeBytes(of: Self.magic.bigEndian, toByteOffset: 0, as: UInt32.self)
        out[4] = kind.rawValue
        out[5] = flags.rawValue
        out.storeBytes(of: UInt16(0), toByteOffset: 6, as: UInt16.self)
        out.storeBytes(of: sequence.bigEndian, toByteOffset: 8, as: UInt64.self)
        out.storeBytes(of: offset.bigEndian, toByteOffset: 16, as: UInt64.self)
        out.storeBytes(of: length.bigEndian, toByteOffset: 24, as: UInt64.self)
        out.storeBytes(of: payloadLength.bigEndian, toByteOffset: 32, as: UInt32.self)
        out.storeBytes(of: checksum.bigEndian, toByteOffset: 36, as: UInt32.self)
    }

    /// The record's checksum: CRC-32C over the log header, the payload, then the head with its CRC field
    /// zero. `payloadChecksum` is the running CRC after the header and payload (`CRC32C.update`).
    public func checksum(payloadChecksum: UInt32) -> UInt32 {
        withUnsafeTemporaryAllocation(byteCount: Self.headSize, alignment: 8) { head in
            encodeHead(into: head, checksum: 0)
            return CRC32C.update(payloadChecksum, UnsafeRawBufferPointer(head))
        }
    }

    /// Decodes a head and checks every field but the checksum against the log's header.
    /// - Throws: `CrashSimError` `.corruptLog` naming what is wrong.
    static func decodeHead(
        _ bytes: [UInt8],
        expecting sequence: UInt64,
        header: WriteLogHeader,
        path: String?,
        at position: UInt64
    ) throws -> (record: WriteLogRecord, checksum: UInt32) {
        func corrupt(_ message: String) -> CrashSimError {
            CrashSimError(
                .corruptLog,
                path: path,
                record: sequence,
                offset: position,
                message: "corrupt log: \(message)"
            )
        }
        var cursor = ByteReader(bytes)
        guard cursor.readInteger(as: UInt32.self) == magic else { throw corrupt("no record starts here") }
        let rawKind = cursor.readInteger(as: UInt8.self)!
        guard let kind = Kind(rawValue: rawKind) else { throw corrupt("unknown record type \(rawKind)") }
        let flags = Flags(rawValue: cursor.readInteger(as: UInt8.self)!)
        let reserved = cursor.readInteger(as: UInt16.self)!
        var record = WriteLogRecord(kind: kind, flags: flags, sequence: cursor.readInteger(as: UInt64.self)!)
        record.offset = cursor.readInteger(as: UInt64.self)!
        record.length = cursor.readInteger(as: UInt64.self)!
        record.payloadLength = cursor.readInteger(as: UInt32.self)!
        let checksum = cursor.readInteger(as: UInt32.self)!
        guard reserved == 0 else { throw corrupt("reserved bytes are not zero") }
        guard record.sequence == sequence else {
            throw corrupt("record number \(record.sequence) where \(sequence) was expected")
        }
        let allowedFlags: Flags =
            switch kind {
            case .write: .fua
            case .writeZeroes: .mayUnmap
            default: []
            }
        guard allowedFlags.isSuperset(of: flags) else { throw corrupt("flags \(flags.rawValue) on a \(kind) record") }
        switch kind {
        case .write, .writeZeroes, .discard:
            let (end, overflow) = record.offset.addingReportingOverflow(record.length)
            guard record.length > 0, !overflow, end <= header.deviceSize else {
                throw corrupt(
                    "a \(kind) of \(record.length) bytes at \(record.offset) is outside the \(header.deviceSize)-byte disk"
                )
            }
            let payload: UInt64 = kind == .write ? record.length : 0
            guard kind != .write || record.length <= maximumWrite else {
                throw corrupt("a write of \(record.length) bytes is larger than \(maximumWrite)")
            }
            guard UInt64(record.payloadLength) == payload else { throw corrupt("the payload length does not match") }
        case .mark:
            guard record.offset == 0, record.length == 0, (1...maximumLabelLength).contains(Int(record.payloadLength))
            else { throw corrupt("a mark record with a bad size") }
        case .flush, .end:
            guard record.offset == 0, record.length == 0, record.payloadLength == 0 else {
                throw corrupt("a \(kind) record with a size")
            }
        }
        return (record, checksum)
    }
}

/// CRC-32C (Castagnoli, as iSCSI and ext4 use; the SSE 4.2 instruction where there is one).
public enum CRC32C {
    /// The CRC-32C of `bytes`.
    public static func checksum(_ bytes: [UInt8]) -> UInt32 { update(0, bytes) }

    /// Continues `crc` (the CRC-32C of earlier bytes) over `bytes`: the CRC-32C of the concatenation.
    public static func update(_ crc: UInt32, _ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { update(crc, $0) } }

    /// Continues `crc` over raw memory.
    public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        CCrashSim_crc32c(crc, bytes.baseAddress, bytes.count)
    }
}
