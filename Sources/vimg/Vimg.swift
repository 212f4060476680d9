import ArgumentParser
import BlockIO
import ImageFormats
import RBD
import VImage

#if canImport(Glibc)
import Glibc
#endif

@main
struct Vimg: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vimg",
        abstract: "Create, inspect and check VIMG copy-on-write disk images.",
        discussion:
            "Habits follow qemu-img: -f/-O for formats, --output=json for scripts, qemu-img check's exit codes.",
        version: "0.1.0",
        subcommands: [
            Create.self, Info.self, Map.self, Check.self, Snapshot.self, Clone.self, Commit.self, Rebase.self,
            Resize.self, Amend.self, Compare.self, Convert.self, Measure.self, Bitmap.self, Diff.self, ExportDiff.self,
            ImportDiff.self, Sparsify.self, Compact.self, Scrub.self, RBDBreakLock.self, Replay.self,
        ]
    )
}

extension RepairMode: ExpressibleByArgument {}
extension FileDevice.CacheMode: ExpressibleByArgument {}

/// `--output=human|json`, shared by the subcommands scripts read.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case human, json
}

struct OutputOptions: ParsableArguments {
    @Option(name: .customLong("output"), help: "Output format: human or json.")
    var format: OutputFormat = .human
}

/// Runs a subcommand body, turning library errors into one calm line on stderr and exit code 1.
func runReportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let error as ExitCode {
        throw error
    } catch let error as VImageError {
        printError(error.description)
        throw ExitCode.failure
    } catch let error as BlockIOError {
        printError(error.description)
        throw ExitCode.failure
    } catch let error as ImageFormatError {
        printError(error.description)
        throw ExitCode.failure
    } catch let error as RBDError {
        printError(error.description)
        throw ExitCode.failure
    }
}

func printError(_ message: String) {
    var stderr = StandardError()
    print("vimg: error: \(message)", to: &stderr)
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        var bytes = Array(string.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}

/// Parses a size argument like qemu-img (`10G`, `512M`, `1T`, plain bytes).
func parseSize(_ text: String, what: String = "size") throws -> UInt64 {
    guard let value = ByteSize.parse(text) else {
        throw ValidationError("invalid \(what) '\(text)': use bytes or a suffix such as 512M, 10G, 1T")
    }
    return value
}

/// A tiny JSON writer: ordered keys (like qemu-img's output) and no Foundation dependency.
enum JSON {
    case int(Int64)
    case uint(UInt64)
    case bool(Bool)
    case string(String)
    case array([JSON])
    case object([(String, JSON)])
    case null

    func render(indent: Int = 0) -> String {
        let pad = String(repeating: " ", count: indent)
        let inner = String(repeating: " ", count: indent + 4)
        switch self {
        case .int(let v): return String(v)
        case .uint(let v): return String(v)
        case .bool(let v): return v ? "true" : "false"
        case .null: return "null"
        case .string(let s): return s.jsonQuoted
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { inner + $0.render(indent: indent + 4) }.joined(separator: ",\n") + "\n\(pad)]"
        case .object(let fields):
            if fields.isEmpty { return "{}" }
            return "{\n"
                + fields.map { inner + $0.0.jsonQuoted + ": " + $0.1.render(indent: indent + 4) }.joined(
                    separator: ",\n"
                ) + "\n\(pad)}"
        }
    }
}
