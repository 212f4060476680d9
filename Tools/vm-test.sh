#!/usr/bin/env bash
# The guest lane: boots the Linux guest of Tools/vm (Debian's kernel, which has nbd, device-mapper, xfs,
# btrfs and vfat; the host's has none of them) and runs, inside it, the suites that need that kernel
# against the binaries and test bundle the host already built (the guest sees the host's / over 9p).
#
#   Tools/vm-test.sh [FILTER]     FILTER: a swift test --filter expression (default: the guest suites)
#
# Inside the guest VDISK_GUEST_LANE=1 is set: tests gated on the guest's kernel then run (and fail if
# something is missing) instead of skipping, and this script fails the lane if any test was skipped, so a
# test cannot be skipped in both lanes. Build first (Tools/test.sh does).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FILTER=${1:-'^CLITests\.(BusTests|GuestTests)/'}
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
[ -x .build/debug/vdisk ] && [ -e .build/debug/vdiskPackageTests.xctest ] || {
    echo "vm-test: build first (swift build --build-tests)" >&2
    exit 2
}
Tools/vm/build.sh

work=$(mktemp -d /tmp/vdisk-vm-test.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/guest.sh" <<EOF
set -uo pipefail
export PATH="/opt/swift/usr/bin:\$PATH" VDISK_GUEST_LANE=1
# The driver's defaults are 16 devices with 16 partitions each; the tests use both.
for m in "nbd nbds_max=16 max_part=16" loop fuse dm_mod xfs btrfs vfat; do modprobe \$m || echo "guest: no module \$m"; done
cd $(printf %q "$ROOT")
echo "guest: kernel \$(uname -r), \$(nproc) CPUs, up \$(cut -d' ' -f1 /proc/uptime) s"
# The test bundle itself, not swift test: swift test would compile the package manifest first, which takes
# minutes under emulation. --testing-library is how swift test runs Swift Testing's tests in it.
NO_COLOR=1 .build/debug/vdiskPackageTests.xctest --testing-library swift-testing --filter $(printf %q "$FILTER") 2>&1
EOF
set +e
VM_MEM=${VM_MEM:-3G} VM_TIMEOUT=${VM_TIMEOUT:-1500} Tools/vm/run.sh "$work/guest.sh" | tee "$work/log" |
    grep -vE '^\[|^(◇|↳|✔) '
status=${PIPESTATUS[0]}
set -e
grep -E '^(✔|✘) Test run|Executed [0-9]+ tests' "$work/log" | tail -2 || true
if grep -E '^(➜|↳|◇|✘|✔)? ?Test .* skipped' "$work/log"; then
    echo "vm-test: tests were skipped in the guest lane; they would run nowhere"
    [ "$status" = 0 ] && status=1
fi
exit "$status"
