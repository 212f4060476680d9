// Design notes
// ------------
// How the bus runs another program. It must never wedge the bus, whatever the program does:
//
//   - posix_spawn, not Foundation's `Process`: `Process` watches its children through CoreFoundation's run
//     loop, whose wakeup "socket pair" is two UDP sockets on 127.0.0.1; where the loopback interface is
//     down (a fresh guest, a container), that pair cannot be made ("*** Could not create wakeup socket pair
//     for CFSocket!!!"), the child's exit is never noticed, `waitUntilExit` never returns and the child stays
//     a zombie. Nothing here involves a run loop.
//   - the child gets /dev/null as stdin, one pipe as stdout and stderr, and no other descriptor of ours
//     (closefrom in the child): it cannot keep a control connection, a /dev/fuse or an NBD socket alive,
//     and a daemon it forks holds only the pipe.
//   - a clean signal mask and default dispositions (our threads block or ignore some), and its own process
//     group, so a timeout can kill everything it started.
//   - output is read with poll against a deadline; once the child has exited, what its forked children
//     still hold is not waited for (a daemonizing tool returns at once). The child is always reaped.
//
//   spawn --> poll(pipe, deadline) --> child exited? --> drain what is there --> reap
//                    |
//                    +-- deadline --> SIGKILL to the process group --> reap --> error naming the tool

import CBlockIO
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A program run by the bus, bounded in time.
public enum Subprocess {
    /// What a finished program left.
    public struct Result: Sendable {
        /// The exit status, or 128 + the signal that ended it.
        public var status: Int32
        /// Its standard output and standard error, interleaved (at most `outputLimit` bytes).
        public var output: String
    }

    /// Output beyond this is read and dropped: a tool's messages are a few lines.
    static let outputLimit = 1 << 16

    /// Runs `program` with `arguments` and waits for it, at most `timeout` seconds.
    /// - Throws: `BusError` when it cannot be started or does not finish in time (then it and every process
    ///   in its group were killed and reaped).
    public static func run(_ program: String, _ arguments: [String], timeout: Double) throws -> Result {
        var fds: [Int32] = [-1, -1]
        guard CBlockIO_pipe_cloexec(&fds) == 0 else {
            throw BusError("cannot run \(program): pipe: \(String(cString: strerror(errno)))")
        }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        defer { close(readEnd) }
        let pid: pid_t
        do {
            pid = try spawn(program, arguments, stdout: writeEnd, newGroup: true)
        } catch {
            close(writeEnd)
            throw error
        }
        close(writeEnd)
        _ = fcntl(readEnd, F_SETFL, fcntl(readEnd, F_GETFL) | O_NONBLOCK)

        let deadline = monotonicSeconds() + timeout
        var output: [UInt8] = []
        var status: Int32?
        var chunk = [UInt8](repeating: 0, count: 4096)
        func drain() -> Bool {  // false at end of file
            while true {
                let n = chunk.withUnsafeMutableBytes { read(readEnd, $0.baseAddress, $0.count) }
                if n > 0 {
                    if output.count < outputLimit { output += chunk[..<min(n, outputLimit - output.count)] }
                    continue
                }
                if n < 0 && errno == EINTR { continue }
                return n < 0  // EAGAIN: open but empty
            }
        }
        var open = true
        while status == nil {
            let left = deadline - monotonicSeconds()
            if left <= 0 {
                kill(-pid, SIGKILL)
                kill(pid, SIGKILL)
                _ = reap(pid, block: true)
                throw BusError(
                    "\(program) did not finish within \(formatSeconds(timeout)) s and was stopped"
                        + "\(output.isEmpty ? "" : " (it said: \(summary(output)))")"
                )
            }
            if open {
                var entry = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
                // Wake at least every 50 ms to notice the exit of a child whose daemon holds the pipe.
                _ = poll(&entry, 1, Int32(min(left, 0.05) * 1000) + 1)
                open = drain()
            } else {
                usleep(UInt32(min(left, 0.01) * 1_000_000) + 1)
            }
            status = reap(pid, block: false)
        }
        if open { _ = drain() }  // what it wrote just before it exited
        return Result(status: status!, output: String(decoding: output, as: UTF8.self))
    }

    /// Starts `program` in the background, with stdin from /dev/null and stdout and stderr on `stdout`,
    /// nothing else inherited, a clean signal mask, and (with `newGroup`) its own process group.
    /// - Returns: its pid; the caller reaps it.
    public static func spawn(_ program: String, _ arguments: [String], stdout: Int32, newGroup: Bool) throws -> pid_t {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stdout, 2)
        // Everything above stderr: the child must hold none of our sockets, pipes or devices.
        CBlockIO_spawn_addclosefrom(&actions, 3)

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var defaults = sigset_t()
        sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var flags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF
        if newGroup {
            flags |= POSIX_SPAWN_SETPGROUP
            posix_spawnattr_setpgroup(&attributes, 0)
        }
        posix_spawnattr_setflags(&attributes, Int16(flags))

        let argv = ([program] + arguments).map { strdup($0) } + [nil]
        defer { for argument in argv { free(argument) } }
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, program, &actions, &attributes, argv, Glibc.environ)
        guard rc == 0 else { throw BusError("cannot run \(program): \(String(cString: strerror(rc)))") }
        return pid
    }

    /// The exit status of `pid` once it has ended (nil while it runs, with `block` false).
    static func reap(_ pid: pid_t, block: Bool) -> Int32? {
        var status: Int32 = 0
        while true {
            let r = waitpid(pid, &status, block ? 0 : WNOHANG)
            if r == pid { return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
            if r < 0 && errno == EINTR { continue }
            if r < 0 { return 127 }  // not our child (any more): nothing to wait for
            return nil
        }
    }

    private static func summary(_ output: [UInt8]) -> String {
        let text = String(decoding: output.suffix(300), as: UTF8.self)
        return text.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }.joined(separator: "; ")
    }
}

func monotonicSeconds() -> Double {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Double(now.tv_sec) + Double(now.tv_nsec) / 1e9
}

func formatSeconds(_ seconds: Double) -> String {
    seconds == seconds.rounded() ? String(Int(seconds)) : String(format: "%.1f", seconds)
}
