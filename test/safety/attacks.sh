#!/usr/bin/env bash
# The attacks of issue 9, as a user (or an adversary) would make them, against the real CLI with
# the real qemu-img/qemu-io: each line says what is tried and what must happen. Run by
# test/safety/attacks.test.ts (CI); by hand: bash test/safety/attacks.sh [WORKDIR].
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
IT=(node "$ROOT/bin/imgtool")
W="${1:-$(mktemp -d)}"
mkdir -p "$W"
cd "$W" || exit 1
pass=0
fail=0
ok() { pass=$((pass + 1)); echo "ok   - $1"; }
bad() { fail=$((fail + 1)); echo "FAIL - $1"; }
# expect CODE DESCRIPTION -- COMMAND...: the command exits CODE within 60 s
expect() {
  local want=$1 what=$2
  shift 3
  timeout 60 "$@" >out.txt 2>err.txt
  local got=$?
  if [ "$got" = "$want" ]; then ok "$what"; else bad "$what (exit $got, wanted $want: $(head -c 300 err.txt))"; fi
}
same() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1 ($2 != $3)"; fi; }
md5() { md5sum "$1" | cut -d' ' -f1; }

# 1. convert onto its own source, through a symlink, onto its backing file
qemu-img create -q -f qcow2 src.qcow2 8M && qemu-io -f qcow2 -c "write -P 7 0 4M" src.qcow2 >/dev/null
before=$(md5 src.qcow2)
expect 1 "convert -O qcow2 X X is refused" -- "${IT[@]}" convert -O qcow2 src.qcow2 src.qcow2
expect 1 "convert -O raw X X is refused" -- "${IT[@]}" convert -O raw src.qcow2 src.qcow2
ln -sf src.qcow2 link.qcow2
expect 1 "convert onto a symlink to the source is refused" -- "${IT[@]}" convert -O qcow2 src.qcow2 link.qcow2
same "the source is unchanged" "$before" "$(md5 src.qcow2)"
qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -f qcow2 -c "write -P 1 3M 64k" base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 && qemu-io -f qcow2 -c "write -P 7 512k 4k" top.qcow2 >/dev/null
bb=$(md5 base.qcow2)
expect 1 "convert of an overlay onto its backing file is refused" -- "${IT[@]}" convert -O qcow2 top.qcow2 base.qcow2
same "the backing file is unchanged" "$bb" "$(md5 base.qcow2)"
expect 1 "a bad -o value is refused" -- "${IT[@]}" convert -O qcow2 -o cluster_size=3 src.qcow2 new.qcow2
if [ ! -e new.qcow2 ]; then ok "and no target file was created"; else bad "a target file was created"; fi

# 2. a running qemu-io holds the image: imgtool must not write it, nor read it without -U
qemu-img create -q -f qcow2 -o cluster_size=4096 held.qcow2 16M && qemu-io -f qcow2 -c "write -P 1 0 64k" held.qcow2 >/dev/null
rm -f cmds && mkfifo cmds
qemu-io -f qcow2 held.qcow2 <cmds >/dev/null 2>&1 &
qio=$!
exec 7>cmds
echo "write -P 2 1M 64k" >&7
for _ in $(seq 1 100); do grep -q " 100 \| 101 " /proc/locks 2>/dev/null && break; sleep 0.1; done
sleep 0.5
hb=$(md5 held.qcow2)
expect 1 "snapshot -c under a running qemu-io is refused" -- "${IT[@]}" snapshot -c during held.qcow2
expect 1 "resize under a running qemu-io is refused" -- "${IT[@]}" resize held.qcow2 +1M
expect 1 "repair under a running qemu-io is refused" -- "${IT[@]}" repair held.qcow2
if grep -q 'lock' err.txt; then ok "and the message names the lock"; else bad "no lock in the message: $(cat err.txt)"; fi
expect 1 "info without -U under a writer is refused, as qemu-img info" -- "${IT[@]}" info held.qcow2
expect 0 "info -U under a writer works" -- "${IT[@]}" info -U held.qcow2
same "the held image is unchanged" "$hb" "$(md5 held.qcow2)"
echo quit >&7
exec 7>&-
wait $qio 2>/dev/null

