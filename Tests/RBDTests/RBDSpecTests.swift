import RBD
import Testing

/// `rbd:` names: qemu's spelling parses into its parts, prints back to the same name, and every malformed
/// name is refused with a message that names the wrong part and never shows a key.
struct RBDSpecTests {
    /// Pool, namespace, image, snapshot and options land in their fields; `text` parses back to the value.
    @Test func partsAndRoundTrip() throws {
        let spec = try RBDSpec(
            parsing: "rbd:pool/ns/img@snap:conf=/etc/ceph/a.conf:id=vdisk:key=QUJD==:mon_host=1.2.3.4\\:3300"
        )
        #expect(spec.pool == "pool")
        #expect(spec.namespace == "ns")
        #expect(spec.image == "img")
        #expect(spec.snapshot == "snap")
        #expect(spec.conf == "/etc/ceph/a.conf")
        #expect(spec.id == "vdisk")
        #expect(spec.key == "QUJD==")
        #expect(spec.options == [RBDSpec.Option(name: "mon_host", value: "1.2.3.4:3300")])
        #expect(try RBDSpec(parsing: spec.text) == spec)
        #expect(spec.description == "rbd:pool/ns/img@snap")
        let plain = try RBDSpec(parsing: "rbd:rbd/disk")
        #expect(plain.namespace == nil && plain.snapshot == nil && plain.options.isEmpty)
        #expect(plain.at(snapshot: "v1").description == "rbd:rbd/disk@v1")
    }

    /// Escaped separators are part of a name, and survive printing.
    @Test func escapes() throws {
        let spec = try RBDSpec(parsing: "rbd:p/a\\@b\\:c")
        #expect(spec.image == "a@b:c")
        #expect(try RBDSpec(parsing: spec.text) == spec)
    }

    /// Malformed names are refused with `.invalidName`, and a key never appears in the message.
    @Test(arguments: [
        "rbd:", "rbd:pool", "rbd:/img", "rbd:pool/", "rbd:a/b/c/d", "rbd:pool/img@", "rbd:pool/img@a@b",
        "rbd:pool/img:novalue", "rbd:pool/img:key=SECRET:=x", "file.raw",
    ])
    func refused(_ text: String) {
        #expect {
            try RBDSpec(parsing: text)
        } throws: { error in
            guard let error = error as? RBDError else { return false }
            return error.code == .invalidName && !error.description.contains("SECRET")
        }
    }

    /// A relative conf path is made absolute for a process that runs elsewhere; an absolute one is kept.
    @Test func confResolution() throws {
        let spec = try RBDSpec(parsing: "rbd:p/i:conf=site/ceph.conf")
        #expect(spec.resolvingConf(against: "/work").conf == "/work/site/ceph.conf")
        let absolute = try RBDSpec(parsing: "rbd:p/i:conf=/etc/ceph/ceph.conf")
        #expect(absolute.resolvingConf(against: "/work") == absolute)
    }
}
