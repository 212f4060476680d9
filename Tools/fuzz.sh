#!/usr/bin/env bash
# libFuzzer target for the engine (VIMG and qcow2) open + read + check + repair (Fuzz/FuzzVImage.swift,
# iteration in Sources/VImageTestSupport/FuzzHarness.swift). Builds the fuzzer with swiftc
# -sanitize=fuzzer,address straight from the sources of CBlockIO, BlockIO, VImage and the module maps of
# CLZ4, CZlib and CZstd (system libraries), then runs it for SECONDS (default 60) on a scratch copy of the
# seed corpus (Fixtures/fuzz/corpus: VIMG images, and qcow2 ones qemu-img made), so the repository corpus
# only changes on purpose. A crash (trap, ASan report, timeout, out-of-memory) is copied to
# Fixtures/fuzz/crashers/, where FixtureTests replays it; the script then exits non-zero.
#
#   Tools/fuzz.sh [SECONDS] [extra libFuzzer flags...]     (e.g. Tools/fuzz.sh 600 -jobs=2 -workers=2)
#   FUZZ_WORK=DIR to keep the grown corpus between runs (default .build/fuzz/corpus).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
SECONDS_TO_RUN=${1:-60}
shift || true
ROOT=$PWD
OUT=$ROOT/.build/fuzz
MODULES=$OUT/modules
mkdir -p "$MODULES/CBlockIO" "$OUT/artifacts" Fixtures/fuzz/crashers
SAN=(-sanitize=fuzzer,address)
SWIFTFLAGS=(-parse-as-library -swift-version 6 -O -g -wmo -I "$MODULES" -I "$MODULES/CBlockIO" -I "$ROOT/Sources/CLZ4" -I "$ROOT/Sources/CZlib" -I "$ROOT/Sources/CZstd" -I /usr/include)

# CBlockIO: SwiftPM generates its module map; write the equivalent.
cat > "$MODULES/CBlockIO/module.modulemap" <<MAP
module CBlockIO {
    header "$PWD/Sources/CBlockIO/include/CBlockIO.h"
    export *
}
MAP
clang -c -O1 -g -fsanitize=fuzzer-no-link,address -I Sources/CBlockIO/include Sources/CBlockIO/shim.c -o "$OUT/CBlockIO.o"
clang -c -O1 -g -fsanitize=fuzzer-no-link,address -I Sources/CBlockIO/include Sources/CBlockIO/linux.c -o "$OUT/CBlockIOLinux.o"
swiftc "${SWIFTFLAGS[@]}" "${SAN[@]}" -module-name BlockIO -emit-module -emit-module-path "$MODULES/BlockIO.swiftmodule" \
    -c Sources/BlockIO/*.swift -o "$OUT/BlockIO.o"
swiftc "${SWIFTFLAGS[@]}" "${SAN[@]}" -module-name VImage -emit-module -emit-module-path "$MODULES/VImage.swiftmodule" \
    -c Sources/VImage/*.swift -o "$OUT/VImage.o"
# Linked from inside $OUT: swiftc leaves the executable's module files in the working directory.
(cd "$OUT" && swiftc "${SWIFTFLAGS[@]}" "${SAN[@]}" -module-name FuzzVImage \
    "$ROOT/Fuzz/FuzzVImage.swift" "$ROOT/Sources/VImageTestSupport/FuzzHarness.swift" "$ROOT/Sources/VImageTestSupport/Support.swift" \
    CBlockIO.o CBlockIOLinux.o BlockIO.o VImage.o -llz4 -lz -lzstd -use-ld=lld -o fuzz-vimage)
echo "built $OUT/fuzz-vimage" >&2

WORK=${FUZZ_WORK:-$OUT/corpus}
mkdir -p "$WORK"
cp -n Fixtures/fuzz/corpus/* "$WORK"/ 2>/dev/null || true
rm -f "$OUT"/artifacts/*
status=0
# Leak detection is off: the Swift runtime's caches look like leaks to LSan at exit.
ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1} \
    "$OUT/fuzz-vimage" -max_total_time="$SECONDS_TO_RUN" -timeout=20 -rss_limit_mb=4096 -max_len=131072 \
    -detect_leaks=0 -print_final_stats=1 -artifact_prefix="$OUT/artifacts/" "$@" "$WORK" || status=$?
found=0
for f in "$OUT"/artifacts/*; do
    [ -e "$f" ] || continue
    name=$(basename "$f")
    cp "$f" "Fixtures/fuzz/crashers/$name"
    echo "crasher saved: Fixtures/fuzz/crashers/$name" >&2
    found=1
done
[ $found = 0 ] || exit 1
exit $status
