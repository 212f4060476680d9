#!/usr/bin/env bash
# NBD server benchmark: fio's nbd engine against `vdisk serve` and `qemu-nbd` on the same data (VIMG vs
# qcow2, and raw vs raw), over unix sockets, in one run; then nbdcopy of the whole disk, and the server's
# RSS while serving a 100 GiB image. Prints Markdown tables; ratio = ours / theirs (above 1: faster).
#
#   Tools/bench-nbd.sh [WORKDIR] [SIZE]     (default: a temp dir under /var/tmp, 1G)
#
# Environment: OURS=qcow2 serves a copy of qemu-img's qcow2 file with `vdisk serve` instead of the VIMG
# conversion (issue 18: the same bytes under both servers); ROWS="randread 4k 1;randwrite 4k 1" picks fio rows (rw bs depth; default all six);
# ROUNDS=N measures each row N times, the four servers in turn each round, and keeps each one's best
# (default 1); ROWS_ONLY=1 skips nbdcopy and the memory check. With perf installed, a second table gives
# each server's CPU time and context switches per request at depth 1 (perf stat on the server while fio
# sends 30000 requests): unlike throughput, these hardly move with other load on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vdisk >/dev/null
swift build -c release --product vimg >/dev/null
BIN=$PWD/.build/release
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-nbd.XXXXXX)}
SIZE=${2:-1G}
mkdir -p "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Same content everywhere: a fully written raw file, converted to each format.
fio --name=fill --filename="$WORK/src.raw" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --buffer_compress_percentage=0 --refill_buffers >/dev/null
"$BIN/vimg" convert -O vimg "$WORK/src.raw" "$WORK/a.vimg"
qemu-img convert -O qcow2 -o cluster_size=65536 "$WORK/src.raw" "$WORK/a.qcow2"
cp --sparse=always "$WORK/src.raw" "$WORK/ours.raw"
OURS=${OURS:-vimg}
[ "$OURS" = qcow2 ] && cp --sparse=always "$WORK/a.qcow2" "$WORK/ours.qcow2"
LABEL=$([ "$OURS" = qcow2 ] && echo qcow2 || echo VIMG)
cp --sparse=always "$WORK/src.raw" "$WORK/theirs.raw"

serve_ours() {  # image socket
    "$BIN/vdisk" serve --socket "$2" "$1" 2>/dev/null &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$2" ] && return; sleep 0.05; done
}
serve_theirs() {  # image format socket
    qemu-nbd -f "$2" -k "$3" --persistent --cache=writeback --aio=threads -e 16 "$1" 2>/dev/null &
    PIDS+=($!)
    for _ in $(seq 100); do [ -S "$3" ] && return; sleep 0.05; done
}
serve_ours "$WORK/$([ "$OURS" = qcow2 ] && echo ours.qcow2 || echo a.vimg)" "$WORK/ours-vimg.sock"
serve_theirs "$WORK/a.qcow2" qcow2 "$WORK/qemu-qcow2.sock"
serve_ours "$WORK/ours.raw" "$WORK/ours-raw.sock"
serve_theirs "$WORK/theirs.raw" raw "$WORK/qemu-raw.sock"

measure() {  # socket rw bs iodepth -> MiB/s
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="$SIZE" --time_based --runtime=8 --ramp_time=1 --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' |  # the nbd engine prints "fio: connected to NBD server" before the JSON
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw"] + j["write"]["bw"]) / 1024))'
}

best() {  # old new -> the larger
    awk -v a="$1" -v b="$2" 'BEGIN { print (b > a ? b : a) }'
}

