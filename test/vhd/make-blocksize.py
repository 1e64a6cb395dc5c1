#!/usr/bin/env python3
"""Make a dynamic VHD with any block size from a raw file, following the VHD
specification, independently of imgtool's code (qemu-img only makes 2 MiB
blocks). Footer (creator 'win ', sized by current_size), dynamic header at
512, BAT at 1536 padded to a sector, then one block per raw chunk that holds
a non-zero byte, in guest order: its sector bitmap (all ones, padded to
whole sectors as the specification says) and its data; the footer copy last.

usage: make-blocksize.py RAW OUT BLOCK_SIZE
"""
import struct
import sys
import uuid

raw_path, out_path, block_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = open(raw_path, 'rb').read()
size = len(raw)
assert size % 512 == 0


def checksum(b):
    return (~sum(b)) & 0xffffffff


def footer():
    f = bytearray(512)
    f[0:8] = b'conectix'
    struct.pack_into('>IIQI', f, 8, 2, 0x00010000, 512, 0)
    f[28:32] = b'win '
    struct.pack_into('>I', f, 32, 0x000a0000)
    f[36:40] = b'Wi2k'
    struct.pack_into('>QQ', f, 40, size, size)
    sectors = size // 512
    cyl = min(65535, sectors // (16 * 63))
    struct.pack_into('>HBBI', f, 56, cyl, 16, 63, 3)
    f[68:84] = uuid.UUID(int=block_size).bytes
    struct.pack_into('>I', f, 64, checksum(f))
    return bytes(f)


entries = (size + block_size - 1) // block_size
bat_bytes = (entries * 4 + 511) // 512 * 512
bitmap = ((block_size // 512 + 7) // 8 + 511) // 512 * 512
h = bytearray(1024)
h[0:8] = b'cxsparse'
struct.pack_into('>QQIII', h, 8, 0xffffffffffffffff, 1536, 0x00010000, entries, block_size)
struct.pack_into('>I', h, 36, checksum(h))
bat = bytearray(b'\xff' * bat_bytes)
out = bytearray(footer() + bytes(h))
out += b'\0' * (1536 - len(out))
body = bytearray()
pos = 1536 + bat_bytes
for i in range(entries):
    chunk = raw[i * block_size:(i + 1) * block_size]
    if chunk.count(0) == len(chunk):
        continue
    struct.pack_into('>I', bat, 4 * i, (pos + len(body)) // 512)
    body += b'\xff' * bitmap + chunk + b'\0' * (block_size - len(chunk))
out += bat + body + footer()
open(out_path, 'wb').write(out)
