// Design notes
// ------------
// qcow2's compressed clusters hold one cluster's data in one of two encodings (header byte 104):
//
//   zlib: a raw deflate stream (no zlib header), window 2^12 — inflateInit2(windowBits: -12);
//   zstd: one or more zstd frames, decoded with the streaming API because QEMU does not store the
//         content size.
//
// The stored span (whole sectors) may end with bytes of the next compressed cluster, so decoding stops
// once a whole cluster has been produced; it is an error if the input ends before that. The C libraries
// never read or write outside the buffers they are given. zlib and libzstd are reached only here.

import CZlib
import CZstd

public enum Qcow2Decompressor {
    /// Decodes `input` into exactly `output.count` bytes; false if the data is malformed or too short.
    public static func decompress(
        _ type: Qcow2CompressionType,
        _ input: UnsafeRawBufferPointer,
        into output: UnsafeMutableRawBufferPointer
    ) -> Bool {
        switch type {
        case .zlib: return inflateRaw(input, into: output)
        case .zstd: return zstdStream(input, into: output)
        }
    }

    private static func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool
    {
        guard let src = input.baseAddress, let dst = output.baseAddress, input.count <= Int(UInt32.max),
            output.count <= Int(UInt32.max)
        else {
            return false
        }
        var stream = z_stream()
        guard inflateInit2_(&stream, -12, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else {
            return false
        }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: src.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        stream.next_out = dst.assumingMemoryBound(to: Bytef.self)
        stream.avail_out = uInt(output.count)
        let result = inflate(&stream, Z_FINISH)
        // The span may continue past the stream's end (Z_STREAM_END), or the stream may continue past
        // one cluster (Z_BUF_ERROR with the output full); either way a full cluster is what counts.
        return (result == Z_STREAM_END || result == Z_BUF_ERROR || result == Z_OK) && stream.avail_out == 0
    }

    private static func zstdStream(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool
    {
        guard let src = input.baseAddress, let dst = output.baseAddress, let context = ZSTD_createDCtx() else {
            return false
        }
        defer { ZSTD_freeDCtx(context) }
        var inBuffer = ZSTD_inBuffer(src: src, size: input.count, pos: 0)
        var outBuffer = ZSTD_outBuffer(dst: dst, size: output.count, pos: 0)
        // Each call makes progress or fails; the loop ends when the cluster is full or the input is used up.
        while outBuffer.pos < outBuffer.size {
            let before = (inBuffer.pos, outBuffer.pos)
            let result = ZSTD_decompressStream(context, &outBuffer, &inBuffer)
            if ZSTD_isError(result) != 0 { return false }
            if before == (inBuffer.pos, outBuffer.pos) { return false }
        }
        return true
    }
}
