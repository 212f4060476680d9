// Design notes
// ------------
// How an RBD image is named on vdisk's command lines, in backing file names and in the bus's table: qemu's
// spelling, so a name that works with `qemu-img` works here and back.
//
//   rbd:POOL/IMAGE[@SNAP][:OPTION=VALUE]...
//   rbd:POOL/NAMESPACE/IMAGE[@SNAP][:OPTION=VALUE]...
//
// Options: `conf=PATH` (the ceph.conf to read; default: $CEPH_CONF, then /etc/ceph/ceph.conf), `id=NAME`
// (the cephx user, default admin), `key=SECRET` (instead of a keyring; it then shows on `ps`), and any
// other Ceph client option (`mon_host=...`, `keyring=...`), set before connecting. A backslash escapes the
// next character, so `mon_host=127.0.0.1\:3300` keeps its colon. `rbd://` URIs are not accepted: qemu
// does not know them, and one spelling is easier to document and to match in backing file names.
//
// A name is text a user typed or an image stored: it is parsed strictly (a pool, an image, no empty parts,
// no NUL, at most 4095 bytes) and every failure says what is wrong with which part.

/// A parsed `rbd:` name.
public struct RBDSpec: Sendable, Hashable, CustomStringConvertible {
    public var pool: String
    public var namespace: String?
    public var image: String
    public var snapshot: String?
    /// The `conf=` option: the ceph.conf to read.
    public var conf: String?
    /// The `id=` option: the cephx user without its `client.` prefix.
    public var id: String?
    /// The `key=` option: the cephx secret.
    public var key: String?
    /// Every other option, in order, passed to librados before connecting.
    public var options: [Option]

    /// One `name=value` Ceph client option.
    public struct Option: Sendable, Hashable {
        public var name: String
        public var value: String

        public init(name: String, value: String) {
            self.name = name
            self.value = value
        }
    }

    /// The prefix that marks an RBD name.
    public static let prefix = "rbd:"
    /// The longest name accepted (the longest backing file name an image can store).
    public static let maxLength = 4095

    public init(
        pool: String,
        namespace: String? = nil,
        image: String,
        snapshot: String? = nil,
        conf: String? = nil,
        id: String? = nil,
        key: String? = nil,
        options: [Option] = []
    ) {
        self.pool = pool
        self.namespace = namespace
        self.image = image
        self.snapshot = snapshot
        self.conf = conf
        self.id = id
        self.key = key
        self.options = options
    }

