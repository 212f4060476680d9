import BlockIO
import ImageFormats
import Testing
import VImage
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Every `vimg` command, and `vdisk serve`, on a chain that mixes formats: a VIMG clone over a qcow2 image
/// (written by qemu) over a raw file. All of them open images through the one opener in ImageFormats.
@Suite(
    .serialized,
    .enabled(if: VimgCLITests.hasQemu && Clients.vdiskBuilt, "needs qemu-img, qemu-io and the built vdisk")
)
struct MixedChainTests {
    let vimg = TestEnvironment.product("vimg")
    static let mib = 1 << 20

    /// base.raw (1st MiB 0x11) <- mid.qcow2 (2nd MiB 0x22) <- top.vimg (3rd MiB 0x33), 4 MiB each;
    /// returns the guest content of top.vimg.
    func makeChain(_ dir: String) throws -> [UInt8] {
        let steps: [(String, [String])] = [
            ("qemu-img", ["create", "-f", "raw", dir + "/base.raw", "4M"]),
            ("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 1M", dir + "/base.raw"]),
            ("qemu-img", ["create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir + "/mid.qcow2"]),
            ("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 1M 1M", dir + "/mid.qcow2"]),
        ]
        for (program, arguments) in steps {
            let r = run(TestEnvironment.which(program)!, arguments)
            try #require(r.status == 0, "\(program) \(arguments): \(r.stderr)")
        }
        let clone = run(vimg, ["clone", dir + "/mid.qcow2", dir + "/top.vimg"])
        try #require(clone.status == 0, "vimg clone: \(clone.stderr)")
        let image = try ImageFormats.openVImage(path: dir + "/top.vimg", readOnly: false)
        try image.write([UInt8](repeating: 0x33, count: Self.mib), at: 2 * UInt64(Self.mib))
        try image.close()
        return [UInt8](repeating: 0x11, count: Self.mib) + [UInt8](repeating: 0x22, count: Self.mib)
            + [UInt8](repeating: 0x33, count: Self.mib) + [UInt8](repeating: 0, count: Self.mib)
    }

    func writeRaw(_ bytes: [UInt8], to path: String) throws {
        let file = try FileDevice.open(path: path, readOnly: false, create: true, growable: true, lock: .exclusive)
        try file.write(bytes, at: 0)
        try file.close()
    }

    /// Invariant: info, map, check, snapshot, compare, convert, measure, resize, rebase and commit all work
    /// on a VIMG clone whose backing chain is qcow2 over raw, and the guest content stays what qemu and
    /// our writes made it.
    @Test func everyVimgCommandOnAMixedChain() throws {
        let dir = TestEnvironment.temporaryDirectory("vimg-mixed")
        defer { TestEnvironment.remove(dir) }
        let expected = try makeChain(dir)
        let top = dir + "/top.vimg"
        try writeRaw(expected, to: dir + "/expected.raw")

        let info = run(vimg, ["info", "--backing-chain", "--output=json", top])
        #expect(info.status == 0, "\(info.stderr)")
        for format in ["\"vimg\"", "\"qcow2\"", "\"raw\""] { #expect(info.stdout.contains("\"format\": \(format)")) }
        #expect(run(vimg, ["info", top]).status == 0)
        let map = run(vimg, ["map", "--output=json", top])
        #expect(map.status == 0 && map.stdout.contains("\"depth\": 2"), "\(map.stdout)\(map.stderr)")
        #expect(run(vimg, ["check", top]).status == 0)
        #expect(run(vimg, ["compare", top, dir + "/expected.raw"]).status == 0)

        // Snapshots of the clone.
        #expect(run(vimg, ["snapshot", "-c", "s1", top]).status == 0)
        #expect(run(vimg, ["snapshot", "-l", top]).stdout.contains("s1"))
        let image = try ImageFormats.openVImage(path: top, readOnly: false)
        try image.write([UInt8](repeating: 0x44, count: 4096), at: 0)
        try image.close()
        #expect(run(vimg, ["compare", top, dir + "/expected.raw"]).status == 1)
        #expect(run(vimg, ["snapshot", "-a", "s1", top]).status == 0)
        #expect(run(vimg, ["compare", top, dir + "/expected.raw"]).status == 0)
        #expect(run(vimg, ["snapshot", "-d", "s1", top]).status == 0)

        // Convert reads through the chain; measure sizes it.
        #expect(run(vimg, ["convert", "-O", "raw", top, dir + "/out.raw"]).status == 0)
        #expect(run(vimg, ["compare", dir + "/out.raw", dir + "/expected.raw"]).status == 0)
        #expect(run(vimg, ["convert", "-O", "qcow2", top, dir + "/out.qcow2"]).status == 0)
        #expect(
            run(TestEnvironment.which("qemu-img")!, ["compare", dir + "/out.qcow2", dir + "/expected.raw"]).status == 0
        )
        #expect(run(vimg, ["measure", "-O", "vimg", top]).status == 0)

        // Resize the clone, then rebase it straight onto the raw base (safe: content unchanged).
        #expect(run(vimg, ["resize", top, "+1M"]).status == 0)
        try writeRaw(expected + [UInt8](repeating: 0, count: Self.mib), to: dir + "/expected5.raw")
        #expect(run(vimg, ["compare", top, dir + "/expected5.raw"]).status == 0)
        let rebase = run(vimg, ["rebase", "-b", "base.raw", "-F", "raw", top])
        #expect(rebase.status == 0, "\(rebase.stderr)")
        #expect(run(vimg, ["compare", top, dir + "/expected5.raw"]).status == 0)
        #expect(run(vimg, ["info", "--backing-chain", top]).stdout.contains("base.raw"))

        // Commit into the raw base: the base then holds the whole disk (its first 4 MiB).
        let commit = run(vimg, ["commit", top])
        #expect(commit.status == 0, "\(commit.stderr)")
        #expect(run(vimg, ["compare", dir + "/base.raw", dir + "/expected.raw"]).status == 0)
        #expect(run(vimg, ["check", top]).status == 0)
    }

    /// Invariant: `vdisk serve` exports a VIMG clone over qcow2, and a qcow2 image itself (read-write, so
    /// qemu-img reads the file with -U), with the content qemu-img reads from the same chain.
    @Test func serveMixedChainAndQcow2() throws {
        let dir = TestEnvironment.temporaryDirectory("vimg-mixed")
        defer { TestEnvironment.remove(dir) }
        let expected = try makeChain(dir)
        try writeRaw(expected, to: dir + "/expected.raw")
        let qemuImg = TestEnvironment.which("qemu-img")!
        for (image, reference) in [
            (dir + "/top.vimg", dir + "/expected.raw"), (dir + "/mid.qcow2", dir + "/mid.qcow2"),
        ] {
            let socket = dir + "/nbd.sock"
            guard let server = ServeProcess(["--socket", socket, image], directory: dir) else {
                Issue.record("vdisk serve \(image) did not start: \(readFile(dir + "/serve.err"))")
                continue
            }
            let compare = run(qemuImg, ["compare", "-U", "nbd+unix:///?socket=\(socket)", reference])
            #expect(compare.status == 0, "\(image): \(compare.stdout)\(compare.stderr)")
            #expect(server.stop() == 0)
            unlink(socket)
        }
    }
}
