/**
 * Writing refcounts: allocate and free clusters (reusing freed space), grow
 * refcount blocks (placed so that they describe themselves where possible)
 * and the refcount table (a new table written and flushed before the header
 * points at it).
 *
 * Durability contract (what callers rely on):
 * - `alloc*` only changes memory. `persist()` writes every changed refcount
 *   block; a brand-new block is written and flushed before the reftable entry
 *   that points at it. The caller flushes after `persist()` before it links a
 *   new cluster into an L2/L1 table (rule 1: refcount before mapping).
 * - Decrements must only be asked for once the unlink is durable (callers
 *   queue frees and apply them after a flush).
 * - Every structure has its own buffer: blocks are separate Uint8Arrays and
 *   every device write is given a copy, so no two on-disk structures are ever
 *   built in one shared scratch buffer (seed: dm-snapshot header race).
 */
import { CorruptImageError, ImgtoolError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { putU32be, putU64be } from '../../../util/bytes.js'
import { MAX_HOST_OFFSET, MAX_REFTABLE_BYTES } from '../spec/constants.js'
import type { Qcow2Header } from '../spec/header.js'
import { decodeReftableEntry } from '../read/refcount.js'
import { getRefcountEntry, maxRefcount, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'

export type MetadataKind = 'refblock' | 'reftable'

export interface RefcountWriterHooks {
  /** a cluster became a refcount block or table cluster (overlap guard) */
  onMetadata?(cluster: number, kind: MetadataKind | undefined): void
}

export class RefcountWriter {
  readonly clusterSize: number
  readonly perBlock: number
  readonly order: number
  private table: Uint8Array
  private tableDv: DataView
  private readonly blocks = new Map<number, Uint8Array>()
  private readonly dirtyBlocks = new Set<number>()
  /** reftable indices whose entry changed in memory and is not yet on disk */
  private readonly dirtyEntries = new Set<number>()
  /** blocks created in memory whose content has never been written */
  private readonly newBlocks = new Set<number>()
  /** refcount blocks created and table growths so far (callers compare it around an allocation) */
  structureChanges = 0
  /** clusters handed out but not yet counted (during an allocation) */
  private readonly reserved = new Reserved()
  /** first cluster that may be free */
  private freeHint = 0
  /** first cluster past every allocation and past the end of the file */
  private top: number
  /** defer ordering flushes (lazy refcounts: the image is dirty, open rebuilds) */
  lazy = false

  constructor(
    private readonly dev: BlockDevice,
    private readonly header: Qcow2Header,
    private readonly file: string,
    table: Uint8Array,
    private readonly hooks: RefcountWriterHooks = {},
  ) {
    this.clusterSize = header.clusterSize
    this.order = header.refcountOrder
    this.perBlock = refcountsPerBlock(header.clusterSize, header.refcountOrder)
    this.table = table
    this.tableDv = new DataView(table.buffer, table.byteOffset, table.byteLength)
    this.top = Math.ceil(dev.size / this.clusterSize)
  }

  static async load(dev: BlockDevice, h: Qcow2Header, file: string, hooks: RefcountWriterHooks = {}): Promise<RefcountWriter> {
    const table = await dev.read(h.refcountTableOffset, h.refcountTableClusters * h.clusterSize, 'reftable')
    const w = new RefcountWriter(dev, h, file, table, hooks)
    // the top must be past every refcounted cluster, even those beyond the end of the file
    for (let ti = w.tableEntries - 1; ti >= 0; ti--) {
      const off = w.blockOffset(ti)
      if (off === 0) continue
      w.top = Math.max(w.top, off / w.clusterSize + 1)
      const b = await w.block(ti)
      for (let i = w.perBlock - 1; i >= 0; i--) {
        if (getRefcountEntry(b, i, w.order) !== 0) {
          w.top = Math.max(w.top, ti * w.perBlock + i + 1)
          break
        }
      }
      break
    }
    return w
  }

  get tableEntries(): number {
    return this.table.byteLength / 8
  }

  /** Refcount blocks' and table's cluster indices (for the overlap guard). */
  async metadataClusters(): Promise<Array<[number, MetadataKind]>> {
    const out: Array<[number, MetadataKind]> = []
    const t0 = this.header.refcountTableOffset / this.clusterSize
    for (let i = 0; i < this.header.refcountTableClusters; i++) out.push([t0 + i, 'reftable'])
    for (let ti = 0; ti < this.tableEntries; ti++) {
      const off = this.blockOffset(ti)
      if (off !== 0) out.push([off / this.clusterSize, 'refblock'])
    }
    return out
  }

  blockOffset(ti: number): number {
    if (ti >= this.tableEntries) return 0
    const e = decodeReftableEntry(this.tableDv, ti * 8)
    return e.offset
  }

  private async block(ti: number): Promise<Uint8Array> {
    const off = this.blockOffset(ti)
    let b = this.blocks.get(off)
    if (!b) {
      if (off % this.clusterSize !== 0) {
        throw new CorruptImageError(`qcow2: ${this.file}: refcount block offset ${hex(off)} is not aligned (reftable index ${ti})`, {
          file: this.file,
          structure: 'reftable',
        })
      }
      b = await this.dev.read(off, this.clusterSize, 'refblock')
      this.blocks.set(off, b)
    }
    return b
  }

  async get(cluster: number): Promise<number> {
    const ti = Math.floor(cluster / this.perBlock)
    if (this.blockOffset(ti) === 0) return 0
    return getRefcountEntry(await this.block(ti), cluster % this.perBlock, this.order)
  }

  private async isFree(c: number): Promise<boolean> {
    if (this.reserved.has(c)) return false
    if (c >= this.top) return true
    return (await this.get(c)) === 0
  }

  /** Find `n` contiguous free clusters (not yet counted): the first fit from the hint, else the top. */
  private async find(n: number): Promise<number> {
    let c = this.freeHint
    let runStart = c
    let run = 0
    while (c < this.top) {
      if (await this.isFree(c)) {
        if (run === 0) runStart = c
        run++
        if (run === n) return runStart
      } else {
        run = 0
        if (c === this.freeHint) this.freeHint = c + 1
      }
      c++
    }
    // past the top everything is free (a free run just below it may continue there)
    if (run > 0) {
      let ok = true
      for (let i = this.top; i < runStart + n; i++) if (this.reserved.has(i)) ok = false
      if (ok) return runStart
    }
    return this.topFree()
  }

  private topFree(): number {
    let t = this.top
    t = Math.max(t, this.reserved.end())
    return t
  }

  /** Allocate `n` contiguous clusters (refcount 1 each, in memory). Returns the first cluster's byte offset. */
  async alloc(n: number): Promise<number> {
    if (n <= 0) throw new ImgtoolError('INTERNAL', `qcow2: allocation of ${n} clusters`)
    const start = await this.find(n)
    if ((start + n) * this.clusterSize > MAX_HOST_OFFSET) {
      throw new ImgtoolError(
        'NO_SPACE',
        `qcow2: ${this.file}: cannot allocate ${n} clusters at ${hex(start * this.clusterSize)}: beyond the largest host offset`,
      )
    }
    this.reserved.add(start, n)
    let done = 0
    try {
      // block by block: one lookup per refcount block, not per cluster
      while (done < n) {
        const c = start + done
        const ti = Math.floor(c / this.perBlock)
        if (this.blockOffset(ti) === 0) {
          await this.setCount(c, 1) // creates the block
          done++
          continue
        }
        const b = await this.block(ti)
        const end = Math.min(n, (ti + 1) * this.perBlock - start)
        setOnes(b, (start + done) % this.perBlock, (start + end - 1) % this.perBlock, this.order)
        this.dirtyBlocks.add(this.blockOffset(ti))
        done = end
      }
    } catch (e) {
      // take back the counts already made: nothing references these clusters
      for (let i = 0; i < done; i++) await this.setCount(start + i, 0).catch(() => undefined)
      if (start < this.freeHint) this.freeHint = start
      throw e
    } finally {
      this.reserved.delete(start, n)
    }
    this.top = Math.max(this.top, start + n)
    if (start === this.freeHint) this.freeHint = start + n
    return start * this.clusterSize
  }

  /** Add `delta` to the refcount of every cluster overlapping [offset, offset+length). */
  async update(offset: number, length: number, delta: number): Promise<void> {
    const first = Math.floor(offset / this.clusterSize)
    const last = Math.floor((offset + length - 1) / this.clusterSize)
    for (let c = first; c <= last; c++) {
      const v = (await this.get(c)) + delta
      if (v < 0) {
        throw new CorruptImageError(`qcow2: ${this.file}: refcount of cluster ${hex(c * this.clusterSize)} would drop below 0`, {
          file: this.file,
          structure: 'refblock',
          offset: c * this.clusterSize,
        })
      }
      if (v > maxRefcount(this.order)) {
        throw new ImgtoolError(
          'UNSUPPORTED',
          `qcow2: ${this.file}: refcount of cluster ${hex(c * this.clusterSize)} would exceed ${maxRefcount(this.order)} (refcount_bits ${2 ** this.order})`,
        )
      }
      await this.setCount(c, v)
      if (v === 0 && c < this.freeHint) this.freeHint = c
      if (v > 0) this.top = Math.max(this.top, c + 1)
    }
  }

  /** Set a refcount, creating the refcount block (and growing the table) when needed. */
  private async setCount(c: number, v: number): Promise<void> {
    const ti = Math.floor(c / this.perBlock)
    if (this.blockOffset(ti) === 0) {
      if (v === 0) return
      await this.createBlock(ti)
    }
    const b = await this.block(ti)
    setRefcountEntry(b, c % this.perBlock, this.order, v)
    this.dirtyBlocks.add(this.blockOffset(ti))
  }

  /**
   * Create the refcount block of table index `ti` (inside the table) at free cluster `at`, a
   * cluster it describes itself: for callers that place blocks as qemu does.
   */
  async createBlockAt(ti: number, at: number): Promise<void> {
    if (ti >= this.tableEntries || this.blockOffset(ti) !== 0 || Math.floor(at / this.perBlock) !== ti || !(await this.isFree(at))) {
      throw new ImgtoolError('INTERNAL', `qcow2: ${this.file}: refcount block ${ti} cannot be placed at ${hex(at * this.clusterSize)}`)
    }
    await this.createBlock(ti, at)
  }

  private async createBlock(ti: number, at?: number): Promise<void> {
    if (ti >= this.tableEntries) await this.growTable(ti)
    if (this.blockOffset(ti) !== 0) return
    this.structureChanges++
    const b = at ?? (await this.find(1))
    this.reserved.add(b, 1)
    try {
      const blk = new Uint8Array(this.clusterSize)
      if (Math.floor(b / this.perBlock) === ti) {
        // the block describes itself
        setRefcountEntry(blk, b % this.perBlock, this.order, 1)
      } else {
        await this.setCount(b, 1)
      }
      const off = b * this.clusterSize
      this.blocks.set(off, blk)
      this.setTableEntry(ti, off)
      this.newBlocks.add(off)
      this.dirtyBlocks.add(off)
      this.dirtyEntries.add(ti)
      this.top = Math.max(this.top, b + 1)
      this.hooks.onMetadata?.(b, 'refblock')
    } finally {
      this.reserved.delete(b, 1)
    }
  }

  private setTableEntry(ti: number, off: number): void {
    putU64be(this.table, ti * 8, off)
  }

  /**
   * A larger refcount table at the top of the file, with the refcount blocks
   * that describe it and themselves. Written and flushed, then the header is
   * switched (one 12-byte write in the first sector), flushed, and only then
   * is the old table freed.
   */
  private async growTable(needIndex: number): Promise<void> {
    this.structureChanges++
    await this.persist() // existing state first, so the new table copies what is on disk
    const cs = this.clusterSize
    const pb = this.perBlock
    const start = this.topFree()
    let entries = Math.max(needIndex + 1, Math.ceil((this.tableEntries * 3) / 2))
    let tableClusters = 0
    let newBlockTis: number[] = []
    for (;;) {
      tableClusters = Math.ceil((entries * 8) / cs)
      const end = start + tableClusters + newBlockTis.length
      const need: number[] = []
      for (let ti = Math.floor(start / pb); ti <= Math.floor((end - 1) / pb); ti++) if (this.blockOffset(ti) === 0) need.push(ti)
      const maxTi = Math.max(needIndex, ...need)
      if (need.length === newBlockTis.length && maxTi < entries) {
        newBlockTis = need
        break
      }
      newBlockTis = need
      entries = Math.max(entries, maxTi + 1)
    }
    const bytes = tableClusters * cs
    if (bytes > MAX_REFTABLE_BYTES) {
      throw new ImgtoolError('NO_SPACE', `qcow2: ${this.file}: the refcount table would exceed 8 MiB (${tableClusters} clusters)`)
    }
    const table = new Uint8Array(bytes)
    table.set(this.table)
    const tableDv = new DataView(table.buffer)
    const newBlocks: Array<{ cluster: number; ti: number; data: Uint8Array }> = newBlockTis.map((ti, i) => ({
      cluster: start + tableClusters + i,
      ti,
      data: new Uint8Array(cs),
    }))
    for (const nb of newBlocks) putU64be(table, nb.ti * 8, nb.cluster * cs)
    // count the table and the new blocks: in the new blocks, or in existing ones
    const counted = start + tableClusters + newBlocks.length
    const touched = new Set<number>()
    const changedInExisting: Array<{ blk: Uint8Array; index: number; off: number }> = []
    for (let c = start; c < counted; c++) {
      const ti = Math.floor(c / pb)
      const nb = newBlocks.find((x) => x.ti === ti)
      if (nb) {
        setRefcountEntry(nb.data, c % pb, this.order, 1)
      } else {
        const blk = await this.block(ti)
        setRefcountEntry(blk, c % pb, this.order, 1)
        touched.add(this.blockOffset(ti))
        changedInExisting.push({ blk, index: c % pb, off: this.blockOffset(ti) })
      }
    }
    let switched = false
    try {
      for (const nb of newBlocks) await this.dev.write(nb.cluster * cs, nb.data.slice(), 'refblock')
      for (const off of touched) await this.dev.write(off, this.blocks.get(off)!.slice(), 'refblock')
      await this.dev.write(start * cs, table.slice(), 'reftable')
      await this.dev.flush()
      const hdr = new Uint8Array(12)
      putU64be(hdr, 0, start * cs)
      putU32be(hdr, 8, tableClusters)
      await this.dev.write(48, hdr, 'header')
      switched = true
      await this.dev.flush()
    } catch (e) {
      if (!switched) {
        // nothing points at the new structures: take back the counts made for them
        for (const ch of changedInExisting) {
          setRefcountEntry(ch.blk, ch.index, this.order, 0)
          this.dirtyBlocks.add(ch.off)
        }
        throw e
      }
      // the header reached the device: the new table is in charge; the old one is freed after a good flush
      this.installGrownTable(start, tableClusters, table, tableDv, newBlocks, counted)
      throw e
    }
    this.installGrownTable(start, tableClusters, table, tableDv, newBlocks, counted)
    await this.applyDeferredFrees()
  }

  /** Frees waiting for a successful flush (the old reftable after a flush failure). */
  readonly deferredFrees: Array<{ offset: number; length: number }> = []

  private installGrownTable(
    start: number,
    tableClusters: number,
    table: Uint8Array,
    tableDv: DataView,
    newBlocks: Array<{ cluster: number; ti: number; data: Uint8Array }>,
    counted: number,
  ): void {
    const cs = this.clusterSize
    const oldOffset = this.header.refcountTableOffset
    const oldClusters = this.header.refcountTableClusters
    this.header.refcountTableOffset = start * cs
    this.header.refcountTableClusters = tableClusters
    this.table = table
    this.tableDv = tableDv
    for (const nb of newBlocks) {
      this.blocks.set(nb.cluster * cs, nb.data)
      this.hooks.onMetadata?.(nb.cluster, 'refblock')
    }
    for (let c = start; c < start + tableClusters; c++) this.hooks.onMetadata?.(c, 'reftable')
    this.top = Math.max(this.top, counted)
    for (let i = 0; i < oldClusters; i++) this.hooks.onMetadata?.(oldOffset / cs + i, undefined)
    // the old table is unreferenced once the header switch is durable
    this.deferredFrees.push({ offset: oldOffset, length: oldClusters * cs })
  }

  /** Apply frees that waited for a durable flush (call after a successful flush). */
  async applyDeferredFrees(): Promise<void> {
    while (this.deferredFrees.length > 0) {
      const f = this.deferredFrees.shift()!
      await this.update(f.offset, f.length, -1)
    }
  }

  /** True when memory holds refcount changes not yet written. */
  get dirty(): boolean {
    return this.dirtyBlocks.size > 0 || this.dirtyEntries.size > 0
  }

  /**
   * Write changed refcount blocks. New blocks are made durable before the
   * reftable entries that point at them. Does not flush at the end: the
   * caller flushes before it links (unless refcounts are lazy).
   */
  async persist(): Promise<void> {
    if (!this.dirty) return
    const cs = this.clusterSize
    if (this.newBlocks.size > 0) {
      for (const off of [...this.newBlocks].sort((a, b) => a - b)) {
        await this.dev.write(off, this.blocks.get(off)!.slice(), 'refblock')
        this.dirtyBlocks.delete(off)
        this.newBlocks.delete(off)
      }
      if (!this.lazy) await this.dev.flush()
    }
    for (const off of [...this.dirtyBlocks].sort((a, b) => a - b)) {
      await this.dev.write(off, this.blocks.get(off)!.slice(), 'refblock')
      this.dirtyBlocks.delete(off)
    }
    // An entry may only become durable once the block holding its block's own
    // refcount is reachable: write entries in dependency order, flushing between rounds.
    let first = true
    while (this.dirtyEntries.size > 0) {
      const pending = new Set(this.dirtyEntries)
      const ready = [...pending].filter((ti) => {
        const home = Math.floor(this.blockOffset(ti) / cs / this.perBlock)
        return home === ti || !pending.has(home)
      })
      if (ready.length === 0) ready.push(...pending) // cannot happen: homes form no cycle
      if (!first && !this.lazy) await this.dev.flush()
      first = false
      for (const ti of ready.sort((a, b) => a - b)) {
        await this.dev.write(this.header.refcountTableOffset + ti * 8, this.table.slice(ti * 8, ti * 8 + 8), 'reftable')
        this.dirtyEntries.delete(ti)
      }
    }
  }
}

/** Set entries [first, last] of a block to 1 (fresh allocations): the hot loop of large allocations. */
function setOnes(b: Uint8Array, first: number, last: number, order: number): void {
  if (order === 4) {
    for (let i = first; i <= last; i++) {
      b[i * 2] = 0
      b[i * 2 + 1] = 1
    }
  } else if (order === 3) {
    b.fill(1, first, last + 1)
  } else {
    for (let i = first; i <= last; i++) setRefcountEntry(b, i, order, 1)
  }
}

/** Clusters handed out but not yet counted: a few ranges (nested allocations), not one entry per cluster. */
class Reserved {
  private readonly ranges: Array<[number, number]> = []
  add(start: number, n: number): void {
    this.ranges.push([start, start + n])
  }
  delete(start: number, n: number): void {
    const i = this.ranges.findIndex(([a, b]) => a === start && b === start + n)
    if (i >= 0) this.ranges.splice(i, 1)
  }
  has(c: number): boolean {
    for (const [a, b] of this.ranges) if (c >= a && c < b) return true
    return false
  }
  /** first cluster past every reserved range */
  end(): number {
    let e = 0
    for (const [, b] of this.ranges) e = Math.max(e, b)
    return e
  }
}
