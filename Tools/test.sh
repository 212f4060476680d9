#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: build (warnings are errors), then swift test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
Tools/setup.sh
swift build --build-tests -Xswiftc -warnings-as-errors 2>&1 | grep -v '^\[' || true
# Fail here if the build failed (the grep above hides progress lines only).
swift build --build-tests -Xswiftc -warnings-as-errors >/dev/null
swift test --parallel --num-workers 2 2>&1 | tee /tmp/vdisk-test.log | grep -vE '^\[|^(◇|↳|✔) ' 
status=${PIPESTATUS[0]}
grep -E '^(✔|✘) Test run|Executed [0-9]+ tests' /tmp/vdisk-test.log | tail -3
exit "$status"
