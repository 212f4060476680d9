import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// The kernel NBD driver (/dev/nbdN), connected to the bus's own NBD export with Debian's `nbd-client`,
/// which does the handshake and hands the socket to the kernel (NBD_SET_SOCK / netlink) as it does for
/// any NBD server.
enum KernelNBD {
    static let client = "/usr/sbin/nbd-client"

    /// Whether this kernel has NBD devices (the `nbd` module loaded).
    static var isAvailable: Bool { access("/sys/block/nbd0", F_OK) == 0 && access("/dev/nbd0", F_OK) == 0 }

    /// Connects a free /dev/nbdN to `export` on the unix socket and returns its path.
    static func connect(socket: String, export: String, readOnly: Bool) throws -> String {
        guard access(client, X_OK) == 0 else { throw BusError("\(client) is missing (Debian package nbd-client)") }
        for index in 0..<1024 {
            let name = "nbd\(index)"
            guard access("/sys/block/\(name)", F_OK) == 0 else { break }
            // A device in use has a pid file (the connection's owner) or a non-zero size.
            if access("/sys/block/\(name)/pid", F_OK) == 0 { continue }
            if let size = try? String(contentsOfFile: "/sys/block/\(name)/size", encoding: .utf8),
                size.trimmingCharacters(in: .whitespacesAndNewlines) != "0"
            {
                continue
            }
            var output = ""
            var arguments = ["-unix", socket, "/dev/\(name)", "-N", export, "-b", "4096"]
            if readOnly { arguments.append("-readonly") }
            let status = runTool(client, arguments, output: &output)
            if status == 0 { return "/dev/\(name)" }
            if output.contains("busy") || output.contains("in use") { continue }
            throw BusError(
                "nbd-client could not connect /dev/\(name): \(output.trimmingCharacters(in: .whitespacesAndNewlines))"
            )
        }
        throw BusError("no free /dev/nbdN device")
    }

    static func disconnect(_ device: String) throws {
        var output = ""
        let status = runTool(client, ["-d", device], output: &output)
        guard status == 0 else {
            throw BusError("cannot disconnect \(device): \(output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
    }
}
