#if canImport(Glibc)
import Glibc
#endif

/// The Ceph cluster the tests that need one share: started once per test process by
/// `Tools/ceph-cluster.sh` (about 15 s) in a folder of its own, and stopped when the process exits. Tests
/// name images as `rbd:rbd/NAME:conf=PATH`, so nothing depends on the environment of the processes they
/// start.
public enum CephTestCluster {
    /// The cluster's ceph.conf, or nil (then `unavailable` says why).
    public static var conf: String? { state.conf }
    /// Why there is no cluster, for the skip message.
    public static var unavailable: String { state.why }

    /// `rbd:rbd/NAME:conf=...`: an image of the test pool (the name is unique per test process).
    public static func image(_ name: String, snapshot: String? = nil) -> String {
        "rbd:rbd/\(name)-\(getpid())" + (snapshot.map { "@" + $0 } ?? "") + ":conf=\(conf ?? "")"
    }

    /// Runs `Tools/ceph-cluster.sh COMMAND` on the shared cluster (stop, restart, pause, resume).
    @discardableResult
    public static func control(_ command: String) -> ProcessResult {
        guard let directory = state.directory else {
            return ProcessResult(status: 1, stdout: "", stderr: "no test cluster")
        }
        return run(TestEnvironment.packageRoot + "/Tools/ceph-cluster.sh", [command, directory])
    }

    private struct State: Sendable {
        var conf: String?
        var directory: String?
        var why: String
    }

    private static let state: State = start()

    private static func start() -> State {
        guard TestEnvironment.which("ceph-mon") != nil, TestEnvironment.which("ceph-osd") != nil,
            TestEnvironment.which("rbd") != nil
        else {
            return State(conf: nil, directory: nil, why: "Ceph is not installed (Tools/setup.sh installs it)")
        }
        let directory = TestEnvironment.temporaryDirectory("vdisk-ceph")
        let script = TestEnvironment.packageRoot + "/Tools/ceph-cluster.sh"
        let result = run(script, ["start", directory])
        guard result.status == 0 else {
            let why = "the test cluster did not start: \(result.stderr.split(separator: "\n").last ?? "")"
            printToStandardError("CephTestCluster: \(why)")
            return State(conf: nil, directory: nil, why: why)
        }
        stopDirectory = strdup(directory)
        atexit {
            guard let directory = CephTestCluster.stopDirectory else { return }
            let dir = String(cString: directory)
            run(TestEnvironment.packageRoot + "/Tools/ceph-cluster.sh", ["stop", dir])
            TestEnvironment.remove(dir)
        }
        return State(conf: directory + "/ceph.conf", directory: directory, why: "")
    }

    /// For the exit handler, which cannot capture context.
    private nonisolated(unsafe) static var stopDirectory: UnsafeMutablePointer<CChar>?
}

func printToStandardError(_ text: String) {
    var bytes = Array((text + "\n").utf8)
    _ = write(2, &bytes, bytes.count)
}
