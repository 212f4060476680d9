#!/usr/bin/env bash
# Kernel block devices compared in the Linux guest (Tools/vm), in one run on the same data: vdisk's
# /dev/nbdN, vdisk's /dev/loopN over its FUSE file, and qemu-nbd -c /dev/nbdM. fio with 4 KiB random
# reads and writes at depth 32 and 1 MiB sequential reads and writes, O_DIRECT. The guest runs under TCG,
# so only ratios mean something (to qemu-nbd in the same run); results go to docs/PERFORMANCE.md by hand.
#
#   Tools/bench-guest.sh [SECONDS per row, default 8]      (build first: swift build -c release --product vdisk)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_ROW=${1:-8}
BIN=${VDISK_BIN_DIR:-$ROOT/.build/release}
[ -x "$BIN/vdisk" ] && [ -x "$BIN/vimg" ] || { echo "build first: swift build -c release --product vdisk --product vimg" >&2; exit 2; }
Tools/vm/build.sh
work=$(mktemp -d /tmp/vdisk-bench-guest.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/guest.sh" <<EOF
set -euo pipefail
modprobe nbd nbds_max=4; modprobe loop; modprobe fuse
B=$(printf %q "$BIN")
export VDISK_RUNTIME_DIR=/run/vdisk-bench
D=/tmp/bench; mkdir -p \$D  # tmpfs: the images live in the guest's memory, for every row alike
for f in raw vimg; do
    \$B/vimg create -f \$f \$D/disk.\$f 512M >/dev/null
done
rows="randread:4k:32 randwrite:4k:32 read:1M:4 write:1M:4"
bench() {  # NAME DEVICE
    # Write the whole device once, so reads hit data and writes overwrite.
    dd if=/dev/urandom of=\$2 bs=1M count=256 oflag=direct status=none
    for row in \$rows; do
        IFS=: read -r rw bs depth <<<"\$row"
        fio --name=\$1 --filename=\$2 --rw=\$rw --bs=\$bs --iodepth=\$depth --ioengine=libaio --direct=1 \
            --size=256M --runtime=$SECONDS_PER_ROW --time_based --output-format=json \
            | python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="read" if j["read"]["io_bytes"] else "write"; print(sys.argv[1], sys.argv[2], j[k]["iops"], j[k]["bw"])' "\$1" "\$rw-\$bs-qd\$depth"
    done
}
for f in raw vimg; do
    d=\$(\$B/vdisk plug --device nbd --name n\$f \$D/disk.\$f); bench "vdisk-nbd-\$f" \$d; \$B/vdisk unplug n\$f
    d=\$(\$B/vdisk plug --device loop --name l\$f \$D/disk.\$f); bench "vdisk-loop-\$f" \$d; \$B/vdisk unplug l\$f
done
\$B/vdisk bus --stop
qemu-nbd -f raw -c /dev/nbd3 \$D/disk.raw  # buffered, as vdisk reads and writes its file
for i in \$(seq 100); do [ -e /sys/block/nbd3/pid ] && break; sleep 0.1; done
bench qemu-nbd-raw /dev/nbd3
qemu-nbd -d /dev/nbd3 >/dev/null
EOF
VM_MEM=3G VM_TIMEOUT=1800 Tools/vm/run.sh "$work/guest.sh" | tee "$work/out" >&2
grep -E '^(vdisk|qemu)' "$work/out" >"$work/rows" || true
python3 - "$work/rows" <<'PY'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    name, test, iops, bw = line.split()
    rows[test][name] = float(iops)
names = ["vdisk-nbd-raw", "vdisk-loop-raw", "vdisk-nbd-vimg", "vdisk-loop-vimg"]
print("| fio (O_DIRECT) | " + " | ".join(n.replace("vdisk-", "") for n in names) + " |")
print("| --- |" + " --- |" * len(names))
for test, by in rows.items():
    base = by.get("qemu-nbd-raw")
    cells = [f"{by[n] / base:.2f}x" if base and n in by else "-" for n in names]
    print(f"| {test} | " + " | ".join(cells) + " |")
PY
