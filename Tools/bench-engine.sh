#!/usr/bin/env bash
# Engine benchmark: the VIMG engine (vimg-bench) against `qemu-img bench` on a qcow2 with the same
# cluster size, same request stream, same 1 GiB image, in one run. Prints a Markdown table with ratios
# (>1 means vimg is faster). "Random" rows use qemu-img bench's wrap-around stride: a step of 7919
# blocks modulo the image size touches every block once per pass in a scattered order.
#
#   Tools/bench-engine.sh [WORKDIR]     (default: a temp dir under /var/tmp; needs ~4.5 GiB free)
#
# BEFORE=DIR adds a column: the vimg-bench built in another checkout (DIR/.build/release, e.g. a worktree
# at an older commit) runs every row too, on an image of its own, right after ours: a before/after
# comparison in one run, under the same load.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vimg-bench >/dev/null
swift build -c release --product vimg >/dev/null
BENCH=$PWD/.build/release/vimg-bench
VIMG=$PWD/.build/release/vimg
BEFORE_BENCH=
if [ -n "${BEFORE:-}" ]; then
    BEFORE_BENCH=$(cd "$BEFORE" && pwd)/.build/release/vimg-bench
    BEFORE_VIMG=$(cd "$BEFORE" && pwd)/.build/release/vimg  # its images are made by its own vimg
    [ -x "$BEFORE_BENCH" ] && [ -x "$BEFORE_VIMG" ] || {
        echo "build vimg-bench and vimg in $BEFORE first (swift build -c release --product ...)" >&2
        exit 1
    }
fi
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
SIZE=1G
STRIDE4K=$((4096 * 7919))
STRIDE64K=$((65536 * 7919))

ours() { "$BENCH" "$@" | awk '{print $1, $3}'; }  # seconds bytes
before() { "$BEFORE_BENCH" "$@" | awk '{print $1, $3}'; }
theirs() {
    local out
    out=$(qemu-img bench -f qcow2 "$@" | tail -1)
    # "Run completed in 3.057 seconds."
    echo "$out" | awk '{print $4}'
}

fresh() {
    rm -f "$WORK/a.vimg" "$WORK/b.vimg" "$WORK/a.qcow2"
    "$VIMG" create -q "$WORK/a.vimg" $SIZE
    [ -z "$BEFORE_BENCH" ] || "$BEFORE_VIMG" create -q "$WORK/b.vimg" $SIZE
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/a.qcow2" $SIZE
}

if [ -n "$BEFORE_BENCH" ]; then
    printf '| workload | vimg | qemu-img bench (qcow2) | ratio | vimg before | after / before |\n|---|---|---|---|---|---|\n'
else
    printf '| workload | vimg | qemu-img bench (qcow2) | ratio |\n|---|---|---|---|\n'
fi
row() {  # name unit count blocksize -- vimg args -- qemu args
    local name=$1 unit=$2 count=$3 bs=$4
    shift 4
    local oargs=() qargs=()
    while [ "$1" != "--" ]; do oargs+=("$1"); shift; done
    shift
    qargs=("$@")
    local o t b=0
    o=$(ours "${oargs[@]}" | awk '{print $1}')
    if [ -n "$BEFORE_BENCH" ]; then
        local bargs=("${oargs[@]}")
        bargs[-1]=${bargs[-1]/a.vimg/b.vimg}
        b=$(before "${bargs[@]}" | awk '{print $1}')
    fi
    t=$(theirs "${qargs[@]}")
    awk -v n="$name" -v u="$unit" -v c="$count" -v bs="$bs" -v o="$o" -v t="$t" -v b="$b" 'BEGIN {
        if (u == "MiB/s") { ov = c * bs / 1048576 / o; tv = c * bs / 1048576 / t; bv = b > 0 ? c * bs / 1048576 / b : 0; f = "%.0f MiB/s" }
        else { ov = c / o; tv = c / t; bv = b > 0 ? c / b : 0; f = "%.0f IOPS" }
        printf "| %s | " f " | " f " | %.2fx |", n, ov, tv, ov / tv
        if (bv > 0) printf " " f " | %.2fx |", bv, ov / bv
        printf "\n" }'
}

