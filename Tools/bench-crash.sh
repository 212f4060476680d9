#!/usr/bin/env bash
# Crash-testing overhead: fio (libaio, O_DIRECT) on one VIMG disk plugged three ways in turn - normally,
# with --crash-sim, with --record - in one run. Each row is the best of $ROUNDS rounds, the three ways
# interleaved within a round; ratio = throughput with the wrapper / plugged normally. Prints a Markdown
# table. Needs root.
#
#   Tools/bench-crash.sh [WORKDIR] [SIZE]   (default: a temp dir under /var/tmp, 1G)
#   ROUNDS=3 RUNTIME=10                     (rounds per row; seconds per time-based fio run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
if [ -z "${VDISK_BIN_DIR:-}" ]; then
    Tools/setup.sh
    swift build -c release --product vdisk >/dev/null
    swift build -c release --product vimg >/dev/null
    VDISK_BIN_DIR=$PWD/.build/release
fi
VDISK=$VDISK_BIN_DIR/vdisk
VIMG=$VDISK_BIN_DIR/vimg
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-crash.XXXXXX)}
SIZE=${2:-1G}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
mkdir -p "$WORK"
export VDISK_RUNTIME_DIR="$WORK/run"
cleanup() {
    "$VDISK" bus --stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# One image, allocated everywhere first, so every way measures the data path, not first allocation.
"$VIMG" create "$WORK/disk.vimg" "$SIZE" >/dev/null
dev=$("$VDISK" plug --name disk "$WORK/disk.vimg")
fio --name=fill --filename="$dev" --rw=write --bs=1M --direct=1 --ioengine=libaio --iodepth=8 --size="$SIZE" >/dev/null
"$VDISK" unplug disk

plug() {  # normal|crash-sim|record|snapshot -> the device
    case $1 in
    normal) "$VDISK" plug --name disk "$WORK/disk.vimg" ;;
    snapshot)
        "$VIMG" snapshot -c bench-control "$WORK/disk.vimg"
        "$VDISK" plug --name disk "$WORK/disk.vimg"
        ;;
    crash-sim) "$VDISK" plug --name disk --crash-sim=1 "$WORK/disk.vimg" 2>/dev/null ;;
    record) "$VDISK" plug --name disk --record "$WORK/disk.log" "$WORK/disk.vimg" ;;
    esac
}
unplug() {  # normal|crash-sim|record|snapshot: and drop what a recording leaves (its log and start snapshot)
    "$VDISK" unplug disk
    [ "$1" = snapshot ] && "$VIMG" snapshot -d bench-control "$WORK/disk.vimg"
    if [ "$1" = record ]; then
        rm -f "$WORK/disk.log"
        for snapshot in $("$VIMG" snapshot -l "$WORK/disk.vimg" | grep -o 'vdisk-record-[0-9a-f]*'); do
            "$VIMG" snapshot -d "$snapshot" "$WORK/disk.vimg"
        done
    fi
}
# fio throughput in MiB/s: device rw bs iodepth [fio options...]
measure() {
    local device=$1 rw=$2 bs=$3 depth=$4
    shift 4
    fio --name=b --filename="$device" --rw="$rw" --bs="$bs" --iodepth="$depth" --direct=1 --ioengine=libaio \
        --size="$SIZE" --group_reporting --output-format=json "$@" 2>/dev/null |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw"] + j["write"]["bw"]) / 1024))'
}
best() { printf '%s\n' "$@" | sort -g | tail -1; }

# The last two columns separate the recorder's own cost from its start snapshot's: "snapshot" is the disk
# plugged normally just after an internal snapshot was taken (every first write to a cluster copies it).
echo "| workload | plugged (MiB/s) | --crash-sim (MiB/s) | ratio | --record (MiB/s) | ratio | plugged after a snapshot (MiB/s) | --record / that |"
echo "|---|---|---|---|---|---|---|---|"
# A row's runs: "fio arguments|runs before the measured one|name". The first write to a cluster after
# the plug costs a --record disk a copy of the cluster (its start snapshot shares them all), so the random
# write row is measured twice: the first pass after the plug, and a second pass over copied clusters.
rows=(
    "randwrite 4k 32 --fsync=32 --time_based --runtime=$RUNTIME --ramp_time=1|0|randwrite 4k QD32 fsync=32, first pass"
    "randwrite 4k 32 --fsync=32 --time_based --runtime=$RUNTIME --ramp_time=1|1|randwrite 4k QD32 fsync=32, second pass"
    "write 1M 8 --io_size=$SIZE|0|write 1M QD8 (the whole disk once)"
    "read 1M 8 --time_based --runtime=$RUNTIME --ramp_time=1|0|read 1M QD8"
)
for row in "${rows[@]}"; do
    IFS='|' read -r spec warmups name <<<"$row"
    declare -A results=([normal]="" [crash-sim]="" [record]="" [snapshot]="")
    for _ in $(seq "$ROUNDS"); do
        for way in normal crash-sim record snapshot; do
            device=$(plug "$way")
            # shellcheck disable=SC2086
            for _ in $(seq "$warmups"); do measure "$device" $spec >/dev/null; done
            # shellcheck disable=SC2086
            results[$way]+=" $(measure "$device" $spec)"
            unplug "$way"
        done
    done
    # shellcheck disable=SC2086
    n=$(best ${results[normal]}) c=$(best ${results[crash-sim]}) r=$(best ${results[record]})
    # shellcheck disable=SC2086
    p=$(best ${results[snapshot]})
    awk -v w="$name" -v n="$n" -v c="$c" -v r="$r" -v p="$p" \
        'BEGIN { printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.2fx | %.0f | %.2fx |\n", w, n, c, c / n, r, r / n, p, r / p }'
done
