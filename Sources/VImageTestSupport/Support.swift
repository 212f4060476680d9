import BlockIO

#if canImport(Glibc)
import Glibc
#endif

/// SplitMix64: a tiny, fast, seedable generator so failures replay from the seed in the message.
public struct SeededRandom: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Deterministic test data: the byte at absolute offset `o` with seed `s` is a function of both, so a
/// misplaced block is detected, not just a wrong one.
public enum Pattern {
    public static func bytes(count: Int, offset: UInt64, seed: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        for i in 0..<count {
            var x = (offset + UInt64(i)) &* 0x9E37_79B9_7F4A_7C15 ^ seed &* 0xD6E8_FEB8_6659_FD93
            x ^= x >> 29
            out[i] = UInt8(truncatingIfNeeded: x | 1)  // never zero, so zero detection cannot pass by accident
        }
        return out
    }
}

/// A flat in-memory model of what a disk must read back.
public struct ReferenceDisk: Sendable {
    public private(set) var bytes: [UInt8]

    public init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    public mutating func write(_ data: [UInt8], at offset: Int) {
        bytes.replaceSubrange(offset..<offset + data.count, with: data)
    }

    public mutating func zero(at offset: Int, count: Int) {
        bytes.replaceSubrange(offset..<offset + count, with: repeatElement(0, count: count))
    }

    public mutating func resize(_ size: Int) {
        if size < bytes.count {
            bytes.removeSubrange(size...)
        } else {
            bytes += [UInt8](repeating: 0, count: size - bytes.count)
        }
    }

    public func read(at offset: Int, count: Int) -> ArraySlice<UInt8> { bytes[offset..<offset + count] }
}

/// Where things are when tests run from the package root.
public enum TestEnvironment {
    /// The package root (found from this file's path).
    public static let packageRoot: String = {
        var path = #filePath
        for _ in 0..<3 { path = String(path[..<path.lastIndex(of: "/")!]) }
        return path
    }()

    /// A built product (`vimg`, `vdisk`): `$VDISK_BIN_DIR/NAME`, else the newest of .build/{debug,release}.
    public static func product(_ name: String) -> String {
        if let dir = getenv("VDISK_BIN_DIR").map({ String(cString: $0) }) { return dir + "/" + name }
        let candidates = [".build/debug", ".build/release"].map { packageRoot + "/" + $0 + "/" + name }
        var best = candidates[0]
        var bestTime = -1
        for c in candidates {
            var st = stat()
            if stat(c, &st) == 0, st.st_mtim.tv_sec > bestTime {
                bestTime = st.st_mtim.tv_sec
                best = c
            }
        }
        return best
    }

    /// The full path of a program on PATH, or nil.
    public static func which(_ program: String) -> String? {
        let path = getenv("PATH").map { String(cString: $0) } ?? "/usr/bin:/bin"
        for dir in path.split(separator: ":") {
            let candidate = "\(dir)/\(program)"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return nil
    }

    public static var isRoot: Bool { geteuid() == 0 }

    /// A fresh temporary directory.
    public static func temporaryDirectory(_ prefix: String = "vdisk-test") -> String {
        var template = Array("/tmp/\(prefix).XXXXXX".utf8CString)
        let path = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: path!)
    }

    /// Removes a directory tree.
    public static func remove(_ path: String) {
        var pid: pid_t = 0
        let words: [String] = ["/bin/rm", "-rf", path]
        let argv: [UnsafeMutablePointer<CChar>?] = words.map { strdup($0) } + [nil]
        defer { for arg in argv { free(arg) } }
        guard posix_spawn(&pid, "/bin/rm", nil, nil, argv, environ) == 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    }
}

/// The result of running a program.
public struct ProcessResult: Sendable {
    public var status: Int32
    public var stdout: String
    public var stderr: String
}

