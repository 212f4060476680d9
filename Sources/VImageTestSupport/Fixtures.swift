// Design notes
// ------------
// The corrupt-image fixtures (Fixtures/corrupt/NAME.vimg) each come with NAME.expected.json, written by
// `vimg-fixtures` (Tools/make-fixtures.sh) from this model and read back by FixtureTests. The expected
// findings and exit codes are written by hand in the generator, from the damage it does, never by
// running the checker, so the tests compare the checker with an independent statement.
//
// Guest data after repair is described, not stored: the extents written (a `Pattern` or a
// compressible text, both functions of the guest offset), the clusters the damage destroys (read as
// zeroes once `-r all` drops their references), and an FNV-1a 64 hash of the whole virtual disk that
// the description yields.

import BlockIO

/// What a guest extent holds.
public enum FixtureContent: String, Sendable {
    /// `Pattern.bytes(count:offset:seed:)`: incompressible.
    case pattern
    /// `FixtureContent.text`: compressible ASCII.
    case text

    public static let textLine = Array("vimg fixture: compressible guest data, one line after another\n".utf8)

    /// The bytes at guest `offset ..< offset + count`.
    public func bytes(count: Int, offset: UInt64, seed: UInt64) -> [UInt8] {
        switch self {
        case .pattern: return Pattern.bytes(count: count, offset: offset, seed: seed)
        case .text:
            let line = Self.textLine
            return (0..<count).map { line[Int((offset + UInt64($0)) % UInt64(line.count))] }
        }
    }
}

/// The expected outcome of checking and repairing one corrupt fixture.
public struct FixtureSpec: Sendable {
    public struct Finding: Sendable, Hashable, CustomStringConvertible {
        public var kind: String
        public var severity: String
        public var count: Int
        public init(_ kind: String, _ severity: String, count: Int = 1) {
            self.kind = kind
            self.severity = severity
            self.count = count
        }
        public var description: String { "\(kind)/\(severity)x\(count)" }
    }

    public struct Written: Sendable {
        public var offset: UInt64
        public var length: Int
        public var content: FixtureContent
        public var seed: UInt64
        public init(offset: UInt64, length: Int, content: FixtureContent, seed: UInt64) {
            self.offset = offset
            self.length = length
            self.content = content
            self.seed = seed
        }
    }

    public var name: String
    public var description: String
    public var virtualSize: UInt64
    public var clusterSize: Int
    /// Every finding `check` must report (kind, severity, how many), and no other.
    public var findings: [Finding]
    /// `vimg check` exit code, then after `vimg check -r all`.
    public var checkExit: Int32
    public var repairExit: Int32
    /// Whether a read-only open succeeds before repair.
    public var opens: Bool
    /// Whether the guest data after repair is known (false: the repair cannot complete, or the data
    /// depends on a backing file that is not there).
    public var recoverable: Bool
    public var written: [Written]
    /// Guest ranges whose data the damage destroys: zeroes after repair.
    public var lost: [(offset: UInt64, length: Int)]
    /// Other files a test must place beside the image (none are shipped; documented only).
    public var note: String

    public init(
        name: String,
        description: String,
        virtualSize: UInt64,
        clusterSize: Int,
        findings: [Finding],
        checkExit: Int32,
        repairExit: Int32,
        opens: Bool = true,
        recoverable: Bool = true,
        written: [Written],
        lost: [(offset: UInt64, length: Int)] = [],
        note: String = ""
    ) {
        self.name = name
        self.description = description
        self.virtualSize = virtualSize
        self.clusterSize = clusterSize
        self.findings = findings
        self.checkExit = checkExit
        self.repairExit = repairExit
        self.opens = opens
        self.recoverable = recoverable
        self.written = written
        self.lost = lost
        self.note = note
    }

    /// The whole virtual disk as it must read after `-r all` (when `recoverable`).
    public func expectedGuest() -> [UInt8] {
        var disk = [UInt8](repeating: 0, count: Int(virtualSize))
        for w in written {
            disk.replaceSubrange(
                Int(w.offset)..<Int(w.offset) + w.length,
                with: w.content.bytes(count: w.length, offset: w.offset, seed: w.seed)
            )
        }
        for l in lost {
            disk.replaceSubrange(Int(l.offset)..<Int(l.offset) + l.length, with: repeatElement(0, count: l.length))
        }
        return disk
    }

