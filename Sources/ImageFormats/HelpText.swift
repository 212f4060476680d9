extension String {
    /// Command help written with the source file's line breaks, made ready for ArgumentParser: the lines
    /// of a paragraph are joined into one, which it wraps to the terminal's width (it keeps every newline it
    /// is given, so each source line would be broken a second time). Blank lines and indented lines
    /// (examples) stay as written.
    public var reflowedHelp: String {
        var lines: [String] = []
        var joinable = false
        for line in split(separator: "\n", omittingEmptySubsequences: false) {
            let isProse = !line.isEmpty && line.first != " "
            if isProse && joinable, let last = lines.popLast() {
                lines.append(last + " " + line)
            } else {
                lines.append(String(line))
            }
            joinable = isProse
        }
        return lines.joined(separator: "\n")
    }
}