    /// Whether `text` names an RBD image (starts with `rbd:`); such names are never file paths.
    public static func isRBD(_ text: String) -> Bool { text.hasPrefix(prefix) }

    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:OPTION=VALUE]...`.
    /// - Throws: `RBDError` `.invalidName` naming the part that is wrong.
    public init(parsing text: String) throws {
        guard Self.isRBD(text) else { throw RBDError(.invalidName, message: "'\(text)' does not start with rbd:") }
        guard text.utf8.count <= Self.maxLength, !text.utf8.contains(0) else {
            throw RBDError(.invalidName, message: "an rbd: name must be at most \(Self.maxLength) bytes, with no NUL")
        }
        let fields = Self.split(Substring(text.dropFirst(Self.prefix.count)), on: ":")
        let location = fields[0]
        let atSplit = Self.split(location, on: "@")
        guard atSplit.count <= 2 else { throw Self.invalid(text, "more than one '@' before the options") }
        let parts = Self.split(atSplit[0], on: "/").map(Self.unescape)
        guard parts.count == 2 || parts.count == 3, parts.allSatisfy({ !$0.isEmpty }) else {
            throw Self.invalid(text, "expected rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE")
        }
        pool = parts[0]
        namespace = parts.count == 3 ? parts[1] : nil
        image = parts[parts.count - 1]
        snapshot = nil
        if atSplit.count == 2 {
            let name = Self.unescape(atSplit[1])
            guard !name.isEmpty else { throw Self.invalid(text, "empty snapshot name after '@'") }
            snapshot = name
        }
        conf = nil
        id = nil
        key = nil
        options = []
        for field in fields.dropFirst() {
            let pair = Self.split(field, on: "=")
            guard pair.count >= 2 else {
                throw Self.invalid(text, "option '\(Self.unescape(field))' is not NAME=VALUE")
            }
            // The value runs to the end of the field: base64 keys end in '='.
            let name = Self.unescape(pair[0])
            let value = Self.unescape(field[pair[1].startIndex...])
            guard !name.isEmpty, name.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "_" || $0 == " " }) else {
                throw Self.invalid(text, "invalid option name '\(name)'")
            }
            switch name {
            case "conf": conf = value
            case "id": id = value
            case "key": key = value
            default: options.append(Option(name: name, value: value))
            }
        }
    }

    /// The name without options and with its parts escaped: what messages and listings show (never the key).
    public var description: String {
        var text = Self.prefix + Self.escape(pool) + "/"
        if let namespace { text += Self.escape(namespace) + "/" }
        text += Self.escape(image)
        if let snapshot { text += "@" + Self.escape(snapshot) }
        return text
    }

    /// The full name, options included (the key too): what can be parsed back into this value.
    public var text: String {
        var text = description
        if let conf { text += ":conf=" + Self.escape(conf, special: ":\\") }
        if let id { text += ":id=" + Self.escape(id, special: ":\\") }
        if let key { text += ":key=" + Self.escape(key, special: ":\\") }
        for option in options {
            text += ":" + Self.escape(option.name, special: ":\\=") + "=" + Self.escape(option.value, special: ":\\")
        }
        return text
    }

    /// The same image at `snapshot` (nil: the image itself), with the same options.
    public func at(snapshot: String?) -> RBDSpec {
        var copy = self
        copy.snapshot = snapshot
        return copy
    }

    /// The same name with a relative `conf=` path made absolute against `folder` (for a process that runs
    /// elsewhere, such as the bus).
    public func resolvingConf(against folder: String) -> RBDSpec {
        guard let conf, !conf.hasPrefix("/") else { return self }
        var copy = self
        copy.conf = folder + (folder.hasSuffix("/") ? "" : "/") + conf
        return copy
    }

    /// The image `name` in the same pool and namespace, with the same options.
    public func sibling(named name: String) -> RBDSpec {
        var copy = self
        copy.image = name
        copy.snapshot = nil
        return copy
    }

    // MARK: Tokens

    private static func invalid(_ text: String, _ why: String) -> RBDError {
        RBDError(.invalidName, message: "invalid rbd: name '\(RBDSpec.redacted(text))': \(why)")
    }

    /// `text` with the value of a `key=` option hidden, for messages about names that did not parse.
    static func redacted(_ text: String) -> String {
        let fields = text.split(separator: ":", omittingEmptySubsequences: false)
        return fields.map { $0.hasPrefix("key=") ? "key=***" : String($0) }.joined(separator: ":")
    }

    /// Splits at every `separator` that is not escaped by a backslash; escapes are kept.
    private static func split(_ text: Substring, on separator: Character) -> [Substring] {
        var parts: [Substring] = []
        var start = text.startIndex
        var index = text.startIndex
        while index < text.endIndex {
            if text[index] == "\\" {
                index = text.index(after: index)
                if index < text.endIndex { index = text.index(after: index) }
                continue
            }
            if text[index] == separator {
                parts.append(text[start..<index])
                start = text.index(after: index)
            }
            index = text.index(after: index)
        }
        parts.append(text[start...])
        return parts
    }

    private static func unescape(_ text: Substring) -> String {
        var result = ""
        var escaped = false
        for character in text {
            if escaped || character != "\\" {
                result.append(character)
                escaped = false
            } else {
                escaped = true
            }
        }
        return result
    }

    /// Puts a backslash before each character of `special` (by default those that end a part of the name).
    private static func escape(_ text: String, special: String = ":@/\\") -> String {
        var result = ""
        for character in text {
            if special.contains(character) { result.append("\\") }
            result.append(character)
        }
        return result
    }
}
