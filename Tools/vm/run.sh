#!/usr/bin/env bash
# run.sh SCRIPT [SCRATCHDIR]: boots the guest built by build.sh, runs SCRIPT with bash as root inside it,
# prints its output and exits with its status.
#
# The guest's root is the host's / (read-only over 9p, with a throwaway tmpfs on top), so the host's
# binaries, packages and build outputs are all there; SCRATCHDIR (created if missing) is /scratch in the
# guest, read-write, and the script's working folder.
#
# Env: VM_TIMEOUT (s, default 600)  VM_MEM (2G)  VM_SMP (2)  VM_MODULES (modprobe'd before SCRIPT)
#      VM_ACCEL (auto|kvm|tcg; auto is tcg when the host's KVM is PVM or unusable)  VM_CONSOLE=1 (kernel log)
#      VDISK_VM_DIR (where build.sh put the kernel; default /var/tmp/vdisk-vm)
# Exit: SCRIPT's status; 124 on timeout; 125 when the guest never ran SCRIPT.
set -uo pipefail
OUT=${VDISK_VM_DIR:-/var/tmp/vdisk-vm}
[ $# -ge 1 ] && [ -f "$1" ] || { echo "usage: $0 SCRIPT [SCRATCHDIR]" >&2; exit 2; }
SCRIPT=$1
SCRATCH=${2:-}
[ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] || { echo "run Tools/vm/build.sh first" >&2; exit 2; }
KVER=$(cat "$OUT/kver")
CTL=$(mktemp -d /tmp/vdisk-vm-ctl.XXXXXX)
trap 'rm -rf "$CTL"' EXIT
cp "$SCRIPT" "$CTL/script"
{
    printf 'VM_MODDIR=%q\n' "$OUT/kernel/root/lib/modules/$KVER"
    printf 'VM_MODULES=%q\n' "${VM_MODULES:-}"
    if [ -n "$SCRATCH" ]; then
        mkdir -p "$SCRATCH"
        SCRATCH=$(cd "$SCRATCH" && pwd)
        printf 'VM_SCRATCH=1\nVM_CWD=/scratch\n'
    fi
} >"$CTL/env"
# /dev/kvm on these machines is PVM (module kvm_pvm): it runs only PVM-enabled guest kernels and a stock
# Debian kernel hangs early under it, so software emulation (TCG) it is.
ACCEL=${VM_ACCEL:-auto}
if [ "$ACCEL" = auto ]; then
    if [ -d /sys/module/kvm_pvm ] || [ ! -w /dev/kvm ]; then ACCEL=tcg; else ACCEL=kvm; fi
fi
if [ "$ACCEL" = kvm ]; then
    accel=(-enable-kvm -cpu "${VM_CPU:-host,-arch-capabilities}")
else
    accel=(-accel tcg,thread=multi,tb-size=512 -cpu "${VM_CPU:-max}")
fi
args=("${accel[@]}" -m "${VM_MEM:-2G}" -smp "${VM_SMP:-2}" -M pc -nodefaults -no-user-config -display none
    -no-reboot -kernel "$OUT/vmlinuz" -initrd "$OUT/initramfs.cpio.gz"
    -chardev stdio,id=con,signal=off -serial chardev:con
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap
    -virtfs local,path="$CTL",mount_tag=ctl,security_model=none
    -device virtio-rng-pci)
[ -n "$SCRATCH" ] && args+=(-virtfs local,path="$SCRATCH",mount_tag=scratch,security_model=none)
if [ "${VM_CONSOLE:-0}" = 1 ]; then quiet=""; else quiet="quiet loglevel=3"; fi
args+=(-append "console=ttyS0 $quiet panic=-1 8250.nr_uarts=1 ${VM_EXTRA_APPEND:-}")
timeout -k 5 "${VM_TIMEOUT:-600}" qemu-system-x86_64 "${args[@]}" </dev/null |
    sed -u -e "s/\r$//" -e "/reboot: Power down$/d"
qemu=${PIPESTATUS[0]}
if [ -f "$CTL/rc" ]; then exit "$(cat "$CTL/rc")"; fi
if [ "$qemu" = 124 ]; then
    echo "vm: timed out after ${VM_TIMEOUT:-600} s" >&2
    exit 124
fi
echo "vm: the guest stopped without running the script (qemu exit $qemu)" >&2
exit 125
