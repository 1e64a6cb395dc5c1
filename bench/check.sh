#!/usr/bin/env bash
# Build bench/check.ts with its imports into a temp dir and run it.
#   bash bench/check.sh [WORKDIR]   (ROUNDS=n, WRITE_README=path to write the table)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(mktemp -d "${TMPDIR:-/tmp}/imgtool-bench-build.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
WORK=${1:-/tmp/imgtool-bench}
mkdir -p "$WORK"
cd "$HERE"
npx tsc --outDir "$OUT" --rootDir . --module NodeNext --moduleResolution NodeNext --target ES2022 --types node --skipLibCheck --strict bench/check.ts
echo '{"type":"module"}' >"$OUT/package.json"
node --expose-gc "$OUT/bench/check.js" "$WORK"
