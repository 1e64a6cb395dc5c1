#!/usr/bin/env bash
# VMDK fixtures, made by the real qemu-img and qemu-io, with golden outputs:
# for every image NAME, NAME.md5 (md5 of `qemu-img convert -O raw`),
# NAME.info.json and NAME.map.json (qemu-img info/map --output=json, run from
# this folder so file names are relative), NAME.check.txt/.exit.
#
#   bash images/vmdk/make-fixtures.sh [DIR]     (default: this folder)
#
# Every subformat qemu-img writes: monolithicSparse (with and without
# zeroed_grain), streamOptimized, monolithicFlat, twoGbMaxExtentSparse,
# twoGbMaxExtentFlat. Small virtual sizes keep each file well under 1 MiB
# (flat extent files are mostly holes). Pseudo-random data is AES-128-CTR over
# zeros with a fixed key; the CIDs qemu-img draws are patched to fixed values
# so the set is reproducible on one qemu version.
set -euo pipefail
export LC_ALL=C TZ=UTC
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-$HERE}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
mkdir -p "$OUT"
cd "$OUT"
rm -f -- *.vmdk *.md5 *.json *.txt *.exit

rnd() { # rnd FILE BYTES
  head -c "$2" /dev/zero | openssl enc -aes-128-ctr -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 -nosalt > "$1"
}
io() { # io FILE CMD...: qemu-io writes on a vmdk image
  local f=$1; shift
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  "$QEMU_IO" -f vmdk "${args[@]}" "$f" > /dev/null
}
fixcid() { # fixcid FILE CID: the CID line (hosted: the embedded descriptor), same length
  sed -i -e "s/^CID=[0-9a-f]\{8\}$/CID=$2/" "$1"
}

"$QEMU_IMG" create -q -f vmdk sparse-empty.vmdk 2M
"$QEMU_IMG" create -q -f vmdk sparse-data.vmdk 3M
io sparse-data.vmdk 'write -P 0xab 0 64k' 'write -P 0xcd 1M 4k' 'write -P 0x11 2047k 2k' 'write -P 0xee 3068k 4k'
"$QEMU_IMG" create -q -f vmdk -o zeroed_grain=on sparse-zeroed.vmdk 2M
io sparse-zeroed.vmdk 'write -P 0x5a 0 192k' 'write -z 64k 64k' 'write -z 1M 128k' 'write -P 0x33 1600k 512'
"$QEMU_IMG" create -q -f vmdk -o subformat=monolithicSparse,adapter_type=lsilogic,hwversion=6 sparse-odd.vmdk 1234567b
io sparse-odd.vmdk 'write -P 0x77 1233920 512'

"$QEMU_IMG" create -q -f vmdk -o subformat=streamOptimized stream-empty.vmdk 1M

"$QEMU_IMG" create -q -f vmdk -o subformat=monolithicFlat flat.vmdk 1M
io flat.vmdk 'write -P 0x44 0 4k' 'write -P 0x45 512k 64k'
"$QEMU_IMG" create -q -f vmdk -o subformat=twoGbMaxExtentSparse split-sparse.vmdk 2M
io split-sparse.vmdk 'write -P 0x61 64k 64k' 'write -P 0x62 1984k 64k'
"$QEMU_IMG" create -q -f vmdk -o subformat=twoGbMaxExtentFlat split-flat.vmdk 1M
io split-flat.vmdk 'write -P 0x71 4k 4k'

# converted by qemu-img from raw: random data, zeros and holes
rnd src.raw 262144
truncate -s 1M src.raw
dd if=/dev/zero of=src.raw bs=64k seek=1 count=1 conv=notrunc status=none
"$QEMU_IMG" convert -O vmdk src.raw conv-sparse.vmdk
"$QEMU_IMG" convert -O vmdk -o subformat=streamOptimized src.raw conv-stream.vmdk
"$QEMU_IMG" convert -O vmdk -o subformat=monolithicFlat src.raw conv-flat.vmdk
rm -f src.raw

# flat extent files without holes, as a git checkout writes them (map's zero flags then hold)
for f in flat-flat split-flat-f001 conv-flat-flat; do
  cp --sparse=never "$f.vmdk" "$f.tmp" && mv "$f.tmp" "$f.vmdk"
done

cid=1
for f in sparse-empty sparse-data sparse-zeroed sparse-odd stream-empty flat split-sparse split-flat conv-sparse conv-stream conv-flat; do
  fixcid "$f.vmdk" "$(printf '%08x' $((0x1000 + cid)))"
  cid=$((cid + 1))
  "$QEMU_IMG" convert -f vmdk -O raw "$f.vmdk" "$f.raw.tmp"
  md5sum < "$f.raw.tmp" | cut -d' ' -f1 > "$f.vmdk.md5"
  rm -f "$f.raw.tmp"
  "$QEMU_IMG" info -f vmdk --output=json "$f.vmdk" > "$f.vmdk.info.json"
  "$QEMU_IMG" map -f vmdk --output=json "$f.vmdk" > "$f.vmdk.map.json"
  set +e
  "$QEMU_IMG" check -f vmdk "$f.vmdk" > "$f.vmdk.check.txt" 2>&1
  echo $? > "$f.vmdk.check.exit"
  set -e
done
"$QEMU_IMG" --version | head -1 > qemu-version.txt
