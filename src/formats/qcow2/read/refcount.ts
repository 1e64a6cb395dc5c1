/**
 * Reading refcounts: the refcount table (loaded once, at most 8 MiB) and
 * refcount blocks through a small cache. Writers update through the same
 * object so the cache never goes stale.
 */
import { CorruptImageError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { Lru } from '../../../util/lru.js'
import type { Qcow2Header } from '../spec/header.js'
import { getRefcountEntry, refcountsPerBlock } from '../spec/refcount-codec.js'

export interface ReftableEntry {
  offset: number
  reservedBits: boolean
}

export function decodeReftableEntry(dv: DataView, byteOffset: number): ReftableEntry {
  const hi = dv.getUint32(byteOffset, false)
  const lo = dv.getUint32(byteOffset + 4, false)
  return { offset: hi * 0x1_0000_0000 + ((lo & 0xfffffe00) >>> 0), reservedBits: (lo & 0x1ff) !== 0 }
}

export class RefcountReader {
  private table: Uint8Array | undefined
  private readonly blocks = new Lru<number, Uint8Array>(64)
  readonly perBlock: number

  constructor(
    private readonly dev: BlockDevice,
    private readonly header: Qcow2Header,
    private readonly file: string,
  ) {
    this.perBlock = refcountsPerBlock(header.clusterSize, header.refcountOrder)
  }

  get tableEntries(): number {
    return (this.header.refcountTableClusters * this.header.clusterSize) / 8
  }

  async loadTable(): Promise<Uint8Array> {
    if (!this.table) {
      this.table = await this.dev.read(this.header.refcountTableOffset, this.header.refcountTableClusters * this.header.clusterSize, 'reftable')
    }
    return this.table
  }

  async reftableEntry(index: number): Promise<ReftableEntry> {
    const t = await this.loadTable()
    if (index >= this.tableEntries) return { offset: 0, reservedBits: false }
    return decodeReftableEntry(new DataView(t.buffer, t.byteOffset, t.byteLength), index * 8)
  }

  async block(offset: number): Promise<Uint8Array> {
    let b = this.blocks.get(offset)
    if (!b) {
      b = await this.dev.read(offset, this.header.clusterSize, 'refblock')
      this.blocks.set(offset, b)
    }
    return b
  }

  /** Refcount of host cluster `cluster`; 0 where no refcount block exists. */
  async get(cluster: number): Promise<number> {
    const b = await this.blockOf(Math.floor(cluster / this.perBlock))
    return b ? getRefcountEntry(b, cluster % this.perBlock, this.header.refcountOrder) : 0
  }

  /**
   * How many of the host clusters [0, end) have a non-zero refcount, counted in order and no further
   * than `limit`: the answer and the error (if any) of calling get() on each cluster in turn, with one
   * await per refcount block instead of three per cluster (16 384 clusters per GiB of 64 KiB clusters).
   */
  async countReferenced(end: number, limit: number): Promise<number> {
    const order = this.header.refcountOrder
    let count = 0
    for (let i = 0; i < end && count < limit;) {
      const ti = Math.floor(i / this.perBlock)
      const blockEnd = Math.min(end, (ti + 1) * this.perBlock)
      const b = await this.blockOf(ti)
      if (!b) {
        i = blockEnd
        continue
      }
      for (let k = i % this.perBlock; i < blockEnd && count < limit; i++, k++) if (getRefcountEntry(b, k, order) !== 0) count++
    }
    return count
  }

  /** The refcount block of refcount table index `ti`; undefined where there is none. */
  private async blockOf(ti: number): Promise<Uint8Array | undefined> {
    const e = await this.reftableEntry(ti)
    if (e.offset === 0) return undefined
    if (e.offset % this.header.clusterSize !== 0) {
      throw new CorruptImageError(
        `qcow2: ${this.file}: refcount block offset ${hex(e.offset)} is not aligned to cluster size ${hex(this.header.clusterSize)} (refcount table index ${ti})`,
        { file: this.file, structure: 'reftable', offset: this.header.refcountTableOffset + ti * 8 },
      )
    }
    return this.block(e.offset)
  }

  /** Drop cached state (after a writer replaced the table or blocks). */
  invalidate(): void {
    this.table = undefined
    this.blocks.clear()
  }
}
