#!/usr/bin/env bash
# What dirty bitmaps (issue 13) and end-to-end checksums (issue 15) cost: fio's nbd engine against
# `vdisk serve` on the same data as a plain VIMG image, one with an enabled persistent dirty bitmap, and one
# with checksums (-o checksums=on), in one run; best of ROUNDS; ratio = with the feature / plain. Then the
# scrub rate against reading the same file (page cache dropped before each), and `vimg diff` between two
# snapshots of a 100 GiB image with 1% of it changed in between.
#
#   Tools/bench-integrity.sh [WORKDIR] [SIZE]   (default: a temp dir under /var/tmp, 1G)
#
# Environment: BIN=DIR uses vdisk and vimg from DIR instead of a release build; ROUNDS=N (default 3);
# RUNTIME=seconds per measurement (default 5).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
if [ -z "${BIN:-}" ]; then
    swift build -c release --product vdisk >/dev/null
    swift build -c release --product vimg >/dev/null
    BIN=$PWD/.build/release
fi
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-integrity.XXXXXX)}
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

# The same content three ways: plain, with an enabled bitmap, with checksums.
fio --name=fill --filename="$WORK/src.raw" --rw=write --bs=1M --size="$SIZE" --ioengine=psync \
    --buffer_compress_percentage=0 --refill_buffers >/dev/null
"$BIN/vimg" convert -O vimg "$WORK/src.raw" "$WORK/plain.vimg"
cp "$WORK/plain.vimg" "$WORK/bitmap.vimg"
"$BIN/vimg" bitmap --add "$WORK/bitmap.vimg" backup
"$BIN/vimg" convert -O vimg -o checksums=on "$WORK/src.raw" "$WORK/checksums.vimg"
rm -f "$WORK/src.raw"

start() {  # image
    rm -f "$WORK/s.sock"
    "$BIN/vdisk" serve --socket "$WORK/s.sock" "$1" 2>/dev/null &
    SERVER=$!
    for _ in $(seq 200); do [ -S "$WORK/s.sock" ] && return; sleep 0.05; done
    echo "bench-integrity: vdisk serve did not start" >&2
    exit 1
}
stop() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=""
}
fio_row() {  # rw bs depth -> MiB/s
    fio --name=b --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/s.sock" --rw="$1" --bs="$2" --iodepth="$3" \
        --size="$SIZE" --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null |
        sed -n '/^{/,$p' |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % ((j["read"]["bw"] + j["write"]["bw"]) / 1024))'
}

ROWS=("randread 4k 1" "randread 4k 32" "randwrite 4k 1" "randwrite 4k 32" "read 1M 4" "write 1M 4")
echo "| workload (vdisk serve, MiB/s) | plain VIMG | with a bitmap | ratio | with checksums | ratio |"
echo "|---|---|---|---|---|---|"
for spec in "${ROWS[@]}"; do
    set -- $spec
    declare -A best=()
    for _ in $(seq "$ROUNDS"); do
        for kind in plain bitmap checksums; do
            start "$WORK/$kind.vimg"
            r=$(fio_row "$1" "$2" "$3")
            stop
            best[$kind]=$(awk -v a="${best[$kind]:-0}" -v b="$r" 'BEGIN { print (b > a ? b : a) }')
        done
    done
    awk -v n="$1 $2 QD$3" -v p="${best[plain]}" -v b="${best[bitmap]}" -v c="${best[checksums]}" \
        'BEGIN { printf "| %s | %.0f | %.0f | %.2fx | %.0f | %.2fx |\n", n, p, b, b / p, c, c / p }'
done
"$BIN/vimg" check "$WORK/checksums.vimg" >/dev/null

# Scrub rate vs reading the same file, both from disk (page cache dropped first), best of ROUNDS.
seconds() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
read_best=999999
scrub_best=999999
for _ in $(seq "$ROUNDS"); do
    sync
    echo 3 >/proc/sys/vm/drop_caches
    t=$(seconds dd if="$WORK/checksums.vimg" of=/dev/null bs=1M)
    read_best=$(echo "if ($t < $read_best) $t else $read_best" | bc)
    echo 3 >/proc/sys/vm/drop_caches
    t=$(seconds "$BIN/vimg" scrub "$WORK/checksums.vimg")
    scrub_best=$(echo "if ($t < $scrub_best) $t else $scrub_best" | bc)
done
bytes=$(stat -c %s "$WORK/checksums.vimg")
echo
echo "| read of the checksummed image's file | MiB/s |"
echo "|---|---|"
awk -v b="$bytes" -v r="$read_best" -v s="$scrub_best" 'BEGIN {
    printf "| dd bs=1M (the raw read rate) | %.0f |\n| vimg scrub | %.0f (%.2fx) |\n", b / r / 1048576, b / s / 1048576, r / s
}'
rm -f "$WORK"/*.vimg

# vimg diff between two snapshots of a 100 GiB image with 1% (1 GiB, 64 KiB writes) changed.
"$BIN/vimg" create "$WORK/big.vimg" 100G >/dev/null
"$BIN/vimg" snapshot -c s1 "$WORK/big.vimg"
start "$WORK/big.vimg"
fio --name=change --ioengine=nbd --uri="nbd+unix:///?socket=$WORK/s.sock" --rw=randwrite --bs=64k \
    --iodepth=16 --size=100G --number_ios=16384 >/dev/null 2>&1
stop
"$BIN/vimg" snapshot -c s2 "$WORK/big.vimg"
diff_best=999999
for _ in $(seq "$ROUNDS"); do
    t=$(seconds "$BIN/vimg" diff --from-snap s1 --to-snap s2 "$WORK/big.vimg")
    diff_best=$(echo "if ($t < $diff_best) $t else $diff_best" | bc)
done
ranges=$("$BIN/vimg" diff --from-snap s1 --to-snap s2 "$WORK/big.vimg" | wc -l)
echo
echo "| vimg diff, 100 GiB image, 1% changed (16384 x 64 KiB writes) | seconds | ranges |"
echo "|---|---|---|"
printf '| --from-snap s1 --to-snap s2 | %.3f | %d |\n' "$diff_best" "$ranges"
