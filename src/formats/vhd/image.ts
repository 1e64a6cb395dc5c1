/**
 * A VHD behind the one image interface. Fixed disks map guest bytes 1:1 onto
 * the file; dynamic disks through the BAT, one block (its sector bitmap, then
 * its data) per entry; differencing disks like dynamic ones, except that
 * sectors whose bitmap bit is clear, and unmapped blocks, come from the
 * parent. Dynamic disks are read as QEMU reads them: a mapped block is read
 * whole and its bitmap is not consulted.
 */
import { CorruptImageError, ReadOnlyError, UsageError, hex } from '../../errors.js'
import { readInto, type BlockDevice } from '../../io/block-device.js'
import type { CheckOptions, CheckReport, RepairMode, RepairResult } from '../../check/types.js'
import type { OpenContext, OpenImageOptions } from '../../image/context.js'
import type { DiskImage, Extent, ImageInfo, InPlaceRange, WritesInPlace } from '../../image/disk-image.js'
import { checkGuestRange } from '../../image/range.js'
import { readLayout, type SparseLayout, type VhdLayout } from './open.js'
import { openParent } from './parent.js'
import { BAT_UNUSED, SECTOR, TYPE_DIFFERENCING } from './spec.js'
import { VhdWriter } from './write.js'

export class VhdImage implements DiskImage, WritesInPlace {
  readonly format = 'vpc'
  writer: VhdWriter | undefined
  private bitmapCache: { offset: number; bits: Uint8Array } | undefined

  /** for a differencing disk opened for check: how to open its parent (to compare UUIDs) */
  parentOpener: (() => Promise<DiskImage>) | undefined

  constructor(
    readonly device: BlockDevice,
    readonly layout: VhdLayout,
    readonly backing: DiskImage | undefined,
    private readonly infoOnly: boolean,
  ) {}

  get filename(): string {
    return this.device.name
  }
  get virtualSize(): number {
    return this.layout.virtualSize
  }
  get readOnly(): boolean {
    return this.device.readOnly
  }
  get diskType(): number {
    return this.layout.footer.diskType
  }
  get sparse(): SparseLayout | undefined {
    return this.layout.sparse
  }
  get differencing(): boolean {
    return this.diskType === TYPE_DIFFERENCING
  }

  private refuseInfoOnly(what: string): void {
    if (this.infoOnly) throw new UsageError(`vpc: ${this.filename}: opened for info only; cannot ${what}`)
  }

  /** Host offset of the block holding guest `offset`, or undefined when the BAT maps none. */
  blockOffset(index: number): number | undefined {
    const s = this.sparse!
    const v = index < s.bat.length ? s.bat[index]! : BAT_UNUSED
    return v === BAT_UNUSED ? undefined : v * SECTOR
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkGuestRange(`vpc: ${this.filename}: read`, offset, length, this.virtualSize)
    this.refuseInfoOnly('read')
    if (this.writer) await this.writer.idle()
    return this.readNow(offset, length)
  }

  /**
   * Guest bytes [offset, offset + buf.byteLength) into `buf`, every byte of it written (zeros where the disk
   * stores none), so a caller (convert) can hand in a reused buffer instead of taking a new one per read.
   * Fixed disks: one read. Dynamic disks: every mapped block's part read at once straight into `buf`, as
   * qemu reads them (the data only: a dynamic disk's bitmap is not consulted), unmapped parts zero-filled.
   */
  async readInto(offset: number, buf: Uint8Array): Promise<void> {
    checkGuestRange(`vpc: ${this.filename}: read`, offset, buf.byteLength, this.virtualSize)
    this.refuseInfoOnly('read')
    if (this.writer) await this.writer.idle()
    await this.readNowInto(offset, buf)
  }

