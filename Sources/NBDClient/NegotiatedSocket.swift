import NBDProtocol

#if canImport(Glibc)
import Glibc
#endif

/// A socket past the NBD handshake, for a client that does transmission itself: the kernel's NBD driver,
/// which the bus hands sockets to over netlink and which cannot negotiate on its own.
public struct NBDNegotiatedSocket: Sendable {
    /// The connected socket, in blocking mode with no receive timeout (the kernel's reads wait for as long
    /// as a request takes). The caller owns it.
    public let fd: Int32
    /// The export's size in bytes.
    public let size: UInt64
    /// The export's transmission flags (NBD_FLAG_*).
    public let flags: UInt16

    /// Connects to `export` on the unix socket `path` (plaintext) and negotiates with NBD_OPT_GO.
    /// - Throws: `BlockIOError` with the server's answer when it refuses the export.
    public static func connect(unixSocket path: String, export: String) throws -> NBDNegotiatedSocket {
        let uri = "nbd+unix:///\(NBDURI.percentEncoded(export))?socket=\(path)"
        let connection = try NBDConnection.open(
            NBDURI(transport: .unix(path: path), export: export),
            uri: uri,
            tls: nil
        )
        // The connection closes its descriptor when it goes away; the caller gets a duplicate of its own.
        let fd = fcntl(connection.fd, F_DUPFD_CLOEXEC, 3)
        guard fd >= 0 else { throw connection.fail("cannot duplicate the socket", errno: errno) }
        var none = timeval(tv_sec: 0, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &none, socklen_t(MemoryLayout<timeval>.size))
        return NBDNegotiatedSocket(fd: fd, size: connection.size, flags: connection.flags.rawValue)
    }
}
