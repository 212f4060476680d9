#!/usr/bin/env bash
# Space given back to the host (issue 16): the same workload on a VIMG image plugged by vdisk and on a
# qcow2 image served by qemu-nbd --discard=unmap (plugged through the same bus, as a remote export, so both
# see the same kernel, ext4 and front end). Steps: fill the disk to 80% with files, take a snapshot, delete
# half the files, drop the snapshot, fstrim, compact (vimg compact; for qcow2 the peer's way, qemu-img
# convert into a new file). After each step the host file's length and allocated size are printed, as a
# Markdown table. Snapshots are taken and dropped with the disk unplugged (neither tool does it live here).
# Needs root.
#
#   Tools/bench-space.sh [WORKDIR] [SIZE]   (default: a temp dir under /var/tmp, 4G)
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
WORK=${1:-$(mktemp -d /var/tmp/vdisk-bench-space.XXXXXX)}
SIZE=${2:-4G}
mkdir -p "$WORK/m"
export VDISK_RUNTIME_DIR="$WORK/run"
NBD_PID=
cleanup() {
    umount "$WORK/m" 2>/dev/null || true
    "$VDISK" bus --stop >/dev/null 2>&1 || true
    [ -n "$NBD_PID" ] && kill "$NBD_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

bytes=$(numfmt --from=iec "$SIZE")
mib() { echo $(($1 / 1048576)); }
# "length MiB / allocated MiB" of a file
sizes() { echo "$(mib "$(stat -c %s "$1")") / $(mib $(($(stat -c %b "$1") * 512)))"; }

# kind file: plugs the image and mounts nothing; sets DEV. Not called in a command substitution, which
# would wait for qemu-nbd (it inherits the substitution's stdout).
plug() {
    if [ "$1" = vimg ]; then
        DEV=$("$VDISK" plug --name disk "$2")
    else
        qemu-nbd -f qcow2 --discard=unmap --cache=writeback -k "$WORK/nbd.sock" -t "$2" >/dev/null 2>&1 &
        NBD_PID=$!
        for _ in $(seq 100); do [ -S "$WORK/nbd.sock" ] && break; sleep 0.05; done
        DEV=$("$VDISK" plug --name disk "nbd+unix:///?socket=$WORK/nbd.sock")
    fi
}
unplug() {  # kind
    umount "$WORK/m"
    "$VDISK" unplug disk >/dev/null
    if [ "$1" = qcow2 ]; then
        kill "$NBD_PID"
        wait "$NBD_PID" 2>/dev/null || true
        NBD_PID=
        rm -f "$WORK/nbd.sock"
    fi
}

declare -A row
run_kind() {  # kind
    local kind=$1 file=$WORK/disk.$1
    if [ "$kind" = vimg ]; then "$VIMG" create "$file" "$SIZE" >/dev/null; else qemu-img create -q -f qcow2 "$file" "$SIZE"; fi
    plug "$kind" "$file"
    mkfs.ext4 -q -E nodiscard "$DEV"
    mount "$DEV" "$WORK/m"
    # 80% of the disk in 64 MiB files of random data.
    local count=$((bytes * 8 / 10 / 67108864 - 2))
    for i in $(seq 1 "$count"); do head -c 64M /dev/urandom >"$WORK/m/f$i"; done
    sync
    row[$kind,live]=$(df -m --output=used "$WORK/m" | tail -1 | tr -d ' ')
    row[$kind,fill]=$(sizes "$file")
    unplug "$kind"
    if [ "$kind" = vimg ]; then "$VIMG" snapshot -c s1 "$file"; else qemu-img snapshot -c s1 "$file"; fi
    row[$kind,snapshot]=$(sizes "$file")
    plug "$kind" "$file"
    mount "$DEV" "$WORK/m"
    for i in $(seq 1 2 "$count"); do rm "$WORK/m/f$i"; done
    sync
    row[$kind,delete]=$(sizes "$file")
    row[$kind,live2]=$(df -m --output=used "$WORK/m" | tail -1 | tr -d ' ')
    unplug "$kind"
    if [ "$kind" = vimg ]; then "$VIMG" snapshot -d s1 "$file"; else qemu-img snapshot -d s1 "$file"; fi
    row[$kind,drop]=$(sizes "$file")
    plug "$kind" "$file"
    mount "$DEV" "$WORK/m"
    fstrim "$WORK/m"
    sync
    unplug "$kind"
    row[$kind,trim]=$(sizes "$file")
    local start end
    start=$(date +%s.%N)
    if [ "$kind" = vimg ]; then
        "$VIMG" compact "$file" >/dev/null
        row[$kind,compacted]=$(sizes "$file")
    else
        qemu-img convert -O qcow2 "$file" "$file.new"
        row[$kind,compacted]=$(sizes "$file.new")
        rm -f "$file.new"
    fi
    end=$(date +%s.%N)
    row[$kind,seconds]=$(printf '%.1f' "$(echo "$end - $start" | bc)")
    rm -f "$file"
}

run_kind vimg
run_kind qcow2

echo "| step (file length MiB / allocated MiB) | VIMG (vdisk) | qcow2 (qemu-nbd --discard=unmap) |"
echo "|---|---|---|"
echo "| filled to 80% (${row[vimg,live]} MiB used in ext4) | ${row[vimg,fill]} | ${row[qcow2,fill]} |"
echo "| snapshot taken | ${row[vimg,snapshot]} | ${row[qcow2,snapshot]} |"
echo "| half the files deleted (${row[vimg,live2]} MiB used) | ${row[vimg,delete]} | ${row[qcow2,delete]} |"
echo "| snapshot dropped | ${row[vimg,drop]} | ${row[qcow2,drop]} |"
echo "| fstrim | ${row[vimg,trim]} | ${row[qcow2,trim]} |"
echo "| compacted (vimg compact / qemu-img convert) | ${row[vimg,compacted]} | ${row[qcow2,compacted]} |"
echo "| compaction time (s) | ${row[vimg,seconds]} | ${row[qcow2,seconds]} |"
