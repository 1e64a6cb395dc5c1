#!/usr/bin/env bash
# VHD (vpc) fixtures, made by the real qemu-img and qemu-io into the directory
# given (the tests call this into a temporary directory: a dynamic VHD with one
# allocated block is already 2 MiB, too big to commit).
#
#   bash test/vhd/make-fixtures.sh DIR
#
# Pseudo-random data is AES-128-CTR over zeros with a fixed key, so the set is
# the same on every run of one qemu version (except the footer's UUID and
# timestamp, which qemu-img draws afresh).
set -euo pipefail
dir=${1:?usage: make-fixtures.sh DIR}
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
mkdir -p "$dir"
cd "$dir"

rnd() { # rnd FILE BYTES: pseudo-random bytes
  head -c "$2" /dev/zero | openssl enc -aes-128-ctr -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 -nosalt > "$1"
}
io() { # io FILE CMD...: qemu-io writes on a vpc image
  local f=$1; shift
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  "$QEMU_IO" -f vpc "${args[@]}" "$f" > /dev/null
}

# dynamic disks
"$QEMU_IMG" create -q -f vpc dyn-empty.vhd 10M
"$QEMU_IMG" create -q -f vpc dyn-data.vhd 10M
io dyn-data.vhd 'write -P 0xab 0 64k' 'write -P 0xcd 5M 4k' 'write -P 0x11 2047k 2k' 'write -P 0xee 10260k 4k'
"$QEMU_IMG" create -q -f vpc -o force_size=on dyn-force.vhd 5000k
io dyn-force.vhd 'write -P 0x5a 4096k 904k'
"$QEMU_IMG" create -q -f vpc dyn-odd.vhd 7654321
io dyn-odd.vhd 'write -P 0x77 3M 512'
# each CHS branch of the geometry rounding (17, 31, 63 and 255 sectors per track)
"$QEMU_IMG" create -q -f vpc chs-31.vhd 100M
"$QEMU_IMG" create -q -f vpc chs-63.vhd 1G
"$QEMU_IMG" create -q -f vpc chs-255.vhd 40G
io chs-255.vhd 'write -P 0x42 39G 8k'

# fixed disks
"$QEMU_IMG" create -q -f vpc -o subformat=fixed fixed.vhd 3M
io fixed.vhd 'write -P 0x33 0 100k' 'write -P 0x44 2M 12k'
"$QEMU_IMG" create -q -f vpc -o subformat=fixed,force_size=on fixed-force.vhd 3M
io fixed-force.vhd 'write -P 0x55 1M 1M'

# converted by qemu-img from raw: random data, zeros and holes
rnd src.raw 3145728
truncate -s 6M src.raw
dd if=/dev/zero of=src.raw bs=64k seek=20 count=4 conv=notrunc status=none
"$QEMU_IMG" convert -O vpc src.raw conv-dyn.vhd
"$QEMU_IMG" convert -O vpc -o subformat=fixed src.raw conv-fixed.vhd
"$QEMU_IMG" convert -O vpc -o subformat=fixed,force_size=on src.raw conv-azure.vhd
