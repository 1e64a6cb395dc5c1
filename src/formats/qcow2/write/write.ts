/**
 * Guest writes on a qcow2 image: any offset and length, copy-on-write from
 * the old cluster or the backing file, L2 table allocation (and COW of shared
 * tables), zero writes (v3 zero flag, discard), subcluster writes for extended
 * L2, compressed cluster writes.
 *
 * This module: the writer object (attach, public operations, transactions,
 * allocation and the overlap guard). A request is planned in write-plan.ts
 * (copy-on-write, partial clusters) and committed in write-commit.ts (the
 * ordering protocol: refcounts, data, links, frees; undo after a failure).
 * Every operation runs under the image's mutex.
 */
import { CorruptImageError, ImgtoolError, ReadOnlyError, UnsupportedFeatureError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { checkGuestRange } from '../../../image/range.js'
import { putU64be } from '../../../util/bytes.js'
import { decodeL2, type L2Entry } from '../spec/entries.js'
import { hasDataFile, hasExtendedL2, hasLazyRefcounts, isDirty, l2EntrySize, type Qcow2Header } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { EntryWriter } from '../spec/l2-meta.js'
import { Mutex } from '../read/mutex.js'
import { OverlapGuard } from './overlap.js'
import { RefcountWriter } from './refcount-writer.js'
import { SUBCLUSTERS_PER_CLUSTER, INCOMPAT_CORRUPT } from '../spec/constants.js'
import { markDirtyBit, rebuildRefcounts, walkMetadata } from './dirty.js'
import { writeZeroesLocked } from './zeroes.js'
import { writeCompressedLocked } from './compressed.js'
import { WritePipeline } from './pipeline.js'
import type { Range, TableWork, WriterCore } from './core.js'

export interface WriteZeroesOptions {
  /** free whole clusters instead of keeping them allocated as zero (qemu's MAY_UNMAP) */
  discard?: boolean
}

/**
 * The image's persistent dirty bitmaps as the writer drives them: loaded at
 * attach (ops/bitmap-write.ts implements it; the façade passes the loader),
 * told of every guest change, stored on close.
 */
export interface PersistentBitmapHook {
  /** every cluster holding bitmap metadata, for the overlap guard */
  guardRanges(): Iterable<Range & { kind: 'bitmap-directory' | 'bitmap-table' | 'bitmap-data' }>
  /** set IN_USE on every consistent bitmap, durably (attach, before any guest write) */
  markInUse(w: Qcow2Writer): Promise<void>
  /** guest bytes [offset, offset+length) changed */
  note(offset: number, length: number): void
  /** store the bitmaps (close) */
  store(w: Qcow2Writer): Promise<void>
  /** refuse a resize QEMU refuses */
  checkResizable(): void
  /** refuse a snapshot apply QEMU refuses */
  checkSnapshotApply(name: string): void
}

/** Loads the image's persistent bitmaps at attach; undefined when it has none. */
export type BitmapLoader = (state: Qcow2State) => Promise<PersistentBitmapHook | undefined>

export class Qcow2Writer implements WriterCore {
  readonly mutex = new Mutex()
  /** guest writes: data writes of consecutive requests in flight together (write-pipeline.ts) */
  private readonly pipeline = new WritePipeline(this)
  readonly guard: OverlapGuard
  readonly header: Qcow2Header
  readonly clusterSize: number
  readonly entryWriter: EntryWriter
  readonly subclusterSize: number
  private closed = false
  private corrupt = false
  private broken = false
  private dirtyMarked: boolean
  /** @internal byte cursor for packing compressed clusters (write-compressed.ts) */
  compressedCursor = 0
  /** messages for the user (e.g. "refcounts rebuilt") */
  readonly notices: string[] = []
  /** the image's persistent dirty bitmaps (bitmap-write.ts); undefined when it has none */
  bitmaps: PersistentBitmapHook | undefined

  /** the image's refcounts (replaced only by `replaceRefcounts`) */
  private refcountWriter: RefcountWriter

  get refcounts(): RefcountWriter {
    return this.refcountWriter
  }

  /**
   * After a commit that switched the image to a new refcount table (the v2
   * snapshot shadow commit): count with `next` from now on, same laziness.
   */
  replaceRefcounts(next: RefcountWriter): void {
    next.lazy = this.refcountWriter.lazy
    this.refcountWriter = next
    this.compressedCursor = 0
  }

  private constructor(
    readonly state: Qcow2State,
    refcounts: RefcountWriter,
  ) {
    this.refcountWriter = refcounts
    this.header = state.header
    this.clusterSize = state.header.clusterSize
    this.entryWriter = { entrySize: l2EntrySize(this.header), extended: hasExtendedL2(this.header), clusterBits: this.header.clusterBits }
    this.subclusterSize = this.entryWriter.extended ? this.clusterSize / SUBCLUSTERS_PER_CLUSTER : this.clusterSize
    this.guard = new OverlapGuard(this.clusterSize, state.filename)
    this.dirtyMarked = isDirty(this.header)
    refcounts.lazy = hasLazyRefcounts(this.header)
  }

  /** Attach a writer to an image opened read-write; a dirty image gets its refcounts rebuilt first. */
  static async attach(state: Qcow2State, loadBitmaps?: BitmapLoader): Promise<Qcow2Writer> {
    const header = state.header
    if (state.device.readOnly) throw new ReadOnlyError(`qcow2: ${state.filename}: image is open read-only`)
    if (header.cryptMethod !== 0) throw new UnsupportedFeatureError(`qcow2: ${state.filename}: writing encrypted images is not supported`)
    const notices: string[] = []
    if (isDirty(header)) {
      await rebuildRefcounts(state)
      notices.push(`qcow2: ${state.filename}: the image was not closed cleanly; refcounts were rebuilt`)
    }
    let guardFill: Array<[number, string]> = []
    const hooks = {
      onMetadata: (cluster: number, kind: 'refblock' | 'reftable' | undefined) => {
        if (w) w.guard.set(cluster, kind)
        else guardFill.push([cluster, kind ?? ''])
      },
    }
    // let, not const: the hook above reads w while RefcountWriter.load runs, before it is assigned
    // eslint-disable-next-line prefer-const
    let w: Qcow2Writer | undefined
    const refcounts = await RefcountWriter.load(state.device, header, state.filename, hooks)
    w = new Qcow2Writer(state, refcounts)
    w.notices.push(...notices)
    for (const [c, k] of guardFill) w.guard.set(c, k === '' ? undefined : (k as 'refblock'))
    guardFill = []
    await w.loadGuard()
    state.refcounts.invalidate()
    // bitmaps: loaded as QEMU loads them, IN_USE durable before the first guest write
    w.bitmaps = loadBitmaps ? await loadBitmaps(state) : undefined
    if (w.bitmaps) {
      for (const r of w.bitmaps.guardRanges()) w.guard.setRange(r.offset, r.length, r.kind)
      await w.bitmaps.markInUse(w)
    }
    return w
  }

  private async loadGuard(): Promise<void> {
    const g = this.guard
    g.set(0, 'header')
    for (const [c, k] of await this.refcounts.metadataClusters()) g.set(c, k)
    await walkMetadata(
      this.state,
      (offset, length, kind) => {
        if (kind === 'l1' || kind === 'l2' || kind === 'snapshot' || kind === 'snapshot-l1') g.setRange(offset, length, kind)
      },
      { data: false },
    )
  }

  get lazy(): boolean {
    return this.refcounts.lazy
  }

  // ---------------------------------------------------------------- public

  write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`qcow2: ${this.state.filename}: write`, offset, data.byteLength, this.header.size)
    this.noteGuestChange(offset, data.byteLength)
    return this.pipeline.submit(offset, data)
  }

  writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    checkGuestRange(`qcow2: ${this.state.filename}: write zeroes`, offset, length, this.header.size)
    this.noteGuestChange(offset, length)
    return this.mutex.run(() => writeZeroesLocked(this, offset, length, options.discard ?? false))
  }

  /** Store one whole cluster as compressed bytes (`compressed` from compress-write.ts). */
  writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    if (offset % this.clusterSize !== 0) throw new ImgtoolError('USAGE', `qcow2: compressed write at ${hex(offset)} is not cluster aligned`)
    checkGuestRange(`qcow2: ${this.state.filename}: compressed write`, offset, Math.min(this.clusterSize, this.header.size - offset), this.header.size)
    if (hasDataFile(this.header))
      throw new UnsupportedFeatureError(`qcow2: ${this.state.filename}: compressed writes are not possible with an external data file`)
    if (compressed.byteLength >= this.clusterSize)
      throw new ImgtoolError('USAGE', `qcow2: compressed cluster of ${compressed.byteLength} bytes is not smaller than the cluster`)
    this.noteGuestChange(offset, Math.min(this.clusterSize, this.header.size - offset))
    return this.mutex.run(() => writeCompressedLocked(this, [{ offset, data: compressed }]))
  }

  /**
   * Guest bytes [offset, offset+length) are about to change: every enabled
   * persistent bitmap gets their bits set (in memory; stored on close). Every
   * path that changes guest content calls it before the change.
   */
  noteGuestChange(offset: number, length: number): void {
    this.bitmaps?.note(offset, length)
  }

  /** Plain flush: data and refcounts. Bitmaps are stored only on close, as QEMU does. */
  flush(): Promise<void> {
    return this.mutex.run(async () => {
      await this.refcounts.persist()
      await this.flushDevices()
      if (this.refcounts.dirty && !this.refcounts.lazy) await this.refcounts.persist()
    })
  }

  close(): Promise<void> {
    return this.mutex.run(async () => {
      if (this.closed) return
      this.closed = true
      if (this.corrupt || this.broken) return
      await this.refcounts.persist()
      await this.flushDevices()
      if (this.refcounts.dirty) {
        // frees that waited for that flush
        await this.refcounts.persist()
        await this.flushDevices()
      }
      // bitmaps: new data, tables and directory, durable before the header points at them
      if (this.bitmaps) await this.bitmaps.store(this)
      if (this.dirtyMarked && isDirty(this.header)) {
        await markDirtyBit(this.state.device, this.header, false)
        await this.state.device.flush()
        this.dirtyMarked = false
      }
    })
  }

  /**
   * Metadata transactions for operations that change refcounts and COPIED
   * flags together (snapshots): the dirty bit is set and flushed first, so a
   * crash in between leaves an image that the next read-write open repairs
   * (rebuildRefcounts fixes refcounts and COPIED flags). Call inside `mutex.run`.
   */
  async beginTransaction(): Promise<void> {
    this.assertUsable()
    await this.refcounts.persist()
    await this.flushDevices()
    if (this.header.version >= 3) await this.ensureDirty()
  }

  /**
   * A transaction that failed half way: memory no longer matches the disk.
   * The writer refuses further writes; the image stays dirty (v3) so the next
   * read-write open rebuilds refcounts and COPIED flags.
   */
  abortTransaction(): void {
    this.broken = true
  }

  async endTransaction(): Promise<void> {
    await this.refcounts.persist()
    await this.flushDevices()
    if (this.dirtyMarked && !this.refcounts.lazy) {
      await markDirtyBit(this.state.device, this.header, false)
      await this.state.device.flush()
      this.dirtyMarked = false
    }
  }

  /** Flush the devices (inside `mutex.run`; `flush()` would wait for the mutex). */
  flushNow(): Promise<void> {
    return this.flushDevices()
  }

  /** After resize: the open image's tables no longer match the file. */
  retire(): void {
    this.closed = true
  }

  /** Allocation for other writer modules (snapshot tables, L1 copies), guarded like guest allocations. */
  allocClusters(n: number): Promise<number> {
    return this.alloc(n, undefined)
  }

  /** A guarded metadata write for other writer modules. */
  async writeMetadata(offset: number, data: Uint8Array, tag: 'l1' | 'l2' | 'snapshot' | 'header'): Promise<void> {
    const allowed = tag === 'l1' || tag === 'l2' ? tag : undefined
    if (tag === 'header') return this.state.device.write(offset, data, tag)
    if (tag === 'snapshot') {
      const hit = this.guard.conflict(offset, data.byteLength, 'snapshot')
      if (hit) {
        await this.markCorrupt()
        throw this.guard.error(offset, data.byteLength, 'snapshot table write', hit)
      }
      return this.state.device.write(offset, data, tag)
    }
    return this.guardedWrite(this.state.device, offset, data, tag, allowed)
  }

  // ---------------------------------------------------------------- helpers

  assertUsable(): void {
    if (this.closed) throw new ImgtoolError('USAGE', `qcow2: ${this.state.filename}: image is closed`)
    if (this.broken) {
      throw new ImgtoolError('INTERNAL', `qcow2: ${this.state.filename}: a metadata transaction failed; close and reopen the image (it is repaired on open)`)
    }
    if (this.corrupt) {
      throw new CorruptImageError(`qcow2: ${this.state.filename}: image is marked corrupt; writes are refused (run imgtool check -r all)`, {
        file: this.state.filename,
      })
    }
  }

  /** @internal */
  async flushDevices(): Promise<void> {
    if (this.state.dataDevice !== this.state.device) await this.state.dataDevice.flush()
    await this.state.device.flush()
    if (this.refcounts.deferredFrees.length > 0) await this.refcounts.applyDeferredFrees()
  }

  /** Drop a reference once the next flush succeeds (it may still be reachable from what is on disk). */
  deferFree(offset: number, length: number): void {
    this.refcounts.deferredFrees.push({ offset, length })
  }

  /** Mark the image corrupt (v3 header bit) and refuse further writes. */
  async markCorrupt(): Promise<void> {
    this.corrupt = true
    if (this.header.version < 3) return
    this.header.incompatibleFeatures |= BigInt(INCOMPAT_CORRUPT)
    const b = new Uint8Array(8)
    putU64be(b, 0, this.header.incompatibleFeatures)
    try {
      await this.state.device.write(72, b, 'header')
      await this.state.device.flush()
    } catch {
      // the refusal stands even if the bit cannot be written
    }
  }

  /** @internal */
  async guardedWrite(dev: BlockDevice, offset: number, data: Uint8Array, tag: string, allowed?: 'l1' | 'l2'): Promise<void> {
    if (dev === this.state.device) {
      const hit = this.guard.conflict(offset, data.byteLength, allowed)
      if (hit) {
        await this.markCorrupt()
        throw this.guard.error(offset, data.byteLength, `${tag} write`, hit)
      }
    }
    await dev.write(offset, data, tag)
  }

  /** @internal */
  get l2Entries(): number {
    return this.clusterSize / this.entryWriter.entrySize
  }

  /** @internal */
  entry(t: Uint8Array, i: number): L2Entry {
    return decodeL2(new DataView(t.buffer, t.byteOffset, t.byteLength), i * this.entryWriter.entrySize, this.state.decodeContext)
  }

  /** Old guest bytes of [offset, offset+length), zeros past the virtual size. */
  /** @internal */
  async oldGuest(offset: number, length: number): Promise<Uint8Array> {
    const n = Math.max(0, Math.min(length, this.header.size - offset))
    if (n === length) return this.state.readGuest(offset, length)
    const out = new Uint8Array(length)
    if (n > 0) out.set(await this.state.readGuest(offset, n))
    return out
  }

  /** @internal */
  async refcount(host: number): Promise<number> {
    return this.refcounts.get(Math.floor(host / this.clusterSize))
  }

  /** Allocate clusters; refcounts that call known metadata free mean a corrupt image. */
  /** @internal */
  async alloc(n: number, w: TableWork | undefined): Promise<number> {
    const first = await this.refcounts.alloc(n)
    if (w) w.allocated.push({ offset: first, length: n * this.clusterSize })
    const hit = this.guard.conflict(first, n * this.clusterSize)
    if (hit) {
      await this.markCorrupt()
      throw this.guard.error(first, n * this.clusterSize, 'allocation (refcount 0)', hit)
    }
    return first
  }

  /** @internal */
  touch(w: TableWork, i: number): void {
    w.lo = Math.min(w.lo, i)
    w.hi = Math.max(w.hi, i)
  }

  /** Reference dropped by replacing entry `e` (nothing for external data clusters). */
  /** @internal */
  dropRef(e: L2Entry): Range | undefined {
    if (e.type === 'compressed') {
      const start = e.hostOffset - (e.hostOffset % 512)
      return { offset: start, length: e.sectors * 512 }
    }
    if ((e.type === 'normal' || e.type === 'zero') && e.hostOffset !== 0 && !hasDataFile(this.header)) {
      return { offset: e.hostOffset, length: this.clusterSize }
    }
    return undefined
  }

  /** @internal */
  async ensureDirty(): Promise<void> {
    if (this.dirtyMarked) return
    await markDirtyBit(this.state.device, this.header, true)
    await this.state.device.flush()
    this.dirtyMarked = true
  }

  /**
   * Grow the file to a multiple of 512 bytes, as QEMU does when convert -c
   * ends (a zero-length compressed write: "align end of file to a sector
   * boundary"); compressed data packed byte by byte may end mid-sector.
   */
  alignFileEnd(): Promise<void> {
    return this.mutex.run(async () => {
      this.assertUsable()
      const n = this.state.device.size
      const aligned = Math.ceil(n / 512) * 512
      if (aligned !== n) await this.state.device.truncate(aligned)
    })
  }

  /** Several whole clusters stored compressed in one commit (one table update per L2 table). */
  writeCompressedBatch(items: Array<{ offset: number; data: Uint8Array }>): Promise<void> {
    for (const it of items) {
      if (it.offset % this.clusterSize !== 0) throw new ImgtoolError('USAGE', `qcow2: compressed write at ${hex(it.offset)} is not cluster aligned`)
      checkGuestRange(`qcow2: ${this.state.filename}: compressed write`, it.offset, Math.min(this.clusterSize, this.header.size - it.offset), this.header.size)
      if (it.data.byteLength >= this.clusterSize)
        throw new ImgtoolError('USAGE', `qcow2: compressed cluster of ${it.data.byteLength} bytes is not smaller than the cluster`)
    }
    if (hasDataFile(this.header))
      throw new UnsupportedFeatureError(`qcow2: ${this.state.filename}: compressed writes are not possible with an external data file`)
    for (const it of items) this.noteGuestChange(it.offset, Math.min(this.clusterSize, this.header.size - it.offset))
    return this.mutex.run(() => writeCompressedLocked(this, items))
  }
}
