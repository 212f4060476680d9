#!/usr/bin/env bash
# Bus benchmark: fio (libaio, O_DIRECT) on a plugged VIMG disk and a plugged raw disk (FUSE + loop, or
# /dev/nbdN where the kernel has NBD) vs the same fio on a plain loop device over a raw file, in one
# run. Prints a Markdown table; ratio = plugged throughput / plain loop throughput (1.0 = as fast).
# Needs root.
#
#   Tools/bench-bus.sh [WORKDIR] [SIZE]     (default: a temp dir under /var/tmp, 2G)
#   ROUNDS=3 RUNTIME=5                      (rounds per row, seconds per fio run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vdisk >/dev/null
swift build -c release --product vimg >/dev/null
BIN=$PWD/.build/release
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-bus.XXXXXX)}
SIZE=${2:-2G}
mkdir -p "$WORK"
export VDISK_RUNTIME_DIR="$WORK/run"
LOOP=""
cleanup() {
    "$BIN/vdisk" bus --stop >/dev/null 2>&1 || true
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/vimg" create -q "$WORK/a.vimg" "$SIZE" >/dev/null
truncate -s "$SIZE" "$WORK/plain.raw" "$WORK/b.raw"
# Allocate everything first so reads and rewrites measure the data path, not first allocation.
fill() { fio --name=fill --filename="$1" --rw=write --bs=1M --direct=1 --ioengine=libaio --iodepth=8 --size="$SIZE" >/dev/null; }
LOOP=$(losetup --find --show --direct-io=on "$WORK/plain.raw")
VDEV=$("$BIN/vdisk" plug --name vimg "$WORK/a.vimg")
RDEV=$("$BIN/vdisk" plug --name raw "$WORK/b.raw")
fill "$LOOP"; fill "$VDEV"; fill "$RDEV"

# fio throughput in MiB/s for one job on one device.
measure() {  # device rw bs iodepth
    fio --name=b --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --direct=1 --ioengine=libaio \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --size="$SIZE" --group_reporting --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw"] + j["write"]["bw"]) / 1024))'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

# 4 KiB rows on these 2-core machines vary by up to 2x from run to run (scheduling of fio, the loop
# workers and the FUSE threads), so each row is the median of $ROUNDS rounds, the three devices
# interleaved within a round.
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-3}
echo "| workload | plain loop (MiB/s) | plugged VIMG (MiB/s) | ratio | plugged raw (MiB/s) | ratio |"
echo "|---|---|---|---|---|---|"
for spec in "read 1M 8" "write 1M 8" "randread 4k 32" "randwrite 4k 32" "randread 4k 1" "randwrite 4k 1"; do
    set -- $spec
    ls=() vs=() rs=()
    for _ in $(seq "$ROUNDS"); do
        ls+=("$(measure "$LOOP" "$1" "$2" "$3")")
        vs+=("$(measure "$VDEV" "$1" "$2" "$3")")
        rs+=("$(measure "$RDEV" "$1" "$2" "$3")")
    done
    l=$(median "${ls[@]}") v=$(median "${vs[@]}") r=$(median "${rs[@]}")
    awk -v n="$1 $2 QD$3" -v l="$l" -v v="$v" -v r="$r" \
        'BEGIN { printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.2fx |\n", n, l, v, v / l, r, r / l }'
done
echo
echo "Devices: plain $LOOP, VIMG $VDEV, raw $RDEV ($( [ "${VDEV#/dev/nbd}" != "$VDEV" ] && echo kernel NBD || echo FUSE + loop))"
