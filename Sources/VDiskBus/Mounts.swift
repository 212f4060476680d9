import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// What is mounted from a block device, and the few mount operations the bus needs.
enum Mounts {
    struct Mount: Hashable {
        var device: String
        var mountpoint: String
    }

    /// File systems mounted from `device` or one of its partitions (`/dev/loop3`, `/dev/loop3p1`, ...).
    static func mounted(onDevice device: String) -> [Mount] {
        guard let text = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return [] }
        var result: [Mount] = []
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count >= 2 else { continue }
            let source = unescape(String(fields[0]))
            guard
                source == device
                    || (source.hasPrefix(device + "p") && source.dropFirst(device.count + 1).allSatisfy(\.isNumber))
            else { continue }
            result.append(Mount(device: source, mountpoint: unescape(String(fields[1]))))
        }
        return result
    }

    /// /proc/mounts writes space, tab, newline and backslash as octal escapes.
    static func unescape(_ field: String) -> String {
        guard field.contains("\\") else { return field }
        let bytes = Array(field.utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            if bytes[i] == UInt8(ascii: "\\"), i + 3 < bytes.count,
                let code = UInt8(String(decoding: bytes[(i + 1)...(i + 3)], as: UTF8.self), radix: 8)
            {
                out.append(code)
                i += 4
            } else {
                out.append(bytes[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func unmount(_ mountpoint: String) throws {
        if umount2(mountpoint, 0) == 0 { return }
        let e = errno
        throw BusError("cannot unmount \(mountpoint): \(String(cString: strerror(e)))")
    }

    static func freeze(_ mountpoint: String) throws {
        let status = runTool("/sbin/fsfreeze", ["-f", mountpoint])
        guard status == 0 else {
            throw BusError("cannot freeze \(mountpoint) for the snapshot (fsfreeze exit \(status))")
        }
    }

    @discardableResult
    static func thaw(_ mountpoint: String) -> Bool {
        runTool("/sbin/fsfreeze", ["-u", mountpoint]) == 0
    }
}

/// Runs a system tool and returns its exit status (127 if it could not be started).
@discardableResult
func runTool(_ path: String, _ arguments: [String], output: UnsafeMutablePointer<String>? = nil) -> Int32 {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: path)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    do { try process.run() } catch { return 127 }
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    output?.pointee = String(decoding: data, as: UTF8.self)
    return process.terminationStatus
}
