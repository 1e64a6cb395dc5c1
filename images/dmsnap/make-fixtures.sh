#!/bin/sh
# Regenerate the kernel-made dm-snapshot fixtures with the dmsnap oracle
# (../shared/tools/dmsnap-oracle, a real Debian 6.1 kernel under qemu).
#
#   images/dmsnap/make-fixtures.sh            # all fixtures
#   images/dmsnap/make-fixtures.sh c8-basic   # only the named ones
#
# Each fixture directory keeps origin.img, cow.img and the oracle's manifest.json
# (merged-* keep merge.json). The kernel's console logs and view dumps are dropped.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
oracle=${DMSNAP_ORACLE:-$here/../../../shared/tools/dmsnap-oracle/make-fixture.sh}
[ -x "$oracle" ] || { echo "dmsnap oracle not found at $oracle (set DMSNAP_ORACLE)" >&2; exit 2; }

create() { # name, oracle create args...
  name=$1; shift
  rm -rf "$here/$name"
  "$oracle" create --out "$here/$name" "$@"
  rm -rf "$here/$name/run" "$here/$name/snapshot-view.img"
}

merge() { # name, source fixture
  name=$1; src=$2
  rm -rf "$here/$name"
  "$oracle" merge --origin "$here/$src/origin.img" --cow "$here/$src/cow.img" --out "$here/$name"
  rm -rf "$here/$name/run"
}

fx_c8_basic() {
  create c8-basic --chunk 8 --origin-size 512K --cow-size 128K \
    --write snap:0:4K --write snap:8K:8K --write origin:64K:4K --write snap:256K:12K --strict
}
fx_c1_areas() {
  create c1-areas --chunk 1 --origin-size 128K --cow-size 128K \
    --random 60 --random-target mixed --random-max-sectors 3 --seed 3 --strict
}
fx_c1_fullarea() {
  # 4 page-sized writes = exactly 32 one-sector chunks: area 0 full, area 1 zeroed
  create c1-fullarea --chunk 1 --origin-size 64K --cow-size 20K \
    --write snap:0:4K --write snap:12K:4K --write snap:32K:4K --write snap:60K:4K --strict
}
fx_c16_random() {
  create c16-random --chunk 16 --origin-size 512K --cow-size 512K \
    --random 24 --random-target mixed --random-max-sectors 16 --seed 7 --strict
}
fx_c32_default() {
  create c32-default --chunk 32 --origin-size 512K --cow-size 256K \
    --write snap:16K:4K --write origin:100K:20K --write snap:300K:1K --write snap:0:512 --strict
}
fx_c8_partial() {
  # 259-sector origin: the last chunk (32) holds only 3 sectors
  create c8-partial --chunk 8 --origin-size 259s --cow-size 64K \
    --write origin:131584:512 --write snap:132096:512 --write snap:4K:4K --strict
}
fx_c8_full_po() {
  w=""; i=0
  while [ $i -lt 16 ]; do w="$w --write snap:$((i * 8192)):4K"; i=$((i + 1)); done
  # shellcheck disable=SC2086
  create c8-full-po --chunk 8 --store PO --origin-size 256K --cow-size 64K $w
}
fx_c8_invalid() {
  w=""; i=0
  while [ $i -lt 16 ]; do w="$w --write snap:$((i * 8192)):4K"; i=$((i + 1)); done
  # shellcheck disable=SC2086
  create c8-invalid --chunk 8 --store P --origin-size 256K --cow-size 64K $w
}
fx_merged_c8_basic() { merge merged-c8-basic c8-basic; }
fx_merged_c1_areas() { merge merged-c1-areas c1-areas; }

all="c8_basic c1_areas c1_fullarea c16_random c32_default c8_partial c8_full_po c8_invalid merged_c8_basic merged_c1_areas"
if [ $# -eq 0 ]; then set -- $all; fi
for f in "$@"; do
  f=$(echo "$f" | tr - _)
  echo "== $f" >&2
  "fx_$f"
done