    public func json() -> String {
        var guest: [(String, FixtureJSON)] = [("recoverable", .bool(recoverable))]
        guest.append(
            (
                "written",
                .array(
                    written.map {
                        .object([
                            ("offset", .number($0.offset)), ("length", .number(UInt64($0.length))),
                            ("content", .string($0.content.rawValue)), ("seed", .number($0.seed)),
                        ])
                    }
                )
            )
        )
        guest.append(
            (
                "lost",
                .array(lost.map { .object([("offset", .number($0.offset)), ("length", .number(UInt64($0.length)))]) })
            )
        )
        if recoverable { guest.append(("fnv1a64", .string(fnv1a64Hex(expectedGuest())))) }
        let fields: [(String, FixtureJSON)] = [
            ("name", .string(name)),
            ("description", .string(description)),
            ("virtual-size", .number(virtualSize)),
            ("cluster-size", .number(UInt64(clusterSize))),
            (
                "findings",
                .array(
                    findings.map {
                        .object([
                            ("kind", .string($0.kind)), ("severity", .string($0.severity)),
                            ("count", .number(UInt64($0.count))),
                        ])
                    }
                )
            ),
            ("check-exit", .number(UInt64(checkExit))),
            ("repair-all-exit", .number(UInt64(repairExit))),
            ("opens-read-only", .bool(opens)),
            ("guest-after-repair", .object(guest)),
            ("note", .string(note)),
        ]
        return FixtureJSON.object(fields).render() + "\n"
    }

    /// Parses an `.expected.json` written by `json()`.
    public static func parse(_ text: String) throws -> FixtureSpec {
        let root = try FixtureJSON.parse(text)
        func bad(_ what: String) -> FixtureJSON.ParseError {
            FixtureJSON.ParseError(message: "expected.json: bad \(what)")
        }
        guard let name = root["name"]?.string, let description = root["description"]?.string,
            let size = root["virtual-size"]?.number, let cs = root["cluster-size"]?.number,
            let findings = root["findings"]?.array, let checkExit = root["check-exit"]?.number,
            let repairExit = root["repair-all-exit"]?.number, let opens = root["opens-read-only"]?.bool,
            let guest = root["guest-after-repair"], let recoverable = guest["recoverable"]?.bool,
            let written = guest["written"]?.array, let lost = guest["lost"]?.array
        else { throw bad("fields") }
        var spec = FixtureSpec(
            name: name,
            description: description,
            virtualSize: size,
            clusterSize: Int(cs),
            findings: [],
            checkExit: Int32(checkExit),
            repairExit: Int32(repairExit),
            opens: opens,
            recoverable: recoverable,
            written: [],
            note: root["note"]?.string ?? ""
        )
        for f in findings {
            guard let kind = f["kind"]?.string, let severity = f["severity"]?.string, let count = f["count"]?.number
            else { throw bad("finding") }
            spec.findings.append(Finding(kind, severity, count: Int(count)))
        }
        for w in written {
            guard let offset = w["offset"]?.number, let length = w["length"]?.number,
                let content = w["content"]?.string.flatMap(FixtureContent.init(rawValue:)), let seed = w["seed"]?.number
            else { throw bad("written extent") }
            spec.written.append(Written(offset: offset, length: Int(length), content: content, seed: seed))
        }
        for l in lost {
            guard let offset = l["offset"]?.number, let length = l["length"]?.number else { throw bad("lost extent") }
            spec.lost.append((offset, Int(length)))
        }
        if recoverable, let hash = guest["fnv1a64"]?.string, hash != fnv1a64Hex(spec.expectedGuest()) {
            throw bad("fnv1a64 (the description and the hash disagree)")
        }
        return spec
    }
}

/// FNV-1a, 64 bits, as 16 hex digits.
public func fnv1a64Hex(_ bytes: [UInt8]) -> String {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in bytes {
        h ^= UInt64(b)
        h = h &* 0x0000_0100_0000_01b3
    }
    let digits = String(h, radix: 16)
    return String(repeating: "0", count: 16 - digits.count) + digits
}

