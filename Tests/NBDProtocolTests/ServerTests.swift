import BlockIO
import Logging
import NBDProtocol
import NBDServer
import NIOCore
import Synchronization
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// A tiny blocking NBD client over a unix socket, speaking the wire format by hand so the tests check
/// the server's bytes, not a library's interpretation of them.
final class RawClient {
    let fd: Int32

    init?(socketPath: String) {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(socketPath.utf8)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        if result != 0 {
            close(fd)
            return nil
        }
    }

    deinit { close(fd) }

    func send(_ buffer: ByteBuffer) {
        let bytes = Array(buffer.readableBytesView)
        var done = 0
        while done < bytes.count {
            let n = bytes[done...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }

    /// Reads exactly `count` bytes, or nil on EOF/timeout.
    func receive(_ count: Int) -> ByteBuffer? {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes[done...].withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { return nil }
            done += n
        }
        return ByteBuffer(bytes: bytes)
    }

    /// True if the server closed the connection (EOF).
    func isClosedByServer() -> Bool {
        var byte: UInt8 = 0
        return recv(fd, &byte, 1, 0) == 0
    }

    /// Negotiates with GO; returns the export size and flags.
    func handshake(
        export: String = "",
        structured: Bool = true,
        contexts: [String] = [NBDBaseAllocation.name]
    ) -> (UInt64, NBDTransmissionFlags)? {
        guard var greeting = receive(18), greeting.readInteger(as: UInt64.self) == NBDMagic.greeting else { return nil }
        send(ClientBytes.flags())
        if structured {
            send(ClientBytes.option(.structuredReply))
            guard readOptionReplies().last?.0 == .ack else { return nil }
            if !contexts.isEmpty {
                send(ClientBytes.option(.setMetaContext, ClientBytes.metaContextData(export, queries: contexts)))
                guard readOptionReplies().last?.0 == .ack else { return nil }
            }
        }
        send(ClientBytes.option(.go, ClientBytes.goData(export)))
        var result: (UInt64, NBDTransmissionFlags)?
        for (type, data) in readOptionReplies() where type == .info {
            var data = data
            if data.readInteger(as: UInt16.self) == NBDInfoType.export.rawValue {
                result = (data.readInteger()!, NBDTransmissionFlags(rawValue: data.readInteger()!))
            }
        }
        return result
    }

    /// Reads option replies until ACK or an error reply.
    func readOptionReplies() -> [(NBDOptionReplyType, ByteBuffer)] {
        var replies: [(NBDOptionReplyType, ByteBuffer)] = []
        while var header = receive(20) {
            _ = header.readInteger(as: UInt64.self)
            _ = header.readInteger(as: UInt32.self)
            let type = NBDOptionReplyType(rawValue: header.readInteger()!)
            let length = Int(header.readInteger(as: UInt32.self)!)
            let data = length > 0 ? receive(length) ?? ByteBuffer() : ByteBuffer()
            replies.append((type, data))
            if type == .ack || type.isError { break }
        }
        return replies
    }

    func request(_ request: NBDRequest) {
        var buffer = ByteBuffer()
        request.encode(into: &buffer)
        send(buffer)
    }

    /// One reply: (cookie, error, payload). Simple replies to READ carry `readLength` data bytes;
    /// structured replies are read chunk by chunk until DONE, concatenating OFFSET_DATA payloads and the
    /// descriptors of every BLOCK_STATUS chunk (`chunks` keeps them apart, by context id).
    func reply(
        readLength: Int = 0
    ) -> (
        cookie: UInt64, error: NBDErrorCode, data: ByteBuffer, descriptors: [NBDBlockDescriptor],
        chunks: [(contextID: UInt32, descriptors: [NBDBlockDescriptor])]
    )? {
        var data = ByteBuffer()
        var descriptors: [NBDBlockDescriptor] = []
        var chunks: [(contextID: UInt32, descriptors: [NBDBlockDescriptor])] = []
        var error = NBDErrorCode.success
        while true {
            guard var magic = receive(4) else { return nil }
            if magic.readInteger(as: UInt32.self) == NBDMagic.simpleReply {
                guard var rest = receive(12) else { return nil }
                let code = NBDErrorCode(rawValue: rest.readInteger()!)
                let cookie: UInt64 = rest.readInteger()!
                if code == .success && readLength > 0 { data = receive(readLength) ?? ByteBuffer() }
                return (cookie, code, data, [], [])
            }
            guard var header = receive(16) else { return nil }
            let flags = NBDReplyFlags(rawValue: header.readInteger()!)
            let type = NBDReplyChunkType(rawValue: header.readInteger()!)
            let cookie: UInt64 = header.readInteger()!
            let length = Int(header.readInteger(as: UInt32.self)!)
            var payload = length > 0 ? receive(length) ?? ByteBuffer() : ByteBuffer()
            switch type {
            case .offsetData:
                _ = payload.readInteger(as: UInt64.self)
                data.writeBuffer(&payload)
            case .blockStatus:
                let id: UInt32 = payload.readInteger() ?? 0
                var chunk: [NBDBlockDescriptor] = []
                while let length: UInt32 = payload.readInteger(), let flags: UInt32 = payload.readInteger() {
                    chunk.append(NBDBlockDescriptor(length: length, flags: flags))
                }
                descriptors += chunk
                chunks.append((id, chunk))
            case .error:
                error = NBDErrorCode(rawValue: payload.readInteger()!)
            default: break
            }
            if flags.contains(.done) { return (cookie, error, data, descriptors, chunks) }
        }
    }
}

/// Starts a server over memory devices in a temporary directory and stops it afterwards.
func withServer(
    size: UInt64 = 4 << 20,
    readOnly: Bool = false,
    maximumConnections: Int = 64,
    handshakeTimeout: TimeAmount = .seconds(10),
    tls: NBDTLSConfiguration? = nil,
    metaContexts: [NBDMetaContext] = [],
    _ body: (String, NBDServer, MemoryDevice) async throws -> Void
) async throws {
    let directory = TestEnvironment.temporaryDirectory("nbd-server")
    defer { TestEnvironment.remove(directory) }
    let path = directory + "/nbd.sock"
    let device = MemoryDevice(size: size)
    var configuration = NBDServerConfiguration(listeners: [.unixSocket(path: path)])
    configuration.maximumConnections = maximumConnections
    configuration.handshakeTimeout = handshakeTimeout
    configuration.tls = tls
    configuration.deviceThreads = 4
    let server = NBDServer(
        exports: [NBDExport(name: "mem", device: device, readOnly: readOnly, metaContexts: metaContexts)],
        configuration: configuration,
        logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
    )
    try await server.start()
    do {
        try await body(path, server, device)
    } catch {
        try? await server.shutdown()
        throw error
    }
    try await server.shutdown()
}

@Suite(.serialized) struct ServerTests {
    /// Invariant: the socket is created with mode 0600 and removed on shutdown.
    @Test func socketPermissions() async throws {
        var seenPath = ""
        try await withServer { path, _, _ in
            seenPath = path
            var info = stat()
            #expect(stat(path, &info) == 0)
            #expect(info.st_mode & 0o777 == 0o600)
        }
        #expect(access(seenPath, F_OK) != 0)
    }

