/**
 * The snapshot view as a DiskImage: origin bytes overlaid with the COW's
 * exceptions (first record in table order wins). Writes through the view copy
 * the origin chunk into a newly allocated COW chunk; writes to the origin copy
 * the old chunk out first, as snapshot-origin does.
 */
import { CorruptImageError, ImageIoError, ReadOnlyError, UsageError, WrongFormatError, hex } from '../../errors.js'
import type { BlockDevice, DeviceOpener } from '../../io/block-device.js'
import type { DiskImage, Extent, ImageInfo } from '../../image/disk-image.js'
import type { FormatDriver, OpenContext, OpenImageOptions } from '../../image/context.js'
import { canMergeExtents, checkGuestRange } from '../../image/range.js'
import type { CheckOptions, CheckReport, Checkable, RepairMode, RepairResult } from '../../check/types.js'
import { isFormatName } from '../../image/probe.js'
import { SECTOR_BYTES, StoreLayout } from './constants.js'
import { buildLookup, loadTable, statusNumbers, type LoadedTable } from './exceptions.js'
import { decodeHeader, headerProblem, type StoreHeader } from './header.js'
import { ExceptionStore, type OnFull } from './commit.js'
import { createStore, parseCreateOptions } from './create.js'

export interface DmsnapOpenOptions {
  /** the origin image, already open (library use) */
  origin?: DiskImage
  onFull?: OnFull
  forCheck?: boolean
  readOnly: boolean
}

export class DmsnapImage implements DiskImage, Checkable {
  readonly format = 'dmsnap'
  readonly layout: StoreLayout | undefined
  private lookup = new Map<number, number>()
  store: ExceptionStore | undefined
  private table: LoadedTable | undefined
  onFull: OnFull
  /** how to open a journal device for repair (set by the driver from its OpenContext) */
  openDevice?: DeviceOpener

  private constructor(
    readonly cow: BlockDevice,
    readonly origin: DiskImage | undefined,
    readonly header: StoreHeader,
    table: LoadedTable | undefined,
    readonly readOnly: boolean,
    readonly forCheck: boolean,
    onFull: OnFull,
  ) {
    this.onFull = onFull
    this.table = table
    if (table) {
      this.layout = new StoreLayout(header.chunkSectors, cow.size)
      this.lookup = buildLookup(table.records)
      this.store = new ExceptionStore(cow, this.layout, table)
      this.store.valid = header.valid !== 0
    }
  }

  /** Open a store on a device. Refuses what the kernel refuses unless `forCheck`. */
  static async open(cow: BlockDevice, options: DmsnapOpenOptions): Promise<DmsnapImage> {
    const headBuf = await cow.read(0, SECTOR_BYTES, 'cow-header')
    const header = decodeHeader(headBuf)
    const problem = headerProblem(header, cow.size)
    const forCheck = options.forCheck ?? false
    const onFull = options.onFull ?? 'invalidate'
    if (problem) {
      if (forCheck) return new DmsnapImage(cow, options.origin, header, undefined, true, true, onFull)
      throw headerError(cow.name, header, problem.kind)
    }
    const layout = new StoreLayout(header.chunkSectors, cow.size)
    if (layout.cowChunks < 2) {
      if (forCheck) return new DmsnapImage(cow, options.origin, header, undefined, true, true, onFull)
      throw new CorruptImageError(`dmsnap: ${cow.name}: COW of ${cow.size} bytes is smaller than header + one area (${2 * layout.chunkBytes})`, {
        file: cow.name,
      })
    }
    // valid == 0: the kernel reads no exceptions and fails all I/O; we still load them for info/check.
    const table = await loadTable(cow, layout)
    if (table.truncatedArea !== undefined && !forCheck) {
      throw new CorruptImageError(
        `dmsnap: ${cow.name}: metadata area ${table.truncatedArea} at chunk ${layout.areaLocation(table.truncatedArea)} (offset ${hex(layout.offset(layout.areaLocation(table.truncatedArea)))}) lies beyond the end of the COW (${hex(cow.size)}); the kernel fails to load it (EIO)`,
        { file: cow.name, structure: 'cow-area', offset: layout.offset(layout.areaLocation(table.truncatedArea)) },
      )
    }
    return new DmsnapImage(cow, options.origin, header, table, options.readOnly || cow.readOnly, forCheck, onFull)
  }

