/**
 * Encoding L2 entries in a working copy of a table (standard 8-byte entries
 * or extended 16-byte entries with their subcluster bitmap).
 */
import { putU32be, putU64be } from '../../util/bytes.js'
import { encodeL2Compressed, encodeL2Standard, readBitmap, type SubclusterBitmap } from './entries.js'

export const ALL_SUBCLUSTERS = 0xffffffff

export interface EntryWriter {
  entrySize: number
  extended: boolean
  clusterBits: number
}

export function setStandard(t: Uint8Array, ew: EntryWriter, index: number, e: { hostOffset: number; copied: boolean; zero?: boolean }): void {
  putU64be(t, index * ew.entrySize, encodeL2Standard(e))
}

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
