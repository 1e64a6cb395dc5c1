/** Damage library for COW stores: byte edits on a copy of a store, as poke_file does. */
const dv = (b: Uint8Array): DataView => new DataView(b.buffer, b.byteOffset, b.byteLength)

export interface StoreGeometry {
  chunkBytes: number
  perArea: number
}

export function geometry(cow: Uint8Array): StoreGeometry {
  const chunkBytes = dv(cow).getUint32(12, true) * 512
  return { chunkBytes, perArea: chunkBytes / 16 }
}

export type HeaderField = 'magic' | 'valid' | 'version' | 'chunkSize'
const FIELD_OFF: Record<HeaderField, number> = { magic: 0, valid: 4, version: 8, chunkSize: 12 }

export function setHeader(cow: Uint8Array, field: HeaderField, value: number): Uint8Array {
  const c = cow.slice()
  dv(c).setUint32(FIELD_OFF[field], value, true)
  return c
}

/** byte offset of record `index` (global table order) */
export function recordOffset(g: StoreGeometry, index: number): number {
  const area = Math.floor(index / g.perArea)
  const slot = index % g.perArea
  return (1 + area * (g.perArea + 1)) * g.chunkBytes + slot * 16
}

export function getRecord(cow: Uint8Array, index: number): [bigint, bigint] {
  const o = recordOffset(geometry(cow), index)
  return [dv(cow).getBigUint64(o, true), dv(cow).getBigUint64(o + 8, true)]
}

export function setRecord(cow: Uint8Array, index: number, old: bigint | number, neu: bigint | number): Uint8Array {
  const c = cow.slice()
  const o = recordOffset(geometry(c), index)
  dv(c).setBigUint64(o, BigInt(old), true)
  dv(c).setBigUint64(o + 8, BigInt(neu), true)
  return c
}

/** Remove record `index` by shifting the later ones down (what a hand edit would do): its chunk leaks. */
export function removeRecord(cow: Uint8Array, index: number, count: number): Uint8Array {
  let c: Uint8Array = cow.slice()
  for (let i = index; i < count - 1; i++) {
    const [o, n] = getRecord(c, i + 1)
    c = setRecord(c, i, o, n)
  }
  return setRecord(c, count - 1, 0, 0)
}

export function truncateTo(cow: Uint8Array, bytes: number): Uint8Array {
  return cow.slice(0, bytes)
}

export function pokeBytes(cow: Uint8Array, offset: number, bytes: number[]): Uint8Array {
  const c = cow.slice()
  c.set(bytes, offset)
  return c
}
