// Design notes
// ------------
// Two informational header extensions (docs/FORMAT.md, "Feature name table (extension type 6)" and
// "Image UUID (extension type 7)"). Neither changes how the image reads, so a malformed one is ignored,
// never refused (`vimg check` reports it):
//
//   type 6: N x 48-byte entries   | kind u8 | bit u8 | name: 46 bytes UTF-8, zero padded |
//   type 7: 16 bytes              | UUID, big-endian byte form (RFC 9562 version 4)       |

#if canImport(Glibc)
import Glibc
#endif

/// The name of one feature bit, as kept in the feature name table.
public struct FeatureName: Sendable, Hashable {
    public enum Kind: UInt8, Sendable {
        case incompatible = 0
        case compatible = 1
        case autoclear = 2
    }
    public var kind: Kind
    public var bit: UInt8
    public var name: String

    public static let entrySize = 48

    /// Every bit the specification assigns, in kind, then bit order: what a writer puts in a new image.
    public static let all: [FeatureName] = [
        FeatureName(kind: .incompatible, bit: 0, name: "dirty"),
        FeatureName(kind: .incompatible, bit: 1, name: "corrupt"),
        FeatureName(kind: .incompatible, bit: 2, name: "journal"),
        FeatureName(kind: .incompatible, bit: 3, name: "checksums"),
        FeatureName(kind: .autoclear, bit: 0, name: "bitmaps"),
    ]

    /// The table's bytes.
    static func encode(_ names: [FeatureName]) -> [UInt8] {
        var out: [UInt8] = []
        for n in names {
            var entry = [UInt8](repeating: 0, count: entrySize)
            entry[0] = n.kind.rawValue
            entry[1] = n.bit
            let name = Array(n.name.utf8.prefix(entrySize - 2))
            entry.replaceSubrange(2..<2 + name.count, with: name)
            out += entry
        }
        return out
    }

    /// The well-formed entries of a table; malformed ones are skipped (`problems` says which).
    static func decode(_ data: [UInt8]) -> (names: [FeatureName], problems: [String]) {
        var names: [FeatureName] = []
        var problems: [String] = []
        if data.count % entrySize != 0 {
            problems.append("feature name table of \(data.count) bytes is not a multiple of \(entrySize)")
        }
        for index in 0..<data.count / entrySize {
            let entry = data[index * entrySize..<(index + 1) * entrySize]
            let raw = entry[entry.startIndex + 2..<entry.endIndex]
            let end = raw.firstIndex(of: 0) ?? raw.endIndex
            let text = raw[raw.startIndex..<end]
            guard let kind = Kind(rawValue: entry[entry.startIndex]), entry[entry.startIndex + 1] < 64,
                !text.isEmpty, raw[end...].allSatisfy({ $0 == 0 }),
                let name = String(validating: text, as: UTF8.self)
            else {
                problems.append("feature name table entry \(index) is malformed")
                continue
            }
            names.append(FeatureName(kind: kind, bit: entry[entry.startIndex + 1], name: name))
        }
        return (names, problems)
    }
}

/// A 16-byte image identifier (docs/FORMAT.md, "Image UUID").
public struct ImageUUID: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    /// A new random (version 4) UUID.
    public static func random() -> ImageUUID {
        var generator = SystemRandomNumberGenerator()
        var bytes = (0..<16).map { _ in UInt8.random(in: 0...255, using: &generator) }
        bytes[6] = bytes[6] & 0x0F | 0x40  // version 4
        bytes[8] = bytes[8] & 0x3F | 0x80  // RFC 9562 variant
        return ImageUUID(bytes: bytes)!
    }

    /// The usual text form, e.g. `6f1c2f3e-8a4b-4c1d-9e2f-0123456789ab`.
    public var description: String {
        let hex = bytes.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }
        return [0..<4, 4..<6, 6..<8, 8..<10, 10..<16].map { hex[$0].joined() }.joined(separator: "-")
    }
}

extension ImageHeader {
    /// The feature name table (extension type 6); malformed entries are left out.
    public var featureNames: [FeatureName] {
        get {
            extensions.first { $0.type == HeaderExtension.featureNameTable }.map { FeatureName.decode($0.data).names }
                ?? []
        }
        set {
            replaceExtension(HeaderExtension.featureNameTable, newValue.isEmpty ? nil : FeatureName.encode(newValue))
        }
    }

    /// The image UUID (extension type 7), if present and well formed.
    public var uuid: ImageUUID? {
        get { extensions.first { $0.type == HeaderExtension.imageUUID }.flatMap { ImageUUID(bytes: $0.data) } }
        set { replaceExtension(HeaderExtension.imageUUID, newValue?.bytes) }
    }

    /// Problems with the informational extensions (malformed ones are ignored when reading): what
    /// `vimg check` reports as warnings.
    public var informationalExtensionProblems: [String] {
        var problems: [String] = []
        if let table = extensions.first(where: { $0.type == HeaderExtension.featureNameTable }) {
            problems += FeatureName.decode(table.data).problems
        }
        if let id = extensions.first(where: { $0.type == HeaderExtension.imageUUID }), id.data.count != 16 {
            problems.append("image UUID extension of \(id.data.count) bytes is not 16 bytes")
        }
        return problems
    }

    /// Replaces every extension of `type` with one holding `data` (or removes them for nil).
    mutating func replaceExtension(_ type: UInt32, _ data: [UInt8]?) {
        extensions.removeAll { $0.type == type }
        if let data { extensions.append(HeaderExtension(type: type, data: data)) }
    }
}
