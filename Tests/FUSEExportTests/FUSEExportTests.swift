import BlockIO
import FUSEExport
import Testing
import VImageTestSupport

#if canImport(Glibc)
import Glibc
#endif

private let mebibyte = 1 << 20
private let diskSize = 64 * mebibyte

/// Mounts and loop devices are machine-wide, so the FUSE and loop suites run one test at a time.
@Suite(.serialized, .enabled(if: fuseAvailable, "needs root and /dev/fuse"))
enum FUSEExportTests {}

extension FUSEExportTests {
    @Suite struct Export {
        /// Bytes written through the file land on the device at the same offsets and read back; the file has
        /// the device's size and cannot grow; fsync reaches `flush()`; fallocate zeroes ranges.
        @Test func readWriteThroughFile() throws {
            let memory = MemoryDevice(size: UInt64(diskSize))
            let device = CountingDevice(memory)
            let dir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            defer { TestEnvironment.remove(dir) }
            let export = FUSEExport(device: device, mountpoint: dir, readOnly: false)
            try export.start()
            defer { export.stop() }
            #expect(export.isRunning)
            #expect(isMounted(dir))

            var st = stat()
            try #require(stat(export.filePath, &st) == 0)
            #expect(st.st_size == diskSize)
            #expect(st.st_mode == 0o100600)

            let fd = open(export.filePath, O_RDWR | O_CLOEXEC)
            try #require(fd >= 0, "open: \(describeErrno(errno))")
            defer { close(fd) }

            let writes = [(0, 4096), (12_345, 100_000), (mebibyte, mebibyte + 17), (diskSize - 5000, 5000)]
            for (index, (offset, count)) in writes.enumerated() {
                let data = Pattern.bytes(count: count, offset: UInt64(offset), seed: UInt64(index))
                #expect(pwriteAll(fd, data, at: offset) == count)
                let onDevice = try memory.read(count: count, at: UInt64(offset))
                #expect(firstDifference(onDevice[...], data[...]) == nil, "device differs at +\(offset)")
                let throughFile = try #require(preadBytes(fd, count: count, at: offset))
                #expect(firstDifference(throughFile[...], data[...]) == nil, "file differs at +\(offset)")
            }

            // The file ends where the device does.
            #expect(preadBytes(fd, count: 100, at: diskSize) == [])
            #expect(preadBytes(fd, count: 100, at: diskSize - 10)?.count == 10)
            #expect(pwriteAll(fd, [1, 2, 3], at: diskSize) == -Int(ENOSPC))
            #expect(ftruncate(fd, off_t(diskSize / 2)) == -1 && errno == EPERM)
            #expect(ftruncate(fd, off_t(diskSize)) == 0)

            let flushesBefore = device.flushes.load(ordering: .relaxed)
            #expect(fsync(fd) == 0)
            #expect(device.flushes.load(ordering: .relaxed) > flushesBefore)

            // PUNCH_HOLE | KEEP_SIZE and ZERO_RANGE zero the device and the cached pages.
            // (util-linux's fallocate: Glibc only declares fallocate(2) under _GNU_SOURCE.)
            for (mode, offset) in [("--punch-hole", mebibyte + 4096), ("--zero-range", mebibyte + 200_000)] {
                let result = run(program("fallocate"), [mode, "-o", "\(offset)", "-l", "65536", export.filePath])
                #expect(result.status == 0, "fallocate \(mode): \(result.stderr)")
                #expect(try memory.read(count: 65_536, at: UInt64(offset)).allSatisfy { $0 == 0 })
                #expect(preadBytes(fd, count: 65_536, at: offset)?.allSatisfy { $0 == 0 } == true)
            }
            #expect(try memory.read(count: 1, at: UInt64(mebibyte + 4095)) != [0])

            let directory = try #require(opendir(dir))
            var names: [String] = []
            while let entry = readdir(directory) {
                names.append(
                    withUnsafeBytes(of: entry.pointee.d_name) {
                        String(cString: $0.bindMemory(to: CChar.self).baseAddress!)
                    }
                )
            }
            closedir(directory)
            #expect(names.sorted() == [".", "..", "disk"])
        }

