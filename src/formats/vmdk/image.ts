/**
 * A VMDK behind the one image interface: a list of extents laid end to end in
 * guest space. A flat extent maps its bytes 1:1 onto its file from its start
 * offset; a sparse extent through its grain directory and tables (unallocated
 * and zeroed grains read as zeros, compressed grains are inflated).
 */
import { CorruptImageError, ReadOnlyError, UsageError, hex } from '../../errors.js'
import { readInto, type BlockDevice } from '../../io/block-device.js'
import type { CheckOptions, CheckReport, RepairMode, RepairResult } from '../../check/types.js'
import type { OpenContext, OpenImageOptions } from '../../image/context.js'
import type { DiskImage, Extent, ImageInfo, InPlaceRange, WritesInPlace } from '../../image/disk-image.js'
import { checkGuestRange } from '../../image/range.js'
import { GrainMap } from './grains.js'
import { readLayout, type FlatExtent, type SparseExtent, type VmdkExtent, type VmdkLayout } from './open.js'
import { SparseWriter } from './write.js'

export class VmdkImage implements DiskImage, WritesInPlace {
  readonly format = 'vmdk'
  readonly maps = new Map<VmdkExtent, GrainMap>()
  /** one writer per sparse extent when the image was opened for writing */
  readonly writers = new Map<VmdkExtent, SparseWriter>()

  constructor(
    readonly device: BlockDevice,
    readonly layout: VmdkLayout,
    private readonly infoOnly: boolean,
    private readonly writable = false,
  ) {
    for (const e of layout.extents) {
      if (e.kind !== 'sparse') continue
      const map = new GrainMap(e, !writable)
      this.maps.set(e, map)
      if (writable) this.writers.set(e, new SparseWriter(e, map))
    }
  }

  get filename(): string {
    return this.device.name
  }
  get virtualSize(): number {
    return this.layout.virtualSize
  }
  get readOnly(): boolean {
    return !this.writable
  }

