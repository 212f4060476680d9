#!/usr/bin/env bash
# The main job on a default image: create a VIMG disk, write to it, snapshot, clone, check.
# Installs what it needs (apt) and builds first. Pass a directory to keep the images there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build -c release --product vimg >/dev/null
VIMG=$PWD/.build/release/vimg
WORK=${1:-$(mktemp -d /tmp/vdisk-demo.XXXXXX)}
mkdir -p "$WORK"
cd "$WORK"
run() { echo "\$ $*"; "$@"; echo; }

run "$VIMG" create disk.vimg 1G
# Write 64 MiB of data with qemu-io into a raw disk, then bring it in through a clone + commit.
run "$VIMG" create -f raw data.raw 1G
qemu-io -f raw -c 'write -P 0x5a 0 64M' data.raw >/dev/null
run "$VIMG" clone -F raw data.raw overlay.vimg
run "$VIMG" rebase -b "" overlay.vimg
run "$VIMG" compare -f raw data.raw overlay.vimg
run "$VIMG" snapshot -c first overlay.vimg
run "$VIMG" snapshot -l overlay.vimg
run "$VIMG" map overlay.vimg
run "$VIMG" check overlay.vimg
run "$VIMG" info overlay.vimg
echo "Images are in $WORK"
