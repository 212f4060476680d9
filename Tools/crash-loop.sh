#!/usr/bin/env bash
# Power-cut loop for ext4 on a `vdisk plug --crash-sim` disk (docs/CRASH.md). For each seed: plug a
# fresh clone of an ext4 image with --crash-sim=SEED, mount it (data=ordered, the journal on: ext4's
# defaults), run a workload that writes, renames and fsyncs files (and writes others with O_DIRECT and
# never syncs them), cut the power once it has fsynced a seed-chosen number of files, then unplug, plug
# the image again normally, mount it (the journal replays), and check that every file whose fsync
# returned is there, intact, and that `fsck.ext4 -fn` finds nothing. The mode cycles with the seed:
# drop, reorder, tear at 512 bytes, tear at 4 KiB. Needs root (FUSE and loop devices).
#
#   Tools/crash-loop.sh [N] [FIRST_SEED]     (default: 100 seeds from 1)
#   VDISK_BIN_DIR=DIR                        the vdisk and vimg to use (default: a release build, made here)
#
# Prints one line per seed; exits 1 if any seed failed (its details are printed), 0 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
FIRST=${2:-1}
if [ -z "${VDISK_BIN_DIR:-}" ]; then
    [ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
    swift build -c release --product vdisk >/dev/null
    swift build -c release --product vimg >/dev/null
    VDISK_BIN_DIR=$PWD/.build/release
fi
VDISK=$VDISK_BIN_DIR/vdisk
VIMG=$VDISK_BIN_DIR/vimg
WORK=$(mktemp -d /var/tmp/vdisk-crash-loop.XXXXXX)
export VDISK_RUNTIME_DIR=$WORK/run
MNT=$WORK/m
mkdir -p "$MNT"
WORKLOAD=""
cleanup() {
    [ -n "$WORKLOAD" ] && kill "$WORKLOAD" 2>/dev/null && wait "$WORKLOAD" 2>/dev/null
    umount "$MNT" 2>/dev/null || true
    "$VDISK" bus --stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Writes files until something fails or STOP exists; after each fsync of a file (and of its folder)
# returns, appends the file's name and SHA-256 to PROGRESS, which lives outside the disk.
workload() {  # DIR PROGRESS STOP
    local dir=$1 progress=$2 stop=$3 i=0
    while [ ! -e "$stop" ]; do
        i=$((i + 1))
        head -c $(((RANDOM % 48 + 1) * 4096 + RANDOM)) /dev/urandom >"$dir/f$i.tmp" || return
        mv "$dir/f$i.tmp" "$dir/f$i" || return
        sync "$dir/f$i" "$dir" || return
        echo "f$i $(sha256sum <"$dir/f$i" | cut -c1-64)" >>"$progress"
        # Straight to the disk, never synced: these may be lost, but must not break anything.
        dd if=/dev/urandom of="$dir/u$i" bs=64k count=$((RANDOM % 4 + 1)) oflag=direct status=none || return
        if [ $((i % 4)) -eq 0 ]; then rm -f "$dir/u$((i - 2))"; fi
    done
}

"$VIMG" create "$WORK/base.vimg" 256M >/dev/null
dev=$("$VDISK" plug --name base "$WORK/base.vimg")
mkfs.ext4 -q "$dev"
"$VDISK" unplug base

modes=("drop" "reorder" "tear 512" "tear 4K")
failed=0
for seed in $(seq "$FIRST" $((FIRST + N - 1))); do
    rm -f "$WORK/disk.vimg" "$WORK/progress"
    touch "$WORK/progress"
    "$VIMG" clone "$WORK/base.vimg" "$WORK/disk.vimg" >/dev/null
    set -- ${modes[$((seed % 4))]}
    crash=(--mode "$1")
    [ $# -gt 1 ] && crash+=(--tear-size "$2")
    files=$((seed % 17 + 2))
    dev=$("$VDISK" plug --name disk --crash-sim="$seed" "$WORK/disk.vimg" 2>/dev/null)
    mount "$dev" "$MNT"
    rm -f "$WORK/stop"
    workload "$MNT" "$WORK/progress" "$WORK/stop" 2>/dev/null &
    WORKLOAD=$!
    # Wait for the workload to have fsynced $files files (a marker, not a sleep, decides the moment).
    for _ in $(seq 6000); do
        [ "$(wc -l <"$WORK/progress")" -ge "$files" ] && break
        kill -0 "$WORKLOAD" 2>/dev/null || break
        sleep 0.01
    done
    # The power goes at a seed-chosen write from here: in a journal commit, between a file's data and
    # its metadata, in the middle of an O_DIRECT write...
    report=$("$VDISK" crash disk --after-writes $((seed * 7 % 40 + 1)) --timeout 30 "${crash[@]}")
    # The workload stops at its next failed call (the disk is dead) or at the stop file; wait for it,
    # and for whatever it was running, so that nothing holds the file system.
    touch "$WORK/stop"
    wait "$WORKLOAD" 2>/dev/null || true
    WORKLOAD=""
    umount "$MNT"
    "$VDISK" unplug disk

    problems=""
    dev=$("$VDISK" plug --name check "$WORK/disk.vimg")
    if mount "$dev" "$MNT"; then
        while read -r name sum; do
            if [ ! -f "$MNT/$name" ]; then
                problems+="  $name was fsynced, and is missing"$'\n'
            elif [ "$(sha256sum <"$MNT/$name" | cut -c1-64)" != "$sum" ]; then
                problems+="  $name was fsynced, and its content differs"$'\n'
            fi
        done <"$WORK/progress"
        umount "$MNT"
    else
        problems+="  the file system does not mount"$'\n'
    fi
    if ! fsck=$(fsck.ext4 -fn "$dev" 2>&1); then
        problems+="  fsck.ext4 -fn: $(echo "$fsck" | head -20)"$'\n'
    fi
    "$VDISK" unplug check
    if ! check=$("$VIMG" check "$WORK/disk.vimg" 2>&1); then problems+="  vimg check: $check"$'\n'; fi
    synced=$(wc -l <"$WORK/progress")
    if [ -z "$problems" ]; then
        echo "seed $seed: ok: $synced fsynced files intact, fsck clean (${report#power cut on disk: })"
    else
        echo "seed $seed: FAILED (${report#power cut on disk: })"
        printf '%s' "$problems"
        failed=$((failed + 1))
    fi
done
echo "$((N - failed)) of $N seeds passed"
[ "$failed" -eq 0 ]