/// Runs a program to completion, capturing its output (posix_spawn; no Foundation needed).
@discardableResult
public func run(
    _ program: String,
    _ arguments: [String],
    environment: [String: String]? = nil,
    input: [UInt8]? = nil
) -> ProcessResult {
    let dir = TestEnvironment.temporaryDirectory("vdisk-run")
    defer { TestEnvironment.remove(dir) }
    let outPath = dir + "/out"
    let errPath = dir + "/err"
    let inPath = dir + "/in"
    if let input {
        let fd = open(inPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        _ = input.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, input == nil ? "/dev/null" : inPath, O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, outPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, errPath, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    var env: [String]
    if let environment {
        var merged: [String: String] = [:]
        var p = environ
        while let entry = p.pointee {
            let s = String(cString: entry)
            if let eq = s.firstIndex(of: "=") { merged[String(s[..<eq])] = String(s[s.index(after: eq)...]) }
            p += 1
        }
        for (k, v) in environment { merged[k] = v }
        env = merged.map { "\($0)=\($1)" }
    } else {
        env = []
        var p = environ
        while let entry = p.pointee {
            env.append(String(cString: entry))
            p += 1
        }
    }
    let argv = ([program] + arguments).map { strdup($0) } + [nil]
    let envp = env.map { strdup($0) } + [nil]
    defer {
        for arg in argv { free(arg) }
        for variable in envp { free(variable) }
    }
    var pid: pid_t = 0
    let rc = withCleanSignals { posix_spawnp(&pid, program, &actions, &$0, argv, envp) }
    guard rc == 0 else { return ProcessResult(status: 127, stdout: "", stderr: "spawn failed: \(describeErrno(rc))") }
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    let exit = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return ProcessResult(status: exit, stdout: readFile(outPath), stderr: readFile(errPath))
}

/// A whole file as UTF-8 text ("" if missing).
public func readFile(_ path: String) -> String {
    // Read to the end rather than trusting the size: /proc files say 0, /sys files 4096.
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return "" }
    defer { close(fd) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let n = read(fd, &chunk, chunk.count)
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { break }
        bytes += chunk[0..<n]
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// The first index where two byte sequences differ (or where one ends), nil if equal. Tests compare
/// with this rather than `==` so a failure prints an offset, not megabytes of bytes.
public func firstDifference(_ a: ArraySlice<UInt8>, _ b: ArraySlice<UInt8>) -> Int? {
    let n = min(a.count, b.count)
    var i = 0
    var ia = a.startIndex
    var ib = b.startIndex
    while i < n {
        if a[ia] != b[ib] { return i }
        i += 1
        ia += 1
        ib += 1
    }
    return a.count == b.count ? nil : n
}

/// Runs `body` with posix_spawn attributes that give the child no blocked signals and default handlers
/// for the ones servers and shells use: test runners block signals in their threads, and a child
/// inherits that mask (a shell's `wait` or a server's SIGTERM handling would hang).
func withCleanSignals(_ body: (inout posix_spawnattr_t) -> Int32) -> Int32 {
    var attributes = posix_spawnattr_t()
    posix_spawnattr_init(&attributes)
    defer { posix_spawnattr_destroy(&attributes) }
    var empty = sigset_t()
    sigemptyset(&empty)
    posix_spawnattr_setsigmask(&attributes, &empty)
    var defaults = sigset_t()
    sigemptyset(&defaults)
    for number in [SIGINT, SIGTERM, SIGUSR1, SIGCHLD, SIGPIPE] { sigaddset(&defaults, number) }
    posix_spawnattr_setsigdefault(&attributes, &defaults)
    posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
    return body(&attributes)
}

/// Starts a program in the background with stdin from /dev/null and output to files (or /dev/null), a
/// clean signal mask and default dispositions (test threads may block signals, and children inherit
/// that), and returns its pid.
public func spawn(
    _ program: String,
    _ arguments: [String],
    stdout: String = "/dev/null",
    stderr: String = "/dev/null"
) -> pid_t? {
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_addopen(&actions, 1, stdout, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    posix_spawn_file_actions_addopen(&actions, 2, stderr, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
    let argv = ([program] + arguments).map { strdup($0) } + [nil]
    defer { for arg in argv { free(arg) } }
    var pid: pid_t = 0
    guard withCleanSignals({ posix_spawn(&pid, program, &actions, &$0, argv, environ) }) == 0 else { return nil }
    return pid
}

/// Kills `pid` (SIGKILL) if it has not exited yet, and reaps it: for cleanup paths.
public func killIfRunning(_ pid: pid_t) {
    var status: Int32 = 0
    if waitpid(pid, &status, WNOHANG) == 0 {
        kill(pid, SIGKILL)
        waitpid(pid, &status, 0)
    }
}

/// Waits up to `seconds` for `pid` to exit; returns its status (128+n for a signal), or -1 after
/// killing it on timeout.
@discardableResult
public func waitForExit(_ pid: pid_t, seconds: Int = 30) -> Int32 {
    var status: Int32 = 0
    for _ in 0..<(seconds * 20) {
        let result = waitpid(pid, &status, WNOHANG)
        if result == pid { return (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f) }
        if result < 0 { return -1 }
        usleep(50_000)
    }
    kill(pid, SIGKILL)
    waitpid(pid, &status, 0)
    return -1
}

/// The seeds a randomized test runs: a fixed range, so every run covers the same cases, plus one random
/// seed that is printed, so each run also explores a new case and any failure reruns. `VDISK_SEED=N`
/// runs seed N alone.
public enum TestSeeds {
    public static func seeds(_ fixed: Range<UInt64>, test: String) -> [UInt64] {
        if let text = getenv("VDISK_SEED").map({ String(cString: $0) }), let seed = UInt64(text) {
            return [seed]
        }
        var generator = SystemRandomNumberGenerator()
        let extra = UInt64.random(in: fixed.upperBound...UInt64(UInt32.max), using: &generator)
        print("\(test): seeds \(fixed.lowerBound)..<\(fixed.upperBound) and \(extra) (rerun one with VDISK_SEED=N)")
        return Array(fixed) + [extra]
    }
}
