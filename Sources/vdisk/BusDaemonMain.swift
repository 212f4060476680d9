import BlockIO
import ImageFormats
import NBDClient
import Foundation
import VDiskBus
import VImage

/// Runs the bus in this process until it is told to stop.
func runBusDaemon(paths: BusPaths, persist: Bool) throws {
    let log: @Sendable (String) -> Void = { printToStandardError("vdisk bus: \($0)") }
    let opener = BusOpener(
        openImage: { path, format, readOnly, snapshot in
            let format = try format.map { name -> ImageFormats.Format in
                guard let f = ImageFormats.Format(rawValue: name) else { throw BusError("unknown format '\(name)' (use vimg, raw or qcow2)") }
                return f
            } ?? ImageFormats.probe(path: path)
            return (try ImageFormats.open(path: path, format: format, readOnly: readOnly, snapshot: snapshot), format.rawValue)
        },
        openRemote: { uri, readOnly in try NBDClientDevice.connect(uri: uri, readOnly: readOnly) })
    let bus = Bus(paths: paths, opener: opener, exporter: nil, persist: persist, log: log)
    let daemon = try BusDaemon(bus: bus)
    try daemon.prepare()
    log("listening on \(paths.controlSocket) (pid \(getpid()))")
    bus.restoreState()
    daemon.run()
    log("stopped")
}
