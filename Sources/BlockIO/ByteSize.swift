/// Parses and prints sizes the way qemu-img does: `10G`, `512M`, `1T`, `4096`, `64k` (binary units).
public enum ByteSize {
    /// Parses `text` as a byte count with an optional `k`/`K`, `M`, `G`, `T`, `P`, `E` suffix (powers of 1024)
    /// and an optional trailing `B`/`iB`. Returns nil on garbage or overflow.
    public static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text.trimmingWhitespace())
        guard !digits.isEmpty else { return nil }
        for suffix in ["iB", "ib", "B", "b"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
            let candidate = digits.dropLast(suffix.count)
            if let last = candidate.last, last.isLetter || suffix.hasPrefix("B") || suffix.hasPrefix("b") {
                digits = candidate
                break
            }
        }
        var shift: UInt64 = 0
        if let last = digits.last, last.isLetter {
            switch last {
            case "k", "K": shift = 10
            case "m", "M": shift = 20
            case "g", "G": shift = 30
            case "t", "T": shift = 40
            case "p", "P": shift = 50
            case "e", "E": shift = 60
            default: return nil
            }
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let value = UInt64(digits) else {
            return nil
        }
        let (result, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : result
    }

    /// A short human form: `1 GiB`, `512 MiB`, `1.5 GiB`, `100 B`.
    public static func format(_ bytes: UInt64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024, unit < units.count - 1 {
            value /= 1024
            unit += 1
        }
        if unit == 0 { return "\(bytes) B" }
        let rounded = (value * 100).rounded() / 100
        if rounded == rounded.rounded() { return "\(Int(rounded)) \(units[unit])" }
        var text = String(rounded)
        if text.hasSuffix("0") { text.removeLast() }
        return "\(text) \(units[unit])"
    }
}

extension String {
    fileprivate func trimmingWhitespace() -> Substring {
        var slice = Substring(self)
        while let first = slice.first, first.isWhitespace { slice.removeFirst() }
        while let last = slice.last, last.isWhitespace { slice.removeLast() }
        return slice
    }
}
