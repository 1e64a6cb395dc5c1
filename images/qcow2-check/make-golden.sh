#!/usr/bin/env bash
# Record qemu-img check's verdicts on the damaged fixtures (see make-golden.ts).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/imgtool-golden-build.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
cd "$HERE"
npx tsc --outDir "$OUT" --rootDir . --module NodeNext --moduleResolution NodeNext --target ES2022 --types node --skipLibCheck --strict images/qcow2-check/make-golden.ts
echo '{"type":"module"}' >"$OUT/package.json"
# fixtures.ts finds images/qcow2 relative to itself
mkdir -p "$OUT/images" && ln -s "$HERE/images/qcow2" "$OUT/images/qcow2"
node "$OUT/images/qcow2-check/make-golden.js" "$HERE/images/qcow2-check/golden.json"