fresh
row "1 MiB sequential write (allocating), 1 thread / depth 1" MiB/s 1024 1048576 \
    -c 1024 -s 1M -w -d 1 "$WORK/a.vimg" -- -c 1024 -s 1M -w -d 1 "$WORK/a.qcow2"
row "1 MiB sequential read, 1 / 1" MiB/s 1024 1048576 \
    -c 1024 -s 1M -d 1 "$WORK/a.vimg" -- -c 1024 -s 1M -d 1 "$WORK/a.qcow2"
row "1 MiB sequential read, 8 / 8" MiB/s 4096 1048576 \
    -c 4096 -s 1M -d 8 "$WORK/a.vimg" -- -c 4096 -s 1M -d 8 "$WORK/a.qcow2"
row "4 KiB random read, 1 / 1" IOPS 100000 4096 \
    -c 100000 -s 4k -S $STRIDE4K -d 1 "$WORK/a.vimg" -- -c 100000 -s 4k -S $STRIDE4K -d 1 "$WORK/a.qcow2"
row "4 KiB random read, 8 / 8" IOPS 400000 4096 \
    -c 400000 -s 4k -S $STRIDE4K -d 8 "$WORK/a.vimg" -- -c 400000 -s 4k -S $STRIDE4K -d 8 "$WORK/a.qcow2"
row "4 KiB random write (allocated), 1 / 1" IOPS 100000 4096 \
    -c 100000 -s 4k -S $STRIDE4K -w -d 1 "$WORK/a.vimg" -- -c 100000 -s 4k -S $STRIDE4K -w -d 1 "$WORK/a.qcow2"
row "4 KiB random write (allocated), 8 / 8" IOPS 200000 4096 \
    -c 200000 -s 4k -S $STRIDE4K -w -d 8 "$WORK/a.vimg" -- -c 200000 -s 4k -S $STRIDE4K -w -d 8 "$WORK/a.qcow2"
fresh
row "4 KiB random write (allocating a cluster each), 1 / 1" IOPS 16384 4096 \
    -c 16384 -s 4k -S $STRIDE64K -w -d 1 "$WORK/a.vimg" -- -c 16384 -s 4k -S $STRIDE64K -w -d 1 "$WORK/a.qcow2"
fresh
row "4 KiB random write (allocating a cluster each), 8 / 8" IOPS 16384 4096 \
    -c 16384 -s 4k -S $STRIDE64K -w -d 8 "$WORK/a.vimg" -- -c 16384 -s 4k -S $STRIDE64K -w -d 8 "$WORK/a.qcow2"
fresh
row "1 MiB sequential write (allocating), 8 / 8" MiB/s 1024 1048576 \
    -c 1024 -s 1M -w -d 8 "$WORK/a.vimg" -- -c 1024 -s 1M -w -d 8 "$WORK/a.qcow2"

# Overhead of the format itself: VIMG sequential read against reading a raw file of the same data.
rm -f "$WORK/a.raw"
"$VIMG" create -q -f raw "$WORK/a.raw" $SIZE
"$BENCH" -c 1024 -s 1M -w -d 1 "$WORK/a.raw" >/dev/null
r=$(ours -c 1024 -s 1M -d 1 "$WORK/a.raw" | awk '{print $1}')
v=$(ours -c 1024 -s 1M -d 1 "$WORK/a.vimg" | awk '{print $1}')
awk -v r="$r" -v v="$v" 'BEGIN { printf "\nVIMG vs raw file, 1 MiB sequential read (same engine, page cache): raw %.0f MiB/s, VIMG %.0f MiB/s, VIMG takes %.2fx the raw time\n", 1024/r, 1024/v, v/r }'
