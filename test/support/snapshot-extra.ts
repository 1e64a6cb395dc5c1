/**
 * Damage for amend tests: an image's snapshot table rewritten in place with
 * no extra data in its entries, as qemu before 1.x wrote v2 snapshots (qemu
 * 7.2 always writes the 24 v3 bytes, even in v2 images). The entries shrink,
 * so the table stays where it is; the bytes it no longer uses are zeroed.
 */
export function stripSnapshotExtraData(image: Uint8Array): Uint8Array {
  const out = new Uint8Array(image) // a copy (a Buffer would refuse a fill past its end)
  const dv = new DataView(out.buffer, out.byteOffset, out.byteLength)
  const count = dv.getUint32(60)
  const offset = Number(dv.getBigUint64(64))
  const entries: Uint8Array[] = []
  let pos = offset
  for (let i = 0; i < count; i++) {
    const idSize = dv.getUint16(pos + 12)
    const nameSize = dv.getUint16(pos + 14)
    const extraSize = dv.getUint32(pos + 36)
    const e = new Uint8Array(Math.ceil((40 + idSize + nameSize) / 8) * 8)
    e.set(out.subarray(pos, pos + 40))
    new DataView(e.buffer).setUint32(36, 0)
    e.set(out.subarray(pos + 40 + extraSize, pos + 40 + extraSize + idSize + nameSize), 40)
    entries.push(e)
    pos += Math.ceil((40 + extraSize + idSize + nameSize) / 8) * 8
  }
  out.fill(0, offset, Math.min(pos, out.byteLength))
  let at = offset
  for (const e of entries) {
    out.set(e, at)
    at += e.byteLength
  }
  return out
}
