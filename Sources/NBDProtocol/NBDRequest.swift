import NIOCore

// Design notes
// ------------
// A transmission request is a fixed 28-byte header, followed for NBD_CMD_WRITE by `length` bytes of
// payload:
//
//   0         4       6      8             16            24        28
//   +---------+-------+------+-------------+-------------+---------+------------------+
//   | magic   | flags | type | cookie      | offset      | length  | payload (WRITE)  |
//   +---------+-------+------+-------------+-------------+---------+------------------+
//
// The decoder only frames; it does not judge (validation needs the export and the negotiated options, so
// the server does it). The one exception is size: a WRITE payload above `maximumPayload` is never
// buffered. The decoder emits the request with `payloadDiscarded = true` at once (so the server can answer
// EOVERFLOW) and then drops the payload bytes as they arrive, which keeps the connection in sync and
// usable without holding the bytes in memory. A wrong magic cannot be resynchronised: it is an error and
// the connection closes.

/// One transmission request as framed by `NBDRequestDecoder`.
public struct NBDRequest: Sendable, Hashable {
    /// The command flags as sent (unknown bits kept, so validation can refuse them).
    public var flags: NBDCommandFlags
    public var command: NBDCommand
    /// The client's opaque request identifier, echoed in every reply.
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The data of a WRITE (exactly `length` bytes); nil for other commands and for discarded payloads.
    public var payload: ByteBuffer?
    /// A WRITE whose payload was larger than the decoder's limit: the bytes were skipped, not kept.
    public var payloadDiscarded: Bool

    public init(
        flags: NBDCommandFlags = [],
        command: NBDCommand,
        cookie: UInt64,
        offset: UInt64 = 0,
        length: UInt32 = 0,
        payload: ByteBuffer? = nil,
        payloadDiscarded: Bool = false
    ) {
        self.flags = flags
        self.command = command
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDiscarded = payloadDiscarded
    }

    /// The size of the fixed request header.
    public static let headerSize = 28

    /// Writes the request as a client would send it (header, then the payload if any).
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.request)
        buffer.writeInteger(flags.rawValue)
        buffer.writeInteger(command.rawValue)
        buffer.writeInteger(cookie)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
        if var payload { buffer.writeBuffer(&payload) }
    }
}

/// The one public error of `NBDProtocol`: a peer broke the framing, so the connection cannot continue.
public struct NBDProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable {
        /// A request or option did not start with its magic number.
        case badMagic
        /// The client set handshake flags this server does not know.
        case unknownClientFlags
        /// An option claimed more data than the server is willing to buffer.
        case optionTooLong
        /// The client asked for an export that does not exist with `NBD_OPT_EXPORT_NAME`.
        case unknownExport
        /// The client ended the negotiation (`NBD_OPT_ABORT`) or closed the connection.
        case aborted
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}

/// Frames transmission requests (see the design notes above).
public struct NBDRequestDecoder: ByteToMessageDecoder {
    public typealias InboundOut = NBDRequest

    /// WRITE payloads above this are skipped instead of buffered.
    public let maximumPayload: UInt32
    /// Payload bytes of an oversized WRITE still to drop.
    private var bytesToSkip: UInt64 = 0

    public init(maximumPayload: UInt32 = NBDLimits.maximumPayload) {
        self.maximumPayload = maximumPayload
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let request = try next(from: &buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(request))
        return .continue
    }

    public mutating func decodeLast(
        context: ChannelHandlerContext,
        buffer: inout ByteBuffer,
        seenEOF: Bool
    ) throws -> DecodingState {
        // A partial request at EOF is simply dropped: the client is gone and nobody awaits a reply.
        while let request = try next(from: &buffer) {
            context.fireChannelRead(Self.wrapInboundOut(request))
        }
        return .needMoreData
    }

    /// Takes the next complete request from `buffer`, or nil if more bytes are needed. Exposed for tests
    /// and fuzzing, which drive the framing without a channel.
    /// - Throws: `NBDProtocolError` `.badMagic` if the bytes are not a request.
    public mutating func next(from buffer: inout ByteBuffer) throws -> NBDRequest? {
        if bytesToSkip > 0 {
            let count = Int(min(bytesToSkip, UInt64(buffer.readableBytes)))
            buffer.moveReaderIndex(forwardBy: count)
            bytesToSkip -= UInt64(count)
            if bytesToSkip > 0 { return nil }
        }
        guard buffer.readableBytes >= NBDRequest.headerSize else { return nil }
        let start = buffer.readerIndex
        guard let magic = buffer.getInteger(at: start, as: UInt32.self),
            let flags = buffer.getInteger(at: start + 4, as: UInt16.self),
            let command = buffer.getInteger(at: start + 6, as: UInt16.self),
            let cookie = buffer.getInteger(at: start + 8, as: UInt64.self),
            let offset = buffer.getInteger(at: start + 16, as: UInt64.self),
            let length = buffer.getInteger(at: start + 24, as: UInt32.self)
        else { return nil }
        guard magic == NBDMagic.request else {
            throw NBDProtocolError(.badMagic, "bad request magic 0x\(String(magic, radix: 16))")
        }
        var request = NBDRequest(
            flags: NBDCommandFlags(rawValue: flags),
            command: NBDCommand(rawValue: command),
            cookie: cookie,
            offset: offset,
            length: length
        )
        if request.command == .write {
            if length > maximumPayload {
                buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
                bytesToSkip = UInt64(length)
                request.payloadDiscarded = true
                return request
            }
            guard buffer.readableBytes >= NBDRequest.headerSize + Int(length) else { return nil }
            buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
            request.payload = buffer.readSlice(length: Int(length))
            return request
        }
        buffer.moveReaderIndex(forwardBy: NBDRequest.headerSize)
        return request
    }
}
