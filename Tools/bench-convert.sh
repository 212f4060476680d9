#!/usr/bin/env bash
# Convert benchmark: `vimg convert` against `qemu-img convert` on the same 2 GiB raw image of mixed
# content (a third incompressible, a third compressible text, a third zeroes as holes), in one run.
# Prints a Markdown table: seconds for each side, the ratio (>1 means vimg is faster), output sizes.
# Every source is read once before it is timed, so both sides read it from the page cache; each time
# is the best of two runs.
#
#   Tools/bench-convert.sh [WORKDIR]    (default: a temp dir under /var/tmp; needs ~8 GiB free)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
command -v qemu-img >/dev/null || Tools/setup.sh
swift build -c release --product vimg >/dev/null
VIMG=$PWD/.build/release/vimg
WORK=${1:-$(mktemp -d /var/tmp/vdisk-convert.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src.raw
CHUNK=64    # MiB per piece; pieces cycle random, text, hole

# The source: 2 GiB, 32 pieces of 64 MiB.
truncate -s 2G "$SRC"
{ seq 1 100000000 || true; } | head -c $((CHUNK << 20)) > "$WORK/text.bin"
for i in $(seq 0 31); do
    case $((i % 3)) in
        0) head -c $((CHUNK << 20)) /dev/urandom | dd of="$SRC" bs=1M seek=$((i * CHUNK)) conv=notrunc status=none ;;
        1) dd if="$WORK/text.bin" of="$SRC" bs=1M seek=$((i * CHUNK)) conv=notrunc status=none ;;
        2) ;;
    esac
done
rm -f "$WORK/text.bin"

now() { date +%s.%N; }
warm() { cat "$1" > /dev/null; }
# time_it FILE-TO-REMOVE CMD...: seconds taken by CMD, the best of two runs (page-cache writeback of
# earlier steps makes single runs noisy); each run starts with nothing dirty.
time_it() {
    local out=$1
    shift
    local best="" t0 t1 t
    for _ in 1 2; do
        rm -f "$out"
        sync
        t0=$(now)
        "$@" >/dev/null
        t1=$(now)
        t=$(echo "$t1 - $t0" | bc -l)
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    echo "$best"
}
size_mib() { echo "scale=0; $(stat -c %s "$1") / 1048576" | bc; }
alloc_mib() { echo "scale=0; $(stat -c %b "$1") * 512 / 1048576" | bc; }
fmt() { printf '%.2f' "$1"; }
ratio() { printf '%.1fx' "$(echo "$2 / $1" | bc -l)"; }

echo "Source: 2 GiB raw, $(alloc_mib "$SRC") MiB allocated (incompressible, text, holes); $(nproc) CPUs." >&2
warm "$SRC"

printf '| conversion | vimg (s) | qemu-img (s) | speed-up | vimg output | qemu-img output |\n|---|---|---|---|---|---|\n'

a=$(time_it "$WORK/a.vimg" "$VIMG" convert -O vimg "$SRC" "$WORK/a.vimg")
b=$(time_it "$WORK/a.qcow2" qemu-img convert -O qcow2 "$SRC" "$WORK/a.qcow2")
printf '| raw -> vimg vs raw -> qcow2 | %s | %s | %s | %s MiB | %s MiB |\n' "$(fmt "$a")" "$(fmt "$b")" "$(ratio "$a" "$b")" \
    "$(alloc_mib "$WORK/a.vimg")" "$(alloc_mib "$WORK/a.qcow2")"

a=$(time_it "$WORK/c.vimg" "$VIMG" convert -c -O vimg "$SRC" "$WORK/c.vimg")
b=$(time_it "$WORK/z.qcow2" qemu-img convert -c -O qcow2 -o compression_type=zlib "$SRC" "$WORK/z.qcow2")
printf '| raw -> vimg -c (LZ4) vs qcow2 -c zlib | %s | %s | %s | %s MiB | %s MiB |\n' "$(fmt "$a")" "$(fmt "$b")" "$(ratio "$a" "$b")" \
    "$(size_mib "$WORK/c.vimg")" "$(size_mib "$WORK/z.qcow2")"
b=$(time_it "$WORK/s.qcow2" qemu-img convert -c -O qcow2 -o compression_type=zstd "$SRC" "$WORK/s.qcow2")
printf '| raw -> vimg -c (LZ4) vs qcow2 -c zstd | %s | %s | %s | %s MiB | %s MiB |\n' "$(fmt "$a")" "$(fmt "$b")" "$(ratio "$a" "$b")" \
    "$(size_mib "$WORK/c.vimg")" "$(size_mib "$WORK/s.qcow2")"
rm -f "$WORK/z.qcow2"

warm "$WORK/a.vimg"
warm "$WORK/a.qcow2"
a=$(time_it "$WORK/out.raw" "$VIMG" convert -O raw "$WORK/a.vimg" "$WORK/out.raw")
b=$(time_it "$WORK/out.raw" qemu-img convert -O raw "$WORK/a.qcow2" "$WORK/out.raw")
printf '| vimg -> raw vs qcow2 -> raw | %s | %s | %s | | |\n' "$(fmt "$a")" "$(fmt "$b")" "$(ratio "$a" "$b")"
rm -f "$WORK/a.vimg" "$WORK/a.qcow2"

warm "$WORK/c.vimg"
warm "$WORK/s.qcow2"
a=$(time_it "$WORK/out.raw" "$VIMG" convert -O raw "$WORK/c.vimg" "$WORK/out.raw")
cmp -s "$SRC" "$WORK/out.raw" || { echo "vimg -c round trip differs from the source" >&2; exit 1; }
b=$(time_it "$WORK/out.raw" qemu-img convert -O raw "$WORK/s.qcow2" "$WORK/out.raw")
printf '| read compressed: vimg -c -> raw vs qcow2 zstd -> raw | %s | %s | %s | | |\n' "$(fmt "$a")" "$(fmt "$b")" "$(ratio "$a" "$b")"
