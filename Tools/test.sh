#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: lint, build (a warning in our code fails it), swift test
# on the host, then the guest lane (Tools/vm-test.sh: the suites that need /dev/nbdN, in a Linux guest).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
# The house style (.swift-format, swift-nio's settings): any finding fails the run. `swift format -i -r
# Sources Tests Benchmarks Tools Fuzz Package.swift` fixes most of them.
if ! swift format lint --strict -r Sources Tests Benchmarks Tools Fuzz Package.swift; then
    echo "swift format lint: findings above"
    exit 1
fi
log=$(mktemp /tmp/vdisk-build.XXXXXX)
trap 'rm -f "$log"' EXIT
if ! swift build --build-tests >"$log" 2>&1; then
    grep -E 'error:|warning:' "$log" | sort -u || tail -50 "$log"
    echo "build failed"
    exit 1
fi
if grep -E "^$PWD/(Sources|Tests|Benchmarks)/.*warning:" "$log" | sort -u | grep .; then
    echo "build has warnings in our code"
    exit 1
fi
set +e
start=$SECONDS
swift test --skip-build 2>&1 | tee "$log" | grep -vE '^\[|^(◇|↳|✔) '
status=${PIPESTATUS[0]}
set -e
grep -E '^(✔|✘) Test run|Executed [0-9]+ tests' "$log" | tail -3
echo "host lane: $((SECONDS - start)) s"
# The guest lane: what needs a kernel with NBD, device-mapper, xfs, btrfs (this one has none), in a Linux
# guest (Tools/vm-test.sh). VDISK_SKIP_GUEST_LANE=1 leaves it out (for a quick local run, never in CI).
if [ "${VDISK_SKIP_GUEST_LANE:-0}" = 1 ] && [ -z "${CI:-}" ]; then
    echo "guest lane: skipped (VDISK_SKIP_GUEST_LANE=1)"
else
    start=$SECONDS
    set +e
    Tools/vm-test.sh
    guest=$?
    set -e
    echo "guest lane: $((SECONDS - start)) s"
    [ "$guest" = 0 ] || status=$guest
fi
exit "$status"
