#!/usr/bin/env bash
# Check benchmark: `vimg check` against `qemu-img check` on images with the same guest data, fully
# allocated at 64 KiB clusters (default 8 GiB: 131072 clusters). Prints a Markdown table: milliseconds
# for each side (the best of three, after one untimed run so both read their metadata from the page
# cache), the ratio (>1 means vimg is faster), and each program's start-up time for scale.
#
# The data: a raw file written by fio (sequential, non-zero buffers, so nothing is left sparse), converted
# to qcow2 by `qemu-img convert`, then the raw is deleted and the qcow2 converted to VIMG by
# `vimg convert` (peak disk use about twice the size, plus a little).
#
#   Tools/bench-check.sh [GIB] [WORKDIR]    (default 8 GiB in a temp dir under /var/tmp; needs ~2*GIB+1 GiB)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
command -v qemu-img >/dev/null && command -v fio >/dev/null || Tools/setup.sh
GIB=${1:-8}
swift build -c release --product vimg >/dev/null
VIMG=$PWD/.build/release/vimg
WORK=${2:-$(mktemp -d /var/tmp/vdisk-check.XXXXXX)}
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

fio --name=fill --filename="$WORK/src.raw" --rw=write --bs=4M --size="${GIB}G" --ioengine=psync \
    --zero_buffers=0 --refill_buffers=0 --end_fsync=0 >/dev/null
qemu-img convert -f raw -O qcow2 -o cluster_size=65536 "$WORK/src.raw" "$WORK/a.qcow2"
rm -f "$WORK/src.raw"
"$VIMG" convert -f qcow2 -O vimg -o cluster_size=65536 "$WORK/a.qcow2" "$WORK/a.vimg"
sync

now() { date +%s.%N; }
# best_of_3 CMD...: the fastest of three runs, after an untimed one. The command must exit 0 (clean).
best_of_3() {
    local best="" t0 t1 t
    "$@" >/dev/null
    for _ in 1 2 3; do
        t0=$(now)
        "$@" >/dev/null
        t1=$(now)
        t=$(echo "$t1 - $t0" | bc -l)
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    echo "$best"
}
alloc_mib() { echo "$(stat -c %b "$1") * 512 / 1048576" | bc; }

echo "Images: ${GIB} GiB allocated at 64 KiB clusters; vimg $(alloc_mib "$WORK/a.vimg") MiB, qcow2 $(alloc_mib "$WORK/a.qcow2") MiB; $(nproc) CPUs." >&2
a=$(best_of_3 "$VIMG" check "$WORK/a.vimg")
b=$(best_of_3 qemu-img check -f qcow2 "$WORK/a.qcow2")
# Process start-up alone, for scale: most of a check this size is start-up on both sides.
c=$(best_of_3 "$VIMG" --help)
d=$(best_of_3 qemu-img --version)
ms() { printf '%.1f' "$(echo "$1 * 1000" | bc -l)"; }
printf '| %s GiB allocated, 64 KiB clusters | vimg (ms) | qemu-img (ms) | speed-up |\n|---|---|---|---|\n' "$GIB"
printf '| `vimg check` vs `qemu-img check` | %s | %s | %.1fx |\n' "$(ms "$a")" "$(ms "$b")" "$(echo "$b / $a" | bc -l)"
printf '| start-up only (`vimg --help` vs `qemu-img --version`) | %s | %s | |\n' "$(ms "$c")" "$(ms "$d")"
