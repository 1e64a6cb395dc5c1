/**
 * Guest writes on a qcow2 image: any offset and length, copy-on-write from
 * the old cluster or the backing file, L2 table allocation (and COW of shared
 * tables), zero writes (v3 zero flag, discard), subcluster writes for extended
 * L2, compressed cluster writes.
 *
 * Every request runs through one commit protocol (under the image's mutex):
 *   A. allocate (memory), persist refcount blocks           rule 1
 *   B. write guest data and new L2 tables, flush             rule 2
 *   C. link: L2 entries of existing tables, L1 entries of new/COWed tables,
 *      in allocation order (seed: complete in allocation order)
 *   D. flush, then drop the references that were replaced
 * If anything fails before an allocation is linked, every such allocation
 * is freed again, across all L2 tables the request touched; a cluster whose
 * link may have reached the disk is never freed (seed: qcow2 L2Meta undo).
 */
import { CorruptImageError, ImgtoolError, ReadOnlyError, UnsupportedFeatureError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { checkGuestRange } from '../../image/range.js'
import { putU64be } from '../../util/bytes.js'
import { decodeL1, decodeL2, encodeL1, type L2Entry } from './entries.js'
import { hasDataFile, hasExtendedL2, hasLazyRefcounts, isDirty, l2EntrySize, type Qcow2Header } from './header.js'
import type { Qcow2Image } from './image.js'
import { ALL_SUBCLUSTERS, getBitmap, setBitmap, setStandard, subclusterMask, type EntryWriter } from './l2-meta.js'
import { Mutex } from './mutex.js'
import { OverlapGuard } from './overlap.js'
import { RefcountWriter } from './refcount-writer.js'
import { SUBCLUSTERS_PER_CLUSTER, INCOMPAT_CORRUPT, AUTOCLEAR_BITMAPS } from './constants.js'
import { markDirtyBit, rebuildRefcounts, walkMetadata } from './dirty.js'
import { writeZeroesLocked } from './write-zeroes.js'
import { writeCompressedLocked } from './write-compressed.js'

export interface Range {
  offset: number
  length: number
}

/** The work on one L2 table within one request. */
export interface TableWork {
  l1Index: number
  /** table the entries are read from (0: none yet) */
  oldL2: number
  /** table the entries are written to */
  l2: number
  mode: 'inplace' | 'new' | 'cow'
  table: Uint8Array
  lo: number
  hi: number
  /** clusters allocated for this table's entries (data, compressed bytes): freed if never linked */
  allocated: Range[]
  /** references dropped once the link is durable */
  frees: Range[]
  linked: boolean
  /** a link write for this table was issued (it may have reached the disk) */
  attempted: boolean
}

export interface DataWrite {
  device: BlockDevice
  offset: number
  parts: Uint8Array[]
  length: number
}

function joined(d: DataWrite): Uint8Array {
  if (d.parts.length === 1) return d.parts[0]!
  const out = new Uint8Array(d.length)
  let o = 0
  for (const p of d.parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

export interface WriteZeroesOptions {
  /** free whole clusters instead of keeping them allocated as zero (qemu's MAY_UNMAP) */
  discard?: boolean
}

export class Qcow2Writer {
  readonly mutex = new Mutex()
  readonly guard: OverlapGuard
  readonly h: Qcow2Header
  readonly cs: number
  readonly ew: EntryWriter
  readonly sc: number
  private closed = false
  private corrupt = false
  private broken = false
  private dirtyMarked: boolean
  /** @internal byte cursor for packing compressed clusters (write-compressed.ts) */
  compressedCursor = 0
  /** messages for the user (e.g. "refcounts rebuilt") */
  readonly notices: string[] = []

  private constructor(
    readonly img: Qcow2Image,
    readonly rc: RefcountWriter,
  ) {
    this.h = img.header
    this.cs = img.header.clusterSize
    this.ew = { entrySize: l2EntrySize(this.h), extended: hasExtendedL2(this.h), clusterBits: this.h.clusterBits }
    this.sc = this.ew.extended ? this.cs / SUBCLUSTERS_PER_CLUSTER : this.cs
    this.guard = new OverlapGuard(this.cs, img.filename)
    this.dirtyMarked = isDirty(this.h)
    rc.lazy = hasLazyRefcounts(this.h)
  }

  /** Attach a writer to an image opened read-write; a dirty image gets its refcounts rebuilt first. */
  static async attach(img: Qcow2Image): Promise<Qcow2Writer> {
    const h = img.header
    if (img.device.readOnly) throw new ReadOnlyError(`qcow2: ${img.filename}: image is open read-only`)
    if (h.cryptMethod !== 0) throw new UnsupportedFeatureError(`qcow2: ${img.filename}: writing encrypted images is not supported`)
    if ((h.autoclearFeatures & BigInt(AUTOCLEAR_BITMAPS)) !== 0n) {
      throw new UnsupportedFeatureError(`qcow2: ${img.filename}: writing images with persistent bitmaps is not supported`)
    }
    const notices: string[] = []
    if (isDirty(h)) {
      await rebuildRefcounts(img)
      notices.push(`qcow2: ${img.filename}: the image was not closed cleanly; refcounts were rebuilt`)
    }
    let guardFill: Array<[number, string]> = []
    const hooks = {
      onMetadata: (cluster: number, kind: 'refblock' | 'reftable' | undefined) => {
        if (w) w.guard.set(cluster, kind)
        else guardFill.push([cluster, kind ?? ''])
      },
    }
    let w: Qcow2Writer | undefined
    const rc = await RefcountWriter.load(img.device, h, img.filename, hooks)
    w = new Qcow2Writer(img, rc)
    w.notices.push(...notices)
    for (const [c, k] of guardFill) w.guard.set(c, k === '' ? undefined : (k as 'refblock'))
    guardFill = []
    await w.loadGuard()
    img.refcounts.invalidate()
    return w
  }

  private async loadGuard(): Promise<void> {
    const g = this.guard
    g.set(0, 'header')
    for (const [c, k] of await this.rc.metadataClusters()) g.set(c, k)
    await walkMetadata(this.img, (offset, length, kind) => {
      if (kind === 'l1' || kind === 'l2' || kind === 'snapshot' || kind === 'snapshot-l1') g.setRange(offset, length, kind)
    }, { data: false })
  }

  get lazy(): boolean {
    return this.rc.lazy
  }

  // ---------------------------------------------------------------- public

  write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`qcow2: ${this.img.filename}: write`, offset, data.byteLength, this.h.size)
    return this.mutex.run(() => this.doWrite(offset, data))
  }

  writeZeroes(offset: number, length: number, options: WriteZeroesOptions = {}): Promise<void> {
    checkGuestRange(`qcow2: ${this.img.filename}: write zeroes`, offset, length, this.h.size)
    return this.mutex.run(() => writeZeroesLocked(this, offset, length, options.discard ?? false))
  }

  /** Store one whole cluster as compressed bytes (`compressed` from compress-write.ts). */
  writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    if (offset % this.cs !== 0) throw new ImgtoolError('USAGE', `qcow2: compressed write at ${hex(offset)} is not cluster aligned`)
    checkGuestRange(`qcow2: ${this.img.filename}: compressed write`, offset, Math.min(this.cs, this.h.size - offset), this.h.size)
    if (hasDataFile(this.h)) throw new UnsupportedFeatureError(`qcow2: ${this.img.filename}: compressed writes are not possible with an external data file`)
    if (compressed.byteLength >= this.cs) throw new ImgtoolError('USAGE', `qcow2: compressed cluster of ${compressed.byteLength} bytes is not smaller than the cluster`)
    return this.mutex.run(() => writeCompressedLocked(this, [{ offset, data: compressed }]))
  }

  flush(): Promise<void> {
    return this.mutex.run(async () => {
      await this.rc.persist()
      await this.flushDevices()
      if (this.rc.dirty && !this.rc.lazy) await this.rc.persist()
    })
  }

  close(): Promise<void> {
    return this.mutex.run(async () => {
      if (this.closed) return
      this.closed = true
      if (this.corrupt || this.broken) return
      await this.rc.persist()
      await this.flushDevices()
      if (this.rc.dirty) {
        // frees that waited for that flush
        await this.rc.persist()
        await this.flushDevices()
      }
      if (this.dirtyMarked && isDirty(this.h)) {
        await markDirtyBit(this.img.device, this.h, false)
        await this.img.device.flush()
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
    await this.rc.persist()
    await this.flushDevices()
    if (this.h.version >= 3) await this.ensureDirty()
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
    await this.rc.persist()
    await this.flushDevices()
    if (this.dirtyMarked && !this.rc.lazy) {
      await markDirtyBit(this.img.device, this.h, false)
      await this.img.device.flush()
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
    if (tag === 'header') return this.img.device.write(offset, data, tag)
    if (tag === 'snapshot') {
      const hit = this.guard.conflict(offset, data.byteLength, 'snapshot')
      if (hit) {
        await this.markCorrupt()
        throw this.guard.error(offset, data.byteLength, 'snapshot table write', hit)
      }
      return this.img.device.write(offset, data, tag)
    }
    return this.guardedWrite(this.img.device, offset, data, tag, allowed)
  }

  // ---------------------------------------------------------------- helpers

  assertUsable(): void {
    if (this.closed) throw new ImgtoolError('USAGE', `qcow2: ${this.img.filename}: image is closed`)
    if (this.broken) {
      throw new ImgtoolError('INTERNAL', `qcow2: ${this.img.filename}: a metadata transaction failed; close and reopen the image (it is repaired on open)`)
    }
    if (this.corrupt) {
      throw new CorruptImageError(`qcow2: ${this.img.filename}: image is marked corrupt; writes are refused (run imgtool check -r all)`, {
        file: this.img.filename,
      })
    }
  }

  /** @internal */
  async flushDevices(): Promise<void> {
    if (this.img.dataDevice !== this.img.device) await this.img.dataDevice.flush()
    await this.img.device.flush()
    if (this.rc.deferredFrees.length > 0) await this.rc.applyDeferredFrees()
  }

  /** Drop a reference once the next flush succeeds (it may still be reachable from what is on disk). */
  deferFree(offset: number, length: number): void {
    this.rc.deferredFrees.push({ offset, length })
  }

  /** Mark the image corrupt (v3 header bit) and refuse further writes. */
  async markCorrupt(): Promise<void> {
    this.corrupt = true
    if (this.h.version < 3) return
    this.h.incompatibleFeatures |= BigInt(INCOMPAT_CORRUPT)
    const b = new Uint8Array(8)
    putU64be(b, 0, this.h.incompatibleFeatures)
    try {
      await this.img.device.write(72, b, 'header')
      await this.img.device.flush()
    } catch {
      // the refusal stands even if the bit cannot be written
    }
  }

  /** @internal */
  async guardedWrite(dev: BlockDevice, offset: number, data: Uint8Array, tag: string, allowed?: 'l1' | 'l2'): Promise<void> {
    if (dev === this.img.device) {
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
    return this.cs / this.ew.entrySize
  }

  /** @internal */
  entry(t: Uint8Array, i: number): L2Entry {
    return decodeL2(new DataView(t.buffer, t.byteOffset, t.byteLength), i * this.ew.entrySize, this.img.mapper.decodeContext)
  }

  /** Old guest bytes of [offset, offset+length), zeros past the virtual size. */
  /** @internal */
  async oldGuest(offset: number, length: number): Promise<Uint8Array> {
    const n = Math.max(0, Math.min(length, this.h.size - offset))
    if (n === length) return this.img.readUnlocked(offset, length)
    const out = new Uint8Array(length)
    if (n > 0) out.set(await this.img.readUnlocked(offset, n))
    return out
  }

  /** @internal */
  async refcount(host: number): Promise<number> {
    return this.rc.get(Math.floor(host / this.cs))
  }

  /** Get the table for L1 index `i` ready for changes: in place, new, or COW of a shared table. */
  /** @internal */
  async prepareTable(i: number, create: boolean): Promise<TableWork | undefined> {
    if (i >= this.h.l1Size) throw new ImgtoolError('INTERNAL', `qcow2: L1 index ${i} beyond l1_size ${this.h.l1Size}`)
    const l1e = decodeL1(new DataView(this.img.l1.buffer, this.img.l1.byteOffset, this.img.l1.byteLength), i * 8)
    const base = { l1Index: i, lo: Infinity, hi: -1, allocated: [] as Range[], frees: [] as Range[], linked: false, attempted: false }
    if (l1e.l2Offset === 0) {
      if (!create) return undefined
      const l2 = await this.alloc(1, undefined)
      this.guard.set(l2 / this.cs, 'l2')
      return { ...base, oldL2: 0, l2, mode: 'new', table: new Uint8Array(this.cs), allocated: [{ offset: l2, length: this.cs }] }
    }
    const old = await this.img.mapper.loadL2(i, l1e.l2Offset)
    if ((await this.refcount(l1e.l2Offset)) === 1) {
      return { ...base, oldL2: l1e.l2Offset, l2: l1e.l2Offset, mode: 'inplace', table: old.slice() }
    }
    const l2 = await this.alloc(1, undefined)
    this.guard.set(l2 / this.cs, 'l2')
    return {
      ...base,
      oldL2: l1e.l2Offset,
      l2,
      mode: 'cow',
      table: old.slice(),
      allocated: [{ offset: l2, length: this.cs }],
      frees: [{ offset: l1e.l2Offset, length: this.cs }],
    }
  }

  /** Allocate clusters; refcounts that call known metadata free mean a corrupt image. */
  /** @internal */
  async alloc(n: number, w: TableWork | undefined): Promise<number> {
    const first = await this.rc.alloc(n)
    if (w) w.allocated.push({ offset: first, length: n * this.cs })
    const hit = this.guard.conflict(first, n * this.cs)
    if (hit) {
      await this.markCorrupt()
      throw this.guard.error(first, n * this.cs, 'allocation (refcount 0)', hit)
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
    if ((e.type === 'normal' || e.type === 'zero') && e.hostOffset !== 0 && !hasDataFile(this.h)) {
      return { offset: e.hostOffset, length: this.cs }
    }
    return undefined
  }

  // ---------------------------------------------------------------- write

  /** @internal */
  async doWrite(offset: number, data: Uint8Array): Promise<void> {
    this.assertUsable()
    if (data.byteLength === 0) return
    const works: TableWork[] = []
    const writes: DataWrite[] = []
    let needFlush = false
    const coverage = this.l2Entries * this.cs
    try {
      let pos = offset
      const end = offset + data.byteLength
      while (pos < end) {
        const l1Index = Math.floor(pos / coverage)
        const tEnd = Math.min(end, (l1Index + 1) * coverage)
        const w = (await this.prepareTable(l1Index, true))!
        works.push(w)
        if (w.mode !== 'inplace') needFlush = true
        // clusters needing a new host cluster, allocated together in guest order
        const plans: Array<{ idx: number; guest: number; from: number; to: number; e: L2Entry }> = []
        for (let p = pos; p < tEnd; ) {
          const cStart = Math.floor(p / this.cs) * this.cs
          const to = Math.min(tEnd, cStart + this.cs)
          const idx = (cStart / this.cs) % this.l2Entries
          plans.push({ idx, guest: cStart, from: p, to, e: this.entry(w.table, idx) })
          p = to
        }
        const alloc: typeof plans = []
        for (const pl of plans) {
          const piece = data.subarray(pl.from - offset, pl.to - offset)
          const r = await this.planClusterWrite(w, pl.idx, pl.guest, pl.from, piece, writes)
          if (r === 'alloc') alloc.push(pl)
          else if (r === 'meta') needFlush = true
        }
        if (alloc.length > 0) {
          needFlush = true
          if (hasDataFile(this.h)) {
            for (const pl of alloc) await this.fillNewCluster(w, pl.idx, pl.guest, pl.guest, pl.e, pl.from, data.subarray(pl.from - offset, pl.to - offset), writes, this.img.dataDevice)
          } else {
            const first = await this.alloc(alloc.length, w)
            for (let k = 0; k < alloc.length; k++) {
              const pl = alloc[k]!
              await this.fillNewCluster(w, pl.idx, pl.guest, first + k * this.cs, pl.e, pl.from, data.subarray(pl.from - offset, pl.to - offset), writes, this.img.device)
            }
          }
        }
        pos = tEnd
      }
      await this.commit(works, writes, needFlush)
    } catch (e) {
      await this.undo(works)
      throw e
    }
  }

  /**
   * One cluster of a write: 'inplace' (data only), 'meta' (in place, but the
   * entry changes: subclusters or a preallocated zero cluster), or 'alloc'.
   */
  /** @internal */
  async planClusterWrite(w: TableWork, idx: number, guest: number, from: number, piece: Uint8Array, writes: DataWrite[]): Promise<'inplace' | 'meta' | 'alloc'> {
    const e = this.entry(w.table, idx)
    const dataDev = this.img.dataDevice
    const owned =
      (e.type === 'normal' || (e.type === 'zero' && e.hostOffset !== 0)) &&
      (hasDataFile(this.h) || (await this.refcount(e.hostOffset)) === 1)
    if (!owned) return 'alloc'
    const host = (e as { hostOffset: number }).hostOffset
    if (!this.ew.extended) {
      if (e.type === 'normal') {
        await this.dataWrite(writes, dataDev, host + (from - guest), piece)
        return 'inplace'
      }
      // preallocated zero cluster: write the whole cluster, then drop the zero flag
      const buf = new Uint8Array(this.cs)
      buf.set(piece, from - guest)
      await this.dataWrite(writes, dataDev, host, buf)
      setStandard(w.table, this.ew, idx, { hostOffset: host, copied: true })
      this.touch(w, idx)
      return 'meta'
    }
    // extended L2, host cluster owned: write subclusters in place, mark them allocated
    const bm = getBitmap(w.table, idx)
    const s0 = Math.floor((from - guest) / this.sc)
    const s1 = Math.floor((from - guest + piece.byteLength - 1) / this.sc)
    const mask = subclusterMask(s0, s1)
    if ((bm.alloc & mask) === mask) {
      await this.dataWrite(writes, dataDev, host + (from - guest), piece)
      return 'inplace'
    }
    const bufStart = s0 * this.sc
    const buf = await this.subclusterBuffer(guest, bufStart, (s1 + 1) * this.sc, from, piece)
    await this.dataWrite(writes, dataDev, host + bufStart, buf)
    setBitmap(w.table, idx, { alloc: (bm.alloc | mask) >>> 0, zero: (bm.zero & ~mask) >>> 0 })
    this.touch(w, idx)
    return 'meta'
  }

  /** Bytes of [cluster+a, cluster+b): old guest content overlaid with `piece` (at guest `from`). */
  /** @internal */
  async subclusterBuffer(guest: number, a: number, b: number, from: number, piece: Uint8Array): Promise<Uint8Array> {
    const total = b - a
    const covered = from === guest + a && piece.byteLength >= total
    const buf = covered ? new Uint8Array(total) : await this.oldGuest(guest + a, total)
    buf.set(piece, from - guest - a)
    return buf
  }

  /** Content for a newly allocated (or external) host cluster and its new entry. */
  /** @internal */
  async fillNewCluster(w: TableWork, idx: number, guest: number, host: number, e: L2Entry, from: number, piece: Uint8Array, writes: DataWrite[], dev: BlockDevice): Promise<void> {
    const dropped = this.dropRef(e)
    if (dropped) w.frees.push(dropped)
    if (!this.ew.extended || e.type === 'compressed') {
      const full = from === guest && piece.byteLength === this.cs
      const buf = full ? piece : await this.oldGuest(guest, this.cs)
      if (!full) buf.set(piece, from - guest)
      await this.dataWrite(writes, dev, host, buf)
      setStandard(w.table, this.ew, idx, { hostOffset: host, copied: true })
      if (this.ew.extended) setBitmap(w.table, idx, { alloc: ALL_SUBCLUSTERS, zero: 0 })
      this.touch(w, idx)
      return
    }
    const bm = getBitmap(w.table, idx)
    const s0 = Math.floor((from - guest) / this.sc)
    const s1 = Math.floor((from - guest + piece.byteLength - 1) / this.sc)
    const mask = subclusterMask(s0, s1)
    if (e.type === 'normal') {
      // a shared cluster: copy its allocated subclusters, then the new ones
      const old = await this.img.dataDevice.read(e.hostOffset, this.cs, 'data')
      const mid = await this.subclusterBuffer(guest, s0 * this.sc, (s1 + 1) * this.sc, from, piece)
      old.set(mid, s0 * this.sc)
      await this.dataWrite(writes, dev, host, old)
    } else {
      const bufStart = s0 * this.sc
      const mid = await this.subclusterBuffer(guest, bufStart, (s1 + 1) * this.sc, from, piece)
      await this.dataWrite(writes, dev, host + bufStart, mid)
    }
    setStandard(w.table, this.ew, idx, { hostOffset: host, copied: true })
    setBitmap(w.table, idx, { alloc: (bm.alloc | mask) >>> 0, zero: (bm.zero & ~mask) >>> 0 })
    this.touch(w, idx)
  }

  /**
   * Queue a data write, merging with the previous one when host-contiguous:
   * views of one buffer that are adjacent in memory too stay one view (no
   * copy); other pieces are joined once, when the request is committed.
   */
  /** @internal */
  async dataWrite(writes: DataWrite[], device: BlockDevice, offset: number, data: Uint8Array): Promise<void> {
    const last = writes[writes.length - 1]
    if (last && last.device === device && last.offset + last.length === offset && last.length + data.byteLength <= 8 * 1024 * 1024) {
      const tail = last.parts[last.parts.length - 1]!
      if (tail.buffer === data.buffer && tail.byteOffset + tail.byteLength === data.byteOffset) {
        last.parts[last.parts.length - 1] = new Uint8Array(data.buffer, tail.byteOffset, tail.byteLength + data.byteLength)
      } else {
        last.parts.push(data)
      }
      last.length += data.byteLength
      return
    }
    writes.push({ device, offset, parts: [data], length: data.byteLength })
  }

  // ---------------------------------------------------------------- commit / undo

  /** @internal */
  async commit(works: TableWork[], writes: DataWrite[], needFlush: boolean): Promise<void> {
    const dev = this.img.device
    // A. refcounts (lazy: kept in memory; the dirty bit is durable before anything depends on it)
    // lazy refcounts: any refcount change (allocation or free) may reach the disk out of order
    const changing = works.some((w) => w.allocated.length > 0 || w.frees.length > 0)
    if (changing && this.rc.lazy) await this.ensureDirty()
    if (!this.rc.lazy) await this.rc.persist()
    // B. guest data, durable before anything maps it
    for (const d of writes) await this.guardedWrite(d.device, d.offset, joined(d), 'data')
    if (needFlush) await this.flushDevices()
    // C. new tables' contents and links in existing tables, in allocation order; then L1 links
    const es = this.ew.entrySize
    for (const w of works) {
      if (w.mode !== 'inplace') {
        await this.guardedWrite(dev, w.l2, w.table.slice(), 'l2', 'l2')
      } else if (w.hi < 0) {
        w.linked = true
      } else {
        w.attempted = true
        await this.guardedWrite(dev, w.l2 + w.lo * es, w.table.slice(w.lo * es, (w.hi + 1) * es), 'l2', 'l2')
        w.linked = true
        this.img.mapper.l2cache.set(w.l2, w.table)
      }
    }
    if (works.some((w) => w.mode !== 'inplace')) {
      await this.flushDevices()
      for (const w of works) {
        if (w.mode === 'inplace') continue
        const b = new Uint8Array(8)
        putU64be(b, 0, encodeL1({ l2Offset: w.l2, copied: true }))
        w.attempted = true
        await this.guardedWrite(dev, this.h.l1TableOffset + w.l1Index * 8, b, 'l1', 'l1')
        w.linked = true
        this.img.l1.set(b, w.l1Index * 8)
        this.img.mapper.l2cache.set(w.l2, w.table)
      }
    }
    // D. drop replaced references once the new links are durable
    await this.applyFrees(works)
  }

  /** @internal */
  async applyFrees(works: TableWork[]): Promise<void> {
    const frees = works.filter((w) => w.linked).flatMap((w) => w.frees)
    if (frees.length === 0) return
    if (!this.rc.lazy) await this.flushDevices()
    for (const w of works) if (w.linked) w.frees = []
    for (const f of frees) await this.free(f)
    if (!this.rc.lazy) await this.rc.persist()
  }

  /** @internal */
  async free(f: Range): Promise<void> {
    await this.rc.update(f.offset, f.length, -1)
    this.compressedCursor = 0
    this.img.dropCompressedCache()
    const first = Math.floor(f.offset / this.cs)
    const last = Math.floor((f.offset + f.length - 1) / this.cs)
    for (let c = first; c <= last; c++) {
      if (this.guard.kindAt(c) === 'l2' && (await this.rc.get(c)) === 0) {
        this.guard.set(c, undefined)
        this.img.mapper.l2cache.delete(c * this.cs)
      }
    }
  }

  /**
   * After a failure: free what was allocated and never linked; for a link
   * write that failed, read back what reached the disk and keep anything it
   * references. Linked tables still get their replaced references dropped.
   */
  /** @internal */
  async undo(works: TableWork[]): Promise<void> {
    const toFree: Range[] = []
    for (const w of works) {
      if (w.linked) continue
      let linkedOnDisk: Set<number> = new Set()
      try {
        if (w.attempted) linkedOnDisk = await this.referencedOnDisk(w)
      } catch {
        continue // cannot tell: leak rather than risk freeing a linked cluster
      }
      for (const r of w.allocated) {
        for (let c = r.offset; c < r.offset + r.length; c += this.cs) {
          if (!linkedOnDisk.has(c)) toFree.push({ offset: c, length: Math.min(this.cs, r.offset + r.length - c) })
        }
      }
    }
    try {
      for (const f of toFree) {
        await this.rc.update(f.offset, f.length, -1)
        const c = Math.floor(f.offset / this.cs)
        if (this.guard.kindAt(c) === 'l2' && (await this.rc.get(c)) === 0) this.guard.set(c, undefined)
      }
      this.compressedCursor = 0
      await this.applyFrees(works)
      if (!this.rc.lazy) await this.rc.persist()
    } catch {
      // the refcount changes stay dirty in memory and are written by the next flush or close
    }
  }

  /** Host clusters of `w.allocated` that the on-disk metadata references right now. */
  /** @internal */
  async referencedOnDisk(w: TableWork): Promise<Set<number>> {
    const dev = this.img.device
    const out = new Set<number>()
    if (w.mode === 'inplace') {
      if (w.hi < 0) return out
      const disk = await dev.read(w.l2, this.cs, 'l2')
      this.img.mapper.l2cache.set(w.l2, disk)
      for (let i = w.lo; i <= w.hi; i++) {
        const e = this.entry(disk, i)
        if (e.type === 'normal' || e.type === 'zero') out.add(e.hostOffset)
        if (e.type === 'compressed') out.add(e.hostOffset - (e.hostOffset % this.cs))
      }
      return out
    }
    const b = await dev.read(this.h.l1TableOffset + w.l1Index * 8, 8, 'l1')
    const l1e = decodeL1(new DataView(b.buffer, b.byteOffset, 8), 0)
    if (l1e.l2Offset === w.l2) {
      // the new table is linked after all: it and everything it references stay
      this.img.l1.set(b, w.l1Index * 8)
      this.img.mapper.l2cache.set(w.l2, w.table)
      w.linked = true
      for (const r of w.allocated) for (let c = r.offset; c < r.offset + r.length; c += this.cs) out.add(c)
    }
    return out
  }

  /** @internal */
  async ensureDirty(): Promise<void> {
    if (this.dirtyMarked) return
    await markDirtyBit(this.img.device, this.h, true)
    await this.img.device.flush()
    this.dirtyMarked = true
  }


  /** Several whole clusters stored compressed in one commit (one table update per L2 table). */
  writeCompressedBatch(items: Array<{ offset: number; data: Uint8Array }>): Promise<void> {
    for (const it of items) {
      if (it.offset % this.cs !== 0) throw new ImgtoolError('USAGE', `qcow2: compressed write at ${hex(it.offset)} is not cluster aligned`)
      checkGuestRange(`qcow2: ${this.img.filename}: compressed write`, it.offset, Math.min(this.cs, this.h.size - it.offset), this.h.size)
      if (it.data.byteLength >= this.cs) throw new ImgtoolError('USAGE', `qcow2: compressed cluster of ${it.data.byteLength} bytes is not smaller than the cluster`)
    }
    if (hasDataFile(this.h)) throw new UnsupportedFeatureError(`qcow2: ${this.img.filename}: compressed writes are not possible with an external data file`)
    return this.mutex.run(() => writeCompressedLocked(this, items))
  }

}
