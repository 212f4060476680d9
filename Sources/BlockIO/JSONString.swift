extension String {
    /// The string as a JSON string literal, quotes included: `"`, `\` and control characters escaped.
    /// For the hand-written JSON of `vimg --output=json`, `vdisk serve --stats-file` and the test
    /// fixtures, which keep their keys in a fixed order and so do not go through an encoder.
    public var jsonQuoted: String {
        var out = "\""
        for scalar in unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }
}
