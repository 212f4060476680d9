#!/usr/bin/env bash
# Installs what building and testing vdisk needs on Debian (idempotent; needs root or sudo for apt).
# Swift itself is expected at /opt/swift or on PATH (see README).
set -euo pipefail

packages=(
    qemu-utils      # qemu-img, qemu-io, qemu-nbd: the peers our tests and benchmarks compare against
    libnbd-bin      # nbdinfo, nbdcopy, nbdsh: real NBD clients for the interop tests
    python3-libnbd  # nbdsh's Python binding (Debian's /usr/bin/python3)
    fio             # benchmarks (its nbd engine), the verifying writers of Tools/soak-bus.sh
    liblz4-dev      # LZ4 compressed clusters
    zlib1g-dev libzstd-dev  # reading qcow2 compressed clusters (zlib, zstd)
    libfuse3-dev fuse3  # the FUSE + loop device path of vdisk plug
    e2fsprogs fdisk util-linux  # mkfs, sfdisk, losetup, partx for the bus tests
    xfsprogs btrfs-progs dosfstools ntfs-3g lvm2  # every kind of disk the guest lane puts on /dev/nbdN
    qemu-system-x86 busybox-static kmod  # the Linux guest of the guest lane (Tools/vm, Tools/vm-test.sh)
    openssl         # makes the CA and certificates of the TLS tests (vdisk serve --tls)
    libssl-dev      # TLS in the NBD client (nbds:// sources of vdisk plug)
    librados-dev librbd-dev  # rbd: images (Sources/CRBD)
    ceph-mon ceph-osd ceph-common  # the throwaway test cluster of Tools/ceph-cluster.sh, rbd and rados
    qemu-block-extra  # qemu-img and qemu-nbd reach rbd: images (interop tests, Tools/bench-ceph.sh)
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v swift >/dev/null 2>&1; then
    if [ -x /opt/swift/usr/bin/swift ]; then
        echo "setup: add /opt/swift/usr/bin to PATH" >&2
    else
        echo "setup: Swift 6 is required (https://swift.org/install), not found on PATH" >&2
    fi
    exit 1
fi