  /** The extent holding guest byte `pos` (extents are few: a linear walk). */
  extentAt(pos: number): VmdkExtent {
    for (const e of this.layout.extents) if (pos < e.start + e.length) return e
    throw new CorruptImageError(`vmdk: ${this.filename}: no extent holds guest offset ${hex(pos)}`, { file: this.filename, structure: 'descriptor' })
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length)
    await this.readInto(offset, out)
    return out
  }

  /**
   * Guest bytes [offset, offset + buf.byteLength) into `buf`, every byte of it written (zeros where the image
   * stores none), so a caller (convert) can hand in a reused buffer instead of taking a new one per read.
   */
  async readInto(offset: number, buf: Uint8Array): Promise<void> {
    const length = buf.byteLength
    checkGuestRange(`vmdk: ${this.filename}: read`, offset, length, this.virtualSize)
    if (this.infoOnly) throw new UsageError(`vmdk: ${this.filename}: opened for info only; cannot read`)
    for (let pos = offset; pos < offset + length;) {
      const e = this.extentAt(pos)
      const rel = pos - e.start
      const n = Math.min(e.start + e.length, offset + length) - pos
      const dst = buf.subarray(pos - offset, pos - offset + n)
      if (e.kind === 'flat') await readInto(e.device, e.hostStart + rel, dst, 'data')
      else await this.readSparse(e, rel, dst)
      pos += n
    }
  }

  /**
   * Bytes [rel, rel + dst.byteLength) of a sparse extent: the grains' entries first, then every read at
   * once: runs of grains that follow each other in the file in one read each, compressed grains
   * together (GrainMap.compressedGrains: one read of a stream's span, each grain inflated from it).
   */
  private async readSparse(e: SparseExtent, rel: number, dst: Uint8Array): Promise<void> {
    const map = this.maps.get(e)!
    const gs = e.grainSize
    const end = rel + dst.byteLength
    const jobs: Array<Promise<void>> = []
    let run: { host: number; at: number; length: number } | undefined
    const flushRun = () => {
      if (!run) return
      const r = run
      jobs.push(readInto(e.device, r.host, dst.subarray(r.at, r.at + r.length), 'data'))
      run = undefined
    }
    const packed: Array<{ sector: number; inGrain: number; at: number; length: number }> = []
    for (let pos = rel; pos < end;) {
      const inGrain = pos % gs
      const n = Math.min(gs - inGrain, end - pos)
      const entry = await map.entry(pos)
      if (entry.kind === 'normal') {
        const host = entry.sector * 512 + inGrain
        if (run && run.host + run.length === host && run.length < 8 << 20) run.length += n
        else {
          flushRun()
          run = { host, at: pos - rel, length: n }
        }
      } else {
        flushRun()
        if (entry.kind === 'compressed') packed.push({ sector: entry.sector, inGrain, at: pos - rel, length: n })
        // unallocated and zeroed grains read as zeros (dst may be a reused buffer)
        else dst.fill(0, pos - rel, pos - rel + n)
      }
      pos += n
    }
    flushRun()
    if (packed.length > 0) {
      jobs.push(
        map.compressedGrains(packed.map((p) => p.sector)).then((grains) => {
          for (const [i, p] of packed.entries()) {
            const bytes = grains[i]!
            if (p.inGrain + p.length > bytes.byteLength) {
              throw new CorruptImageError(
                `vmdk: ${e.file}: compressed grain at ${hex(p.sector * 512)}: inflates to ${bytes.byteLength} bytes, fewer than the ${p.inGrain + p.length} read from it`,
                { file: e.file, structure: 'compressed grain', offset: p.sector * 512 },
              )
            }
            dst.set(bytes.subarray(p.inGrain, p.inGrain + p.length), p.at)
          }
        }),
      )
    }
    const settled = await Promise.allSettled(jobs)
    const failed = settled.find((x) => x.status === 'rejected')
    if (failed) throw (failed as PromiseRejectedResult).reason
  }

  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    checkGuestRange(`vmdk: ${this.filename}: map`, offset, length, this.virtualSize)
    const end = offset + length
    for (let pos = offset; pos < end;) {
      const e = this.extentAt(pos)
      const stop = Math.min(end, e.start + e.length)
      if (e.kind === 'flat') yield* this.flatExtents(e, pos, stop)
      else yield* this.sparseExtents(e, pos, stop)
      pos = stop
    }
  }

  /** A flat extent as qemu-img maps it: data, and zero too where the host file has a hole. */
  private async *flatExtents(e: FlatExtent, pos: number, stop: number): AsyncIterable<Extent> {
    const dev = e.device
    while (pos < stop) {
      const host = e.hostStart + pos - e.start
      const st =
        dev.hostStatus && host < dev.size ? await dev.hostStatus(host, Math.min(stop - pos, dev.size - host)) : { data: host < dev.size, length: stop - pos }
      const n = Math.min(st.length, stop - pos)
      yield { start: pos, length: n, depth: 0, present: true, zero: !st.data, data: true, hostOffset: host, file: e.file }
      pos += n
    }
  }

  private async *sparseExtents(e: SparseExtent, pos: number, stop: number): AsyncIterable<Extent> {
    const map = this.maps.get(e)!
    while (pos < stop) {
      const rel = pos - e.start
      const n = Math.min(e.grainSize - (rel % e.grainSize), stop - pos)
      const entry = await map.entry(rel)
      if (entry.kind === 'unallocated') yield { start: pos, length: n, depth: 0, present: false, zero: true, data: false }
      else if (entry.kind === 'zero') yield { start: pos, length: n, depth: 0, present: true, zero: true, data: false }
      else if (entry.kind === 'compressed') yield { start: pos, length: n, depth: 0, present: true, zero: false, data: true }
      else yield { start: pos, length: n, depth: 0, present: true, zero: false, data: true, hostOffset: entry.sector * 512 + (rel % e.grainSize), file: e.file }
      pos += n
    }
  }

  async info(): Promise<ImageInfo> {
    const l = this.layout
    const info: ImageInfo = { filename: this.filename, format: 'vmdk', virtualSize: this.virtualSize }
    if (this.device.allocatedSize) {
      let total = await this.device.allocatedSize()
      for (const d of l.extraDevices) if (d.allocatedSize) total += await d.allocatedSize()
      info.actualSize = total
    }
    // qemu-img gives a cluster size when every extent is alike and sparse (vmdk_co_get_info)
    const first = l.extents[0]!
    const alike = l.extents.every(
      (e) =>
        e.kind === first.kind &&
        (e.kind === 'flat' || (first.kind === 'sparse' && e.kind === 'sparse' && e.compressed === first.compressed && e.grainSize === first.grainSize)),
    )
    if (alike && first.kind === 'sparse') info.clusterSize = first.grainSize
    info.formatSpecific = {
      type: 'vmdk',
      data: {
        cid: l.descriptor.cid,
        'parent-cid': l.descriptor.parentCid,
        'create-type': l.createType,
        extents: l.extents.map((e) => {
          const o: Record<string, unknown> = { 'virtual-size': e.length, filename: e.file }
          if (e.kind === 'sparse') o['cluster-size'] = e.grainSize
          o['format'] = e.type
          if (e.kind === 'sparse' && e.compressed) o['compressed'] = true
          return o
        }),
      },
    }
    return info
  }

  /**
   * Guest bytes into the extents: a flat extent in place, a sparse extent
   * through its writer (grains allocated at the end of its file, linked once
   * durable: write.ts).
   */
  async write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`vmdk: ${this.filename}: write`, offset, data.byteLength, this.virtualSize)
    if (!this.writable) throw new ReadOnlyError(`vmdk: ${this.filename}: the image is open read-only`, { file: this.filename })
    const end = offset + data.byteLength
    const parts: Array<Promise<void>> = []
    for (let pos = offset; pos < end;) {
      const e = this.extentAt(pos)
      const n = Math.min(e.start + e.length, end) - pos
      const piece = data.subarray(pos - offset, pos - offset + n)
      if (e.kind === 'flat') parts.push(e.device.write(e.hostStart + pos - e.start, piece, 'data'))
      else parts.push(this.writers.get(e)!.write(pos - e.start, piece))
      pos += n
    }
    const settled = await Promise.allSettled(parts)
    const failed = settled.find((x) => x.status === 'rejected')
    if (failed) throw (failed as PromiseRejectedResult).reason
  }

  /** a range inside one flat extent is stored in place in the extent's file (sparse extents: undefined) */
  inPlace(offset: number, length: number): InPlaceRange | undefined {
    if (!this.writable || offset < 0 || length <= 0 || offset + length > this.virtualSize) return undefined
    const e = this.extentAt(offset)
    if (e.kind !== 'flat' || offset + length > e.start + e.length) return undefined
    return { file: e.device.name, hostOffset: e.hostStart + offset - e.start }
  }

  async flush(): Promise<void> {
    if (!this.writable) return
    for (const e of this.layout.extents) await e.device.flush()
  }

  async check(options: CheckOptions = {}): Promise<CheckReport> {
    void options
    const { checkVmdk } = await import('./check.js')
    return checkVmdk(this.filename, this.layout)
  }

  /** Repair where it is safe (repair.ts): a hosted monolithicSparse extent's redundant metadata and leaked end. */
  async repair(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
    const { repairVmdk } = await import('./repair.js')
    return repairVmdk(this.device, this.layout, options)
  }

  async close(): Promise<void> {
    try {
      for (const d of this.layout.extraDevices) if (d !== this.device) await d.close().catch(() => undefined)
    } finally {
      await this.device.close()
    }
  }
}

export async function openVmdk(device: BlockDevice, context: OpenContext, options: OpenImageOptions): Promise<VmdkImage> {
  const layout = await readLayout(device, context, options)
  const writable = !options.readOnly && !options.forCheck
  if (writable) {
    // flat extents and uncompressed sparse extents take writes; a stream (compressed grains) does not
    const stream = layout.extents.find((e) => e.kind === 'sparse' && (e.compressed || e.markers))
    const problem = layout.problems[0]
    if (stream || problem) {
      for (const d of layout.extraDevices) if (d !== device) await d.close().catch(() => undefined)
      const why = stream ? `its extent ${stream.file} is stream-optimized (compressed grains)` : `it is damaged (${problem!.message})`
      throw new ReadOnlyError(`vmdk: ${device.name}: imgtool writes monolithicSparse and flat VMDK images only; ${why}`, { file: device.name })
    }
  }
  return new VmdkImage(device, layout, options.infoOnly ?? false, writable)
}