    /// Invariant: data written reads back, in simple and structured modes; block status reflects writes
    /// and trims; errors leave the connection usable.
    @Test func readWriteAndErrors() async throws {
        try await withServer { path, _, _ in
            let client = try #require(RawClient(socketPath: path))
            let (size, flags) = try #require(client.handshake())
            #expect(size == 4 << 20)
            #expect(
                flags.isSuperset(of: [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .canMultiConn])
            )
            let pattern = Pattern.bytes(count: 100_000, offset: 12345, seed: 1)
            client.request(
                NBDRequest(
                    flags: .fua,
                    command: .write,
                    cookie: 1,
                    offset: 12345,
                    length: UInt32(pattern.count),
                    payload: ByteBuffer(bytes: pattern)
                )
            )
            #expect(client.reply()?.error == .success)
            client.request(NBDRequest(command: .read, cookie: 2, offset: 12345, length: UInt32(pattern.count)))
            let read = try #require(client.reply())
            #expect(read.cookie == 2 && read.error == .success)
            #expect(Array(read.data.readableBytesView) == pattern)

            // Errors: out of range read and write, zero length, bad flags, unknown command; then still fine.
            client.request(NBDRequest(command: .read, cookie: 3, offset: size - 1, length: 2))
            #expect(client.reply()?.error == .EINVAL)
            client.request(
                NBDRequest(command: .write, cookie: 4, offset: size, length: 1, payload: ByteBuffer(bytes: [1]))
            )
            #expect(client.reply()?.error == .ENOSPC)
            client.request(NBDRequest(command: .read, cookie: 5, offset: 0, length: 0))
            #expect(client.reply()?.error == .EINVAL)
            client.request(NBDRequest(flags: .reqOne, command: .read, cookie: 6, offset: 0, length: 1))
            #expect(client.reply()?.error == .EINVAL)
            client.request(NBDRequest(command: NBDCommand(rawValue: 77), cookie: 7))
            #expect(client.reply()?.error == .EINVAL)
            client.request(NBDRequest(command: .read, cookie: 8, offset: 0, length: 64 << 20))
            #expect(client.reply()?.error == .EOVERFLOW)
            // The spec points of issue 11: FUA is accepted on a READ (SEND_FUA is offered), TRIM and CACHE past
            // the end are EINVAL, not ENOSPC.
            client.request(NBDRequest(flags: .fua, command: .read, cookie: 81, offset: 12345, length: 16))
            let fuaRead = try #require(client.reply())
            #expect(fuaRead.error == .success && Array(fuaRead.data.readableBytesView) == Array(pattern[0..<16]))
            client.request(NBDRequest(command: .trim, cookie: 82, offset: size - 1, length: 2))
            #expect(client.reply()?.error == .EINVAL)
            client.request(NBDRequest(command: .cache, cookie: 83, offset: size, length: 1))
            #expect(client.reply()?.error == .EINVAL)

            client.request(NBDRequest(command: .blockStatus, cookie: 9, offset: 0, length: UInt32(size)))
            let status = try #require(client.reply())
            // MemoryDevice allocates 64 KiB chunks: the written range is data, the rest a zero hole.
            #expect(status.descriptors.first == NBDBlockDescriptor(length: 2 * 65536, flags: 0))
            #expect(status.descriptors.reduce(0) { $0 + UInt64($1.length) } == size)
            #expect(status.descriptors.contains { $0.flags == 0 })

            client.request(NBDRequest(command: .trim, cookie: 10, offset: 0, length: UInt32(size)))
            #expect(client.reply()?.error == .success)
            client.request(
                NBDRequest(flags: .reqOne, command: .blockStatus, cookie: 11, offset: 0, length: UInt32(size))
            )
            #expect(client.reply()?.descriptors == [NBDBlockDescriptor(length: UInt32(size), flags: 3)])
            client.request(NBDRequest(command: .cache, cookie: 12, offset: 0, length: 4096))
            #expect(client.reply()?.error == .success)
            client.request(NBDRequest(command: .flush, cookie: 13))
            #expect(client.reply()?.error == .success)
            client.request(NBDRequest(command: .disconnect, cookie: 14))
            #expect(client.isClosedByServer())
        }
    }

