import ArgumentParser

#if canImport(Glibc)
import Glibc
#endif

/// The `vdisk` root command. Each subcommand lives in its own file as an extension of `Vdisk`; add new
/// ones (plug, unplug, list, bus) to `subcommands` below.
@main
struct Vdisk: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vdisk",
        abstract: "Export disk images over NBD and plug them into the kernel.",
        version: "0.1.0",
        subcommands: [
            Plug.self, Unplug.self, List.self, DiskSnapshot.self, DiskScrub.self, BusCommand.self, Serve.self,
            Crash.self, Mark.self,
        ]
    )

    /// `--crash-sim[=SEED]` is a flag with an optional value, which the parser has no notion of.
    static func main() async {
        await main(CrashTestingOptions.splittingOptionalValues(Array(CommandLine.arguments.dropFirst())))
    }
}

/// Prints one calm line on stderr, prefixed with the program name.
func printError(_ message: String) {
    printToStandardError("vdisk: error: \(message)")
}

func printToStandardError(_ line: String) {
    var bytes = Array((line + "\n").utf8)
    _ = Glibc.write(2, &bytes, bytes.count)
}

/// Runs a subcommand body, turning library errors into one line on stderr and exit code 1.
func runReportingErrors(_ body: () async throws -> Void) async throws {
    do {
        try await body()
    } catch let error as ExitCode {
        throw error
    } catch let error as CleanExit {
        throw error
    } catch {
        // Every library error describes itself in one line (CustomStringConvertible).
        printError("\(error)")
        throw ExitCode.failure
    }
}
