import Testing
import VDiskBus
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The bus's way of running programs: bounded in time, nothing inherited but stdin/stdout/stderr, always
/// reaped, whatever the program does.
struct SubprocessTests {
    /// Invariant: output and exit status come back as the program left them.
    @Test func outputAndStatus() throws {
        let r = try Subprocess.run("/bin/sh", ["-c", "echo out; echo err >&2; exit 3"], timeout: 10)
        #expect(r.status == 3)
        #expect(r.output == "out\nerr\n")
    }

    /// Invariant: a program that daemonizes (leaves a child holding its output pipe) returns as soon as it
    /// exits itself, not when the daemon does.
    @Test func daemonizingToolReturnsAtOnce() throws {
        let marker = "/tmp/vdisk-subprocess-daemon.\(getpid())"
        let start = monotonicNow()
        let r = try Subprocess.run(
            "/bin/sh",
            ["-c", "(echo $$ > \(marker); exec sleep 30) & echo started"],
            timeout: 20
        )
        #expect(r.status == 0)
        #expect(r.output.hasPrefix("started"))
        #expect(monotonicNow() - start < 5, "waited for the daemon")
        // The daemon (not ours to keep) goes away with the test.
        for _ in 0..<100 where access(marker, F_OK) != 0 { usleep(10_000) }
        let text = (try? String(contentsOfFile: marker, encoding: .utf8)) ?? ""
        if let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)) { kill(-pid, SIGKILL) }
        unlink(marker)
    }

    /// Invariant: a program that hangs is killed (with everything it started) at the deadline, reaped, and
    /// the error names it.
    @Test func hangingToolIsStoppedAndReaped() throws {
        let marker = "/tmp/vdisk-subprocess-hang.\(getpid())"
        defer { unlink(marker) }
        let start = monotonicNow()
        do {
            _ = try Subprocess.run(
                "/bin/sh",
                ["-c", "sleep 60 & echo $$ $! > \(marker); echo waiting; sleep 60"],
                timeout: 1
            )
            Issue.record("a hanging program returned")
        } catch {
            #expect("\(error)".contains("/bin/sh did not finish within 1 s"), "\(error)")
            #expect("\(error)".contains("waiting"), "\(error)")
        }
        #expect(monotonicNow() - start < 10)
        // The program was reaped (a zombie would still answer kill 0), and what it started was killed.
        let pids = readFile(marker).split(separator: " ").compactMap { pid_t($0.filter(\.isNumber)) }
        try #require(pids.count == 2, "\(readFile(marker))")
        #expect(kill(pids[0], 0) == -1 && errno == ESRCH, "the program is still there")
        var gone = false
        for _ in 0..<200 {
            // Killed: gone, or a zombie waiting for whoever adopted it.
            let state = readFile("/proc/\(pids[1])/stat").split(separator: " ").dropFirst(2).first
            if kill(pids[1], 0) == -1 && errno == ESRCH || state == "Z" {
                gone = true
                break
            }
            usleep(10_000)
        }
        #expect(gone, "its background child survived")
    }

    /// Invariant: the child holds no descriptor of ours beyond stdin, stdout and stderr.
    @Test func onlyStandardDescriptorsInherited() throws {
        let fd = open("/dev/null", O_RDONLY)  // not close-on-exec
        defer { close(fd) }
        let r = try Subprocess.run("/bin/sh", ["-c", "ls /proc/self/fd"], timeout: 10)
        let fds = r.output.split(separator: "\n").compactMap { Int($0) }
        // ls itself opens one descriptor to read the folder.
        #expect(fds.filter { $0 > 3 }.isEmpty, "\(fds)")
        #expect(!fds.contains(Int(fd)) || fd <= 3)
    }

    /// Invariant: a program that is not there is an error that names it, not a hang.
    @Test func missingProgram() {
        #expect(throws: BusError.self) { try Subprocess.run("/nonexistent/tool", [], timeout: 5) }
    }
}

func monotonicNow() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}
