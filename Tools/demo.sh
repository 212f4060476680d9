#!/usr/bin/env bash
# The main job: plug a disk into the kernel and use it. Takes a working copy (a linked clone) of the
# embedded default image Fixtures/default/default.vimg (128 MiB, ext4, LZ4-compressed clusters), plugs
# it (a /dev/nbdN where the kernel has NBD, else /dev/loopN over a FUSE file), mounts it, writes a file,
# snapshots the live disk, unmounts, unplugs, checks the image, plugs it again and reads the file back,
# then exports it over NBD for nbdinfo. Installs what it needs (apt), builds, and needs root.
#
#   Tools/demo.sh [WORKDIR]     (the clone and its mountpoint stay in WORKDIR; default: a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
[ "$(id -u)" -eq 0 ] || { echo "demo: plugging disks needs root (run with sudo)" >&2; exit 1; }
Tools/setup.sh
echo "demo: building (release)..."
swift build -c release --product vimg >/dev/null
swift build -c release --product vdisk >/dev/null
BIN=$PWD/.build/release
export PATH="$BIN:$PATH"
BASE=$PWD/Fixtures/default/default.vimg
WORK=${1:-$(mktemp -d /tmp/vdisk-demo.XXXXXX)}
mkdir -p "$WORK/mnt"
WORK=$(cd "$WORK" && pwd)
# A bus of our own, so the demo never touches disks plugged by someone else.
export VDISK_RUNTIME_DIR="$WORK/run"
cleanup() {
    mountpoint -q "$WORK/mnt" && umount "$WORK/mnt" || true
    vdisk bus --stop || true
}
trap cleanup EXIT
run() { echo "\$ $*"; "$@"; echo; }

rm -f "$WORK/default.vimg"
run vimg clone "$BASE" "$WORK/default.vimg"
echo "\$ vdisk plug --name default $WORK/default.vimg"
DEV=$(vdisk plug --name default "$WORK/default.vimg")
echo "$DEV"; echo
run vdisk list
run mount "$DEV" "$WORK/mnt"
run cat "$WORK/mnt/WELCOME.txt"
echo "\$ echo 'written through vdisk on $(date -u +%F)' > $WORK/mnt/hello.txt"
echo "written through vdisk on $(date -u +%F)" >"$WORK/mnt/hello.txt"
run df -h "$WORK/mnt"
run vdisk snapshot default after-hello
run umount "$WORK/mnt"
run vdisk unplug default
run vimg check "$WORK/default.vimg"
run vimg snapshot -l "$WORK/default.vimg"
run vimg info --backing-chain "$WORK/default.vimg"
echo "\$ vdisk plug --read-only $WORK/default.vimg"
DEV=$(vdisk plug --read-only "$WORK/default.vimg")
echo "$DEV"; echo
run mount -o ro,noload "$DEV" "$WORK/mnt"
run cat "$WORK/mnt/hello.txt"
run umount "$WORK/mnt"
run vdisk list --output=json
URI=$(vdisk list --output=json | sed -n 's/.*"nbdURI" : "\(.*\)".*/\1/p' | head -1)
if [ -n "$URI" ] && command -v nbdinfo >/dev/null; then
    run nbdinfo "$URI"
fi
run vdisk unplug --all
echo "The clone is $WORK/default.vimg (its base, $BASE, was never written)."