  get filename(): string {
    return this.cow.name
  }
  get backing(): DiskImage | undefined {
    return this.origin
  }
  get valid(): boolean {
    return this.header.valid !== 0 && (this.store?.valid ?? false)
  }
  get chunkBytes(): number {
    return this.requireLayout().chunkBytes
  }
  /** exceptions as the kernel loads them, committed ones only */
  get records(): LoadedTable['records'] {
    return this.table?.records ?? []
  }

  /** The origin's size; without an origin, enough to cover every recorded chunk. */
  get virtualSize(): number {
    if (this.origin) return this.origin.virtualSize
    if (!this.layout) return 0
    let max = -1
    for (const old of this.lookup.keys()) if (old > max && Number.isSafeInteger(old)) max = old
    return (max + 1) * this.layout.chunkBytes
  }

  /** the COW chunk holding the view's chunk `old`, if any (pending writes included) */
  mapping(old: number): number | undefined {
    return this.lookup.get(old)
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkGuestRange(`dmsnap: ${this.filename}: read`, offset, length, this.virtualSize)
    this.requireReadable()
    const layout = this.requireLayout()
    const cb = layout.chunkBytes
    const out = new Uint8Array(length)
    let pos = offset
    while (pos < offset + length) {
      const chunk = Math.floor(pos / cb)
      const within = pos - chunk * cb
      const n = Math.min(cb - within, offset + length - pos)
      const neu = this.lookup.get(chunk)
      let part: Uint8Array
      if (neu !== undefined) {
        if (!layout.fits(neu)) {
          throw new ImageIoError(
            `dmsnap: ${this.filename}: chunk ${chunk} maps to COW chunk ${neu}, beyond the end of the COW (${layout.cowChunks} chunks)`,
            'EIO',
            { file: this.filename, structure: 'cow-data' },
          )
        }
        part = await this.cow.read(layout.offset(neu) + within, n, 'cow-data')
      } else {
        part = await this.requireOrigin('read').read(pos, n)
      }
      out.set(part, pos - offset)
      pos += n
    }
    return out
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`dmsnap: ${this.filename}: write`, offset, data.byteLength, this.virtualSize)
    this.requireWritable()
    const store = this.store!
    const cb = this.chunkBytes
    const chunks = chunksOf(offset, data.byteLength, cb)
    const fresh = chunks.filter((c) => !this.lookup.has(c))
    await this.reserve(fresh.length, 'snapshot write')
    const mark = store.pending.length
    try {
      for (const c of chunks) {
        const start = Math.max(offset, c * cb)
        const end = Math.min(offset + data.byteLength, (c + 1) * cb)
        const slice = data.subarray(start - offset, end - offset)
        let neu = this.lookup.get(c)
        if (neu === undefined) {
          const buf = start === c * cb && end - start === this.chunkLength(c) ? new Uint8Array(cb) : await this.originChunk(c)
          buf.set(slice, start - c * cb)
          neu = store.allocate(c)
          await this.cow.write(this.layout!.offset(neu), buf, 'cow-data')
          this.lookup.set(c, neu)
        } else {
          await this.cow.write(this.layout!.offset(neu) + (start - c * cb), slice, 'cow-data')
        }
      }
    } catch (e) {
      this.undoPending(mark)
      throw e
    }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const step = Math.max(this.chunkBytes, 1 << 20)
    for (let o = 0; o < length; o += step) await this.write(offset + o, new Uint8Array(Math.min(step, length - o)))
  }

  /**
   * A write to the origin with the snapshot preserved: every chunk it touches that
   * has no exception yet is copied into the COW and committed before the origin changes.
   */
  async writeOrigin(offset: number, data: Uint8Array): Promise<void> {
    const origin = this.requireOrigin('write to')
    checkGuestRange(`dmsnap: ${this.filename}: origin write`, offset, data.byteLength, origin.virtualSize)
    this.requireWritable()
    if (!origin.write) throw new ReadOnlyError(`dmsnap: origin ${origin.filename} is not writable`)
    const store = this.store!
    const fresh = chunksOf(offset, data.byteLength, this.chunkBytes).filter((c) => !this.lookup.has(c))
    await this.reserve(fresh.length, 'origin write copy-out')
    const mark = store.pending.length
    try {
      for (const c of fresh) {
        const buf = await this.originChunk(c)
        const neu = store.allocate(c)
        await this.cow.write(this.layout!.offset(neu), buf, 'cow-data')
        this.lookup.set(c, neu)
      }
    } catch (e) {
      this.undoPending(mark)
      throw e
    }
    await this.commit()
    await origin.write(offset, data)
  }

  async flush(): Promise<void> {
    if (this.store && !this.readOnly) {
      if (this.store.valid) await this.commit()
      await this.cow.flush()
    }
    if (this.origin && !this.origin.readOnly) await this.origin.flush()
  }

  /**
   * Commit pending records. If that fails part-way, the disk is the truth: reload the
   * table from it (records that reached it stay; data chunks of the others lie above
   * next_free, so nothing leaks) and rethrow.
   */
  private async commit(): Promise<void> {
    const store = this.store!
    try {
      await store.commit()
    } catch (e) {
      try {
        const t = await loadTable(this.cow, this.layout!)
        this.table = t
        this.lookup = buildLookup(t.records)
        this.store = new ExceptionStore(this.cow, this.layout!, t)
        this.store.valid = store.valid
      } catch {
        store.valid = false // cannot tell what is on disk: refuse further I/O, as the kernel invalidates
      }
      throw e
    }
  }

  async close(): Promise<void> {
    try {
      if (!this.readOnly && this.store?.valid) await this.flush()
    } finally {
      await this.cow.close()
      if (this.origin) await this.origin.close()
    }
  }

  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    checkGuestRange(`dmsnap: ${this.filename}: map`, offset, length, this.virtualSize)
    const cb = this.layout?.chunkBytes ?? SECTOR_BYTES
    let cur: Extent | undefined
    const emit = function* (e: Extent): Generator<Extent> {
      if (cur && canMergeExtents(cur, e)) {
        cur.length += e.length
        return
      }
      if (cur) yield cur
      cur = { ...e }
    }
    let pos = offset
    const end = offset + length
    while (pos < end) {
      const chunk = Math.floor(pos / cb)
      const n = Math.min((chunk + 1) * cb, end) - pos
      const neu = this.lookup.get(chunk)
      if (neu !== undefined) {
        yield* emit({ start: pos, length: n, depth: 0, present: true, zero: false, data: true, hostOffset: neu * cb + (pos - chunk * cb), file: this.filename })
      } else if (this.origin) {
        for await (const e of this.origin.extents(pos, n)) yield* emit({ ...e, depth: e.depth + 1 })
      } else {
        yield* emit({ start: pos, length: n, depth: 1, present: false, zero: false, data: false })
      }
      pos += n
    }
    if (cur) yield cur
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = { filename: this.filename, format: 'dmsnap', virtualSize: this.virtualSize }
    if (this.cow.allocatedSize) info.actualSize = await this.cow.allocatedSize()
    if (this.origin) {
      info.backingFilename = this.origin.filename
      info.backingFormat = this.origin.format
    }
    const data: Record<string, unknown> = {
      magic: hex(this.header.magic),
      valid: this.header.valid,
      version: this.header.version,
      'chunk-sectors': this.header.chunkSectors,
      'cow-size': this.cow.size,
    }
    if (this.layout && this.table && this.store) {
      info.clusterSize = this.layout.chunkBytes
      const live = { nextFree: this.store.nextFree, currentArea: this.store.currentArea, committed: this.store.committed }
      const st = statusNumbers(this.layout, live)
      const lastFull = live.committed === 0 && live.currentArea > 0
      const minChunks = Math.max(live.nextFree, lastFull ? this.layout.areaLocation(live.currentArea) + 1 : 0)
      Object.assign(data, {
        'chunk-size': this.layout.chunkBytes,
        exceptions: this.table.records.length + this.store.committedTotal + this.store.pending.length,
        'exceptions-per-area': this.layout.perArea,
        areas: live.currentArea + 1,
        'current-area': live.currentArea,
        'next-free-chunk': live.nextFree,
        'cow-chunks': this.layout.cowChunks,
        'sectors-allocated': st.sectorsAllocated,
        'total-sectors': st.totalSectors,
        'metadata-sectors': st.metadataSectors,
        status: this.header.valid === 0 ? 'Invalid' : `${st.sectorsAllocated}/${st.totalSectors} ${st.metadataSectors}`,
        'percent-full': st.totalSectors === 0 ? 100 : Math.round((st.sectorsAllocated / st.totalSectors) * 10000) / 100,
        full: this.store ? !this.store.canAllocate(1) : true,
        'min-cow-size': minChunks * this.layout.chunkBytes,
      })
      if (this.table.truncatedArea !== undefined) data['truncated-area'] = this.table.truncatedArea
    }
    if (this.origin) data.origin = this.origin.filename
    info.formatSpecific = { type: 'dmsnap', data }
    return info
  }

  /** The check; a header the kernel refuses means it cannot start: one-line error (exit 1), as qemu-img for a bad qcow2 header. */
  async check(options: CheckOptions = {}): Promise<CheckReport> {
    this.refuseUnreadableHeader()
    const { checkStore } = await import('./check.js')
    return checkStore(this.cow, { originSize: this.origin?.virtualSize, origin: this.origin, onProgress: options.onProgress })
  }

  async repair(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
    if (this.cow.readOnly && !options.dryRun) throw new ReadOnlyError(`dmsnap: ${this.filename}: open read-write to repair`)
    const { repairStore } = await import('./repair.js')
    // the CLI passes the journal already open; a library caller may give only its path
    const own =
      !options.journal && options.journalPath && !options.dryRun && this.openDevice
        ? await this.openDevice(options.journalPath, { readOnly: false, create: true, exclusive: true })
        : undefined
    let result: RepairResult
    try {
      result = await repairStore(this.cow, { ...options, originSize: this.origin?.virtualSize, origin: this.origin, journal: options.journal ?? own })
    } finally {
      await own?.close()
    }
    // a header repair could not rewrite (the areas do not parse cleanly, or no chunk size to trust): as check
    if (result.actions.length === 0) this.refuseUnreadableHeader()
    return result
  }

  private refuseUnreadableHeader(): void {
    const problem = headerProblem(this.header, this.cow.size)
    if (problem) throw headerError(this.cow.name, this.header, problem.kind)
  }

  /** Bytes of origin chunk `c` that exist (a partial last chunk is shorter). */
  chunkLength(c: number): number {
    const cb = this.chunkBytes
    return Math.max(0, Math.min(cb, this.virtualSize - c * cb))
  }

  /** A full chunk buffer holding origin chunk `c` (zeros past the origin's end). */
  async originChunk(c: number): Promise<Uint8Array> {
    const buf = new Uint8Array(this.chunkBytes)
    const n = this.chunkLength(c)
    if (n > 0) buf.set(await this.requireOrigin('copy from').read(c * this.chunkBytes, n))
    return buf
  }

  private async reserve(n: number, what: string): Promise<void> {
    const store = this.store!
    if (n === 0 || store.canAllocate(n)) return
    if (this.onFull === 'refuse') throw store.noSpace(`${what} needs ${n} more chunk(s); nothing was written`)
    await store.invalidate()
    throw store.noSpace(`${what} needs ${n} more chunk(s); the store was invalidated (valid=0) as the kernel does`)
  }

  /** Forget allocations made since `mark` that were never committed. */
  private undoPending(mark: number): void {
    const store = this.store!
    for (const p of store.pending.slice(mark)) if (this.lookup.get(p.old) === p.new) this.lookup.delete(p.old)
    store.dropPending(mark)
  }

  private requireLayout(): StoreLayout {
    if (!this.layout) throw new CorruptImageError(`dmsnap: ${this.filename}: the header is not usable (opened for check only)`, { file: this.filename })
    return this.layout
  }
  private requireReadable(): void {
    this.requireLayout()
    if (this.header.valid === 0 || !this.store?.valid) {
      throw new ImageIoError(`dmsnap: ${this.filename}: the store is invalidated (valid=0); the kernel fails every read and write of the snapshot`, 'EIO', {
        file: this.filename,
        structure: 'cow-header',
      })
    }
  }
  private requireWritable(): void {
    this.requireReadable()
    if (this.readOnly) throw new ReadOnlyError(`dmsnap: ${this.filename}: image is open read-only`, { file: this.filename })
  }
  requireOrigin(what: string): DiskImage {
    if (!this.origin) throw new UsageError(`dmsnap: ${this.filename}: cannot ${what} the origin: no origin given (use --origin ORIGIN or -o origin=PATH)`)
    return this.origin
  }
}