        /// A read-only export serves reads and refuses every kind of write, even to root.
        @Test func readOnlyExport() throws {
            let memory = MemoryDevice(size: UInt64(diskSize))
            let data = Pattern.bytes(count: 8192, offset: 4096, seed: 7)
            try memory.write(data, at: 4096)
            let dir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            defer { TestEnvironment.remove(dir) }
            let export = FUSEExport(device: memory, mountpoint: dir, fileName: "image.raw", readOnly: true)
            try export.start()
            defer { export.stop() }

            var st = stat()
            try #require(stat(dir + "/image.raw", &st) == 0)
            #expect(st.st_mode == 0o100400)
            #expect(open(export.filePath, O_RDWR | O_CLOEXEC) == -1 && errno == EROFS)
            let fd = open(export.filePath, O_RDONLY | O_CLOEXEC)
            try #require(fd >= 0)
            defer { close(fd) }
            #expect(preadBytes(fd, count: 8192, at: 4096) == data)
        }

        /// A failed start leaves nothing mounted, stop is idempotent, and an export can restart.
        @Test func startFailuresAndStopLeaveNoMount() throws {
            let dir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            defer { TestEnvironment.remove(dir) }
            let memory = MemoryDevice(size: 1 << 20)

            let missing = FUSEExport(device: memory, mountpoint: dir + "/missing", readOnly: false)
            #expect { try missing.start() } throws: { ($0 as? FUSEExportError)?.code == .mountpointMissing }
            missing.stop()
            missing.stop()
            #expect(!missing.isRunning)
            #expect(!isMounted(dir + "/missing"))

            let file = dir + "/file"
            close(open(file, O_CREAT | O_WRONLY | O_CLOEXEC, 0o600))
            let onFile = FUSEExport(device: memory, mountpoint: file, readOnly: false)
            #expect { try onFile.start() } throws: { ($0 as? FUSEExportError)?.code == .mountpointMissing }
            onFile.stop()
            #expect(!isMounted(file))

            let export = FUSEExport(device: memory, mountpoint: dir, readOnly: false)
            try export.start()
            defer { export.stop() }
            #expect { try export.start() } throws: { ($0 as? FUSEExportError)?.code == .alreadyStarted }
            #expect(isMounted(dir))
            export.stop()
            export.stop()
            #expect(!isMounted(dir))
            try export.start()
            #expect(isMounted(dir))
            export.stop()
            #expect(!isMounted(dir))
            #expect(!readFile("/proc/mounts").contains(dir))
        }
    }

    @Suite struct Loop {
        /// Writes to /dev/loopN reach the device, with buffered and direct loop I/O; detach unbinds the device
        /// (sysfs shows no backing file) and detaching again is harmless. (Not `losetup -a`: it stats the backing
        /// file of every loop device on the machine, and one served by a stuck FUSE daemon blocks it.)
        @Test(arguments: [false, true]) func attachWriteDetach(directIO: Bool) throws {
            let memory = MemoryDevice(size: UInt64(diskSize))
            let device = CountingDevice(memory)
            let dir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            defer { TestEnvironment.remove(dir) }
            let export = FUSEExport(device: device, mountpoint: dir, readOnly: false)
            try export.start()
            defer { export.stop() }

            let loop = try LoopDevice.attach(file: export.filePath, readOnly: false, directIO: directIO)
            var attached = true
            defer { if attached { try? LoopDevice.detach(loop) } }
            #expect(LoopDevice.backingFile(of: loop) == export.filePath)

            let fd = open(loop, O_RDWR | O_CLOEXEC)
            try #require(fd >= 0)
            #expect(lseek(fd, 0, SEEK_END) == diskSize)
            let data = Pattern.bytes(count: 3 * 65_536, offset: 65_536, seed: 3)
            #expect(pwriteAll(fd, data, at: 65_536) == data.count)
            let flushesBefore = device.flushes.load(ordering: .relaxed)
            #expect(fsync(fd) == 0)
            close(fd)
            #expect(device.flushes.load(ordering: .relaxed) > flushesBefore)
            #expect(try memory.read(count: data.count, at: 65_536) == data)

            try LoopDevice.detach(loop)
            attached = false
            #expect(LoopDevice.backingFile(of: loop) == nil)
            try LoopDevice.detach(loop)  // not bound any more: nothing to do
        }