  /** read() without waiting for the writer (the writer's own reads of guest bytes) */
  async readNow(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length)
    await this.readNowInto(offset, out, true)
    return out
  }

  private async readNowInto(offset: number, buf: Uint8Array, zeroed = false): Promise<void> {
    const s = this.sparse
    if (!s) return readInto(this.device, offset, buf, 'data')
    const length = buf.byteLength
    // a differencing disk's parent may end before the child: what it does not hold reads as zeros
    if (this.differencing && !zeroed) buf.fill(0)
    const jobs: Array<Promise<void>> = []
    for (let pos = offset; pos < offset + length;) {
      const index = Math.floor(pos / s.blockSize)
      const inBlock = pos - index * s.blockSize
      const n = Math.min(s.blockSize - inBlock, offset + length - pos)
      const block = this.blockOffset(index)
      const dst = buf.subarray(pos - offset, pos - offset + n)
      if (block === undefined) {
        if (this.differencing) await this.readParent(pos, dst)
        else if (!zeroed) dst.fill(0)
      } else if (!this.differencing) {
        jobs.push(readInto(this.device, block + s.bitmapSize + inBlock, dst, 'data'))
      } else {
        await this.readDifferencing(block, inBlock, pos, dst)
      }
      pos += n
    }
    if (jobs.length > 0) await settleAll(jobs)
  }

  private async readParent(pos: number, dst: Uint8Array): Promise<void> {
    const p = this.backing
    if (!p || pos >= p.virtualSize) return
    const n = Math.min(dst.byteLength, p.virtualSize - pos)
    dst.set(await p.read(pos, n))
  }

  dropBitmapCache(): void {
    this.bitmapCache = undefined
  }

  async bitmap(block: number): Promise<Uint8Array> {
    if (this.bitmapCache?.offset === block) return this.bitmapCache.bits
    const bits = await this.device.read(block, this.sparse!.bitmapSize, 'bitmap')
    this.bitmapCache = { offset: block, bits }
    return bits
  }

  /** Runs of sectors within one block: [start, end) in bytes from the block start, and whether the child holds them. */
  private async bitmapRuns(block: number, from: number, to: number): Promise<Array<{ start: number; end: number; mine: boolean }>> {
    const bits = await this.bitmap(block)
    const runs: Array<{ start: number; end: number; mine: boolean }> = []
    for (let p = from; p < to;) {
      const sector = Math.floor(p / SECTOR)
      const mine = ((bits[sector >> 3]! >> (7 - (sector & 7))) & 1) === 1
      const end = Math.min(to, (sector + 1) * SECTOR)
      const last = runs[runs.length - 1]
      if (last && last.mine === mine) last.end = end
      else runs.push({ start: p, end, mine })
      p = end
    }
    return runs
  }

  private async readDifferencing(block: number, inBlock: number, pos: number, dst: Uint8Array): Promise<void> {
    const s = this.sparse!
    for (const r of await this.bitmapRuns(block, inBlock, inBlock + dst.byteLength)) {
      const part = dst.subarray(r.start - inBlock, r.end - inBlock)
      if (r.mine) part.set(await this.device.read(block + s.bitmapSize + r.start, r.end - r.start, 'data'))
      else await this.readParent(pos + (r.start - inBlock), part)
    }
  }

  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    checkGuestRange(`vpc: ${this.filename}: map`, offset, length, this.virtualSize)
    if (this.writer) await this.writer.idle()
    const end = offset + length
    const s = this.sparse
    if (!s) {
      yield* this.fixedExtents(offset, end)
      return
    }
    for (let pos = offset; pos < end;) {
      const index = Math.floor(pos / s.blockSize)
      const inBlock = pos - index * s.blockSize
      const n = Math.min(s.blockSize - inBlock, end - pos)
      const block = this.blockOffset(index)
      if (block === undefined) {
        if (this.differencing) yield* this.parentExtents(pos, n)
        else yield { start: pos, length: n, depth: 0, present: true, zero: true, data: false }
      } else if (!this.differencing) {
        yield { start: pos, length: n, depth: 0, present: true, zero: false, data: true, hostOffset: block + s.bitmapSize + inBlock, file: this.filename }
      } else {
        for (const r of await this.bitmapRuns(block, inBlock, inBlock + n)) {
          const at = pos + r.start - inBlock
          if (r.mine) {
            yield {
              start: at,
              length: r.end - r.start,
              depth: 0,
              present: true,
              zero: false,
              data: true,
              hostOffset: block + s.bitmapSize + r.start,
              file: this.filename,
            }
          } else yield* this.parentExtents(at, r.end - r.start)
        }
      }
      pos += n
    }
  }

  /** A fixed disk maps 1:1 onto its file; holes read as zeros (qemu-img map says zero and data, as it does for vpc). */
  private async *fixedExtents(offset: number, end: number): AsyncIterable<Extent> {
    for (let pos = offset; pos < end;) {
      const st = this.device.hostStatus ? await this.device.hostStatus(pos, end - pos) : { data: true, length: end - pos }
      yield { start: pos, length: st.length, depth: 0, present: true, zero: !st.data, data: true, hostOffset: pos, file: this.filename }
      pos += st.length
    }
  }

  private async *parentExtents(pos: number, n: number): AsyncIterable<Extent> {
    const p = this.backing
    const inParent = p ? Math.max(0, Math.min(n, p.virtualSize - pos)) : 0
    if (p && inParent > 0) for await (const e of p.extents(pos, inParent)) yield { ...e, depth: e.depth + 1 }
    if (inParent < n) yield { start: pos + inParent, length: n - inParent, depth: 0, present: false, zero: true, data: false }
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = { filename: this.filename, format: 'vpc', virtualSize: this.virtualSize }
    if (this.device.allocatedSize) info.actualSize = await this.device.allocatedSize()
    if (this.sparse) info.clusterSize = this.sparse.blockSize
    if (this.backing) info.backingFilename = this.backing.filename
    return info
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`vpc: ${this.filename}: write`, offset, data.byteLength, this.virtualSize)
    await this.requireWriter().write(offset, data)
  }

  /** a fixed disk stores its guest bytes in place, before the footer (a dynamic disk maps blocks: undefined) */
  inPlace(offset: number, length: number): InPlaceRange | undefined {
    if (!this.writer || this.sparse || offset < 0 || length <= 0 || offset + length > this.virtualSize) return undefined
    if (this.layout.virtualSize > this.layout.footerOffset) return undefined // the writer refuses it, with its error
    return { file: this.filename, hostOffset: offset }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkGuestRange(`vpc: ${this.filename}: write zeroes`, offset, length, this.virtualSize)
    await this.requireWriter().writeZeroes(offset, length)
  }

  private requireWriter(): VhdWriter {
    if (this.writer) return this.writer
    if (this.readOnly) throw new ReadOnlyError(`vpc: ${this.filename}: opened read-only`, { file: this.filename })
    throw new ReadOnlyError(`vpc: ${this.filename}: imgtool does not write differencing disks`, { file: this.filename })
  }

  async flush(): Promise<void> {
    if (this.writer) await this.writer.idle()
    await this.device.flush()
  }

  async check(options: CheckOptions = {}): Promise<CheckReport> {
    void options
    const { checkVhd, finish } = await import('./check.js')
    const report = await checkVhd(this.device)
    if (this.differencing && this.parentOpener) {
      let parent: DiskImage | undefined
      try {
        parent = await this.parentOpener()
      } catch (e) {
        const why = e instanceof Error ? e.message : String(e)
        ;(report.notices ??= []).push({ kind: 'parent-not-checked', structure: 'parent locator', message: `the parent UUID was not compared: ${why}` })
      }
      if (parent) {
        try {
          const m = parentMismatch(this, parent)
          if (m)
            report.findings.push({
              kind: 'parent-uuid-mismatch',
              severity: 'corruption',
              structure: 'dynamic header',
              hostOffset: m.offset,
              message: m.message,
            })
        } finally {
          await parent.close().catch(() => undefined)
        }
      }
    }
    return finish(report)
  }

  async repair(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
    if (this.writer) await this.writer.idle()
    this.writer?.forgetTail()
    const { repairVhd } = await import('./repair.js')
    return repairVhd(this.device, options)
  }

  async close(): Promise<void> {
    try {
      if (this.writer) await this.writer.idle()
    } finally {
      if (this.backing) await this.backing.close().catch(() => undefined)
      await this.device.close()
    }
  }
}

