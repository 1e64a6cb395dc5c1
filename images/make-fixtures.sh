#!/usr/bin/env bash
# Regenerate the qcow2 fixture images in images/qcow2/ with the real qemu-img /
# qemu-io, plus golden outputs recorded from qemu for each image.
#
#   bash images/make-fixtures.sh          (from any directory)
#
# Everything in images/qcow2/ is deleted and rebuilt.  images/dmsnap/ is not
# touched (it is maintained separately).
#
# Requirements: qemu-img + qemu-io (written against 7.2), jq, openssl, gzip,
# md5sum, sha256sum, od, dd, GNU cp.
#
# Determinism: qemu's output is a function of the commands, except for the
# snapshot timestamps, which are patched to fixed values after the snapshots
# are taken (see patch_snapshot_dates).  Pseudo-random ("incompressible") data
# comes from AES-128-CTR over zeros with a fixed key.  `qemu-img convert` runs
# with -m 1 so clusters are allocated in order.
set -euo pipefail
export LC_ALL=C TZ=UTC

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/qcow2"
QEMU_IMG=${QEMU_IMG:-qemu-img}
QEMU_IO=${QEMU_IO:-qemu-io}
GZIP_OVER=$((1024 * 1024))   # image files larger than this are committed gzip'ed

for tool in "$QEMU_IMG" "$QEMU_IO" jq openssl gzip md5sum sha256sum od dd cp; do
    command -v "$tool" >/dev/null || { echo "make-fixtures: missing tool: $tool" >&2; exit 1; }
done

META=$(mktemp -d "${TMPDIR:-/tmp}/imgtool-fixtures.XXXXXX")
trap 'rm -rf "$META"' EXIT

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"

# ---------------------------------------------------------------------------
# bookkeeping

ORDER=()      # fixture names in creation order
CUR=""        # fixture currently being built

# shell-quote one word only when needed, for readable command logs
q() {
    local a=$1
    if [[ $a =~ ^[A-Za-z0-9_./=,:+@%-]+$ ]]; then
        printf '%s' "$a"
    else
        printf "'%s'" "${a//\'/\'\\\'\'}"
    fi
}
qall() {
    local out="" a
    for a in "$@"; do out+="${out:+ }$(q "$a")"; done
    printf '%s' "$out"
}

log_cmd() { jq -n --arg c "$1" '$c' >>"$META/$CUR.cmds"; }

# fixture NAME IMAGEFILE "tag tag ..." "description"
fixture() {
    CUR=$1
    ORDER+=("$1")
    printf '%s\n' "$2" >"$META/$1.image"
    printf '%s\n' $3 >"$META/$1.tags"
    printf '%s' "$4" >"$META/$1.desc"
    : >"$META/$1.cmds"
    : >"$META/$1.requires"
    : >"$META/$1.snapshots"
    echo "== $1" >&2
}

# files (backing files, data files) that must sit next to the image
requires() { local f; for f in "$@"; do printf '%s\n' "$f" >>"$META/$CUR.requires"; done; }

# run a command, log it; fail loudly (qemu-io exits non-zero on failed commands)
run() {
    log_cmd "$(qall "$@")"
    if ! "$@" >"$META/last.out" 2>&1; then
        echo "make-fixtures: command failed: $(qall "$@")" >&2
        cat "$META/last.out" >&2
        exit 1
    fi
    if grep -qiE 'failed|error' "$META/last.out"; then
        echo "make-fixtures: command reported an error: $(qall "$@")" >&2
        cat "$META/last.out" >&2
        exit 1
    fi
}

io() {   # io IMAGE 'cmd' 'cmd' ...   (qemu-io on a qcow2 image)
    local img=$1; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    run "$QEMU_IO" -f qcow2 "${args[@]}" "$img"
}

# qemu-io whose last command is `abort`: the process dies with SIGABRT
# (exit 134) without closing the image.  Core dumps are disabled.
abort_io() {
    local img=$1; shift
    local args=() c rc
    for c in "$@"; do args+=(-c "$c"); done
    log_cmd "$(qall "$QEMU_IO" -f qcow2 "${args[@]}" "$img")  # dies with SIGABRT (exit 134); run with ulimit -c 0"
    set +e
    (
        ulimit -c 0
        exec "$QEMU_IO" -f qcow2 "${args[@]}" "$img"
    ) >/dev/null 2>&1
    rc=$?
    set -e
    [[ $rc -eq 134 ]] || { echo "make-fixtures: expected qemu-io to abort (134), got $rc" >&2; exit 1; }
}

# deterministic incompressible bytes: randfile FILE BYTES SEED
randfile() {
    log_cmd "$(printf 'head -c %s /dev/zero | openssl enc -aes-128-ctr -nosalt -K %032x -iv %032x > %s' "$2" "$3" 0 "$1")"
    head -c "$2" /dev/zero | openssl enc -aes-128-ctr -nosalt -K "$(printf '%032x' "$3")" -iv "$(printf '%032x' 0)" >"$1"
}

# deterministic compressible text: textfile FILE BYTES
textfile() {
    log_cmd "$(printf 'seq -f %s 1 1000000 | head -c %s > %s' "'imgtool fixture line %08g'" "$2" "$1")"
    seq -f 'imgtool fixture line %08g' 1 1000000 | head -c "$2" >"$1" || true
    [[ $(stat -c %s "$1") -eq $2 ]]
}

