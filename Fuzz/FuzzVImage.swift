// The libFuzzer entry point for opening, reading, checking and repairing hostile VIMG images. Built by
// Tools/fuzz.sh with `swiftc -sanitize=fuzzer,address` from the sources of BlockIO and VImage, this
// file and Sources/VImageTestSupport/FuzzHarness.swift (the iteration, shared with FixtureTests, which
// replays Fixtures/fuzz/crashers through it). Not a SwiftPM target: SwiftPM cannot link libFuzzer's
// main. Model: google/crosvm `fuzz/fuzz_targets/qcow_fuzzer.rs`.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzVImage(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    FuzzHarness.exercise(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
}