function chunksOf(offset: number, length: number, cb: number): number[] {
  const out: number[] = []
  if (length === 0) return out
  for (let c = Math.floor(offset / cb); c * cb < offset + length; c++) out.push(c)
  return out
}

function headerError(name: string, h: StoreHeader, kind: string): Error {
  switch (kind) {
    case 'too-small':
      return new WrongFormatError(`dmsnap: ${name}: file is too small for a COW header (16 bytes at offset 0x0)`, { file: name })
    case 'uninitialised':
      return new WrongFormatError(`dmsnap: ${name}: magic is 0 at offset 0x0: an uninitialised store (the kernel would format it as a new, empty store)`, {
        file: name,
        structure: 'cow-header',
      })
    case 'bad-magic':
      return new CorruptImageError(`dmsnap: ${name}: bad magic ${hex(h.magic)} at offset 0x0 (expected 0x70416e53 "SnAp"); the kernel refuses it (ENXIO)`, {
        file: name,
        structure: 'cow-header',
        offset: 0,
      })
    case 'bad-chunk-size':
      return new CorruptImageError(
        `dmsnap: ${name}: invalid chunk size ${h.chunkSectors} sectors at offset 0xc (must be a power of two, at most 2^21); the kernel refuses it (EINVAL)`,
        { file: name, structure: 'cow-header', offset: 12 },
      )
    default:
      return new CorruptImageError(`dmsnap: ${name}: unsupported version ${h.version} at offset 0x8 (expected 1); the kernel refuses it (EINVAL)`, {
        file: name,
        structure: 'cow-header',
        offset: 8,
      })
  }
}

