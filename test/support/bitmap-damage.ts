/** Damage to a qcow2 image's persistent bitmaps, on its bytes: the states QEMU refuses or leaves inconsistent. */

const EXT_BITMAPS = 0x23852875

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength)
}

/** Where the bitmaps extension's fields are (offset of nb_bitmaps) and the directory. */
export function bitmapsExtension(b: Uint8Array): { field: number; nb: number; dirSize: number; dirOffset: number } {
  const v = view(b)
  let pos = v.getUint32(100)
  for (;;) {
    const magic = v.getUint32(pos)
    const len = v.getUint32(pos + 4)
    if (magic === 0) throw new Error('no bitmaps extension')
    if (magic === EXT_BITMAPS) {
      return { field: pos + 8, nb: v.getUint32(pos + 8), dirSize: Number(v.getBigUint64(pos + 16)), dirOffset: Number(v.getBigUint64(pos + 24)) }
    }
    pos += 8 + Math.ceil(len / 8) * 8
  }
}

/** Offset of directory entry `i`. */
export function entryOffset(b: Uint8Array, i: number): number {
  const v = view(b)
  let p = bitmapsExtension(b).dirOffset
  for (let k = 0; k < i; k++) p += Math.ceil((24 + v.getUint16(p + 18) + v.getUint32(p + 20)) / 8) * 8
  return p
}

/** A copy of `b` with bitmap `i` flagged IN_USE (as a crash of QEMU leaves it). */
export function setInUse(b: Uint8Array, i: number): Uint8Array {
  const out = b.slice()
  const v = view(out)
  const p = entryOffset(out, i)
  v.setUint32(p + 12, v.getUint32(p + 12) | 1)
  return out
}

/** A copy with bitmap `i`'s first table entry pointing at an unaligned offset (check_table_entry fails). */
export function breakTableEntry(b: Uint8Array, i: number): Uint8Array {
  const out = b.slice()
  const v = view(out)
  const table = Number(v.getBigUint64(entryOffset(out, i)))
  v.setBigUint64(table, 0x1200n)
  return out
}

/** A copy with bitmap `i`'s granularity below the minimum (the entry breaks the constraints). */
export function breakGranularity(b: Uint8Array, i: number): Uint8Array {
  const out = b.slice()
  out[entryOffset(out, i) + 17] = 3
  return out
}

/** A copy with bitmap `i`'s table size set to 0 (the entry breaks the constraints). */
export function breakTableSize(b: Uint8Array, i: number): Uint8Array {
  const out = b.slice()
  view(out).setUint32(entryOffset(out, i) + 8, 0)
  return out
}

/** A copy whose extension gives a directory size that does not match its entries (the whole directory is broken). */
export function breakDirectorySize(b: Uint8Array): Uint8Array {
  const out = b.slice()
  const e = bitmapsExtension(out)
  view(out).setBigUint64(e.field + 8, BigInt(e.dirSize + 8))
  return out
}
