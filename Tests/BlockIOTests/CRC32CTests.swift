import BlockIO
import Testing
import VImageTestSupport

/// CRC32C against published check values, and the hardware path against the table-driven one.
@Suite struct CRC32CTests {
    /// Invariant: the standard check value ("123456789" -> 0xE3069283) and RFC 3720's test vectors
    /// (32 bytes of zeroes, of 0xFF, and of 0...31), in one call and in pieces.
    @Test func knownValues() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        let whole = Pattern.bytes(count: 4099, offset: 0, seed: 1)
        let first = CRC32C.checksum(Array(whole[0..<1000]))
        #expect(CRC32C.checksum(Array(whole[1000...]), continuing: first) == CRC32C.checksum(whole))
    }

    /// Invariant: the accelerated and the portable code agree on every length and alignment.
    @Test func hardwareMatchesPortable() {
        let bytes = Pattern.bytes(count: 9000, offset: 7, seed: 2)
        for length in [0, 1, 7, 8, 9, 63, 512, 4096, 4104, 8999] {
            for start in [0, 1, 3] where start + length <= bytes.count {
                let slice = Array(bytes[start..<start + length])
                #expect(CRC32C.checksum(slice) == CRC32C.portableChecksum(slice), "\(start)+\(length)")
            }
        }
    }
}