/// Just enough JSON for the fixture files: objects (ordered), arrays, strings, unsigned integers, booleans.
public indirect enum FixtureJSON: Sendable {
    case object([(String, FixtureJSON)])
    case array([FixtureJSON])
    case string(String)
    case number(UInt64)
    case bool(Bool)

    public struct ParseError: Error, CustomStringConvertible {
        public var message: String
        public var description: String { message }
    }

    public subscript(key: String) -> FixtureJSON? {
        if case .object(let fields) = self { return fields.first { $0.0 == key }?.1 }
        return nil
    }
    public var string: String? { if case .string(let s) = self { return s } else { return nil } }
    public var number: UInt64? { if case .number(let n) = self { return n } else { return nil } }
    public var bool: Bool? { if case .bool(let b) = self { return b } else { return nil } }
    public var array: [FixtureJSON]? { if case .array(let a) = self { return a } else { return nil } }

    public func render(indent: String = "") -> String {
        let inner = indent + "  "
        switch self {
        case .object(let fields):
            if fields.isEmpty { return "{}" }
            return "{\n"
                + fields.map { inner + $0.0.jsonQuoted + ": " + $0.1.render(indent: inner) }.joined(separator: ",\n")
                + "\n" + indent + "}"
        case .array(let items):
            if items.isEmpty { return "[]" }
            return "[\n" + items.map { inner + $0.render(indent: inner) }.joined(separator: ",\n") + "\n" + indent + "]"
        case .string(let s): return s.jsonQuoted
        case .number(let n): return String(n)
        case .bool(let b): return b ? "true" : "false"
        }
    }

    public static func parse(_ text: String) throws -> FixtureJSON {
        var p = Parser(bytes: Array(text.utf8))
        let value = try p.value()
        p.skipSpace()
        guard p.i == p.bytes.count else { throw ParseError(message: "trailing text at \(p.i)") }
        return value
    }

    struct Parser {
        var bytes: [UInt8]
        var i = 0

        mutating func skipSpace() {
            while i < bytes.count, [0x20, 0x0a, 0x0d, 0x09].contains(bytes[i]) { i += 1 }
        }

        mutating func expect(_ c: UInt8) throws {
            skipSpace()
            guard i < bytes.count, bytes[i] == c else {
                throw ParseError(message: "expected '\(Character(UnicodeScalar(c)))' at \(i)")
            }
            i += 1
        }

        mutating func value() throws -> FixtureJSON {
            skipSpace()
            guard i < bytes.count else { throw ParseError(message: "unexpected end") }
            switch bytes[i] {
            case UInt8(ascii: "{"):
                i += 1
                var fields: [(String, FixtureJSON)] = []
                skipSpace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "}") {
                    i += 1
                    return .object(fields)
                }
                repeat {
                    skipSpace()
                    let key = try string()
                    try expect(UInt8(ascii: ":"))
                    fields.append((key, try value()))
                    skipSpace()
                } while try more(closing: UInt8(ascii: "}"))
                return .object(fields)
            case UInt8(ascii: "["):
                i += 1
                var items: [FixtureJSON] = []
                skipSpace()
                if i < bytes.count, bytes[i] == UInt8(ascii: "]") {
                    i += 1
                    return .array(items)
                }
                repeat {
                    items.append(try value())
                    skipSpace()
                } while try more(closing: UInt8(ascii: "]"))
                return .array(items)
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"), UInt8(ascii: "f"):
                let isTrue = bytes[i] == UInt8(ascii: "t")
                let word = Array((isTrue ? "true" : "false").utf8)
                guard bytes.count - i >= word.count, Array(bytes[i..<i + word.count]) == word else {
                    throw ParseError(message: "bad literal at \(i)")
                }
                i += word.count
                return .bool(isTrue)
            default:
                var n: UInt64 = 0
                let start = i
                while i < bytes.count, bytes[i] >= 0x30, bytes[i] <= 0x39 {
                    let (m, o1) = n.multipliedReportingOverflow(by: 10)
                    let (s, o2) = m.addingReportingOverflow(UInt64(bytes[i] - 0x30))
                    guard !o1, !o2 else { throw ParseError(message: "number too large at \(start)") }
                    n = s
                    i += 1
                }
                guard i > start else { throw ParseError(message: "unexpected character at \(i)") }
                return .number(n)
            }
        }

        /// After an item: true on ",", false on the closing bracket.
        mutating func more(closing: UInt8) throws -> Bool {
            guard i < bytes.count else { throw ParseError(message: "unexpected end") }
            if bytes[i] == UInt8(ascii: ",") {
                i += 1
                return true
            }
            guard bytes[i] == closing else { throw ParseError(message: "expected ',' at \(i)") }
            i += 1
            return false
        }

        mutating func string() throws -> String {
            guard i < bytes.count, bytes[i] == UInt8(ascii: "\"") else {
                throw ParseError(message: "expected a string at \(i)")
            }
            i += 1
            var out: [UInt8] = []
            while i < bytes.count, bytes[i] != UInt8(ascii: "\"") {
                if bytes[i] == UInt8(ascii: "\\"), i + 1 < bytes.count {
                    i += 1
                    switch bytes[i] {
                    case UInt8(ascii: "n"): out.append(0x0a)
                    case UInt8(ascii: "u"):
                        guard i + 4 < bytes.count,
                            let v = UInt32(String(decoding: bytes[i + 1...i + 4], as: UTF8.self), radix: 16),
                            let scalar = Unicode.Scalar(v)
                        else { throw ParseError(message: "bad escape at \(i)") }
                        out += Array(String(Character(scalar)).utf8)
                        i += 4
                    default: out.append(bytes[i])
                    }
                } else {
                    out.append(bytes[i])
                }
                i += 1
            }
            guard i < bytes.count else { throw ParseError(message: "unterminated string") }
            i += 1
            return String(decoding: out, as: UTF8.self)
        }
    }
}