        /// Stopping in the wrong order (loop device still bound, a descriptor still open) or after someone
        /// else unmounted the file system does not hang: the mount goes away and the loop device's I/O fails.
        @Test(.timeLimit(.minutes(1))) func stopDoesNotHang() throws {
            let memory = MemoryDevice(size: UInt64(diskSize))
            let dir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            defer { TestEnvironment.remove(dir) }

            let export = FUSEExport(device: memory, mountpoint: dir, readOnly: false)
            try export.start()
            defer { export.stop() }  // idempotent: only matters if the test fails early
            let loop = try LoopDevice.attach(file: export.filePath, readOnly: false)
            defer { try? LoopDevice.detach(loop) }
            let fd = open(export.filePath, O_RDWR | O_CLOEXEC)
            #expect(fd >= 0)
            export.stop()
            #expect(!isMounted(dir))
            #expect(preadBytes(fd, count: 4096, at: 0) == nil)
            close(fd)
            let loopFD = open(loop, O_RDONLY | O_CLOEXEC)
            #expect(loopFD >= 0)
            #expect(preadBytes(loopFD, count: 4096, at: 0) == nil)
            close(loopFD)
            try LoopDevice.detach(loop)
            #expect(LoopDevice.backingFile(of: loop) == nil)

            try export.start()
            #expect(unmount(dir) == 0, "umount: \(describeErrno(errno))")
            export.stop()
            #expect(!isMounted(dir))
        }

        /// The whole stack carries a file system: mkfs.ext4 on the loop device, mount, write, unmount, fsck
        /// clean; the device then holds an ext4 superblock, and a read-only re-export mounts and reads the files.
        @Test(.enabled(if: TestEnvironment.which("mkfs.ext4") != nil || access("/usr/sbin/mkfs.ext4", X_OK) == 0))
        func ext4OnLoopDevice() throws {
            let memory = MemoryDevice(size: UInt64(diskSize))
            let files = [
                ("hello.txt", Pattern.bytes(count: 300_000, offset: 0, seed: 11)),
                ("small", Array("vdisk\n".utf8)), ("zeros", [UInt8](repeating: 0, count: 70_000)),
            ]
            let fuseDir = TestEnvironment.temporaryDirectory("vdisk-fuse")
            let mountDir = TestEnvironment.temporaryDirectory("vdisk-ext4")
            defer {
                TestEnvironment.remove(mountDir)
                TestEnvironment.remove(fuseDir)
            }

            do {
                let export = FUSEExport(device: memory, mountpoint: fuseDir, readOnly: false)
                try export.start()
                defer { export.stop() }
                let loop = try LoopDevice.attach(file: export.filePath, readOnly: false)
                defer { try? LoopDevice.detach(loop) }

                let mkfs = run(program("mkfs.ext4"), ["-q", "-F", loop])
                try #require(mkfs.status == 0, "mkfs.ext4: \(mkfs.stderr)")
                try #require(mount(loop, mountDir, "ext4", 0, nil) == 0, "mount: \(describeErrno(errno))")
                var mounted = true
                defer { if mounted { unmount(mountDir, lazyAfterRetries: true) } }
                for (name, bytes) in files {
                    let fd = open(mountDir + "/" + name, O_CREAT | O_WRONLY | O_CLOEXEC, 0o644)
                    try #require(fd >= 0)
                    #expect(pwriteAll(fd, bytes, at: 0) == bytes.count)
                    close(fd)
                }
                sync()
                #expect(unmount(mountDir) == 0, "umount: \(describeErrno(errno))")
                mounted = false
                let fsck = run(program("fsck.ext4"), ["-n", "-f", loop])
                #expect(fsck.status == 0, "fsck.ext4: \(fsck.stdout) \(fsck.stderr)")
                try LoopDevice.detach(loop)
            }
            #expect(!isMounted(fuseDir))
            #expect(try memory.read(count: 2, at: 1024 + 56) == [0x53, 0xEF], "no ext4 superblock magic")

            // Read the files back through a read-only export and a read-only loop device.
            let export = FUSEExport(device: memory, mountpoint: fuseDir, readOnly: true)
            try export.start()
            defer { export.stop() }
            let loop = try LoopDevice.attach(file: export.filePath, readOnly: true)
            defer { try? LoopDevice.detach(loop) }
            try #require(mount(loop, mountDir, "ext4", UInt(MS_RDONLY), nil) == 0, "mount: \(describeErrno(errno))")
            defer { unmount(mountDir, lazyAfterRetries: true) }
            for (name, bytes) in files {
                let fd = open(mountDir + "/" + name, O_RDONLY | O_CLOEXEC)
                try #require(fd >= 0)
                #expect(preadBytes(fd, count: bytes.count + 1, at: 0) == bytes, "\(name) differs")
                close(fd)
            }
        }
    }
}
