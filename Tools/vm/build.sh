#!/usr/bin/env bash
# Builds the guest of the Linux guest lane (Tools/vm-test.sh): Debian's stock kernel, its modules, and a
# busybox initramfs that mounts the host's / over 9p. Idempotent and cheap once built; on a fresh machine it
# installs qemu-system-x86, busybox-static and kmod and fetches the kernel package with apt-get download.
#
#   Tools/vm/build.sh            -> $VDISK_VM_DIR (default /var/tmp/vdisk-vm): vmlinuz, initramfs.cpio.gz,
#                                   kver, kernel/root/lib/modules/KVER (bound to /lib/modules in the guest)
#
# The output lives outside the work tree and outside shared/ (read-only in CI); it is rebuilt whenever the
# init scripts next to this file change.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${VDISK_VM_DIR:-/var/tmp/vdisk-vm}
export DEBIAN_FRONTEND=noninteractive
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list | grep -qx switch_root || need+=(busybox-static)
command -v depmod >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
    echo "vm build: installing ${need[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

mkdir -p "$OUT/kernel"
# The stamp names the kernel package and the init scripts: a change to either rebuilds.
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
[ -n "$KPKG" ] || { echo "vm build: apt knows no linux-image-amd64" >&2; exit 1; }
KVER=${KPKG#linux-image-}
stamp="$KPKG $(cat "$HERE/init" "$HERE/stage2" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/initramfs.cpio.gz" ]; then
    exit 0
fi

cd "$OUT/kernel"
if [ ! -f "root/boot/vmlinuz-$KVER" ]; then
    rm -f ./*.deb
    apt-get download "$KPKG" >/dev/null 2> >(grep -v unsandboxed >&2)
    rm -rf root
    dpkg-deb -x "${KPKG}"_*.deb root
    rm -f ./*.deb
fi
MODDIR=root/lib/modules/$KVER
[ -f "$MODDIR/modules.dep" ] || depmod -b root "$KVER"
cp "root/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "$KVER" >"$OUT/kver"

# What the initramfs must load before the root exists, each after the modules it depends on.
order=()
add() {
    local m=$1 line deps d
    line=$(grep -E "/$m\.ko(\.xz|\.zst)?:" "$MODDIR/modules.dep" | head -1) || {
        echo "vm build: the kernel has no module $m" >&2
        exit 1
    }
    deps=${line#*:}
    for d in $deps; do add "$(basename "${d%.ko*}")"; done
    for d in "${order[@]:-}"; do [ "$d" = "${line%%:*}" ] && return 0; done
    order+=("${line%%:*}")
}
for m in virtio_pci 9pnet_virtio 9p overlay; do add "$m"; done

IR=$(mktemp -d)
trap 'rm -rf "$IR"' EXIT
mkdir -p "$IR"/{bin,dev,proc,sys,mods,newroot,lower,upper}
cp /bin/busybox "$IR/bin/busybox"
: >"$IR/mods/order"
for p in "${order[@]}"; do
    cp "$MODDIR/$p" "$IR/mods/"
    basename "$p" >>"$IR/mods/order"
done
install -m 0755 "$HERE/init" "$IR/init"
install -m 0755 "$HERE/stage2" "$IR/stage2"
(cd "$IR" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) >"$OUT/initramfs.cpio.gz"
echo "$stamp" >"$OUT/stamp"
echo "vm build: kernel $KVER in $OUT"
