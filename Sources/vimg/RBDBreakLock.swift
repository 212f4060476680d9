import ArgumentParser
import ImageFormats
import RBD

extension Vimg {
    struct RBDBreakLock: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rbd-break-lock",
            abstract: "Fence the dead writer of an RBD image and break its exclusive lock.",
            discussion: """
                For a host that died (or hung) while it had the image open for writing: its client is first
                blocklisted in the cluster, so that if it was only paused its next write fails instead of
                landing after yours, then its lock is removed and the image can be opened again. Run it only
                for a writer you know is gone: a live one loses the image at once.

                  vimg rbd-break-lock rbd:pool/disk
                  vimg rbd-break-lock 'rbd:pool/disk:conf=/etc/ceph/site-b.conf:id=vdisk'
                """.reflowedHelp
        )

        @Argument(help: "The image: rbd:POOL/IMAGE[:conf=PATH][:id=NAME][:key=SECRET].")
        var image: String

        func run() throws {
            try runReportingErrors {
                let spec = try RBDSpec(parsing: image)
                let owners = try RBDDevice.breakLock(spec)
                if owners.isEmpty {
                    print("\(spec): nobody holds the exclusive lock")
                } else {
                    for owner in owners { print("\(spec): blocklisted \(owner) and broke its lock") }
                }
            }
        }
    }
}
