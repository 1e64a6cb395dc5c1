/**
 * Allocation and commit (persistent_prepare_exception / persistent_commit_exception):
 * data chunks are handed out sequentially skipping metadata areas; records are
 * committed strictly in allocation order (seed 000), after a flush that makes
 * their data durable (seed "flush before commit"); a full area is committed
 * only after the next area is zeroed on disk. Area writes are done one 512-byte
 * sector at a time with a flush after each, so a torn write can never leave
 * live-looking records after the terminator.
 */
import { ImageIoError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { RECORD_BYTES, RECORDS_PER_SECTOR, SECTOR_BYTES, type StoreLayout } from './constants.js'
import { encodeRecord, type LoadedTable } from './exceptions.js'
import { freshHeader, writeHeader } from './header.js'

export type OnFull = 'invalidate' | 'refuse'

export interface PendingException {
  old: number
  new: number
}

export class ExceptionStore {
  nextFree: number
  currentArea: number
  /** records committed in the current area */
  committed: number
  /** in-memory copy of the current area (records after `committed` are zero) */
  area: Uint8Array
  readonly pending: PendingException[] = []
  valid = true
  /** records committed by this writer (since it was made from the on-disk table) */
  committedTotal = 0

  constructor(
    readonly dev: BlockDevice,
    readonly layout: StoreLayout,
    table: Pick<LoadedTable, 'nextFree' | 'currentArea' | 'currentCommitted' | 'lastArea'>,
  ) {
    this.nextFree = table.nextFree
    this.currentArea = table.currentArea
    this.committed = table.currentCommitted
    // The kernel keeps the bytes after the terminator (and would resurrect them); we never do.
    this.area = new Uint8Array(layout.chunkBytes)
    this.area.set(table.lastArea.subarray(0, this.committed * RECORD_BYTES))
  }

  /** global table index of the next record to be allocated */
  private get nextIndex(): number {
    return this.currentArea * this.layout.perArea + this.committed + this.pending.length
  }

  /**
   * Can `n` more chunks be allocated? The kernel's room check, plus one rule the
   * kernel lacks: a record that fills an area needs the next area inside the COW
   * (otherwise the kernel invalidates the store when zeroing it, §3.2).
   */
  canAllocate(n: number): boolean {
    let next = this.nextFree
    let g = this.nextIndex
    for (let i = 0; i < n; i++, g++) {
      if ((next + 1) * this.layout.chunkSectors * SECTOR_BYTES > this.layout.cowBytes) return false
      const { area, slot } = this.layout.slotOf(g)
      if (slot === this.layout.perArea - 1 && !this.layout.fits(this.layout.areaLocation(area + 1))) return false
      next = this.layout.skipMetadata(next + 1)
    }
    return true
  }

  /** Hand out the next data chunk for `old`; the record is pending until commit(). */
  allocate(old: number): number {
    const neu = this.nextFree
    this.nextFree = this.layout.skipMetadata(neu + 1)
    this.pending.push({ old, new: neu })
    return neu
  }

  /** Forget pending allocations (after a failed write: nothing was committed for them). */
  dropPending(mark = 0): void {
    if (this.pending.length <= mark) return
    this.nextFree = this.pending[mark]!.new
    this.pending.length = mark
  }

  /** Make every pending record durable, in allocation order. */
  async commit(): Promise<void> {
    if (this.pending.length === 0) return
    await this.dev.flush() // the data of every pending record is durable before any record is
    const E = this.layout.perArea
    while (this.pending.length > 0) {
      const room = E - this.committed
      const batch = this.pending.slice(0, room)
      const first = this.committed
      for (const [i, p] of batch.entries()) encodeRecord(this.area, first + i, p.old, p.new)
      const last = first + batch.length - 1
      const fills = last === E - 1
      if (fills) {
        // zero the next area before the full one becomes durable
        const loc = this.layout.areaLocation(this.currentArea + 1)
        await this.dev.write(this.layout.offset(loc), new Uint8Array(this.layout.chunkBytes), 'cow-area')
        await this.dev.flush()
      }
      await this.writeAreaSlots(first, last)
      this.pending.splice(0, batch.length)
      this.committed += batch.length
      this.committedTotal += batch.length
      if (fills) {
        this.currentArea++
        this.committed = 0
        this.area = new Uint8Array(this.layout.chunkBytes)
      }
    }
  }

  /** Write the sectors of the current area holding slots first..last, in order, each flushed. */
  async writeAreaSlots(first: number, last: number): Promise<void> {
    const base = this.layout.offset(this.layout.areaLocation(this.currentArea))
    for (let s = Math.floor(first / RECORDS_PER_SECTOR); s <= Math.floor(last / RECORDS_PER_SECTOR); s++) {
      const off = s * SECTOR_BYTES
      await this.dev.write(base + off, this.area.slice(off, off + SECTOR_BYTES), 'cow-area')
      await this.dev.flush()
    }
  }

  /** Mark the store invalid the way persistent_drop_snapshot() does (header from its own buffer). */
  async invalidate(): Promise<void> {
    this.valid = false
    await writeHeader(this.dev, freshHeader(this.layout.chunkSectors, 0))
    await this.dev.flush()
  }

  noSpace(what: string): ImageIoError {
    return new ImageIoError(
      `dmsnap: ${this.dev.name}: COW store is full: ${what} (next free chunk ${this.nextFree}, COW holds ${this.layout.cowChunks} chunks of ${hex(this.layout.chunkBytes)} bytes)`,
      'ENOSPC',
      { file: this.dev.name, structure: 'cow-area' },
    )
  }
}
