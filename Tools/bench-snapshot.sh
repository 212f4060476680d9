#!/usr/bin/env bash
# Snapshot and chain benchmark, in one run:
#   - snapshot create and delete on an image with 4 GiB allocated: vimg vs qemu-img snapshot on qcow2
#     (both 64 KiB clusters, both filled by 1 MiB sequential writes);
#   - 4 KiB random reads on a clone 5 levels deep vs 1 level deep (same data in the base).
# Prints Markdown tables; ratios > 1 mean the first column is faster.
#
#   Tools/bench-snapshot.sh [WORKDIR]     (needs ~9 GiB free)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vimg-bench >/dev/null
swift build -c release --product vimg >/dev/null
BENCH=$PWD/.build/release/vimg-bench
VIMG=$PWD/.build/release/vimg
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", b - a }'; }

"$VIMG" create -q "$WORK/s.vimg" 4G
qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/s.qcow2" 4G
"$BENCH" -c 4096 -s 1M -w -d 1 "$WORK/s.vimg" >/dev/null
qemu-img bench -q -f qcow2 -c 4096 -s 1M -w -d 1 "$WORK/s.qcow2" >/dev/null 2>&1 || qemu-img bench -f qcow2 -c 4096 -s 1M -w -d 1 "$WORK/s.qcow2" >/dev/null
sync

echo "| operation (4 GiB allocated) | vimg | qemu-img (qcow2) | ratio |"
echo "|---|---|---|---|"
snaprow() {  # name vimg-flag qemu-flag: best of 5 (snapshots snap1..snap5), alternating the tools
    local o=999 q=999 t0 t1 t2 i
    for i in 1 2 3 4 5; do
        t0=$(now); "$VIMG" snapshot "$2" "snap$i" "$WORK/s.vimg"; t1=$(now)
        qemu-img snapshot "$3" "snap$i" "$WORK/s.qcow2"; t2=$(now)
        o=$(awk -v a="$o" -v b="$(elapsed "$t0" "$t1")" 'BEGIN { print (b < a ? b : a) }')
        q=$(awk -v a="$q" -v b="$(elapsed "$t1" "$t2")" 'BEGIN { print (b < a ? b : a) }')
    done
    awk -v n="$1" -v o="$o" -v q="$q" 'BEGIN { printf "| %s | %.1f ms | %.1f ms | %.2fx |\n", n, o * 1000, q * 1000, q / o }'
}
snaprow "snapshot create (best of 5)" -c -c
snaprow "snapshot delete (best of 5)" -d -d
"$VIMG" check "$WORK/s.vimg" >/dev/null

# Clone chains over a 1 GiB base full of data.
"$VIMG" create -q "$WORK/base.vimg" 1G
"$BENCH" -c 1024 -s 1M -w -d 1 "$WORK/base.vimg" >/dev/null
prev=base.vimg
for i in 1 2 3 4 5; do
    "$VIMG" create -q -b "$prev" -F vimg "$WORK/c$i.vimg"
    prev=c$i.vimg
done
STRIDE=$((4096 * 7919))
best() {  # best of 3 runs: seconds for 200k random 4 KiB reads
    local b=999
    for _ in 1 2 3; do
        t=$("$BENCH" -c 200000 -s 4k -S $STRIDE -d 1 "$@" | awk '{print $1}')
        b=$(awk -v a="$b" -v t="$t" 'BEGIN { print (t < a) ? t : a }')
    done
    echo "$b"
}
one=$(best "$WORK/c1.vimg")
five=$(best "$WORK/c5.vimg")
echo
echo "| 4 KiB random read, 1 thread | clone 1 level deep | clone 5 levels deep | deep / shallow time |"
echo "|---|---|---|---|"
awk -v a="$one" -v b="$five" 'BEGIN { printf "| vimg | %.0f IOPS | %.0f IOPS | %.2fx |\n", 200000 / a, 200000 / b, b / a }'