/** Open the origin named by -o origin=PATH (format probed unless origin_format is given). */
async function openOrigin(context: OpenContext, options: OpenImageOptions): Promise<DiskImage | undefined> {
  const path = options.options?.origin
  if (!path) return undefined
  const fmt = options.options?.origin_format
  if (fmt !== undefined && !isFormatName(fmt)) throw new UsageError(`dmsnap: unknown origin format '${fmt}'`)
  const rw = options.options?.origin_rw === 'on' || options.options?.origin_rw === 'true'
  return context.openImage(path, { readOnly: !rw, format: fmt, depth: (options.depth ?? 0) + 1, chain: options.chain ?? [] })
}

export function parseOnFull(v: string | undefined): OnFull {
  if (v === undefined || v === 'invalidate') return 'invalidate'
  if (v === 'refuse') return 'refuse'
  throw new UsageError(`dmsnap: on_full must be 'invalidate' or 'refuse', not '${v}'`)
}

export const dmsnapDriver: FormatDriver = {
  name: 'dmsnap',
  async open(device, context, options) {
    const onFull = parseOnFull(options.options?.on_full)
    const origin = await openOrigin(context, options)
    try {
      const img = await DmsnapImage.open(device, { origin, onFull, forCheck: options.forCheck, readOnly: options.readOnly })
      img.openDevice = context.openDevice
      return img
    } catch (e) {
      if (origin) await origin.close().catch(() => undefined)
      throw e
    }
  },
  async create(device, context, options) {
    const parsed = parseCreateOptions(options.options, options.size)
    let originSize: number | undefined
    if (options.options.origin) {
      const origin = await context.openImage(options.options.origin, { readOnly: true })
      originSize = origin.virtualSize
      await origin.close()
    }
    await createStore(device, { ...parsed, originSize })
  },
}
