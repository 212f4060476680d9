import CBlockIO

/// CRC32C (Castagnoli), hardware accelerated where the CPU has SSE 4.2 (the one C implementation is in
/// CBlockIO). Used for VIMG's end-to-end checksums.
public enum CRC32C {
    /// The CRC32C of `bytes`, continuing from `crc` (the CRC of what came before, or 0 to start).
    public static func checksum(_ bytes: UnsafeRawBufferPointer, continuing crc: UInt32 = 0) -> UInt32 {
        guard let base = bytes.baseAddress else { return crc }
        return ~CBlockIO_crc32c(~crc, base, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { checksum($0, continuing: crc) }
    }

    /// The same checksum computed by the table-driven code, whatever the CPU (for tests).
    public static func portableChecksum(_ bytes: [UInt8], continuing crc: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBytes { ~CBlockIO_crc32c_portable(~crc, $0.baseAddress, $0.count) }
    }

    /// Whether the CPU's crc32 instruction is in use.
    public static var isHardwareAccelerated: Bool { CBlockIO_crc32c_is_hardware() != 0 }
}