ROWS=${ROWS:-"randread 4k 1;randread 4k 32;randwrite 4k 1;randwrite 4k 32;read 1M 8;write 1M 8"}
ROUNDS=${ROUNDS:-1}
echo "| workload | vdisk serve $LABEL | qemu-nbd qcow2 | ratio | vdisk serve raw | qemu-nbd raw | ratio |"
echo "|---|---|---|---|---|---|---|"
IFS=';' read -ra SPECS <<<"$ROWS"
for spec in "${SPECS[@]}"; do
    set -- $spec
    a=0 b=0 c=0 d=0
    for _ in $(seq "$ROUNDS"); do
        a=$(best "$a" "$(measure "$WORK/ours-vimg.sock" "$1" "$2" "$3")")
        b=$(best "$b" "$(measure "$WORK/qemu-qcow2.sock" "$1" "$2" "$3")")
        c=$(best "$c" "$(measure "$WORK/ours-raw.sock" "$1" "$2" "$3")")
        d=$(best "$d" "$(measure "$WORK/qemu-raw.sock" "$1" "$2" "$3")")
    done
    awk -v n="$1 $2 QD$3" -v a="$a" -v b="$b" -v c="$c" -v d="$d" \
        'BEGIN { printf "| %s (MiB/s) | %.0f | %.0f | %.2fx | %.0f | %.0f | %.2fx |\n", n, a, b, a / b, c, d, c / d }'
done

cost() {  # server-pid socket rw -> "CPU-us-per-request context-switches-per-request"
    local n=30000 out
    out=$(mktemp)
    perf stat -e task-clock,context-switches -p "$1" -o "$out" &
    local perf=$!
    sleep 0.3
    fio --name=c --ioengine=nbd --uri="nbd+unix:///?socket=$2" --rw="$3" --bs=4k --iodepth=1 --size="$SIZE" \
        --number_ios=$n >/dev/null 2>&1
    kill -INT $perf
    wait $perf 2>/dev/null || true
    awk -v n=$n '/task-clock/ { gsub(",", "", $1); t = $1 } /context-switches/ { gsub(",", "", $1); c = $1 }
        END { printf "%.1f %.2f", t * 1000 / n, c / n }' "$out"
    rm -f "$out"
}
if command -v perf >/dev/null && perf stat -e task-clock true >/dev/null 2>&1; then
    echo
    echo "| depth 1, per request | vdisk serve $LABEL | qemu-nbd qcow2 | vdisk serve raw | qemu-nbd raw |"
    echo "|---|---|---|---|---|"
    for rw in randread randwrite; do
        row="| $rw 4k: server CPU µs, context switches"
        i=0
        for sock in ours-vimg qemu-qcow2 ours-raw qemu-raw; do
            set -- $(cost "${PIDS[$i]}" "$WORK/$sock.sock" $rw)
            row="$row | $1, $2"
            i=$((i + 1))
        done
        echo "$row |"
    done
fi

[ "${ROWS_ONLY:-0}" = 1 ] && exit 0

copy() {  # socket -> seconds for nbdcopy of the whole disk to null:
    local t0 t1
    t0=$(date +%s.%N)
    nbdcopy "nbd+unix:///?socket=$1" null:
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'
}
echo
echo "| nbdcopy whole disk to null: | vdisk serve | qemu-nbd | ratio (theirs/ours time) |"
echo "|---|---|---|---|"
for pair in "$LABEL/qcow2 ours-vimg qemu-qcow2" "raw/raw ours-raw qemu-raw"; do
    set -- $pair
    o=$(copy "$WORK/$2.sock"); t=$(copy "$WORK/$3.sock")
    awk -v n="$1" -v o="$o" -v t="$t" 'BEGIN { printf "| %s | %.2f s | %.2f s | %.2fx |\n", n, o, t, t / o }'
done

# Memory: serve a 100 GiB image with data scattered over all of it, read across it, then read RSS.
"$BIN/vimg" create -q "$WORK/big.vimg" 100G >/dev/null
serve_ours "$WORK/big.vimg" "$WORK/big.sock"
BIGPID=${PIDS[-1]}
fio --name=scatter --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/big.sock" --rw=randwrite --bs=4k \
    --size=100G --number_ios=20000 --iodepth=16 >/dev/null 2>&1
fio --name=scan --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/big.sock" --rw=randread --bs=64k \
    --size=100G --number_ios=20000 --iodepth=16 >/dev/null 2>&1
echo
echo "vdisk serve RSS serving a 100 GiB VIMG image after 20k scattered writes and 20k reads: $(( $(ps -o rss= -p "$BIGPID") / 1024 )) MiB"