/**
 * A VHD whose footer or header cannot be read, opened for a check or a
 * repair: it reads nothing; check names what is wrong, repair restores what
 * it can (a footer at 0 from its copy at the end).
 */
export class UnreadableVhd implements DiskImage {
  readonly format = 'vpc'
  readonly virtualSize = 0
  readonly backing = undefined
  constructor(
    readonly device: BlockDevice,
    readonly cause: CorruptImageError,
  ) {}
  get filename(): string {
    return this.device.name
  }
  get readOnly(): boolean {
    return this.device.readOnly
  }
  read(): Promise<Uint8Array> {
    return Promise.reject(this.cause)
  }
  // eslint-disable-next-line require-yield
  async *extents(): AsyncIterable<Extent> {
    throw this.cause
  }
  info(): Promise<ImageInfo> {
    return Promise.reject(this.cause)
  }
  async flush(): Promise<void> {
    await this.device.flush()
  }
  async close(): Promise<void> {
    await this.device.close()
  }
  async check(): Promise<CheckReport> {
    const { checkVhd } = await import('./check.js')
    return checkVhd(this.device)
  }
  async repair(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
    const { repairVhd } = await import('./repair.js')
    return repairVhd(this.device, options)
  }
}

/** Wait for every job (none is left writing into a buffer its caller reuses), then throw the first failure. */
async function settleAll(jobs: Array<Promise<void>>): Promise<void> {
  const settled = await Promise.allSettled(jobs)
  const failed = settled.find((x) => x.status === 'rejected')
  if (failed) throw (failed as PromiseRejectedResult).reason
}

