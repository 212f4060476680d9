#!/usr/bin/env bash
# Regenerates the corrupt-image fixtures (Fixtures/corrupt: NAME.vimg + NAME.expected.json) and the
# fuzz seed corpus (Fixtures/fuzz/corpus), deterministically: running it twice gives identical bytes.
# See Fixtures/README.md for what each fixture is; the damage and the expected reports are written in
# Tools/vimg-fixtures/VimgFixtures.swift.
#
#   Tools/make-fixtures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d /opt/swift/usr/bin ] && export PATH="/opt/swift/usr/bin:$PATH"
swift build --product vimg-fixtures >/dev/null
rm -f Fixtures/corrupt/*.vimg Fixtures/corrupt/*.expected.json Fixtures/fuzz/corpus/*.vimg
.build/debug/vimg-fixtures Fixtures
