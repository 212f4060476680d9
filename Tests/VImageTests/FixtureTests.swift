import BlockIO
import ImageFormats
import Testing
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// The shipped corrupt images (Fixtures/corrupt, made by Tools/make-fixtures.sh) against their
/// expected reports, through the library and through the built `vimg` binary; and the saved fuzz
/// crashers (Fixtures/fuzz/crashers) as regression inputs.
///
/// Serialized: a `posix_spawn` on another thread briefly holds a copy of every open descriptor, and
/// with it a `flock` the library has just released, so a parallel spawn can make a lock fail spuriously.
@Suite(.serialized) struct FixtureTests {
    static let fixtures = TestEnvironment.packageRoot + "/Fixtures"

    static func files(in dir: String, suffix: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var names: [String] = []
        while let entry = readdir(d) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) {
                String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name.hasSuffix(suffix) { names.append(name) }
        }
        return names.sorted()
    }

    static var corruptNames: [String] {
        files(in: fixtures + "/corrupt", suffix: ".expected.json").map { String($0.dropLast(".expected.json".count)) }
    }

    static func bytes(_ path: String) throws -> [UInt8] {
        let file = try FileDevice.open(path: path, readOnly: true)
        defer { try? file.close() }
        return try file.read(count: Int(file.size), at: 0)
    }

    /// Copies fixture `name` into a fresh directory under its own name (a backing loop names itself).
    static func copy(_ name: String) throws -> (dir: String, path: String) {
        let dir = TestEnvironment.temporaryDirectory("vdisk-fixture")
        let path = dir + "/" + name + ".vimg"
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true)
        try file.write(try bytes(fixtures + "/corrupt/" + name + ".vimg"), at: 0)
        try file.close()
        return (dir, path)
    }

    static func findingCounts(_ findings: [(kind: String, severity: String)]) -> Set<FixtureSpec.Finding> {
        var counts: [String: (String, Int)] = [:]
        for f in findings { counts[f.kind, default: (f.severity, 0)].1 += 1 }
        return Set(counts.map { FixtureSpec.Finding($0.key, $0.value.0, count: $0.value.1) })
    }

    /// Invariant: every kind the brief asks for has a fixture.
    @Test func everyKindHasAFixture() {
        let names = Set(Self.corruptNames)
        for kind in [
            "leaked-cluster", "refcount-too-low", "copied-flag", "l2-entry-outside-file", "reserved-bits-l1",
            "reserved-bits-l2",
            "compressed-out-of-range", "snapshot-table", "metadata-overlap", "l2-table-misaligned",
            "l2-table-outside-file",
            "l1-table-outside-file", "dirty", "marked-corrupt", "backing-missing", "backing-loop",
        ] {
            #expect(names.contains(kind), "no fixture for \(kind)")
        }
    }

    /// Invariant: `check` reports exactly the expected findings and exit code; a read-only open succeeds
    /// or fails as expected; `-r all` ends with the expected exit code and, where the data is
    /// recoverable, an image that checks clean, reads the expected guest data, and stays clean after
    /// a write.
    @Test(arguments: corruptNames)
    func libraryMatchesExpectation(name: String) throws {
        let spec = try FixtureSpec.parse(readFile(Self.fixtures + "/corrupt/" + name + ".expected.json"))
        let (dir, path) = try Self.copy(name)
        defer { TestEnvironment.remove(dir) }

        let report = try ImageFormats.check(path: path)
        #expect(
            report.exitCode == spec.checkExit,
            "\(name): \(report.findings.map(\.message)) \(report.incompleteReason ?? "")"
        )
        let found = Self.findingCounts(report.findings.map { ($0.kind, $0.severity.rawValue) })
        #expect(
            found == Set(spec.findings),
            "\(name): found \(found.sorted { $0.kind < $1.kind }), expected \(spec.findings)"
        )

        let opened = Result { try ImageFormats.openVImage(path: path, readOnly: true) }
        if case .success(let image) = opened { try image.close() }
        #expect(((try? opened.get()) != nil) == spec.opens, "\(name): read-only open \(opened)")
        if report.isMarkedCorrupt {
            #expect(throws: VImageError.self) { try ImageFormats.openVImage(path: path, readOnly: false) }
        }

        let result = try ImageFormats.repair(path: path, mode: .all)
        #expect(
            result.after.exitCode == spec.repairExit,
            "\(name) after -r all: \(result.after.findings.map(\.message))"
        )
        guard spec.recoverable else { return }
        let again = try ImageFormats.check(path: path)
        #expect(
            again.isClean && !again.isDirty && !again.isMarkedCorrupt,
            "\(name) after -r all: \(again.findings.map(\.message))"
        )

        let image = try ImageFormats.openVImage(path: path, readOnly: false)
        let guest = try image.read(count: Int(spec.virtualSize), at: 0)
        let expected = spec.expectedGuest()
        let difference = firstDifference(guest[...], expected[...])
        #expect(difference == nil, "\(name): guest data differs at byte \(difference ?? 0)")
        #expect(fnv1a64Hex(guest) == fnv1a64Hex(expected))
        try image.write(Pattern.bytes(count: 64 * 1024, offset: 0, seed: 5), at: 0)
        try image.write(Pattern.bytes(count: 8192, offset: 599 * 4096, seed: 5), at: 599 * 4096)
        try image.close()
        let afterWrite = try ImageFormats.check(path: path)
        #expect(
            afterWrite.isClean,
            "\(name): not clean after writing to the repaired image: \(afterWrite.findings.map(\.message))"
        )
    }

    /// Invariant: the built `vimg check` and `vimg check -r all` give the expected exit codes, and the
    /// JSON output lists the expected finding kinds.
    @Test(.enabled(if: access(TestEnvironment.product("vimg"), X_OK) == 0), arguments: corruptNames)
    func binaryMatchesExpectation(name: String) throws {
        let spec = try FixtureSpec.parse(readFile(Self.fixtures + "/corrupt/" + name + ".expected.json"))
        let vimg = TestEnvironment.product("vimg")
        let (dir, path) = try Self.copy(name)
        defer { TestEnvironment.remove(dir) }

        let check = run(vimg, ["check", "--output=json", path])
        #expect(check.status == spec.checkExit, "\(name): \(check.stdout) \(check.stderr)")
        let json = try FixtureJSON.parse(check.stdout)
        let kinds = (json["findings"]?.array ?? []).compactMap { f -> (kind: String, severity: String)? in
            guard let kind = f["kind"]?.string, let severity = f["severity"]?.string else { return nil }
            return (kind, severity)
        }
        #expect(Self.findingCounts(kinds) == Set(spec.findings), "\(name): \(check.stdout)")
        #expect(json["check-errors"]?.number == (spec.checkExit == 1 ? 1 : 0))

        let repair = run(vimg, ["check", "-r", "all", path])
        #expect(repair.status == spec.repairExit, "\(name): \(repair.stdout) \(repair.stderr)")
        if spec.repairExit == 0 {
            #expect(run(vimg, ["check", path]).status == 0)
        }
    }

    static let crashers = fixtures + "/fuzz/crashers"
    static var crasherNames: [String] {
        files(in: crashers, suffix: "").filter { !$0.hasPrefix(".") && $0 != "README.md" }
    }

    /// Invariant: the crashers folder is where the replay below looks (an empty folder and a wrong path
    /// must not look the same).
    @Test func crashersFolderIsRead() {
        #expect(Self.files(in: Self.crashers, suffix: "").contains("README.md"), "\(Self.crashers) not read")
    }

    /// Invariant: every input the fuzzer ever crashed on now opens, reads, checks and repairs without
    /// trapping (the fuzz iteration, replayed), each in a process of its own so a trap fails only its case.
    @Test(arguments: crasherNames)
    func fuzzCrasherNoLongerTraps(name: String) async {
        let path = Self.crashers + "/" + name
        await #expect(processExitsWith: .success, "\(name)") { [path = path as String] in
            FuzzHarness.exercise(try FixtureTests.bytes(path))
        }
    }

    /// Invariant: the seed corpus's valid images (all but the copies of corrupt fixtures) check clean and survives the fuzz iteration.
    @Test func fuzzCorpusIsValid() throws {
        let dir = Self.fixtures + "/fuzz/corpus"
        // VIMG seeds, and qcow2 ones qemu-img made (the engine opens both).
        let names = (Self.files(in: dir, suffix: ".vimg") + Self.files(in: dir, suffix: ".qcow2"))
            .filter { !$0.hasPrefix("corrupt-") }
        #expect(!names.isEmpty)
        for name in names {
            let data = try Self.bytes(dir + "/" + name)
            let host = MemoryDevice(size: 0, growable: true)
            try host.write(data, at: 0)
            #expect(ImageCheck.check(host: host).isClean, "\(name)")
            FuzzHarness.exercise(data)
        }
    }
}
