/**
 * Metadata areas and the exception table, loaded exactly as the kernel's
 * read_exceptions() does: areas 0, 1, … until the first record with
 * new_chunk 0; no validation of the records themselves.
 */
import type { BlockDevice } from '../../io/block-device.js'
import { putU64le, view } from '../../util/bytes.js'
import { RECORD_BYTES, type StoreLayout } from './constants.js'

/** One on-disk record, decoded once. Values above 2^53 keep their exact bits in `rawOld`/`rawNew`. */
export interface ExceptionRecord {
  /** global index in table order */
  index: number
  area: number
  slot: number
  old: number
  new: number
  rawOld: bigint
  rawNew: bigint
}

export interface LoadedTable {
  records: ExceptionRecord[]
  /** max(new_chunk)+1 (at least 2), nudged past a metadata chunk */
  nextFree: number
  /** the same, exactly (new_chunk is a u64: nextFree is rounded above 2^53) */
  nextFreeRaw: bigint
  /** the area holding the terminator */
  currentArea: number
  /** records in the current area (= slot of the terminator) */
  currentCommitted: number
  /** the bytes of the current area as read (including anything after the terminator) */
  lastArea: Uint8Array
  /** set when an area that had to be read lies (partly) beyond the end of the COW: the kernel fails with EIO */
  truncatedArea?: number
}

export function decodeRecord(buf: Uint8Array, slot: number): { rawOld: bigint; rawNew: bigint } {
  const dv = view(buf)
  return { rawOld: dv.getBigUint64(slot * RECORD_BYTES, true), rawNew: dv.getBigUint64(slot * RECORD_BYTES + 8, true) }
}

export function encodeRecord(buf: Uint8Array, slot: number, old: number, neu: number): void {
  putU64le(buf, slot * RECORD_BYTES, old)
  putU64le(buf, slot * RECORD_BYTES + 8, neu)
}

export async function readArea(dev: BlockDevice, layout: StoreLayout, area: number): Promise<Uint8Array> {
  return dev.read(layout.offset(layout.areaLocation(area)), layout.chunkBytes, 'cow-area')
}

/** The area chunk is wholly inside the COW device (the kernel reads whole chunks). */
export function areaReadable(layout: StoreLayout, area: number): boolean {
  return layout.fits(layout.areaLocation(area))
}

export async function loadTable(dev: BlockDevice, layout: StoreLayout): Promise<LoadedTable> {
  const records: ExceptionRecord[] = []
  let nextFree = 2
  let nextFreeRaw = 2n
  // every area read lies inside the COW, so the loop ends by the area past its last chunk
  for (let area = 0; area <= layout.cowChunks; area++) {
    if (!areaReadable(layout, area)) {
      return { records, nextFree, nextFreeRaw, currentArea: area, currentCommitted: 0, lastArea: new Uint8Array(layout.chunkBytes), truncatedArea: area }
    }
    const buf = await readArea(dev, layout, area)
    for (let slot = 0; slot < layout.perArea; slot++) {
      const { rawOld, rawNew } = decodeRecord(buf, slot)
      if (rawNew === 0n) {
        const skipped = layout.skipMetadata(nextFree)
        return { records, nextFree: skipped, nextFreeRaw: nextFreeRaw + BigInt(skipped - nextFree), currentArea: area, currentCommitted: slot, lastArea: buf }
      }
      const neu = Number(rawNew)
      if (neu + 1 > nextFree) nextFree = neu + 1
      if (rawNew + 1n > nextFreeRaw) nextFreeRaw = rawNew + 1n
      records.push({ index: records.length, area, slot, old: Number(rawOld), new: neu, rawOld, rawNew })
    }
  }
  throw new RangeError(`dmsnap: ${dev.name}: more areas than the COW has chunks`) // unreachable: areaReadable fails first
}

/** Status numbers as `dmsetup status` prints them for this store. */
export interface StatusNumbers {
  sectorsAllocated: number
  totalSectors: number
  metadataSectors: number
}

export function statusNumbers(layout: StoreLayout, t: Pick<LoadedTable, 'nextFree' | 'currentArea'>): StatusNumbers {
  return {
    sectorsAllocated: t.nextFree * layout.chunkSectors,
    totalSectors: Math.floor(layout.cowBytes / 512),
    metadataSectors: (t.currentArea + 2) * layout.chunkSectors,
  }
}

/** old_chunk → new_chunk, the first record in table order winning (as the kernel's lookup does). */
export function buildLookup(records: readonly ExceptionRecord[]): Map<number, number> {
  const m = new Map<number, number>()
  for (const r of records) if (!m.has(r.old)) m.set(r.old, r.new)
  return m
}
