import BlockIO
import NBDProtocol
import NIOCore
import NIOEmbedded
import Testing

@testable import NBDServer

func requestBytes(_ requests: [NBDRequest]) -> ByteBuffer {
    var buffer = ByteBuffer()
    for request in requests { request.encode(into: &buffer) }
    return buffer
}

@Suite struct RequestDecoderTests {
    static let sample: [NBDRequest] = [
        NBDRequest(command: .read, cookie: 1, offset: 4096, length: 512),
        NBDRequest(
            flags: .fua,
            command: .write,
            cookie: 2,
            offset: 10,
            length: 5,
            payload: ByteBuffer(bytes: [1, 2, 3, 4, 5])
        ),
        NBDRequest(command: .flush, cookie: 3),
        NBDRequest(flags: [.noHole, .fastZero], command: .writeZeroes, cookie: 4, offset: 0, length: 1 << 20),
        NBDRequest(flags: .reqOne, command: .blockStatus, cookie: 5, offset: 0, length: 65536),
        NBDRequest(command: .disconnect, cookie: 6),
    ]

    func decodeAll(_ chunks: [ByteBuffer]) throws -> [NBDRequest] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDRequestDecoder()))
        var out: [NBDRequest] = []
        for chunk in chunks {
            try channel.writeInbound(chunk)
            while let request = try channel.readInbound(as: NBDRequest.self) { out.append(request) }
        }
        _ = try channel.finish()
        return out
    }

    /// Invariant: requests decode the same whether the bytes come at once or one byte at a time.
    @Test func dripFed() throws {
        let bytes = requestBytes(Self.sample)
        #expect(try decodeAll([bytes]) == Self.sample)
        let drip = bytes.readableBytesView.map { ByteBuffer(bytes: [$0]) }
        #expect(try decodeAll(drip) == Self.sample)
    }

    /// Invariant: a bad request magic is an error (the connection cannot resynchronise).
    @Test func badMagic() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDRequestDecoder()))
        var bytes = ByteBuffer()
        bytes.writeRepeatingByte(0x41, count: 28)
        #expect(throws: NBDProtocolError.self) { try channel.writeInbound(bytes) }
        _ = try? channel.finish()
    }

    /// Invariant: a WRITE over the payload limit is reported at once with `payloadDiscarded`, its payload
    /// is skipped without being kept, and the next request decodes normally.
    @Test func oversizedWriteIsSkipped() throws {
        var decoder = NBDRequestDecoder(maximumPayload: 16)
        var bytes = ByteBuffer()
        NBDRequest(command: .write, cookie: 9, offset: 0, length: 40).encode(into: &bytes)
        let first = try decoder.next(from: &bytes)
        #expect(first?.payloadDiscarded == true)
        #expect(first?.payload == nil)
        bytes.writeRepeatingByte(7, count: 30)
        #expect(try decoder.next(from: &bytes) == nil)
        bytes.writeRepeatingByte(7, count: 10)
        NBDRequest(command: .flush, cookie: 10).encode(into: &bytes)
        #expect(try decoder.next(from: &bytes) == NBDRequest(command: .flush, cookie: 10))
        #expect(bytes.readableBytes == 0)
    }
}

@Suite struct ReplyEncoderTests {
    func encode(_ reply: NBDReply) -> [UInt8] {
        var buffer = ByteBuffer()
        reply.encode(into: &buffer)
        return Array(buffer.readableBytesView)
    }

    /// Invariant: a simple reply is magic, error, cookie, then read data only on success.
    @Test func simple() {
        #expect(
            encode(.simple(cookie: 0x0102, error: .EIO, data: ByteBuffer(bytes: [9])))
                == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1, 2]
        )
        #expect(encode(.simple(cookie: 1, error: .success, data: ByteBuffer(bytes: [9, 8]))).suffix(2) == [9, 8])
    }

    /// Invariant: structured chunks carry magic, flags, type, cookie, length and a typed payload.
    @Test func structured() {
        let data = encode(
            .chunk(NBDReplyChunk(cookie: 7, content: .offsetData(offset: 512, data: ByteBuffer(bytes: [1, 2, 3]))))
        )
        #expect(
            data == [
                0x66, 0x8E, 0x33, 0xEF, 0, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 11, 0, 0, 0, 0, 0, 0, 2, 0, 1, 2,
                3,
            ]
        )
        let none = encode(.chunk(NBDReplyChunk(cookie: 7, content: .none)))
        #expect(none.count == 20 && none[6...7] == [0, 0] && none[16...] == [0, 0, 0, 0])
        let status = encode(
            .chunk(
                NBDReplyChunk(
                    cookie: 7,
                    content: .blockStatus(contextID: 1, descriptors: [.init(length: 4096, flags: 3)])
                )
            )
        )
        #expect(status[6...7] == [0, 5])
        #expect(status[16...] == [0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3])
        let error = encode(.chunk(NBDReplyChunk(cookie: 7, content: .error(.ENOSPC, message: "full"))))
        #expect(error[6...7] == [0x80, 0x01])
        #expect(Array(error[16...]) == [0, 0, 0, 10, 0, 0, 0, 28, 0, 4] + Array("full".utf8))
    }

    /// Invariant: the zero-copy writer puts the same bytes on the wire as the copying encoder.
    @Test func writerMatchesEncoder() throws {
        let reply = NBDReply.chunk(
            NBDReplyChunk(cookie: 3, content: .offsetData(offset: 0, data: ByteBuffer(bytes: [5, 6, 7])))
        )
        let channel = EmbeddedChannel(handler: NBDReplyWriter())
        try channel.writeOutbound(reply)
        var wire: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { wire += Array(buffer.readableBytesView) }
        #expect(wire == encode(reply))
    }
}

