#!/usr/bin/env bash
# Ceph benchmark (docs/PERFORMANCE.md, "RBD"): fio's nbd engine through `vdisk serve` of a raw RBD image
# and through `qemu-nbd` (qemu's rbd driver) of the same image, and through `vdisk serve` of a VIMG image
# stored in RBD; the cluster's own `rados bench` and `rbd bench` beside them as the ceiling. One throwaway
# cluster (Tools/ceph-cluster.sh), one run, best of 3 for every figure. Servers run one at a time: a
# writer holds the image's exclusive lock. Prints Markdown tables; ratio = ours / qemu-nbd (above 1: faster).
#
#   Tools/bench-ceph.sh [WORKDIR] [SIZE]     (default: a temp dir under /var/tmp, 1G)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vdisk >/dev/null
swift build -c release --product vimg >/dev/null
BIN=$PWD/.build/release
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-ceph.XXXXXX)}
SIZE=${2:-1G}
RUNTIME=${BENCH_RUNTIME:-6}
mkdir -p "$WORK"
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    Tools/ceph-cluster.sh stop "$WORK/ceph" || true
    rm -rf "$WORK"
}
trap cleanup EXIT

export CEPH_CONF
CEPH_CONF=$(Tools/ceph-cluster.sh start "$WORK/ceph")
POOL=rbd

# Both images fully written: the raw one imported from a file, the VIMG one written in order through
# `vdisk serve` (the layout a guest writing its disk from start to end gives: host clusters in guest
# order). `vimg convert`'s parallel workers would interleave the clusters, and every 1 MiB request would
# then be 16 cluster-sized requests one after the other (see docs/PERFORMANCE.md).
fio --name=fill --filename="$WORK/src.raw" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --buffer_compress_percentage=0 --refill_buffers >/dev/null
qemu-img convert -O raw "$WORK/src.raw" "rbd:$POOL/bench-raw"
rm -f "$WORK/src.raw"
"$BIN/vimg" create -q "rbd:$POOL/bench-vimg" "$SIZE"

start() {  # ours|qemu image: serves the image on $WORK/KIND.sock, its pid in $SERVER
    local sock=$WORK/$1.sock
    rm -f "$sock"
    if [ "$1" = qemu ]; then
        qemu-nbd -f raw -k "$sock" --persistent --cache=writeback -e 16 "rbd:$POOL/$2" >/dev/null 2>&1 &
    else
        "$BIN/vdisk" serve --socket "$sock" "rbd:$POOL/$2" >/dev/null 2>&1 &
    fi
    SERVER=$!
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
}
stop() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
}

fio_once() {  # socket rw bs iodepth -> MiB/s
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="$SIZE" --time_based --runtime="$RUNTIME" --ramp_time=1 --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' |  # the nbd engine prints "fio: connected to NBD server" before the JSON
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw"] + j["write"]["bw"]) / 1024))'
}

best() {  # command... -> the highest of 3 runs
    local top=0 value
    for _ in 1 2 3; do
        value=$("$@")
        top=$(awk -v a="$top" -v b="$value" 'BEGIN { print (b > a ? b : a) }')
    done
    echo "$top"
}

measure() {  # server image rw bs iodepth -> best MiB/s of 3
    start "$1" "$2"
    best fio_once "$WORK/$1.sock" "$3" "$4" "$5" >"$WORK/result"
    stop
    cat "$WORK/result"
}

start ours bench-vimg
fio --name=fill --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/ours.sock" --rw=write --bs=1M --iodepth=1 \
    --size="$SIZE" --buffer_compress_percentage=0 --refill_buffers >/dev/null 2>&1
stop

echo "| workload (MiB/s, best of 3) | vdisk serve, raw RBD | qemu-nbd, raw RBD | ratio | vdisk serve, VIMG on RBD | ratio |"
echo "|---|---|---|---|---|---|"
for row in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
    set -- $row
    measure ours bench-raw "$1" "$2" "$3" >"$WORK/a"
    measure qemu bench-raw "$1" "$2" "$3" >"$WORK/b"
    measure ours bench-vimg "$1" "$2" "$3" >"$WORK/c"
    a=$(cat "$WORK/a") b=$(cat "$WORK/b") c=$(cat "$WORK/c")
    awk -v n="$1 $2 QD$3" -v a="$a" -v b="$b" -v c="$c" \
        'BEGIN { printf "| %s | %.1f | %.1f | %.2fx | %.1f | %.2fx |\n", n, a, b, a / b, c, c / b }'
done

# The ceiling: the cluster measured by its own tools, no NBD in the way.
rbd_bench() {  # type pattern bytes threads total -> MiB/s
    rbd bench --io-type "$1" --io-pattern "$2" --io-size "$3" --io-threads "$4" --io-total "$5" "$POOL/bench-raw" 2>/dev/null |
        awk -v size="$3" '/^elapsed/ { for (i = 1; i <= NF; i++) if ($i == "ops/sec:") printf "%.1f", $(i + 1) * size / 1048576 }'
}
rados_write() {
    rados bench -p "$POOL" "$RUNTIME" write -t 16 2>/dev/null | awk '/^Bandwidth \(MB\/sec\)/ { print $3 }'
}
rados_read() {  # writes objects to read, reads them back in order, removes them
    rados bench -p "$POOL" "$RUNTIME" write -t 16 --no-cleanup >/dev/null 2>&1 || true
    rados bench -p "$POOL" "$RUNTIME" seq -t 16 2>/dev/null | awk '/^Bandwidth \(MB\/sec\)/ { print $3 }' || true
    rados -p "$POOL" cleanup >/dev/null 2>&1 || true
}
echo
echo "| the cluster itself (best of 3) | MiB/s |"
echo "|---|---|"
for row in "read rand 4096 32 256M" "write rand 4096 32 256M" "read seq 1048576 8 1G" "write seq 1048576 8 1G"; do
    set -- $row
    echo "| rbd bench $1 $2 $(($3 / 1024)) KiB, $4 threads | $(best rbd_bench "$1" "$2" "$3" "$4" "$5") |"
done
echo "| rados bench write 4 MiB objects, 16 threads | $(best rados_write) |"
echo "| rados bench seq read 4 MiB objects, 16 threads | $(best rados_read) |"
