// Design notes
// ------------
// The numbers of the NBD protocol (NetworkBlockDevice/nbd `doc/proto.md`), as typed values. Everything on
// the wire is big-endian. Codes that a peer may send us and that we may not know (options, commands,
// reply types) are `RawRepresentable` structs rather than enums, so an unknown value survives decoding
// and can be answered ("unsupported") instead of failing the parse.

/// Magic numbers that frame NBD messages.
public enum NBDMagic {
    /// "NBDMAGIC": the first eight bytes the server sends.
    public static let greeting: UInt64 = 0x4E42_444D_4147_4943
    /// "IHAVEOPT": newstyle negotiation; also prefixes every option the client sends.
    public static let options: UInt64 = 0x4948_4156_454F_5054
    /// Prefixes every option reply.
    public static let optionReply: UInt64 = 0x0003_E889_0455_65A9
    /// Prefixes every transmission request.
    public static let request: UInt32 = 0x2560_9513
    /// Prefixes a simple reply.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// Prefixes a structured reply chunk.
    public static let structuredReply: UInt32 = 0x668E_33EF
}

/// Limits of this implementation, advertised through `NBD_INFO_BLOCK_SIZE` where they matter to a client.
public enum NBDLimits {
    /// The smallest request granularity: any byte offset and length work.
    public static let minimumBlockSize: UInt32 = 1
    /// The size below which requests cost a read-modify-write somewhere in the stack.
    public static let preferredBlockSize: UInt32 = 4096
    /// The largest READ or WRITE payload the server accepts (32 MiB).
    public static let maximumPayload: UInt32 = 32 << 20
    /// The spec's limit for strings (export names, descriptions, context names).
    public static let maximumString = 4096
    /// The largest option payload we buffer. Real options are tiny; a bigger claim is hostile.
    public static let maximumOptionLength: UInt32 = 64 * 1024
}

/// Flags the server sends in its greeting (16 bits).
public struct NBDHandshakeFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The server speaks fixed newstyle: it replies to every option, including unknown ones.
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    /// The server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client sends right after the greeting (32 bits).
public struct NBDClientFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
    /// Every flag this server understands; a client setting any other bit is refused.
    public static let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Per-export transmission flags (16 bits), sent with the export size.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// An option code sent by the client during negotiation.
public struct NBDOption: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let exportName = NBDOption(rawValue: 1)
    public static let abort = NBDOption(rawValue: 2)
    public static let list = NBDOption(rawValue: 3)
    public static let startTLS = NBDOption(rawValue: 5)
    public static let info = NBDOption(rawValue: 6)
    public static let go = NBDOption(rawValue: 7)
    public static let structuredReply = NBDOption(rawValue: 8)
    public static let listMetaContext = NBDOption(rawValue: 9)
    public static let setMetaContext = NBDOption(rawValue: 10)
    public static let extendedHeaders = NBDOption(rawValue: 11)

    public var description: String {
        switch self {
        case .exportName: return "EXPORT_NAME"
        case .abort: return "ABORT"
        case .list: return "LIST"
        case .startTLS: return "STARTTLS"
        case .info: return "INFO"
        case .go: return "GO"
        case .structuredReply: return "STRUCTURED_REPLY"
        case .listMetaContext: return "LIST_META_CONTEXT"
        case .setMetaContext: return "SET_META_CONTEXT"
        case .extendedHeaders: return "EXTENDED_HEADERS"
        default: return "option \(rawValue)"
        }
    }
}

/// The type of an option reply. Values with the top bit set are errors.
public struct NBDOptionReplyType: RawRepresentable, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let ack = NBDOptionReplyType(rawValue: 1)
    public static let server = NBDOptionReplyType(rawValue: 2)
    public static let info = NBDOptionReplyType(rawValue: 3)
    public static let metaContext = NBDOptionReplyType(rawValue: 4)

    private static let error: UInt32 = 1 << 31
    public static let errUnsupported = NBDOptionReplyType(rawValue: error | 1)
    public static let errPolicy = NBDOptionReplyType(rawValue: error | 2)
    public static let errInvalid = NBDOptionReplyType(rawValue: error | 3)
    public static let errPlatform = NBDOptionReplyType(rawValue: error | 4)
    public static let errTLSRequired = NBDOptionReplyType(rawValue: error | 5)
    public static let errUnknown = NBDOptionReplyType(rawValue: error | 6)
    public static let errShutdown = NBDOptionReplyType(rawValue: error | 7)
    public static let errBlockSizeRequired = NBDOptionReplyType(rawValue: error | 8)
    public static let errTooBig = NBDOptionReplyType(rawValue: error | 9)

    public var isError: Bool { rawValue & Self.error != 0 }
}

/// The `NBD_INFO_*` items of `NBD_OPT_INFO` and `NBD_OPT_GO`.
public struct NBDInfoType: RawRepresentable, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let export = NBDInfoType(rawValue: 0)
    public static let name = NBDInfoType(rawValue: 1)
    public static let description = NBDInfoType(rawValue: 2)
    public static let blockSize = NBDInfoType(rawValue: 3)
}

