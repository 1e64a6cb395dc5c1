/**
 * Encoding L2 entries in a working copy of a table (standard 8-byte entries
 * or extended 16-byte entries with their subcluster bitmap).
 */
import { putU32be, putU64be } from '../../../util/bytes.js'
import { encodeL2Compressed, readBitmap, type SubclusterBitmap } from './entries.js'

export const ALL_SUBCLUSTERS = 0xffffffff

export interface EntryWriter {
  entrySize: number
  extended: boolean
  clusterBits: number
}

/** encodeL2Standard without a BigInt: this runs once per cluster of every write. */
export function setStandard(t: Uint8Array, ew: EntryWriter, index: number, e: { hostOffset: number; copied: boolean; zero?: boolean }): void {
  const o = index * ew.entrySize
  const hi = (Math.floor(e.hostOffset / TWO32) | (e.copied ? 0x80000000 : 0)) >>> 0
  const lo = ((e.hostOffset % TWO32) | (e.zero ? 1 : 0)) >>> 0
  t[o] = hi >>> 24
  t[o + 1] = (hi >>> 16) & 0xff
  t[o + 2] = (hi >>> 8) & 0xff
  t[o + 3] = hi & 0xff
  t[o + 4] = lo >>> 24
  t[o + 5] = (lo >>> 16) & 0xff
  t[o + 6] = (lo >>> 8) & 0xff
  t[o + 7] = lo & 0xff
}

const TWO32 = 0x1_0000_0000

export function setCompressed(t: Uint8Array, ew: EntryWriter, index: number, hostOffset: number, size: number): void {
  putU64be(t, index * ew.entrySize, encodeL2Compressed(hostOffset, size, ew.clusterBits))
  if (ew.extended) setBitmap(t, index, { alloc: 0, zero: 0 })
}

export function getBitmap(t: Uint8Array, index: number): SubclusterBitmap {
  return readBitmap(new DataView(t.buffer, t.byteOffset, t.byteLength), index * 16)
}

export function setBitmap(t: Uint8Array, index: number, bm: SubclusterBitmap): void {
  putU32be(t, index * 16 + 8, bm.zero >>> 0)
  putU32be(t, index * 16 + 12, bm.alloc >>> 0)
}

/** Mask of subclusters [first, last] (inclusive). */
export function subclusterMask(first: number, last: number): number {
  let m = 0
  for (let i = first; i <= last; i++) m |= 1 << i
  return m >>> 0
}
