// vimg-bench: the engine-level twin of `qemu-img bench`, so both run the same request stream.
//
// Request i goes to (offset + i * step) mod image size, like qemu-img bench; `--depth` threads issue
// requests concurrently (qemu-img bench keeps the same number in flight with AIO). Prints one line:
// "<seconds> <requests> <bytes>" for Tools/bench-engine.sh to turn into a table.

import BlockIO
import ImageFormats
import VImage

#if canImport(Glibc)
import Glibc
#endif

struct Options {
    var path = ""
    var count = 1000
    var size = 4096
    var step: UInt64? = nil
    var depth = 1
    var write = false
    var offset: UInt64 = 0
}

func parse() -> Options {
    var o = Options()
    var args = CommandLine.arguments.dropFirst().makeIterator()
    func value(_ name: String) -> String {
        guard let v = args.next() else { fatalError("missing value for \(name)") }
        return v
    }
    while let arg = args.next() {
        switch arg {
        case "-c": o.count = Int(value(arg))!
        case "-s": o.size = Int(ByteSize.parse(value(arg))!)
        case "-S": o.step = ByteSize.parse(value(arg))!
        case "-d": o.depth = Int(value(arg))!
        case "-o": o.offset = ByteSize.parse(value(arg))!
        case "-w": o.write = true
        default: o.path = arg
        }
    }
    return o
}

final class Shared: @unchecked Sendable {
    let device: any BlockDevice
    let options: Options
    let imageSize: UInt64
    var next = 0
    let lock = Monitor()
    var failure: String?
    init(device: any BlockDevice, options: Options) {
        self.device = device
        self.options = options
        self.imageSize = device.size
    }
}

func worker(_ shared: Shared) {
    let o = shared.options
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: o.size, alignment: 4096)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xA5)
    let step = o.step ?? UInt64(o.size)
    while true {
        let i = shared.lock.withLock { () -> Int in
            defer { shared.next += 1 }
            return shared.next
        }
        if i >= o.count { return }
        let offset = (o.offset + UInt64(i) &* step) % shared.imageSize
        do {
            if o.write {
                try shared.device.write(UnsafeRawBufferPointer(buffer), at: offset, fua: false)
            } else {
                try shared.device.read(into: buffer, at: offset)
            }
        } catch {
            shared.lock.withLock { shared.failure = "\(error)" }
            return
        }
    }
}

/// Starts a worker thread (a plain function: a closure in top-level code would be main-actor isolated).
nonisolated func startWorker(_ shared: Shared) -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(shared).toOpaque()
    pthread_create(
        &thread,
        nil,
        { raw in
            worker(Unmanaged<Shared>.fromOpaque(raw!).takeRetainedValue())
            return nil
        },
        box
    )
    return thread
}

let options = parse()
do {
    let device = try ImageFormats.open(path: options.path, readOnly: !options.write)
    let shared = Shared(device: device, options: options)
    var start = timespec()
    clock_gettime(CLOCK_MONOTONIC, &start)
    var threads: [pthread_t] = []
    for _ in 0..<options.depth { threads.append(startWorker(shared)) }
    for t in threads { pthread_join(t, nil) }
    var end = timespec()
    clock_gettime(CLOCK_MONOTONIC, &end)
    try device.close()  // included: a clean close writes the metadata, as qemu-img bench's does
    var closed = timespec()
    clock_gettime(CLOCK_MONOTONIC, &closed)
    if let failure = shared.failure {
        print("vimg-bench: error: \(failure)")
        exit(1)
    }
    let seconds = Double(closed.tv_sec - start.tv_sec) + Double(closed.tv_nsec - start.tv_nsec) / 1e9
    print("\(seconds) \(options.count) \(options.count * options.size)")
} catch {
    print("vimg-bench: error: \(error)")
    exit(1)
}
