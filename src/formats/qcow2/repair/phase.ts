/**
 * qcow2 repair, what a phase is and the guard every phase passes before its
 * first write: no write may touch the header cluster except the one-sector
 * header updates (and those must keep the magic), and no write may land
 * further past the end of the file than the phase itself grows it (a new
 * structure is placed right after the last cluster of the file, or right after
 * a structure still referenced past it, never at an offset computed from a
 * damaged field).
 */
import { CorruptImageError, hex } from '../../../errors.js'
import type { RepairAction } from '../../../check/types.js'

/** A pending write: the new bytes of one region. */
export interface Write {
  offset: number
  data: Uint8Array
  tag: string
}

export interface Phase {
  writes: Write[]
  actions: RepairAction[]
  leaksFixed: number
  corruptionsFixed: number
  /** written after `writes` are durable (what points at the new bytes) */
  then?: Write[]
  /** bytes the phase leaves unwritten after the end of the file to step over a structure still referenced there */
  stepOver?: number
  /** the refcount structure must be rebuilt, not edited in place (its table is not where the header says) */
  rebuildRefcounts?: boolean
}

const MAGIC = [0x51, 0x46, 0x49, 0xfb]

/** Throws (before anything is written) when a write of the phase breaks the rules above. */
export function guardPhase(file: string, fileSize: number, clusterSize: number, writes: Write[], stepOver = 0): void {
  const grow = writes.reduce((n, w) => n + w.data.byteLength, 0) + stepOver
  const limit = Math.ceil(fileSize / clusterSize) * clusterSize + grow
  for (const w of writes) {
    const end = w.offset + w.data.byteLength
    if (!Number.isSafeInteger(w.offset) || w.offset < 0 || end > limit) {
      throw new CorruptImageError(
        `qcow2: ${file}: repair refused to write ${w.tag} at ${hex(w.offset)} (${hex(w.data.byteLength)} bytes): beyond what the repair adds to the file (size ${hex(fileSize)}); nothing written in this phase`,
        { file, structure: w.tag, offset: w.offset },
      )
    }
    if (w.offset < clusterSize) {
      // the bitmaps extension's count, size and directory offset: one write inside one sector, past the magic
      const bitmapsFields =
        w.tag === 'bitmaps-extension' && w.offset >= 8 && w.data.byteLength <= 24 && Math.floor(w.offset / 512) === Math.floor((end - 1) / 512)
      if (bitmapsFields) continue
      const headerSector = w.tag === 'header' && w.offset === 0 && w.data.byteLength <= 512 && MAGIC.every((b, i) => w.data[i] === b)
      if (!headerSector) {
        throw new CorruptImageError(
          `qcow2: ${file}: repair refused to write ${w.tag} at ${hex(w.offset)} (${hex(w.data.byteLength)} bytes): it lies in the header cluster; nothing written in this phase`,
          { file, structure: 'header', offset: w.offset },
        )
      }
    }
  }
}
