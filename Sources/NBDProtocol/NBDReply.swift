import NIOCore

// Design notes
// ------------
// Two reply shapes exist. A simple reply is a 16-byte header (magic, error, cookie), followed for a
// successful READ by the data. A structured reply is one or more chunks, each with a 20-byte header
// (magic, flags, type, cookie, length) and a typed payload; the last chunk carries the DONE flag:
//
//   simple:      | 0x67446698 | error u32 | cookie u64 | [read data] |
//   structured:  | 0x668e33ef | flags u16 | type u16 | cookie u64 | length u32 | payload ... |
//
// Replies may go out in any order; the cookie ties them to requests. Each reply is written whole on the
// channel's event loop, so chunks of different replies never interleave.
//
// Bulk read data is a separate `ByteBuffer` that `NBDReplyWriter` hands to the channel as is (a gathering
// write), so a 32 MiB read is not copied again after the device filled it. `NBDReplyEncoder` copies
// everything into one buffer and exists for tests and tools that want plain bytes.

/// One `base:allocation` (or any other context's) block status descriptor.
public struct NBDBlockDescriptor: Sendable, Hashable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}

/// One chunk of a structured reply.
public struct NBDReplyChunk: Sendable, Hashable {
    public enum Content: Sendable, Hashable {
        /// `NBD_REPLY_TYPE_NONE`: the request succeeded and there is nothing to say (only with DONE).
        case none
        /// `NBD_REPLY_TYPE_OFFSET_DATA`: read data for `offset ..< offset + data.readableBytes`.
        case offsetData(offset: UInt64, data: ByteBuffer)
        /// `NBD_REPLY_TYPE_OFFSET_HOLE`: a range of a read that reads as zeroes.
        case offsetHole(offset: UInt64, length: UInt32)
        /// `NBD_REPLY_TYPE_BLOCK_STATUS`: descriptors for one metadata context.
        case blockStatus(contextID: UInt32, descriptors: [NBDBlockDescriptor])
        /// `NBD_REPLY_TYPE_ERROR`: the request failed; `message` is for humans and may be empty.
        case error(NBDErrorCode, message: String)
    }

    public var cookie: UInt64
    public var flags: NBDReplyFlags
    public var content: Content

    public init(cookie: UInt64, flags: NBDReplyFlags = .done, content: Content) {
        self.cookie = cookie
        self.flags = flags
        self.content = content
    }

    public var type: NBDReplyChunkType {
        switch content {
        case .none: return .none
        case .offsetData: return .offsetData
        case .offsetHole: return .offsetHole
        case .blockStatus: return .blockStatus
        case .error: return .error
        }
    }
}

/// A reply to one transmission request (or one chunk of it).
public enum NBDReply: Sendable, Hashable {
    /// A simple reply; `data` is the read payload of a successful READ.
    case simple(cookie: UInt64, error: NBDErrorCode, data: ByteBuffer?)
    /// One chunk of a structured reply.
    case chunk(NBDReplyChunk)

    /// The bytes that travel separately from the header: read data.
    public var bulkData: ByteBuffer? {
        switch self {
        case .simple(_, let error, let data): return error == .success ? data : nil
        case .chunk(let chunk):
            if case .offsetData(_, let data) = chunk.content { return data }
            return nil
        }
    }

    /// Writes everything except `bulkData`.
    public func encodeHeader(into buffer: inout ByteBuffer) {
        switch self {
        case .simple(let cookie, let error, _):
            buffer.writeInteger(NBDMagic.simpleReply)
            buffer.writeInteger(error.rawValue)
            buffer.writeInteger(cookie)
        case .chunk(let chunk):
            buffer.writeInteger(NBDMagic.structuredReply)
            buffer.writeInteger(chunk.flags.rawValue)
            buffer.writeInteger(chunk.type.rawValue)
            buffer.writeInteger(chunk.cookie)
            switch chunk.content {
            case .none:
                buffer.writeInteger(UInt32(0))
            case .offsetData(let offset, let data):
                buffer.writeInteger(UInt32(8 + data.readableBytes))
                buffer.writeInteger(offset)
            case .offsetHole(let offset, let length):
                buffer.writeInteger(UInt32(12))
                buffer.writeInteger(offset)
                buffer.writeInteger(length)
            case .blockStatus(let contextID, let descriptors):
                buffer.writeInteger(UInt32(4 + 8 * descriptors.count))
                buffer.writeInteger(contextID)
                for descriptor in descriptors {
                    buffer.writeInteger(descriptor.length)
                    buffer.writeInteger(descriptor.flags)
                }
            case .error(let code, let message):
                let text = Array(message.utf8.prefix(NBDLimits.maximumString))
                buffer.writeInteger(UInt32(6 + text.count))
                buffer.writeInteger(code.rawValue)
                buffer.writeInteger(UInt16(text.count))
                buffer.writeBytes(text)
            }
        }
    }

    /// Writes the whole reply, bulk data included.
    public func encode(into buffer: inout ByteBuffer) {
        encodeHeader(into: &buffer)
        if var data = bulkData { buffer.writeBuffer(&data) }
    }
}

/// Encodes replies into one contiguous buffer each (copies read data; see `NBDReplyWriter`).
public struct NBDReplyEncoder: MessageToByteEncoder {
    public typealias OutboundIn = NBDReply
    public init() {}
    public func encode(data: NBDReply, out: inout ByteBuffer) throws {
        data.encode(into: &out)
    }
}

/// Writes replies as a header buffer plus the untouched read data buffer, so the channel gathers them
/// into one `writev` without copying the data.
public final class NBDReplyWriter: ChannelOutboundHandler, RemovableChannelHandler {
    public typealias OutboundIn = NBDReply
    public typealias OutboundOut = ByteBuffer

    public init() {}

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let reply = Self.unwrapOutboundIn(data)
        var header = context.channel.allocator.buffer(capacity: 32)
        reply.encodeHeader(into: &header)
        if let bulk = reply.bulkData, bulk.readableBytes > 0 {
            context.write(Self.wrapOutboundOut(header), promise: nil)
            context.write(Self.wrapOutboundOut(bulk), promise: promise)
        } else {
            context.write(Self.wrapOutboundOut(header), promise: promise)
        }
    }
}

@available(*, unavailable)
extension NBDReplyWriter: Sendable {}
