#!/usr/bin/env python3
"""Make a differencing VHD (type 4) over a parent qemu-img made.

qemu-img cannot create differencing disks, so this script turns a dynamic
disk qemu-img made (CHILD, same size as the parent) into one, following the
VHD specification, independently of imgtool's code:

  - footer type 4 (both copies), dynamic header parent UUID = the parent's
    footer UUID, parent name (UTF-16BE) and one W2ru locator (UTF-16LE
    relative path) whose data sits in a sector after the BAT;
  - block 1 mapped, its sector bitmap marking only the first 4 sectors
    (2 KiB of the 4 KiB of 0x22) as the child's; the rest holds 0x22 or 0x99, which a
    reader must not show (those sectors come from the parent).

usage: make-differencing.py PARENT CHILD PARENT_NAME
"""
import struct
import sys

parent_path, child_path, parent_name = sys.argv[1:4]


def checksum(buf, at):
    b = bytearray(buf)
    b[at:at + 4] = b'\0\0\0\0'
    return (~sum(b)) & 0xffffffff


parent = open(parent_path, 'rb').read(512)
child = bytearray(open(child_path, 'rb').read())
footer = bytearray(child[0:512])
header = bytearray(child[512:1536])
block_size = struct.unpack('>I', header[32:36])[0]
entries = struct.unpack('>I', header[28:32])[0]
bat_off = struct.unpack('>Q', header[16:24])[0]
bat_bytes = (entries * 4 + 511) // 512 * 512
loc_off = bat_off + bat_bytes
block_off = loc_off + 512

footer[60:64] = struct.pack('>I', 4)
footer[64:68] = struct.pack('>I', checksum(footer, 64))

header[40:56] = parent[68:84]
name16 = parent_name.encode('utf-16-be')
header[64:576] = (name16 + b'\0' * 512)[:512]
rel = ('.\\' + parent_name).encode('utf-16-le')
header[576:600] = b'W2ru' + struct.pack('>III', 1, len(rel), 0) + struct.pack('>Q', loc_off)
header[36:40] = struct.pack('>I', checksum(header, 36))

bitmap_size = (block_size // 512 // 8 + 511) // 512 * 512
out = bytearray(block_off + bitmap_size + block_size + 512)
out[0:512] = footer
out[512:1536] = header
bat = bytearray(b'\xff' * bat_bytes)
bat[4:8] = struct.pack('>I', block_off // 512)
out[bat_off:bat_off + bat_bytes] = bat
out[loc_off:loc_off + len(rel)] = rel
bitmap = bytearray(bitmap_size)
bitmap[0] = 0xf0  # sectors 0..3 only: most significant bit first
out[block_off:block_off + bitmap_size] = bitmap
data = block_off + bitmap_size
out[data:data + block_size] = b'\x99' * block_size
out[data:data + 4096] = b'\x22' * 4096
out[-512:] = footer
open(child_path, 'wb').write(out)