@Suite struct ValidationTests {
    static let writable = NBDSession(
        export: NBDExportDescription(
            name: "d",
            size: 1 << 20,
            flags: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero]
        ),
        structuredReplies: true,
        metaContextIDs: [1]
    )
    static let readOnly = NBDSession(
        export: NBDExportDescription(name: "r", size: 1 << 20, flags: [.hasFlags, .readOnly, .sendFlush])
    )

    func check(_ request: NBDRequest, _ session: NBDSession = writable) -> NBDErrorCode {
        validate(request, in: session)?.code ?? .success
    }

    /// Invariant: each malformed request gets the error the spec asks for, and good ones pass.
    @Test func errors() {
        let size: UInt64 = 1 << 20
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: 0, length: 512)) == .success)
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: size - 1, length: 2)) == .EINVAL)
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: UInt64.max, length: 2)) == .EINVAL)
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: 0, length: 0)) == .EINVAL)
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: 0, length: 33 << 20)) == .EOVERFLOW)
        #expect(check(NBDRequest(command: .write, cookie: 1, offset: size, length: 1)) == .ENOSPC)
        #expect(check(NBDRequest(command: .writeZeroes, cookie: 1, offset: size - 4, length: 8)) == .ENOSPC)
        // An oversized WRITE carries a payload: EINVAL, not EOVERFLOW (which is for payload-less commands).
        #expect(
            check(NBDRequest(command: .write, cookie: 1, offset: 0, length: 40 << 20, payloadDiscarded: true))
                == .EINVAL
        )
        // ENOSPC is for commands that write data; TRIM, CACHE and BLOCK_STATUS past the end are EINVAL.
        #expect(check(NBDRequest(command: .trim, cookie: 1, offset: size - 4, length: 8)) == .EINVAL)
        #expect(check(NBDRequest(command: .cache, cookie: 1, offset: size - 4, length: 8)) == .EINVAL)
        #expect(check(NBDRequest(command: .blockStatus, cookie: 1, offset: size, length: 1)) == .EINVAL)
        #expect(
            check(
                NBDRequest(flags: [.noHole, .fastZero, .fua], command: .writeZeroes, cookie: 1, offset: 0, length: 8)
            ) == .success
        )
        #expect(check(NBDRequest(flags: .reqOne, command: .writeZeroes, cookie: 1, offset: 0, length: 8)) == .EINVAL)
        #expect(check(NBDRequest(flags: .reqOne, command: .blockStatus, cookie: 1, offset: 0, length: 8)) == .success)
        #expect(check(NBDRequest(flags: .noHole, command: .write, cookie: 1, offset: 0, length: 8)) == .EINVAL)
        #expect(check(NBDRequest(flags: .dontFragment, command: .read, cookie: 1, offset: 0, length: 8)) == .EINVAL)
        #expect(check(NBDRequest(command: .flush, cookie: 1)) == .success)
        #expect(check(NBDRequest(command: NBDCommand(rawValue: 99), cookie: 1)) == .EINVAL)
        #expect(check(NBDRequest(command: .resize, cookie: 1, offset: 0, length: 1)) == .EINVAL)
        #expect(check(NBDRequest(flags: NBDCommandFlags(rawValue: 0x100), command: .flush, cookie: 1)) == .EINVAL)
        // Read-only export: writes are EPERM even when also out of range or flagged; block status needs the
        // context.
        #expect(check(NBDRequest(command: .write, cookie: 1, offset: size, length: 1), Self.readOnly) == .EPERM)
        #expect(check(NBDRequest(command: .writeZeroes, cookie: 1, offset: 0, length: 1), Self.readOnly) == .EPERM)
        #expect(check(NBDRequest(command: .trim, cookie: 1, offset: 0, length: 1), Self.readOnly) == .EPERM)
        #expect(
            check(NBDRequest(flags: .fua, command: .write, cookie: 1, offset: 0, length: 1), Self.readOnly) == .EPERM
        )
        #expect(check(NBDRequest(command: .read, cookie: 1, offset: 0, length: 1), Self.readOnly) == .success)
        #expect(check(NBDRequest(command: .blockStatus, cookie: 1, offset: 0, length: 1), Self.readOnly) == .EINVAL)
        #expect(check(NBDRequest(command: .cache, cookie: 1, offset: 0, length: 1), Self.readOnly) == .success)
    }

    /// Invariant: with SEND_FUA offered, FUA is accepted on every command (the spec's MUST); without it, on
    /// none.
    @Test func fuaOnEveryCommand() {
        let commands: [NBDCommand] = [.read, .write, .flush, .trim, .cache, .writeZeroes, .blockStatus]
        for command in commands {
            let length: UInt32 = command == .flush ? 0 : 512
            let request = NBDRequest(flags: .fua, command: command, cookie: 1, offset: 0, length: length)
            #expect(check(request) == .success, "\(command)")
            #expect(check(request, Self.readOnly) != .success, "\(command) on an export without SEND_FUA")
        }
    }

    /// Invariant: commands the export does not offer (TRIM, WRITE_ZEROES, FLUSH) are EINVAL; FAST_ZERO
    /// only where offered.
    @Test func unofferedCommands() {
        let bare = NBDSession(export: NBDExportDescription(name: "b", size: 1 << 20, flags: [.hasFlags]))
        #expect(check(NBDRequest(command: .trim, cookie: 1, offset: 0, length: 1), bare) == .EINVAL)
        #expect(check(NBDRequest(command: .writeZeroes, cookie: 1, offset: 0, length: 1), bare) == .EINVAL)
        #expect(check(NBDRequest(command: .flush, cookie: 1), bare) == .EINVAL)
        #expect(check(NBDRequest(command: .write, cookie: 1, offset: 0, length: 1), bare) == .success)
        let noFastZero = NBDSession(
            export: NBDExportDescription(name: "z", size: 1 << 20, flags: [.hasFlags, .sendWriteZeroes])
        )
        #expect(
            check(NBDRequest(flags: .fastZero, command: .writeZeroes, cookie: 1, offset: 0, length: 1), noFastZero)
                == .EINVAL
        )
    }

    /// Invariant: errno values map onto the closed NBD error set, unknown ones to EIO; ENOTSUP reaches a
    /// client only for a FAST_ZERO write-zeroes, and a device's EOVERFLOW never (both are EINVAL otherwise).
    @Test func errnoMapping() {
        #expect(NBDErrorCode(errno: 1) == .EPERM)
        #expect(NBDErrorCode(errno: 30) == .EPERM)
        #expect(NBDErrorCode(errno: 28) == .ENOSPC)
        #expect(NBDErrorCode(errno: 122) == .ENOSPC)
        #expect(NBDErrorCode(errno: 95) == .ENOTSUP)
        #expect(NBDErrorCode(errno: 22) == .EINVAL)
        #expect(NBDErrorCode(errno: 108) == .ESHUTDOWN)
        #expect(NBDErrorCode(errno: 2) == .EIO)
        let fastZero = NBDRequest(flags: .fastZero, command: .writeZeroes, cookie: 1, offset: 0, length: 1)
        let zero = NBDRequest(command: .writeZeroes, cookie: 1, offset: 0, length: 1)
        let write = NBDRequest(command: .write, cookie: 1, offset: 0, length: 1)
        let slow = BlockIOError(.notSupported, operation: .writeZeroes, message: "slow")
        #expect(nbdErrorCode(for: slow, in: fastZero) == .ENOTSUP)
        #expect(nbdErrorCode(for: slow, in: zero) == .EINVAL)
        #expect(
            nbdErrorCode(for: BlockIOError(.system, operation: .write, errno: 75, message: ""), in: write) == .EINVAL
        )
        #expect(nbdErrorCode(for: BlockIOError(.outOfRange, operation: .write, message: ""), in: write) == .ENOSPC)
        #expect(nbdErrorCode(for: CancellationError(), in: write) == .EIO)
    }

    /// Invariant: block status descriptors cover the request from its offset, merge equal neighbours,
    /// are clipped to the request, REQ_ONE keeps only the first, and no reply has more than the limit.
    @Test func descriptors() {
        let extents = [
            NBDStatusRun(offset: 0, length: 4096, flags: 0), NBDStatusRun(offset: 4096, length: 4096, flags: 0),
            NBDStatusRun(offset: 8192, length: 1 << 20, flags: 3),
        ]
        let all = NBDTransmissionHandler.descriptors(extents, offset: 1024, length: 10000, one: false)
        #expect(all == [.init(length: 7168, flags: 0), .init(length: 2832, flags: 3)])
        let one = NBDTransmissionHandler.descriptors(extents, offset: 1024, length: 10000, one: true)
        #expect(one == [.init(length: 7168, flags: 0)])
        // A reply stops at the descriptor limit (2^20 by default); what it covers is still exact.
        let alternating = (0..<8).map {
            NBDStatusRun(offset: UInt64($0) * 4096, length: 4096, flags: $0 % 2 == 0 ? 0 : 2)
        }
        let capped = NBDTransmissionHandler.descriptors(alternating, offset: 0, length: 32768, one: false, limit: 3)
        #expect(
            capped == [.init(length: 4096, flags: 0), .init(length: 4096, flags: 2), .init(length: 4096, flags: 0)]
        )
        // Runs that do not reach the request's first byte describe nothing (the caller decides what then).
        #expect(NBDTransmissionHandler.descriptors(extents, offset: 1 << 22, length: 512, one: false).isEmpty)
    }
}