const uuidText = (u: Uint8Array) => Array.from(u, (b) => b.toString(16).padStart(2, '0')).join('')

/**
 * A differencing disk names its parent by the parent's footer UUID (dynamic
 * header, offset 40). QEMU 7.2 reads no parent and never compares it; imgtool
 * reports a mismatch (or a parent that is no VHD, so has no UUID) and refuses
 * to write through it: data written over the wrong parent is silently wrong.
 */
export function parentMismatch(child: VhdImage, parent: DiskImage): { offset: number; message: string } | undefined {
  const s = child.sparse!
  const offset = s.headerOffset + 40
  const want = uuidText(s.header.parentUuid)
  if (!(parent instanceof VhdImage)) {
    return {
      offset,
      message: `vpc: ${child.filename}: the parent ${parent.filename} is ${parent.format}, not a VHD: its UUID cannot match ${want} (dynamic header at ${hex(offset)})`,
    }
  }
  const got = uuidText(parent.layout.footer.uuid)
  if (got === want) return undefined
  return {
    offset,
    message: `vpc: ${child.filename}: parent UUID ${want} (dynamic header at ${hex(offset)}) does not match ${parent.filename}'s UUID ${got}: the parent changed or is another disk`,
  }
}

export async function openVhd(device: BlockDevice, context: OpenContext, options: OpenImageOptions): Promise<VhdImage | UnreadableVhd> {
  const forCheck = options.forCheck ?? false
  let layout: VhdLayout
  try {
    layout = await readLayout(device, forCheck)
  } catch (e) {
    if (forCheck && e instanceof CorruptImageError) return new UnreadableVhd(device, e)
    throw e
  }
  const infoOnly = options.infoOnly ?? false
  let backing: DiskImage | undefined
  if (layout.footer.diskType === TYPE_DIFFERENCING && !infoOnly && !forCheck) {
    backing = await openParent(device, layout.sparse!.header, layout.sparse!.headerOffset, context, options)
  }
  const image = new VhdImage(device, layout, backing, infoOnly)
  if (layout.footer.diskType === TYPE_DIFFERENCING && forCheck) {
    image.parentOpener = () => openParent(device, layout.sparse!.header, layout.sparse!.headerOffset, context, options)
  }
  if (backing && !device.readOnly) {
    const m = parentMismatch(image, backing)
    if (m) {
      await backing.close().catch(() => undefined)
      throw new ReadOnlyError(`${m.message}; not opened for writing`, { file: device.name, structure: 'dynamic header', offset: m.offset })
    }
  }
  if (!device.readOnly && !forCheck && !infoOnly) {
    image.writer =
      layout.footer.diskType !== TYPE_DIFFERENCING
        ? new VhdWriter(device, layout)
        : new VhdWriter(device, layout, { readGuest: (o, n) => image.readNow(o, n), bitmapChanged: () => image.dropBitmapCache() })
  }
  return image
}