# splice FILE into DEST at byte OFFSET (DEST keeps its size or grows)
splice() {
    run dd if="$1" of="$2" bs=512 seek=$(($3 / 512)) conv=notrunc status=none
}

be_read() {  # be_read FILE OFFSET NBYTES -> decimal
    local hex
    hex=$(od -An -tx1 -v -j "$2" -N "$3" "$1" | tr -d ' \n')
    echo $((16#$hex))
}
be_write32() {  # be_write32 FILE OFFSET VALUE
    local v=$3
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(((v >> 24) & 255)) $(((v >> 16) & 255)) $(((v >> 8) & 255)) $((v & 255)))" |
        dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# Snapshot table entries carry the wall-clock time of `qemu-img snapshot -c`.
# Overwrite date_sec/date_nsec of every entry with fixed values so the image
# bytes are reproducible.  (No checksum covers the snapshot table.)
patch_snapshot_dates() {
    local img=$1 n off i idlen namelen extra
    n=$(be_read "$img" 60 4)
    off=$(be_read "$img" 64 8)
    for ((i = 0; i < n; i++)); do
        idlen=$(be_read "$img" $((off + 12)) 2)
        namelen=$(be_read "$img" $((off + 14)) 2)
        extra=$(be_read "$img" $((off + 36)) 4)
        be_write32 "$img" $((off + 16)) $((1700000000 + 3600 * i))   # date_sec
        be_write32 "$img" $((off + 20)) 0                             # date_nsec
        off=$((off + 40 + extra + idlen + namelen))
        off=$(((off + 7) / 8 * 8))
    done
    log_cmd "# patch_snapshot_dates $img: date_sec := 1700000000 + 3600*index, date_nsec := 0 in each snapshot table entry (make-fixtures.sh)"
}

K=1024
M=$((1024 * 1024))

# ---------------------------------------------------------------------------
# 1. v2 / v3, cluster sizes, partial-cluster writes, writes over several L2s
#
# The same write program on v2 and v3 so the two can be compared: on v2
# `write -z` cannot use the zero flag and qemu writes real zero data.

basic_ops() {   # basic_ops IMG  (64 KiB clusters, 2 MiB virtual)
    io "$1" \
        'write -P 0x11 0 64k' \
        'write -P 0x22 65636 1000' \
        'write -P 0x33 120000 20000' \
        'write -z 0 64k' \
        'write -z -u 192k 64k' \
        'write -z 300k 4k' \
        'discard 128k 64k' \
        'write -P 0x44 2096848 304'
}

fixture v2-c64k v2-c64k.qcow2 "v2 cluster-65536 partial-cluster discard zero-writes" \
    "compat=0.10, 64 KiB clusters, 2 MiB: pattern writes, unaligned partial-cluster writes, write -z / -z -u (v2 has no zero flag), discard"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=64k v2-c64k.qcow2 2M
basic_ops v2-c64k.qcow2

fixture v3-c64k v3-c64k.qcow2 "v3 cluster-65536 partial-cluster discard zero-writes zero-clusters" \
    "compat=1.1, 64 KiB clusters, 2 MiB: same write program as v2-c64k (zero flag used here)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=64k v3-c64k.qcow2 2M
basic_ops v3-c64k.qcow2

c512_ops() {    # 512 B clusters: one L2 table (64 entries) maps 32 KiB
    io "$1" \
        'write -P 0x11 0 512' \
        'write -P 0x22 1000 3000' \
        'write -P 0x33 30k 70k' \
        'write -z 40k 8k' \
        'write -z -u 50k 2k' \
        'discard 60k 4k' \
        'write -P 0x44 200k 33k' \
        'write -P 0x55 1023k 1k'
}

fixture v2-c512 v2-c512.qcow2 "v2 cluster-512 multi-l2 partial-cluster discard zero-writes" \
    "compat=0.10, 512 B clusters (32 KiB per L2 table), 1 MiB: writes spanning several L2 tables, unaligned writes, zero writes, discard"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=512 v2-c512.qcow2 1M
c512_ops v2-c512.qcow2

fixture v3-c512 v3-c512.qcow2 "v3 cluster-512 multi-l2 partial-cluster discard zero-writes zero-clusters" \
    "compat=1.1, 512 B clusters (32 KiB per L2 table), 1 MiB: same write program as v2-c512"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=512 v3-c512.qcow2 1M
c512_ops v3-c512.qcow2

fixture v3-c4k v3-c4k.qcow2 "v3 cluster-4096 multi-l2 partial-cluster discard zero-writes zero-clusters incompressible" \
    "compat=1.1, 4 KiB clusters (2 MiB per L2 table), 8 MiB: writes across the 2 and 4 MiB L2-table boundaries, random data, zero writes, write ending exactly at 6 MiB"
randfile _rand-64k.bin $((64 * K)) 1
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-c4k.qcow2 8M
io v3-c4k.qcow2 \
    'write -P 0x11 0 4k' \
    'write -P 0x22 2040k 16k' \
    'write -s _rand-64k.bin 4064k 64k' \
    'write -P 0x33 6140k 4k' \
    'write -P 0x44 6150000 1234' \
    'write -z 4080k 8k' \
    'write -z -u 2044k 4k' \
    'discard 6140k 4k' \
    'write -P 0x55 8188k 4k'
run rm -f _rand-64k.bin

fixture v2-c4k v2-c4k.qcow2 "v2 cluster-4096 multi-l2 partial-cluster" \
    "compat=0.10, 4 KiB clusters, 8 MiB: writes across L2 boundaries"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-c4k.qcow2 8M
io v2-c4k.qcow2 \
    'write -P 0x11 0 4k' \
    'write -P 0x22 2040k 16k' \
    'write -P 0x33 4094k 5k' \
    'write -P 0x44 8188k 4k'

fixture v3-c64k-1g v3-c64k-1g.qcow2 "v3 cluster-65536 multi-l2 partial-cluster" \
    "compat=1.1, 64 KiB clusters, 1 GiB virtual (two L2 tables of 512 MiB each): one 128 KiB write straddling the 512 MiB L2 boundary"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=64k v3-c64k-1g.qcow2 1G
io v3-c64k-1g.qcow2 'write -P 0x22 524224k 128k'

fixture v3-c2m v3-c2m.qcow2 "v3 cluster-2097152 partial-cluster zero-clusters sparse" \
    "compat=1.1, 2 MiB clusters, 64 MiB virtual, a few 4 KiB writes (every allocation is a whole 2 MiB cluster, so the file is committed gzip'ed)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=2M v3-c2m.qcow2 64M
io v3-c2m.qcow2 \
    'write -P 0x11 0 4k' \
    'write -P 0x22 6m 4k' \
    'write -P 0x33 40m 4k' \
    'write -z -u 6m 2m'

fixture v2-c2m v2-c2m.qcow2 "v2 cluster-2097152 partial-cluster sparse" \
    "compat=0.10, 2 MiB clusters, 16 MiB virtual, two 4 KiB writes (committed gzip'ed)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=2M v2-c2m.qcow2 16M
io v2-c2m.qcow2 \
    'write -P 0x11 4k 4k' \
    'write -P 0x22 15m 4k'

# ---------------------------------------------------------------------------
# 2. refcount widths (16 is the default and is used by most other fixtures)

for rb in 1 2 4 8 16 32 64; do
    extra=""
    desc="compat=1.1, refcount_bits=$rb, 4 KiB clusters, 1 MiB: writes, overwrite, discard"
    fixture "v3-rc$rb" "v3-rc$rb.qcow2" "v3 cluster-4096 refcount-$rb discard" "$desc"
    run "$QEMU_IMG" create -q -f qcow2 -o "compat=1.1,cluster_size=4k,refcount_bits=$rb" "v3-rc$rb.qcow2" 1M
    io "v3-rc$rb.qcow2" \
        'write -P 0x11 0 12k' \
        'write -P 0x22 4k 1k' \
        'write -P 0x33 512k 8k' \
        'discard 516k 4k' \
        'write -P 0x44 1020k 4k'
    if [[ $rb == 1 ]]; then
        # refcount 1 cannot share a host cluster between compressed clusters
        echo compressed >>"$META/$CUR.tags"
        printf '%s' "$desc; plus three compressed clusters (each needs its own host cluster with 1-bit refcounts)" >"$META/$CUR.desc"
        io v3-rc1.qcow2 \
            'write -c -P 0x55 64k 4k' \
            'write -c -P 0x56 68k 4k' \
            'write -c -P 0x57 72k 4k'
    fi
done

fixture v2-rc16 v2-rc16.qcow2 "v2 cluster-4096 refcount-16" \
    "compat=0.10 (v2 only allows refcount_bits=16), 4 KiB clusters, 1 MiB"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-rc16.qcow2 1M
io v2-rc16.qcow2 'write -P 0x11 0 12k' 'write -P 0x44 1020k 4k'

# ---------------------------------------------------------------------------
# 3. zero clusters

fixture v3-zero v3-zero.qcow2 "v3 cluster-4096 zero-clusters zero-alloc zero-plain partial-cluster discard" \
    "compat=1.1, 4 KiB clusters, 128 KiB: write -z on allocated clusters (keeps allocation: zero-alloc), write -z -u (unmaps: zero-plain), zero writes on unallocated and partial clusters, discard"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-zero.qcow2 128K
io v3-zero.qcow2 \
    'write -P 0x11 0 32k' \
    'write -z 0 4k' \
    'write -z -u 4k 4k' \
    'write -z 8k 1000' \
    'write -z 12500 10000' \
    'write -z -u 24k 4k' \
    'write -z 64k 8k' \
    'write -z -u 80k 4k' \
    'discard 28k 4k' \
    'write -P 0x22 96k 4k' \
    'write -z 96k 4k' \
    'write -P 0x33 97k 1k'

fixture v2-zero v2-zero.qcow2 "v2 cluster-4096 zero-writes partial-cluster discard" \
    "compat=0.10, 4 KiB clusters, 128 KiB: same zero-write program as v3-zero (v2 must store real zeros or deallocate)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-zero.qcow2 128K
io v2-zero.qcow2 \
    'write -P 0x11 0 32k' \
    'write -z 0 4k' \
    'write -z -u 4k 4k' \
    'write -z 8k 1000' \
    'write -z 12500 10000' \
    'write -z -u 24k 4k' \
    'write -z 64k 8k' \
    'write -z -u 80k 4k' \
    'discard 28k 4k' \
    'write -P 0x22 96k 4k' \
    'write -z 96k 4k' \
    'write -P 0x33 97k 1k'

# ---------------------------------------------------------------------------
# 4. compressed clusters (zlib and zstd)

# source: 512 KiB raw = 128 KiB text | 64 KiB random | 64 KiB zeros | 64 KiB 0x5a | 40 KiB text | zeros
make_compress_src() {
    textfile _text.bin $((128 * K))
    randfile _rand.bin $((64 * K)) 2
    run "$QEMU_IMG" create -q -f raw _src.raw 512K
    splice _text.bin _src.raw 0
    splice _rand.bin _src.raw $((128 * K))
    run "$QEMU_IO" -f raw -c 'write -P 0x5a 256k 64k' _src.raw
    run dd if=_text.bin of=_src.raw bs=1k count=40 seek=320 conv=notrunc status=none
    run rm -f _text.bin _rand.bin
}

fixture v3-compressed-zlib v3-compressed-zlib.qcow2 "v3 cluster-65536 compressed compressed-zlib incompressible" \
    "qemu-img convert -c (zlib, 64 KiB clusters) from 512 KiB raw of text, random (stored uncompressed), zeros and 0x5a; then a partial overwrite of a compressed cluster, a qemu-io write -c, and write -z -u over a compressed cluster"
make_compress_src
run "$QEMU_IMG" convert -f raw -O qcow2 -c -m 1 -o compat=1.1,cluster_size=64k,compression_type=zlib _src.raw v3-compressed-zlib.qcow2
io v3-compressed-zlib.qcow2 \
    'write -P 0x77 70000 1000' \
    'write -c -P 0x78 448k 64k' \
    'write -z -u 256k 64k'

fixture v3-compressed-zstd v3-compressed-zstd.qcow2 "v3 cluster-65536 compressed compressed-zstd incompressible" \
    "same as v3-compressed-zlib with compression_type=zstd"
make_compress_src
run "$QEMU_IMG" convert -f raw -O qcow2 -c -m 1 -o compat=1.1,cluster_size=64k,compression_type=zstd _src.raw v3-compressed-zstd.qcow2
io v3-compressed-zstd.qcow2 \
    'write -P 0x77 70000 1000' \
    'write -c -P 0x78 448k 64k' \
    'write -z -u 256k 64k'

fixture v2-compressed-zlib v2-compressed-zlib.qcow2 "v2 cluster-4096 compressed compressed-zlib incompressible" \
    "compat=0.10, 4 KiB clusters: convert -c of the same 512 KiB source as v3-compressed-zlib"
make_compress_src
run "$QEMU_IMG" convert -f raw -O qcow2 -c -m 1 -o compat=0.10,cluster_size=4k _src.raw v2-compressed-zlib.qcow2

fixture v3-compressed-zstd-c4k v3-compressed-zstd-c4k.qcow2 "v3 cluster-4096 compressed compressed-zstd" \
    "zstd, 4 KiB clusters, 1 MiB: qemu-io write -c of compressible text (several compressed clusters share host clusters), partial overwrite, zero write over a compressed cluster"
# One `write -c` per cluster: a multi-cluster compressed write is split into
# per-cluster tasks that run concurrently, so host offsets would vary per run.
textfile _text.bin $((64 * K))
run split -b 4k -d -a 2 _text.bin _text.
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,compression_type=zstd v3-compressed-zstd-c4k.qcow2 1M
cw=()
for i in $(seq 0 15); do cw+=("write -c -s _text.$(printf %02d "$i") $((i * 4))k 4k"); done
io v3-compressed-zstd-c4k.qcow2 "${cw[@]}" \
    'write -c -P 0x11 128k 4k' \
    'write -P 0x22 8k 100' \
    'write -z 16k 4k' \
    'discard 20k 4k'
run rm -f _text.bin _text.[0-9][0-9]

fixture v3-compressed-zlib-c512 v3-compressed-zlib-c512.qcow2 "v3 cluster-512 compressed compressed-zlib" \
    "zlib, 512 B clusters, 256 KiB: convert -c from text (compressed clusters in 512-byte host clusters, many per host cluster)"
textfile _text.bin $((256 * K))
run "$QEMU_IMG" convert -f raw -O qcow2 -c -m 1 -o compat=1.1,cluster_size=512 _text.bin v3-compressed-zlib-c512.qcow2
run rm -f _text.bin
run rm -f _src.raw

# ---------------------------------------------------------------------------
# 5. backing chains (relative backing names, backing formats recorded,
#    backing files shorter than their overlays)

fixture chain-base chain-base.qcow2 "v3 cluster-4096 backing-base" \
    "bottom of chain-base <- chain-mid <- chain-top: 1 MiB, 4 KiB clusters, 0x11 over the first 128 KiB, 0x12 at 768 KiB"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k chain-base.qcow2 1M
io chain-base.qcow2 'write -P 0x11 0 128k' 'write -P 0x12 768k 16k'

fixture chain-mid chain-mid.qcow2 "v3 cluster-4096 backing-chain backing-shorter zero-clusters partial-cluster" \
    "middle: 1.5 MiB over chain-base.qcow2 (1 MiB, -F qcow2): partial-cluster writes (COW from base), zero writes masking base data, a write straddling the base's end, data past it"
requires chain-base.qcow2
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k -b chain-base.qcow2 -F qcow2 chain-mid.qcow2 1536K
io chain-mid.qcow2 \
    'write -P 0x21 4k 4k' \
    'write -P 0x22 10000 300' \
    'write -z 64k 32k' \
    'write -z -u 112k 8k' \
    'discard 120k 4k' \
    'write -P 0x23 1020k 8k' \
    'write -P 0x24 1280k 4k'

fixture chain-top chain-top.qcow2 "v3 cluster-16384 backing-chain backing-shorter zero-clusters partial-cluster discard" \
    "top: 2 MiB, 16 KiB clusters, over chain-mid.qcow2 (1.5 MiB) over chain-base.qcow2 (1 MiB); cluster size differs from the backing files"
requires chain-mid.qcow2 chain-base.qcow2
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=16k -b chain-mid.qcow2 -F qcow2 chain-top.qcow2 2M
io chain-top.qcow2 \
    'write -P 0x31 8k 1k' \
    'write -P 0x32 512k 16k' \
    'write -z -u 768k 16k' \
    'discard 1m 16k' \
    'write -P 0x33 1792k 4k'

fixture chain-raw-top chain-raw-top.qcow2 "v2 cluster-4096 backing-chain backing-raw backing-shorter partial-cluster zero-writes" \
    "compat=0.10 overlay (512 KiB) over a 128 KiB raw file chain-raw-base.raw (-F raw): partial-cluster writes, v2 zero write and discard over backing data, a write straddling the base's end"
run "$QEMU_IMG" create -q -f raw chain-raw-base.raw 128K
run "$QEMU_IO" -f raw -c 'write -P 0xa1 0 64k' -c 'write -P 0xa2 96k 4k' chain-raw-base.raw
requires chain-raw-base.raw
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k -b chain-raw-base.raw -F raw chain-raw-top.qcow2 512K
io chain-raw-top.qcow2 \
    'write -P 0xb1 100 200' \
    'write -z 32k 8k' \
    'discard 48k 4k' \
    'write -P 0xb2 124k 8k'

# ---------------------------------------------------------------------------
# 6. internal snapshots

snap_ops() {    # snap_ops IMG
    io "$1" 'write -P 0x11 0 64k' 'write -P 0x12 256k 8k'
    run "$QEMU_IMG" snapshot -c snap1 "$1"
    io "$1" 'write -P 0x21 4k 4k' 'write -P 0x22 1m 4k' 'discard 256k 4k'
    run "$QEMU_IMG" snapshot -c snap2 "$1"
    io "$1" 'write -P 0x31 8k 100' 'write -z -u 32k 4k'
    patch_snapshot_dates "$1"
    printf '%s\n' snap1 snap2 >"$META/$CUR.snapshots"
}

fixture v3-snapshot v3-snapshot.qcow2 "v3 cluster-4096 snapshot partial-cluster discard" \
    "compat=1.1, 4 KiB clusters, 2 MiB: writes, snapshot snap1, COW overwrites + discard, snapshot snap2, more writes (snapshot dates patched to fixed values)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-snapshot.qcow2 2M
snap_ops v3-snapshot.qcow2

fixture v2-snapshot v2-snapshot.qcow2 "v2 cluster-4096 snapshot partial-cluster discard" \
    "compat=0.10 version of v3-snapshot (qemu 7.2 still writes 24 bytes of extra data per v2 snapshot entry)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-snapshot.qcow2 2M
snap_ops v2-snapshot.qcow2

# ---------------------------------------------------------------------------
# 7. extended L2 entries (subclusters)

fixture v3-extl2-c64k v3-extl2-c64k.qcow2 "v3 cluster-65536 extended-l2 subclusters zero-clusters partial-cluster discard compressed compressed-zlib" \
    "extended_l2=on, 64 KiB clusters (2 KiB subclusters), 1 MiB: subcluster writes, zero subclusters in allocated and unallocated clusters, write -z -u of a subcluster and of a whole cluster, discard, one compressed cluster"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=64k,extended_l2=on v3-extl2-c64k.qcow2 1M
io v3-extl2-c64k.qcow2 \
    'write -P 0x11 0 2k' \
    'write -P 0x12 6k 3k' \
    'write -P 0x13 62k 4k' \
    'write -z 10k 2k' \
    'write -z 130k 4k' \
    'write -P 0x14 192k 64k' \
    'write -z 196k 2k' \
    'write -z -u 198k 2k' \
    'discard 236k 4k' \
    'write -P 0x15 256k 64k' \
    'write -z -u 256k 64k' \
    'write -c -P 0x16 320k 64k'

fixture v3-extl2-c32k-backing v3-extl2-c32k-backing.qcow2 "v3 cluster-32768 extended-l2 subclusters backing-chain backing-shorter zero-clusters partial-cluster" \
    "extended_l2=on, 32 KiB clusters (1 KiB subclusters), 2 MiB over chain-base.qcow2 (1 MiB): subcluster writes leave other subclusters reading from the backing file; zero subclusters mask backing data; a write straddling the backing file's end"
requires chain-base.qcow2
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=32k,extended_l2=on -b chain-base.qcow2 -F qcow2 v3-extl2-c32k-backing.qcow2 2M
io v3-extl2-c32k-backing.qcow2 \
    'write -P 0x41 1k 1k' \
    'write -P 0x42 40000 3000' \
    'write -z 3k 2k' \
    'write -z -u 64k 32k' \
    'discard 97k 1k' \
    'write -P 0x43 1022k 4k'

# ---------------------------------------------------------------------------
# 8. external data files

fixture v3-datafile v3-datafile.qcow2 "v3 cluster-4096 data-file zero-clusters partial-cluster" \
    "external data file v3-datafile.data (data_file_raw=off), 4 KiB clusters, 128 KiB"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,data_file=v3-datafile.data v3-datafile.qcow2 128K
requires v3-datafile.data
io v3-datafile.qcow2 \
    'write -P 0x11 0 8k' \
    'write -P 0x12 64k 5000' \
    'write -z 4k 4k' \
    'write -z -u 64k 4k' \
    'discard 100k 4k' \
    'write -P 0x13 124k 4k'

fixture v3-datafile-raw v3-datafile-raw.qcow2 "v3 cluster-4096 data-file data-file-raw zero-clusters partial-cluster" \
    "external data file v3-datafile-raw.data with data_file_raw=on (the data file is a valid raw image), 4 KiB clusters, 128 KiB"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,data_file=v3-datafile-raw.data,data_file_raw=on v3-datafile-raw.qcow2 128K
requires v3-datafile-raw.data
io v3-datafile-raw.qcow2 \
    'write -P 0x11 0 8k' \
    'write -P 0x12 64k 5000' \
    'write -z 4k 4k' \
    'write -z -u 68k 4k' \
    'discard 100k 4k' \
    'write -P 0x13 124k 4k'

# ---------------------------------------------------------------------------
# 9. persistent dirty bitmaps

fixture v3-bitmap v3-bitmap.qcow2 "v3 cluster-4096 bitmap" \
    "one persistent bitmap bm0 (default granularity), then qemu-io writes recorded in it"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-bitmap.qcow2 4M
io v3-bitmap.qcow2 'write -P 0x11 0 64k'
run "$QEMU_IMG" bitmap -f qcow2 --add v3-bitmap.qcow2 bm0
io v3-bitmap.qcow2 'write -P 0x22 4k 4k' 'write -P 0x23 1m 40k' 'write -P 0x24 4190000 100'

fixture v3-bitmaps2 v3-bitmaps2.qcow2 "v3 cluster-4096 bitmap bitmap-granularity bitmap-disabled" \
    "two persistent bitmaps: bm-64k (-g 64k) and bm-512k (-g 512k, disabled after the first writes), 4 KiB clusters, 8 MiB"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-bitmaps2.qcow2 8M
run "$QEMU_IMG" bitmap -f qcow2 --add -g 64k v3-bitmaps2.qcow2 bm-64k
run "$QEMU_IMG" bitmap -f qcow2 --add -g 512k v3-bitmaps2.qcow2 bm-512k
io v3-bitmaps2.qcow2 'write -P 0x11 0 4k' 'write -P 0x12 3m 20k'
run "$QEMU_IMG" bitmap -f qcow2 --disable v3-bitmaps2.qcow2 bm-512k
io v3-bitmaps2.qcow2 'write -P 0x13 7m 4k'

fixture v3-bitmap-inuse v3-bitmap-inuse.qcow2 "v3 cluster-4096 bitmap bitmap-in-use" \
    "bitmap bm0 loaded by qemu-io, which writes, flushes and abort()s: the bitmap keeps its in-use flag on disk (inconsistent bitmap)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-bitmap-inuse.qcow2 1M
run "$QEMU_IMG" bitmap -f qcow2 --add v3-bitmap-inuse.qcow2 bm0
io v3-bitmap-inuse.qcow2 'write -P 0x11 0 8k'
abort_io v3-bitmap-inuse.qcow2 'write -P 0x12 512k 4k' flush abort

# ---------------------------------------------------------------------------
# 10. lazy refcounts: dirty image (qemu-io aborts without closing) and clean

fixture v3-dirty-lazy v3-dirty-lazy.qcow2 "v3 cluster-4096 lazy-refcounts dirty corrupt-refcounts" \
    "lazy_refcounts=on; qemu-io writes, flushes (L2 tables reach the disk, refcounts do not) and abort()s: dirty bit stays set, refcounts of new clusters are 0 on disk"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,lazy_refcounts=on v3-dirty-lazy.qcow2 1M
abort_io v3-dirty-lazy.qcow2 'write -P 0x11 0 8k' 'write -P 0x12 512k 4k' flush abort
[[ $("$QEMU_IMG" info -f qcow2 --output=json v3-dirty-lazy.qcow2 | jq '."dirty-flag"') == true ]] ||
    { echo "make-fixtures: v3-dirty-lazy.qcow2 is not dirty" >&2; exit 1; }

fixture v3-lazy-clean v3-lazy-clean.qcow2 "v3 cluster-4096 lazy-refcounts" \
    "lazy_refcounts=on, closed normally (dirty bit cleared, refcounts consistent)"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,lazy_refcounts=on v3-lazy-clean.qcow2 1M
io v3-lazy-clean.qcow2 'write -P 0x11 0 8k' 'write -P 0x12 512k 4k'

# ---------------------------------------------------------------------------
# 11. preallocation=metadata, empty, zero-size

fixture v3-prealloc-metadata v3-prealloc-metadata.qcow2 "v3 cluster-4096 prealloc-metadata partial-cluster zero-clusters" \
    "preallocation=metadata, 4 KiB clusters, 128 KiB: every cluster has an L2 entry pointing at (zeroed) host space; then a few writes and a zero write"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k,preallocation=metadata v3-prealloc-metadata.qcow2 128K
io v3-prealloc-metadata.qcow2 'write -P 0x11 4k 4k' 'write -P 0x12 10000 100' 'write -z 64k 8k' 'write -z -u 96k 4k'

fixture v2-prealloc-metadata v2-prealloc-metadata.qcow2 "v2 cluster-4096 prealloc-metadata" \
    "compat=0.10, preallocation=metadata, 4 KiB clusters, 64 KiB, untouched"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k,preallocation=metadata v2-prealloc-metadata.qcow2 64K

fixture v3-empty v3-empty.qcow2 "v3 cluster-65536 empty" "compat=1.1, 1 MiB, never written"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1 v3-empty.qcow2 1M

fixture v2-empty v2-empty.qcow2 "v2 cluster-4096 empty" "compat=0.10, 4 KiB clusters, 1 MiB, never written"
run "$QEMU_IMG" create -q -f qcow2 -o compat=0.10,cluster_size=4k v2-empty.qcow2 1M

fixture v3-zero-size v3-zero-size.qcow2 "v3 cluster-4096 empty zero-size" "compat=1.1, 4 KiB clusters, virtual size 0"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=4k v3-zero-size.qcow2 0

fixture v3-empty-c512 v3-empty-c512.qcow2 "v3 cluster-512 empty" "compat=1.1, 512 B clusters, 1 MiB, never written"
run "$QEMU_IMG" create -q -f qcow2 -o compat=1.1,cluster_size=512 v3-empty-c512.qcow2 1M

# ---------------------------------------------------------------------------
# finalise: rewrite every file without holes, then record goldens

shopt -s nullglob
leftover=(_*)
[[ ${#leftover[@]} -eq 0 ]] || { echo "make-fixtures: temporary files left: ${leftover[*]}" >&2; exit 1; }

echo "== rewriting files without holes" >&2
for f in *; do
    cp --sparse=never "$f" "$f.tmp"
    mv "$f.tmp" "$f"
done
for n in "${ORDER[@]}"; do
    CUR=$n
    img=$(<"$META/$n.image")
    files="$img"
    while read -r r; do [[ -n $r ]] && files+=" $r"; done <"$META/$n.requires"
    log_cmd "for f in $files; do cp --sparse=never \$f \$f.tmp && mv \$f.tmp \$f; done  # git checkouts have no holes"
done

sha() { sha256sum "$1" | cut -d' ' -f1; }
declare -A SHA_BEFORE
for f in *; do SHA_BEFORE[$f]=$(sha "$f"); done

RAW="$META/convert.raw"
golden() {  # golden NAME IMG
    local n=$1 img=$2 rc
    "$QEMU_IMG" info -f qcow2 --output=json "$img" >"$img.info.json"
    if jq -e 'has("backing-filename")' "$img.info.json" >/dev/null; then
        "$QEMU_IMG" info -f qcow2 --backing-chain --output=json "$img" >"$img.chain.json"
    fi
    "$QEMU_IMG" map -f qcow2 --output=json "$img" >"$img.map.json"
    rm -f "$RAW"
    "$QEMU_IMG" convert -f qcow2 -O raw "$img" "$RAW"
    md5sum <"$RAW" | cut -d' ' -f1 >"$img.md5"
    local s
    while read -r s; do
        [[ -n $s ]] || continue
        rm -f "$RAW"
        "$QEMU_IMG" convert -f qcow2 -O raw -l "snapshot.name=$s" "$img" "$RAW"
        md5sum <"$RAW" | cut -d' ' -f1 >"$img.$s.md5"
    done <"$META/$n.snapshots"
    rm -f "$RAW"
    set +e
    "$QEMU_IMG" check -f qcow2 --output=json "$img" >"$img.check.json" 2>/dev/null
    rc=$?
    "$QEMU_IMG" check -f qcow2 "$img" >"$img.check.txt" 2>&1
    set -e
    echo "$rc" >"$img.check.exit"
}

echo "== goldens" >&2
for n in "${ORDER[@]}"; do golden "$n" "$(<"$META/$n.image")"; done

for f in "${!SHA_BEFORE[@]}"; do
    [[ $(sha "$f") == "${SHA_BEFORE[$f]}" ]] || { echo "make-fixtures: $f changed while recording goldens" >&2; exit 1; }
done

# ---------------------------------------------------------------------------
# gzip large image files, write the manifest

declare -A GZ
for f in "${!SHA_BEFORE[@]}"; do
    if (($(stat -c %s "$f") > GZIP_OVER)); then
        gzip -n -9 "$f"
        GZ[$f]=1
        echo "== gzipped $f" >&2
    fi
done

entry_file() { if [[ -n ${GZ[$1]:-} ]]; then echo "$1.gz"; else echo "$1"; fi; }
file_json() {   # {file, image, gzip, size, sha256} of one committed file
    jq -n --arg file "$(entry_file "$1")" --arg image "$1" --argjson gz "$([[ -n ${GZ[$1]:-} ]] && echo true || echo false)" \
        --argjson size "$(if [[ -n ${GZ[$1]:-} ]]; then gzip -dc "$1.gz" | wc -c; else stat -c %s "$1"; fi)" \
        --arg sha "${SHA_BEFORE[$1]}" \
        '{file: $file, image: $image, gzip: $gz, size: $size, sha256: $sha}'
}

: >"$META/manifest.jsonl"
for n in "${ORDER[@]}"; do
    img=$(<"$META/$n.image")
    info="$img.info.json"
    # features: hand-written tags plus tags derived from qemu's own answers
    auto=$(jq -r --slurpfile chk "$img.check.json" --slurpfile map "$img.map.json" '
        [ (if .["format-specific"].data.compat == "0.10" then "v2" else "v3" end),
          "cluster-\(.["cluster-size"])",
          "refcount-\(.["format-specific"].data["refcount-bits"])",
          (if ($chk[0]["compressed-clusters"] // 0) > 0 then "compressed", "compressed-\(.["format-specific"].data["compression-type"] // "zlib")" else empty end),
          (if has("backing-filename") then "backing" else empty end),
          (if .["format-specific"].data["extended-l2"] then "extended-l2" else empty end),
          (if .["format-specific"].data["data-file"] then "data-file" else empty end),
          (if .["format-specific"].data["data-file-raw"] then "data-file-raw" else empty end),
          (if .["format-specific"].data["lazy-refcounts"] then "lazy-refcounts" else empty end),
          (if .["dirty-flag"] then "dirty" else empty end),
          (if (.["format-specific"].data.bitmaps // []) | length > 0 then "bitmap" else empty end),
          (if (.snapshots // []) | length > 0 then "snapshot" else empty end),
          (if any($map[0][]; .depth == 0 and .present and .zero) then "zero-clusters" else empty end)
        ] | .[]' "$info")
    features=$( { cat "$META/$n.tags"; echo "$auto"; [[ -n ${GZ[$img]:-} ]] && echo gzipped; true; } | grep -v '^$' | sort -u | jq -R . | jq -s .)
    reqs=$(while read -r r; do [[ -n $r ]] && file_json "$r"; done <"$META/$n.requires" | jq -s .)
    snaps=$(while read -r s; do [[ -n $s ]] && jq -n --arg s "$s" --arg f "$img.$s.md5" --arg m "$(<"$img.$s.md5")" '{name: $s, md5: $m, golden: $f}'; done <"$META/$n.snapshots" | jq -s .)
    cmds=$(jq -s . "$META/$n.cmds")
    chain=null
    [[ -f $img.chain.json ]] && chain=$(jq -n --arg c "$img.chain.json" '$c')
    file_json "$img" | jq \
        --arg name "$n" --arg desc "$(<"$META/$n.desc")" \
        --argjson vsize "$(jq '.["virtual-size"]' "$info")" \
        --argjson features "$features" --argjson requires "$reqs" --argjson snaps "$snaps" \
        --argjson commands "$cmds" --argjson chain "$chain" \
        --arg md5 "$(<"$img.md5")" --argjson checkExit "$(<"$img.check.exit")" \
        --arg info "$info" --arg map "$img.map.json" --arg md5f "$img.md5" \
        --arg check "$img.check.json" --arg checkExitF "$img.check.exit" --arg checkTxt "$img.check.txt" '
        {name: $name, file: .file, image: .image, gzip: .gzip, format: "qcow2",
         size: .size, sha256: .sha256, virtualSize: $vsize,
         description: $desc, features: $features, requires: $requires,
         commands: $commands, md5: $md5, checkExit: $checkExit, snapshots: $snaps,
         golden: {info: $info, chain: $chain, map: $map, md5: $md5f,
                  check: $check, checkExit: $checkExitF, checkText: $checkTxt}}' \
        >>"$META/manifest.jsonl"
done
jq -s . "$META/manifest.jsonl" >manifest.json

"$QEMU_IMG" --version | head -n1 >qemu-version.txt
printf '%s\n' '*.qcow2 binary' '*.raw binary' '*.data binary' '*.gz binary' \
    '*.json text eol=lf' '*.md5 text eol=lf' '*.exit text eol=lf' '*.txt text eol=lf' >.gitattributes

echo "== done: $(ls | wc -l) files, $(du -sb . | cut -f1) bytes in $OUT" >&2
