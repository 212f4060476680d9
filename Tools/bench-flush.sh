#!/usr/bin/env bash
# What a flush costs: fio's nbd engine against `vdisk serve` (VIMG) and `qemu-nbd` (qcow2) with flushes,
# each server in its default cache mode and with --cache=none, over unix sockets, in one run. Rows: 4 KiB
# random writes with a flush after every write (--fsync=1) and after every 32 (--fsync=32), on a fully
# allocated image and on an empty one (every write allocates), and 1 MiB sequential writes with a flush
# after each (the issue's --fdatasync=1 row: fio's nbd engine refuses fdatasync with EINVAL, and NBD has
# one flush command for both, so it is sent as --fsync=1). Best of ROUNDS; ratio = vdisk / qemu-nbd in the same cache mode (above 1: faster).
# Then the number of fsync/fdatasync calls the server makes per guest flush, counted with strace -c -f
# over a fixed number of writes (default cache mode).
#
#   Tools/bench-flush.sh [WORKDIR] [SIZE]     (default: a temp dir under /var/tmp, 1G)
#
# Environment: BIN=DIR uses vdisk and vimg from DIR instead of a release build; ROUNDS=N (default 3);
# RUNTIME=seconds per measurement (default 5); ROWS_ONLY=1 skips the sync counts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
if [ -z "${BIN:-}" ]; then
    swift build -c release --product vdisk >/dev/null
    swift build -c release --product vimg >/dev/null
    BIN=$PWD/.build/release
fi
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-flush.XXXXXX)}
SIZE=${2:-1G}
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-5}
mkdir -p "$WORK"
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Same content for both: a fully written raw file, converted to each format.
fio --name=fill --filename="$WORK/src.raw" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --buffer_compress_percentage=0 --refill_buffers >/dev/null
"$BIN/vimg" convert -O vimg "$WORK/src.raw" "$WORK/full.vimg"
qemu-img convert -O qcow2 -o cluster_size=65536 "$WORK/src.raw" "$WORK/full.qcow2"
rm -f "$WORK/src.raw"

# image kind (full|empty) server (vdisk|qemu) cache (writeback|none) -> the image to serve
image_for() {
    local ext=vimg
    [ "$2" = qemu ] && ext=qcow2
    if [ "$1" = full ]; then echo "$WORK/full.$ext"; return; fi
    rm -f "$WORK/empty.$ext"
    if [ "$ext" = vimg ]; then
        "$BIN/vimg" create "$WORK/empty.vimg" "$SIZE" >/dev/null
    else
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/empty.qcow2" "$SIZE"
    fi
    echo "$WORK/empty.$ext"
}

# server cache image [wrapper...] -> starts it on $WORK/s.sock, sets SERVER
start() {
    local server=$1 cache=$2 image=$3
    shift 3
    rm -f "$WORK/s.sock"
    if [ "$server" = vdisk ]; then
        "$@" "$BIN/vdisk" serve --cache="$cache" --socket "$WORK/s.sock" "$image" 2>/dev/null &
    else
        "$@" qemu-nbd -f qcow2 -k "$WORK/s.sock" --persistent --cache="$cache" --aio=threads -e 16 "$image" \
            2>/dev/null &
    fi
    SERVER=$!
    for _ in $(seq 200); do [ -S "$WORK/s.sock" ] && return; sleep 0.05; done
    echo "bench-flush: $server did not start" >&2
    exit 1
}

stop() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
}

# rw bs sync-option [extra fio options] -> MiB/s and IOPS ("mib iops")
fio_row() {
    local rw=$1 bs=$2 sync=$3
    shift 3
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/s.sock" --rw="$rw" --bs="$bs" --iodepth=1 \
        "$sync" --size="$SIZE" "$@" --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' |  # the nbd engine prints "fio: connected to NBD server" before the JSON
        python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print("%.2f %.0f" % (w["bw"] / 1024, w["iops"]))'
}

best() {  # "mib iops" "mib iops" -> the one with more MiB/s
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); print (y[1] > x[1] ? b : a) }'
}

ROWS=(
    "randwrite 4k --fsync=1 full"
    "randwrite 4k --fsync=32 full"
    "randwrite 4k --fsync=1 empty"
    "randwrite 4k --fsync=32 empty"
    "write 1M --fsync=1 full"
)
echo "| workload (QD1) | vdisk serve VIMG | qemu-nbd qcow2 | ratio | vdisk --cache=none | qemu-nbd --cache=none | ratio |"
echo "|---|---|---|---|---|---|---|"
for spec in "${ROWS[@]}"; do
    set -- $spec
    declare -A result=()
    for _ in $(seq "$ROUNDS"); do
        for cache in writeback none; do
            for server in vdisk qemu; do
                start "$server" "$cache" "$(image_for "$4" "$server")"
                r=$(fio_row "$1" "$2" "$3" --time_based --runtime="$RUNTIME")
                stop
                result[$server-$cache]=$(best "${result[$server-$cache]:-0 0}" "$r")
            done
        done
    done
    unit=IOPS
    field=2
    if [ "$2" = 1M ]; then unit=MiB/s; field=1; fi
    awk -v n="$1 $2 $3, $4 image ($unit)" -v f="$field" \
        -v a="${result[vdisk-writeback]}" -v b="${result[qemu-writeback]}" \
        -v c="${result[vdisk-none]}" -v d="${result[qemu-none]}" '
        function v(s,  p) { split(s, p, " "); return p[f] + 0 }
        BEGIN {
            printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |\n", n, v(a), v(b), v(a) / v(b), v(c), v(d), v(c) / v(d)
        }'
done
[ -n "${ROWS_ONLY:-}" ] && exit 0

# Syncs per guest flush: the server runs under strace -c -f (all its threads), fio writes a fixed number
# of blocks; the count includes the one flush at shutdown, so it is spread over flushes + 1.
echo
echo "| workload | flushes | vdisk serve VIMG syncs/flush | qemu-nbd qcow2 syncs/flush |"
echo "|---|---|---|---|"
COUNTS=(
    "randwrite 4k --fsync=1 full 2000"
    "randwrite 4k --fsync=32 full 6400"
    "randwrite 4k --fsync=1 empty 2000"
    "randwrite 4k --fsync=32 empty 6400"
    "write 1M --fsync=1 full 500"
)
for spec in "${COUNTS[@]}"; do
    set -- $spec
    per=1
    [ "$3" = --fsync=32 ] && per=32
    bs=4096
    [ "$2" = 1M ] && bs=1048576
    writes=$(numfmt --from=iec "$SIZE" | awk -v n="$5" -v b="$bs" '{ print (n < $1 / b ? n : $1 / b) }')
    flushes=$((writes / per))
    line="| $1 $2 $3, $4 image | $flushes |"
    for server in vdisk qemu; do
        start "$server" writeback "$(image_for "$4" "$server")" strace -f -c -o "$WORK/strace.txt" -e trace=fsync,fdatasync
        fio_row "$1" "$2" "$3" --number_ios="$5" >/dev/null
        # SIGTERM the server itself (strace's child), then wait for strace to write its summary.
        kill "$(pgrep -P "$SERVER" | head -1)" 2>/dev/null || true
        wait "$SERVER" 2>/dev/null || true
        SERVER=""
        syncs=$(awk '$NF == "fsync" || $NF == "fdatasync" { n += $4 } END { print n + 0 }' "$WORK/strace.txt")
        line+=$(awk -v s="$syncs" -v f="$flushes" 'BEGIN { printf " %.2f (%d) |", s / (f + 1), s }')
    done
    echo "$line"
done
