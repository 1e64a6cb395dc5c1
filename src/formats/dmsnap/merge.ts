/**
 * Merge (snapshot-merge): apply the exceptions to the origin from the end of the
 * table backwards, as persistent_prepare_merge/commit_merge do. Each step copies
 * the records of the last non-empty 512-byte sector of the current area into the
 * origin, flushes the origin, then zeroes those records and flushes the COW, so a
 * crash at any point leaves a valid store holding a prefix of the table, and
 * running the merge again resumes it. Finished: header unchanged, every area zero.
 */
import { CorruptImageError, ReadOnlyError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage } from '../../image/disk-image.js'
import { RECORD_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES, StoreLayout } from './constants.js'
import { decodeRecord, loadTable, readArea } from './exceptions.js'
import { headerProblem, readHeader } from './header.js'

export interface MergeOptions {
  onProgress?: (done: number, total: number) => void
}

export interface MergeResult {
  /** records applied to the origin */
  merged: number
  /** chunks written to the origin (a duplicate old chunk is written once per record) */
  chunksCopied: number
  chunkSize: number
}

/**
 * Merge the COW store `cow` into `origin` (which must be writable). The store must load
 * cleanly; records pointing outside the COW or beyond the origin are refused
 * (run check / repair first), as the kernel's merge would fail on them.
 */
export async function mergeStore(cow: BlockDevice, origin: DiskImage, options: MergeOptions = {}): Promise<MergeResult> {
  if (cow.readOnly) throw new ReadOnlyError(`dmsnap: ${cow.name}: open the COW read-write to merge`)
  if (origin.readOnly || !origin.write) throw new ReadOnlyError(`dmsnap: merge: origin ${origin.filename} is not open read-write`)
  const header = await readHeader(cow)
  const hp = headerProblem(header, cow.size)
  if (hp) throw new CorruptImageError(`dmsnap: ${cow.name}: cannot merge: header problem '${hp.kind}' (run check)`, { file: cow.name, structure: 'cow-header' })
  if (header.valid === 0)
    throw new CorruptImageError(`dmsnap: ${cow.name}: cannot merge an invalidated store (valid=0): its content is undefined`, {
      file: cow.name,
      structure: 'cow-header',
    })
  const layout = new StoreLayout(header.chunkSectors, cow.size)
  const table = await loadTable(cow, layout)
  if (table.truncatedArea !== undefined)
    throw new CorruptImageError(`dmsnap: ${cow.name}: cannot merge: area ${table.truncatedArea} lies beyond the end of the COW`, {
      file: cow.name,
      structure: 'cow-area',
    })
  const cb = layout.chunkBytes
  const originChunks = Math.ceil(origin.virtualSize / cb)
  for (const r of table.records) {
    if (r.new >= layout.cowChunks || layout.isMetadata(r.new) || r.rawNew >= 1n << 53n) {
      throw new CorruptImageError(
        `dmsnap: ${cow.name}: cannot merge: record ${r.index} points at COW chunk ${r.rawNew}, outside the data chunks (run check / repair -r all)`,
        { file: cow.name, structure: 'cow-area' },
      )
    }
    if (r.old >= originChunks) {
      throw new CorruptImageError(
        `dmsnap: ${cow.name}: cannot merge: record ${r.index} maps origin chunk ${r.rawOld}, beyond the origin (${originChunks} chunks)`,
        { file: cow.name, structure: 'cow-area' },
      )
    }
  }
  const total = table.records.length
  let area = table.currentArea
  let committed = table.currentCommitted
  let buf: Uint8Array = table.lastArea.slice()
  let merged = 0
  let copied = 0
  while (true) {
    if (committed === 0) {
      if (area === 0) break
      area--
      buf = await readArea(cow, layout, area)
      committed = layout.perArea
    }
    const first = Math.floor((committed - 1) / RECORDS_PER_SECTOR) * RECORDS_PER_SECTOR
    for (let slot = committed - 1; slot >= first; slot--) {
      const { rawOld, rawNew } = decodeRecord(buf, slot)
      const old = Number(rawOld)
      const n = Math.min(cb, origin.virtualSize - old * cb)
      const data = await cow.read(Number(rawNew) * cb, n, 'cow-data')
      await origin.write(old * cb, data)
      copied++
    }
    await origin.flush() // the origin holds the data before the records go
    buf.fill(0, first * RECORD_BYTES, committed * RECORD_BYTES)
    const sectorOff = first * RECORD_BYTES
    const base = layout.offset(layout.areaLocation(area))
    await cow.write(base + sectorOff, buf.slice(sectorOff, sectorOff + SECTOR_BYTES), 'cow-area')
    await cow.flush()
    merged += committed - first
    committed = first
    options.onProgress?.(merged, total)
  }
  // Anything after the terminator in the last area is zeroed too: the kernel leaves every area zero.
  return { merged, chunksCopied: copied, chunkSize: cb }
}

export function describeMerge(r: MergeResult): string {
  return `merged ${r.merged} exception(s), ${r.chunksCopied} chunk(s) of ${hex(r.chunkSize)} bytes copied`
}