/// A transmission-phase command.
public struct NBDCommand: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let read = NBDCommand(rawValue: 0)
    public static let write = NBDCommand(rawValue: 1)
    public static let disconnect = NBDCommand(rawValue: 2)
    public static let flush = NBDCommand(rawValue: 3)
    public static let trim = NBDCommand(rawValue: 4)
    public static let cache = NBDCommand(rawValue: 5)
    public static let writeZeroes = NBDCommand(rawValue: 6)
    public static let blockStatus = NBDCommand(rawValue: 7)
    public static let resize = NBDCommand(rawValue: 8)

    public var description: String {
        switch self {
        case .read: return "READ"
        case .write: return "WRITE"
        case .disconnect: return "DISC"
        case .flush: return "FLUSH"
        case .trim: return "TRIM"
        case .cache: return "CACHE"
        case .writeZeroes: return "WRITE_ZEROES"
        case .blockStatus: return "BLOCK_STATUS"
        case .resize: return "RESIZE"
        default: return "command \(rawValue)"
        }
    }
}

/// Per-request command flags (16 bits).
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let reqOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
    public static let payloadLength = NBDCommandFlags(rawValue: 1 << 5)
}

/// The type of a structured reply chunk.
public struct NBDReplyChunkType: RawRepresentable, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let none = NBDReplyChunkType(rawValue: 0)
    public static let offsetData = NBDReplyChunkType(rawValue: 1)
    public static let offsetHole = NBDReplyChunkType(rawValue: 2)
    public static let blockStatus = NBDReplyChunkType(rawValue: 5)
    public static let error = NBDReplyChunkType(rawValue: (1 << 15) | 1)
    public static let errorOffset = NBDReplyChunkType(rawValue: (1 << 15) | 2)
}

/// Flags of a structured reply chunk.
public struct NBDReplyFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// The last chunk of the reply to this request.
    public static let done = NBDReplyFlags(rawValue: 1 << 0)
}

/// The `base:allocation` metadata context: one bit for "no storage", one for "reads as zeroes".
public enum NBDBaseAllocation {
    public static let name = "base:allocation"
    /// The id we hand out for it; ids are chosen by the server and only need to be stable per connection.
    public static let contextID: UInt32 = 1
    public static let hole: UInt32 = 1 << 0
    public static let zero: UInt32 = 1 << 1
}

/// The `qemu:` namespace (registered with the NBD project, defined in qemu's docs/interop/nbd.rst): dirty
/// bitmaps and the allocation depth of a backing chain.
public enum NBDQemuContext {
    public static let namespace = "qemu:"
    /// `qemu:dirty-bitmap:NAME`, one context per bitmap; also the LIST wildcard for all of them.
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"
    /// `qemu:allocation-depth`: the whole 32-bit status is the layer that provides the data (0 for none,
    /// 1 for the image itself, 2 for its backing image, and so on).
    public static let allocationDepth = "qemu:allocation-depth"
    /// The one flag of a dirty-bitmap context: the extent may have changed.
    public static let dirty: UInt32 = 1 << 0

    /// The context name of a dirty bitmap.
    public static func dirtyBitmap(_ name: String) -> String { dirtyBitmapPrefix + name }
}

/// An NBD error code, as carried by replies. The values are the Linux errno values the spec names, but
/// the wire set is closed: anything else travels as `EIO` (see `init(errno:)`).
public struct NBDErrorCode: RawRepresentable, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let success = NBDErrorCode(rawValue: 0)
    public static let EPERM = NBDErrorCode(rawValue: 1)
    public static let EIO = NBDErrorCode(rawValue: 5)
    public static let ENOMEM = NBDErrorCode(rawValue: 12)
    public static let EINVAL = NBDErrorCode(rawValue: 22)
    public static let ENOSPC = NBDErrorCode(rawValue: 28)
    public static let EOVERFLOW = NBDErrorCode(rawValue: 75)
    public static let ENOTSUP = NBDErrorCode(rawValue: 95)
    public static let ESHUTDOWN = NBDErrorCode(rawValue: 108)

    /// The one mapping from a host errno to the code sent to a client.
    ///
    /// The NBD error space is small and fixed; everything the spec does not name becomes `EIO`, except
    /// the few errnos with an obvious NBD equivalent (read-only file systems are `EPERM`, quota and file
    /// size limits are `ENOSPC`).
    public init(errno: Int32) {
        switch errno {
        case 0: self = .success
        case 1, 13, 30: self = .EPERM  // EPERM, EACCES, EROFS
        case 12: self = .ENOMEM
        case 22, 34: self = .EINVAL  // EINVAL, ERANGE
        case 27, 28, 122: self = .ENOSPC  // EFBIG, ENOSPC, EDQUOT
        case 75: self = .EOVERFLOW
        case 95: self = .ENOTSUP  // EOPNOTSUPP == ENOTSUP on Linux
        case 38: self = .ENOTSUP  // ENOSYS
        case 108: self = .ESHUTDOWN
        default: self = .EIO
        }
    }

    public var description: String {
        switch self {
        case .success: return "success"
        case .EPERM: return "EPERM"
        case .EIO: return "EIO"
        case .ENOMEM: return "ENOMEM"
        case .EINVAL: return "EINVAL"
        case .ENOSPC: return "ENOSPC"
        case .EOVERFLOW: return "EOVERFLOW"
        case .ENOTSUP: return "ENOTSUP"
        case .ESHUTDOWN: return "ESHUTDOWN"
        default: return "error \(rawValue)"
        }
    }
}