    /// Invariant: BLOCK_STATUS answers one chunk per selected context, with the ids SET_META_CONTEXT handed
    /// out, only the last chunk ending the reply; REQ_ONE gives one descriptor per chunk; a context whose
    /// source fails fails the request (EIO with its message), and the connection goes on.
    @Test func metaContextChunks() async throws {
        let bitmap = NBDMetaContext(name: "qemu:dirty-bitmap:b") { offset, count in
            // Dirty below 64 KiB, clean above: a source's runs may start before the request.
            [
                NBDStatusRun(offset: 0, length: 65536, flags: NBDQemuContext.dirty),
                NBDStatusRun(offset: 65536, length: 4 << 20, flags: 0),
            ].filter { $0.offset + $0.length > offset && $0.offset < offset + count }
        }
        let failing = NBDMetaContext(name: "qemu:allocation-depth") { offset, _ in
            struct Broken: Error {}
            if offset >= 1 << 20 { throw Broken() }
            return [NBDStatusRun(offset: offset, length: 1 << 20, flags: 1)]
        }
        try await withServer(metaContexts: [failing, bitmap]) { path, _, _ in
            let client = try #require(RawClient(socketPath: path))
            let size = try #require(client.handshake(contexts: ["base:allocation", "qemu:dirty-bitmap:b"])).0
            client.request(NBDRequest(command: .blockStatus, cookie: 1, offset: 4096, length: UInt32(size - 4096)))
            let status = try #require(client.reply())
            #expect(status.error == .success)
            #expect(status.chunks.map(\.contextID) == [1, 3])
            #expect(
                status.chunks.last?.descriptors == [
                    NBDBlockDescriptor(length: 61440, flags: 1),
                    NBDBlockDescriptor(length: UInt32(size - 65536), flags: 0),
                ]
            )
            client.request(NBDRequest(flags: .reqOne, command: .blockStatus, cookie: 2, offset: 0, length: 100))
            let one = try #require(client.reply())
            #expect(one.chunks.map(\.descriptors.count) == [1, 1])
            #expect(one.chunks.last?.descriptors == [NBDBlockDescriptor(length: 100, flags: 1)])

            let depth = try #require(RawClient(socketPath: path))
            _ = try #require(depth.handshake(contexts: ["qemu:allocation-depth"]))
            depth.request(NBDRequest(command: .blockStatus, cookie: 3, offset: 0, length: 8192))
            #expect(depth.reply()?.chunks.map(\.contextID) == [2])
            depth.request(NBDRequest(command: .blockStatus, cookie: 4, offset: 2 << 20, length: 8192))
            #expect(depth.reply()?.error == .EIO)
            depth.request(NBDRequest(command: .read, cookie: 5, offset: 0, length: 16))
            #expect(depth.reply()?.error == .success)
        }
    }

    /// Invariant: an oversized WRITE is answered with EINVAL, its payload is consumed, and the connection
    /// keeps working.
    @Test func oversizedWrite() async throws {
        try await withServer(size: 64 << 20) { path, _, _ in
            let client = try #require(RawClient(socketPath: path))
            _ = try #require(client.handshake(structured: false))
            let length = 33 << 20
            client.request(NBDRequest(command: .write, cookie: 1, offset: 0, length: UInt32(length)))
            var payload = ByteBuffer()
            payload.writeRepeatingByte(0xEE, count: length)
            client.send(payload)
            #expect(client.reply()?.error == .EINVAL)
            client.request(NBDRequest(command: .read, cookie: 2, offset: 0, length: 16))
            let read = try #require(client.reply(readLength: 16))
            #expect(read.cookie == 2 && Array(read.data.readableBytesView) == [UInt8](repeating: 0, count: 16))
        }
    }

    /// Invariant: many pipelined requests on one connection all get exactly one reply with their cookie.
    @Test func pipelined() async throws {
        try await withServer { path, _, device in
            let client = try #require(RawClient(socketPath: path))
            _ = try #require(client.handshake(structured: false))
            let count = 200
            var expected = Set<UInt64>()
            var batch = ByteBuffer()
            for i in 0..<count {
                let data = Pattern.bytes(count: 4096, offset: UInt64(i * 4096), seed: 3)
                NBDRequest(
                    command: .write,
                    cookie: UInt64(i),
                    offset: UInt64(i * 4096),
                    length: 4096,
                    payload: ByteBuffer(bytes: data)
                ).encode(into: &batch)
                expected.insert(UInt64(i))
            }
            client.send(batch)
            var seen = Set<UInt64>()
            for _ in 0..<count {
                let reply = try #require(client.reply())
                #expect(reply.error == .success)
                seen.insert(reply.cookie)
            }
            #expect(seen == expected)
            #expect(try device.read(count: 4096, at: 4096 * 7) == Pattern.bytes(count: 4096, offset: 4096 * 7, seed: 3))
        }
    }

    /// Invariant: a pipeline mixing requests the server batches (small reads and writes, block status) with
    /// ones it runs alone (a large read, a FUA write, a flush) and ones it refuses (past the end) gets one
    /// correct reply per cookie: batching changes how requests are scheduled, never what they answer.
    @Test func pipelinedMixedBatch() async throws {
        try await withServer(size: 8 << 20) { path, _, device in
            let initial = Pattern.bytes(count: 8 << 20, offset: 0, seed: 5)
            try initial.withUnsafeBytes { try device.write($0, at: 0, fua: false) }
            let client = try #require(RawClient(socketPath: path))
            _ = try #require(client.handshake(structured: true))
            var pipeline = ByteBuffer()
            var reads: [UInt64: (offset: UInt64, length: Int)] = [:]
            var cookie: UInt64 = 0
            func add(_ request: NBDRequest) { request.encode(into: &pipeline) }
            for i in 0..<40 {
                cookie += 1
                let offset = UInt64(i) * 8192 + 512
                add(NBDRequest(command: .read, cookie: cookie, offset: offset, length: 4096))
                reads[cookie] = (offset, 4096)
            }
            cookie += 1
            add(NBDRequest(command: .read, cookie: cookie, offset: 1 << 20, length: 1 << 20))
            reads[cookie] = (1 << 20, 1 << 20)
            let written = Pattern.bytes(count: 4096, offset: 0, seed: 9)
            for (index, flags) in [NBDCommandFlags(), .fua, NBDCommandFlags()].enumerated() {
                cookie += 1
                add(
                    NBDRequest(
                        flags: flags,
                        command: .write,
                        cookie: cookie,
                        offset: UInt64(6 << 20) + UInt64(index) * 4096,
                        length: 4096,
                        payload: ByteBuffer(bytes: written)
                    )
                )
            }
            cookie += 1
            add(NBDRequest(command: .flush, cookie: cookie, offset: 0, length: 0))
            cookie += 1
            let pastEnd = cookie
            add(NBDRequest(command: .read, cookie: pastEnd, offset: 8 << 20, length: 4096))
            client.send(pipeline)

            var seen = Set<UInt64>()
            for _ in 0..<cookie {
                // Replies come in any order; reads are the only ones with data to check.
                let reply = try #require(client.reply())
                #expect(seen.insert(reply.cookie).inserted, "two replies for cookie \(reply.cookie)")
                if reply.cookie == pastEnd {
                    #expect(reply.error == .EINVAL || reply.error == .ENOSPC)
                    continue
                }
                #expect(reply.error == .success, "cookie \(reply.cookie)")
                if let (offset, length) = reads[reply.cookie] {
                    #expect(Array(reply.data.readableBytesView) == Array(initial[Int(offset)..<Int(offset) + length]))
                }
            }
            #expect(seen.count == Int(cookie))
            for index in 0..<3 {
                #expect(try device.read(count: 4096, at: UInt64(6 << 20) + UInt64(index) * 4096) == written)
            }
        }
    }

    /// Invariant: writes on a read-only export are EPERM and it advertises READ_ONLY.
    @Test func readOnlyExport() async throws {
        try await withServer(readOnly: true) { path, _, _ in
            let client = try #require(RawClient(socketPath: path))
            let (_, flags) = try #require(client.handshake())
            #expect(flags.contains(.readOnly))
            #expect(!flags.contains(.sendTrim))
            client.request(
                NBDRequest(command: .write, cookie: 1, offset: 0, length: 1, payload: ByteBuffer(bytes: [1]))
            )
            #expect(client.reply()?.error == .EPERM)
            client.request(NBDRequest(command: .trim, cookie: 2, offset: 0, length: 1))
            #expect(client.reply()?.error == .EPERM)
            client.request(NBDRequest(command: .read, cookie: 3, offset: 0, length: 1))
            #expect(client.reply()?.error == .success)
        }
    }

    /// Invariant: garbage, a stalled handshake and a vanished client close only their own connection.
    @Test func hostileClients() async throws {
        try await withServer(handshakeTimeout: .milliseconds(300)) { path, _, _ in
            let good = try #require(RawClient(socketPath: path))
            _ = try #require(good.handshake())

            let garbage = try #require(RawClient(socketPath: path))
            _ = garbage.receive(18)
            var junk = ByteBuffer()
            junk.writeRepeatingByte(0x5A, count: 64)
            garbage.send(junk)
            #expect(garbage.isClosedByServer())

            let stalled = try #require(RawClient(socketPath: path))
            _ = stalled.receive(18)
            #expect(stalled.isClosedByServer())

            // A client that sends a bad request magic in transmission is dropped too.
            let badRequest = try #require(RawClient(socketPath: path))
            _ = try #require(badRequest.handshake())
            badRequest.send(junk)
            #expect(badRequest.isClosedByServer())

            // A client that vanishes with requests in flight.
            do {
                let vanishing = try #require(RawClient(socketPath: path))
                _ = try #require(vanishing.handshake())
                for i in 0..<16 {
                    vanishing.request(NBDRequest(command: .read, cookie: UInt64(i), offset: 0, length: 1 << 20))
                }
            }

            good.request(NBDRequest(command: .read, cookie: 1, offset: 0, length: 4096))
            #expect(good.reply()?.error == .success)
        }
    }

    /// Invariant: connections beyond the limit are closed at once; the others keep working.
    @Test func connectionLimit() async throws {
        try await withServer(maximumConnections: 2) { path, server, _ in
            let a = try #require(RawClient(socketPath: path))
            let b = try #require(RawClient(socketPath: path))
            _ = try #require(a.handshake())
            _ = try #require(b.handshake())
            let c = try #require(RawClient(socketPath: path))
            #expect(c.receive(18) == nil)
            #expect(server.connectionCount == 2)
            a.request(NBDRequest(command: .flush, cookie: 1))
            #expect(a.reply()?.error == .success)
        }
    }

    /// Invariant: a stale socket file is replaced, a live one refuses the second server.
    @Test func staleAndLiveSocket() async throws {
        try await withServer { path, _, _ in
            var configuration = NBDServerConfiguration(listeners: [.unixSocket(path: path)])
            configuration.deviceThreads = 1
            let second = NBDServer(
                exports: [NBDExport(name: "x", device: MemoryDevice(size: 4096))],
                configuration: configuration,
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
            )
            await #expect(throws: NBDServerError.self) { try await second.start() }
        }
        let directory = TestEnvironment.temporaryDirectory("nbd-stale")
        defer { TestEnvironment.remove(directory) }
        let path = directory + "/stale.sock"
        // Leave a socket file nobody listens on.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8))
            raw[path.utf8.count] = 0
        }
        _ = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        close(fd)
        #expect(access(path, F_OK) == 0)
        let server = NBDServer(
            exports: [NBDExport(name: "x", device: MemoryDevice(size: 4096))],
            configuration: NBDServerConfiguration(listeners: [.unixSocket(path: path)]),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await server.start()
        let client = try #require(RawClient(socketPath: path))
        #expect(client.handshake() != nil)
        try await server.shutdown()
    }

    /// Invariant: with an `inlineBudget`, a small request alone in flight runs on the event loop (its
    /// reply is right); one slow device call does not change that, two in a row send the connection's next
    /// requests to the thread pool; servers without the option use the pool.
    @Test func inlineLoneRequests() async throws {
        let directory = TestEnvironment.temporaryDirectory("nbd-inline")
        defer { TestEnvironment.remove(directory) }
        for inline in [true, false] {
            let path = directory + "/s\(inline).sock"
            let observer = ReadObserver()
            let device = HookedDevice(MemoryDevice(size: 1 << 20)) { _, _ in observer.observe() }
            var configuration = NBDServerConfiguration(listeners: [.unixSocket(path: path)])
            // A budget no preemption on a busy machine reaches, and a device 2x slower than that.
            configuration.inlineBudget = inline ? .milliseconds(50) : nil
            let server = NBDServer(
                exports: [NBDExport(name: "x", device: device)],
                configuration: configuration,
                logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
            )
            try await server.start()
            let client = try #require(RawClient(socketPath: path))
            _ = try #require(client.handshake(structured: false))
            let data = Pattern.bytes(count: 4096, offset: 8192, seed: 5)
            client.request(
                NBDRequest(command: .write, cookie: 1, offset: 8192, length: 4096, payload: ByteBuffer(bytes: data))
            )
            #expect(client.reply()?.error == .success)
            client.request(NBDRequest(command: .read, cookie: 2, offset: 8192, length: 4096))
            #expect(client.reply(readLength: 4096).map { Array($0.data.readableBytesView) } == data)
            #expect(observer.lastThread.hasPrefix("NIO-ELT") == inline, "\(observer.lastThread)")

            if inline {
                /// Reads 512 bytes with the device made `delay` µs slow; the thread that ran the read.
                func read(_ cookie: UInt64, delay: Int) -> String {
                    observer.delayMicroseconds.store(delay, ordering: .relaxed)
                    client.request(NBDRequest(command: .read, cookie: cookie, offset: 0, length: 512))
                    #expect(client.reply(readLength: 512)?.error == .success)
                    return observer.lastThread
                }
                // A slow call still runs inline (its slowness is only known after it), one alone changes
                // nothing, two in a row send the next ones to the pool for a while.
                #expect(read(3, delay: 100_000).hasPrefix("NIO-ELT"))
                #expect(read(4, delay: 0).hasPrefix("NIO-ELT"))
                #expect(read(5, delay: 100_000).hasPrefix("NIO-ELT"))
                #expect(read(6, delay: 100_000).hasPrefix("NIO-ELT"))
                #expect(!read(7, delay: 0).hasPrefix("NIO-ELT"))
            }
            try await server.shutdown()
        }
    }

    /// Invariant: shutdown lets in-flight requests finish and answers them before closing.
    @Test func gracefulShutdown() async throws {
        let directory = TestEnvironment.temporaryDirectory("nbd-shutdown")
        defer { TestEnvironment.remove(directory) }
        let path = directory + "/s.sock"
        let device = MemoryDevice(size: 64 << 20)
        let server = NBDServer(
            exports: [NBDExport(name: "x", device: device)],
            configuration: NBDServerConfiguration(listeners: [.unixSocket(path: path)]),
            logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() })
        )
        try await server.start()
        let client = try #require(RawClient(socketPath: path))
        _ = try #require(client.handshake(structured: false))
        for i in 0..<8 {
            client.request(NBDRequest(command: .read, cookie: UInt64(i), offset: UInt64(i) << 20, length: 1 << 20))
        }
        // Wait until the server has seen the requests (the first reply arrives), then shut down.
        var replies = 0
        if client.reply(readLength: 1 << 20) != nil { replies += 1 }
        let stop = Task { try await server.shutdown() }
        while client.reply(readLength: 1 << 20) != nil { replies += 1 }
        try await stop.value
        #expect(replies == 8)
        #expect(server.exports[0].stats.snapshot.reads == 8)
    }
}

/// What the inline test's device saw: the name of the thread of its last read; and how slow to make reads.
final class ReadObserver: Sendable {
    let thread = Mutex("")
    let delayMicroseconds = Atomic<Int>(0)
    var lastThread: String { thread.withLock { $0 } }

    /// Notes the calling thread's name (NIO names event loop threads NIO-ELT-..., pool threads TP-#...),
    /// then sleeps the delay.
    func observe() {
        var name = [UInt8](repeating: 0, count: 64)
        let fd = open("/proc/thread-self/comm", O_RDONLY)
        let count = fd >= 0 ? Glibc.read(fd, &name, name.count) : 0
        if fd >= 0 { Glibc.close(fd) }
        thread.withLock { $0 = String(decoding: name.prefix(max(0, count)), as: UTF8.self) }
        let delay = delayMicroseconds.load(ordering: .relaxed)
        if delay > 0 { usleep(UInt32(delay)) }
    }
}