# 3. FIFOs named as backing and data files: a one-line error, never a hang
rm -f fifo && mkfifo fifo
qemu-img create -q -f qcow2 -u -b fifo -F raw fb.qcow2 1M
expect 1 "info of an image whose backing file is a FIFO does not hang" -- "${IT[@]}" info --backing-chain fb.qcow2
expect 1 "cat of it does not hang" -- "${IT[@]}" cat fb.qcow2

# 4. a backing name with ':' is not opened relative to the current directory
mkdir -p cwd img && printf SECRET >'cwd/x:y'
qemu-img create -q -f qcow2 -u -b 'x:y' -F raw img/colon.qcow2 64
(cd cwd && timeout 60 "${IT[@]}" cat ../img/colon.qcow2 >../colon.out 2>../colon.err)
if grep -q SECRET colon.out; then bad "a ':' backing name was opened from the current directory"; else ok "a ':' backing name is not opened from the current directory"; fi

# 5. journals: never through a planted symlink, never clobbering a file, owner-only
qemu-img create -q -f qcow2 -o cluster_size=4096 j.qcow2 1M && qemu-io -f qcow2 -c "write -P 1 0 8k" j.qcow2 >/dev/null
python3 - <<'PY'
import struct
f = open('j.qcow2', 'r+b'); f.seek(48); rt = struct.unpack('>Q', f.read(8))[0]
f.seek(rt); rb = struct.unpack('>Q', f.read(8))[0]
f.seek(0, 2); size = f.tell(); f.truncate(size + 4096)   # one more cluster, counted but unused:
f.seek(rb + 2 * (size // 4096)); f.write(struct.pack('>H', 1))   # a leak, so repair has work to do
PY
ln -sf "$W/planted-target" j.qcow2.imgtool-undo
expect 0 "repair with a planted journal symlink still repairs" -- "${IT[@]}" repair j.qcow2
if [ ! -e planted-target ]; then ok "the planted symlink was not followed"; else bad "the planted symlink was followed"; fi
echo precious >mine.txt
expect 1 "repair --journal onto an existing file is refused" -- "${IT[@]}" repair --journal mine.txt j.qcow2
same "the existing file is intact" "precious" "$(cat mine.txt)"
journal=$(ls j.qcow2.imgtool-undo.* 2>/dev/null | head -1)
if [ -z "$journal" ]; then journal=$(grep -o 'written to [^ ]*' err.txt out.txt 2>/dev/null | head -1 | cut -d' ' -f3); fi
if [ -n "$journal" ] && [ "$(stat -c %a "$journal")" = "600" ]; then ok "the journal is owner-only"; else bad "journal mode: ${journal:-none} $(stat -c %a "$journal" 2>/dev/null)"; fi

# 6. dm-snapshot check on a non-store ends (exit 1), never loops
head -c 16 /dev/zero >zeros.img
expect 1 "check -f dmsnap of 16 zero bytes ends with exit 1" -- "${IT[@]}" check -f dmsnap zeros.img
expect 1 "check -f dmsnap of a qcow2 ends with exit 1" -- "${IT[@]}" check -f dmsnap src.qcow2

# 7. Ctrl-C typed in a real terminal during convert -p: exit 130, no target left
head -c 64M /dev/urandom >random.raw
env -u CI python3 "$ROOT/test/support/pty-run.py" 'converting' 240 -- "${IT[@]}" convert -p -c -O qcow2 random.raw cc.qcow2 >pty.json
code=$(python3 -c "import json; print(json.load(open('pty.json'))['code'])")
if [ "$code" = 130 ]; then ok "Ctrl-C in a pty stops convert -p (exit 130)"; else bad "Ctrl-C in a pty: exit $code"; fi
if [ ! -e cc.qcow2 ]; then ok "and the half-made target is gone"; else bad "the half-made target is left"; fi

echo "attacks: $pass passed, $fail failed"
[ "$fail" = 0 ]
