/**
 * A qcow2 image: open (header, L1, backing chain, data file, snapshot table,
 * bitmap directory), guest reads, extents with qemu-img map's meaning, info.
 */
import { UnsupportedFeatureError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { l2CacheBudget, type OpenContext, type OpenImageOptions } from '../../image/context.js'
import type { DiskImage, Extent, ImageInfo, SnapshotSelector } from '../../image/disk-image.js'
import type { CheckOptions, CheckReport, RepairMode, RepairResult } from '../../check/types.js'
import { checkGuestRange } from '../../image/range.js'
import { bitmapFlagNames, readBitmapDirectory, type Qcow2Bitmap } from './spec/bitmap-directory.js'
import type { ClusterMapper, MappingRun } from './read/cluster.js'
import { openBacking, openDataFile, readActiveL1 } from './read/open.js'
import { Qcow2State } from './read/state.js'
import { COMPRESSION_ZSTD, CRYPT_AES } from './spec/constants.js'
import { readLuksInfo } from './spec/luks.js'
import { bitmapsValid, dataFileRaw, hasDataFile, hasExtendedL2, hasLazyRefcounts, isCorrupt, isDirty, readHeader, type Qcow2Header } from './spec/header.js'
import { combinePath } from './spec/paths.js'
import type { RefcountReader } from './read/refcount.js'
import { readSnapshotTable, snapshotInfo, type Qcow2Snapshot } from './spec/snapshot-table.js'
import type { Qcow2Writer, WriteZeroesOptions } from './write/write.js'

export class Qcow2Image implements DiskImage {
  readonly format = 'qcow2'
  /** the open image's state (read/state.ts): handed to check, repair, the writer and the operations */
  readonly state: Qcow2State
  private metadataPrealloc: boolean | undefined
  /** the writer, attached when the image is opened read-write (write.ts) */
  writer: Qcow2Writer | undefined
  /** why no writer could be attached (read-only, unsupported feature) */
  writerRefusal: Error | undefined

  constructor(
    device: BlockDevice,
    header: Qcow2Header,
    /** the active L1 table */
    l1: Uint8Array,
    /** where guest data lives: the image file, or the external data file */
    dataDevice: BlockDevice,
    backing: DiskImage | undefined,
    snapshots: Qcow2Snapshot[],
    bitmaps: Qcow2Bitmap[],
    readonly context: OpenContext,
    readonly openOptions: OpenImageOptions,
  ) {
    const l2CacheBytes = l2CacheBudget(openOptions.depth ?? 0, header.clusterSize)
    this.state = new Qcow2State(device, header, l1, dataDevice, backing, snapshots, bitmaps, l2CacheBytes, Boolean(openOptions.infoOnly))
  }

  get device(): BlockDevice {
    return this.state.device
  }
  get header(): Qcow2Header {
    return this.state.header
  }
  get dataDevice(): BlockDevice {
    return this.state.dataDevice
  }
  get backing(): DiskImage | undefined {
    return this.state.backing
  }
  get snapshots(): Qcow2Snapshot[] {
    return this.state.snapshots
  }
  get bitmaps(): Qcow2Bitmap[] {
    return this.state.bitmaps
  }
  /** the active L1 table */
  get l1(): Uint8Array {
    return this.state.l1
  }
  /** the mapper over the active L1 table and the L2 cache */
  get mapper(): ClusterMapper {
    return this.state.mapper
  }
  get refcounts(): RefcountReader {
    return this.state.refcounts
  }

  /** @internal The writer switched to another active L1 table (read/state.ts). */
  replaceL1(l1: Uint8Array): void {
    this.state.replaceL1(l1)
  }

  get filename(): string {
    return this.device.name
  }
  get virtualSize(): number {
    return this.header.size
  }
  get readOnly(): boolean {
    return this.device.readOnly
  }
  get clusterSize(): number {
    return this.header.clusterSize
  }

  /** Name of the backing file combined with this image's path, as QEMU shows it. */
  get fullBackingFilename(): string | undefined {
    return this.header.backingFile === undefined ? undefined : combinePath(this.filename, this.header.backingFile)
  }

  /**
   * Guest bytes. On an image open for writing, reads share the writer's mutex
   * (issue rule 4): they run alongside each other but never alongside a
   * write, discard, snapshot operation or resize, so a read never returns
   * bytes of a cluster that was freed and reused while it was mapped.
   */
  read(offset: number, length: number): Promise<Uint8Array> {
    const w = this.writer
    if (w) return w.mutex.shared(() => this.readUnlocked(offset, length))
    return this.readUnlocked(offset, length)
  }

  /** @internal guest read without the writer's mutex: for the writer itself, which holds it. */
  readUnlocked(offset: number, length: number): Promise<Uint8Array> {
    return this.state.readGuest(offset, length)
  }

  /**
   * QEMU asks the host file whether data clusters are holes only when the
   * image looks metadata-preallocated: more clusters have a refcount than the
   * file has allocated blocks for (qcow2_detect_metadata_preallocation).
   */
  async detectMetadataPreallocation(): Promise<boolean> {
    if (this.metadataPrealloc !== undefined) return this.metadataPrealloc
    let result = false
    if (this.device.allocatedSize) {
      const realClusters = Math.floor((await this.device.allocatedSize()) / this.clusterSize)
      const threshold = Math.max(Math.floor((realClusters * 10) / 9), realClusters + 2)
      const endCluster = Math.ceil(this.device.size / this.clusterSize)
      try {
        // as qcow2_detect_metadata_preallocation: reaching the threshold is enough
        result = (await this.refcounts.countReferenced(endCluster, threshold)) >= threshold
      } catch {
        result = false // QEMU ignores the failure and reports block status without it
      }
    }
    this.metadataPrealloc = result
    return result
  }

  /**
   * Extents with qemu-img map's meaning. On an image open for writing, each
   * L2 table's range is mapped under the writer's mutex (shared, like a
   * read) and yielded after it is released: every window is one consistent
   * state, and a caller that writes between two extents does not deadlock.
   */
  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    checkGuestRange(`qcow2: ${this.filename}: map`, offset, length, this.virtualSize)
    this.state.refuseInfoOnly()
    const w = this.writer
    if (!w) {
      const recurse = await this.detectMetadataPreallocation()
      for await (const run of this.state.mapper.map(offset, length)) yield* this.runExtents(run, recurse)
      return
    }
    const recurse = await w.mutex.shared(() => this.detectMetadataPreallocation())
    const window = this.state.l2Entries * this.clusterSize
    const end = offset + length
    for (let pos = offset; pos < end;) {
      const next = Math.min(end, (Math.floor(pos / window) + 1) * window)
      const from = pos
      const batch = await w.mutex.shared(async () => {
        const out: Extent[] = []
        for await (const run of this.state.mapper.map(from, next - from)) for await (const e of this.runExtents(run, recurse)) out.push(e)
        return out
      })
      yield* batch
      pos = next
    }
  }

  private async *runExtents(run: MappingRun, recurse: boolean): AsyncGenerator<Extent> {
    const base = { start: run.guest, length: run.length, depth: 0 }
    const file = this.dataDevice.name
    switch (run.type) {
      case 'normal': {
        if (!recurse) {
          yield { ...base, present: true, zero: false, data: true, hostOffset: run.hostOffset!, file }
          return
        }
        let done = 0
        while (done < run.length) {
          const st = this.dataDevice.hostStatus
            ? await this.dataDevice.hostStatus(run.hostOffset! + done, run.length - done)
            : { data: true, length: run.length - done }
          yield { start: run.guest + done, length: st.length, depth: 0, present: true, zero: !st.data, data: true, hostOffset: run.hostOffset! + done, file }
          done += st.length
        }
        return
      }
      case 'zero-alloc':
        yield { ...base, present: true, zero: true, data: false, hostOffset: run.hostOffset!, file }
        return
      case 'zero':
        yield { ...base, present: true, zero: true, data: false }
        return
      case 'compressed':
        yield { ...base, present: true, zero: false, data: true }
        return
      case 'unallocated':
      case 'unallocated-alloc': {
        const b = this.backing
        const end = run.guest + run.length
        if (!b) {
          const e: Extent = { ...base, present: false, zero: true, data: false }
          if (run.type === 'unallocated-alloc') {
            e.hostOffset = run.hostOffset!
            e.file = file
          }
          yield e
          return
        }
        const inBacking = Math.min(end, b.virtualSize)
        if (run.guest < inBacking) {
          for await (const e of b.extents(run.guest, inBacking - run.guest)) yield { ...e, depth: e.depth + 1 }
        }
        if (inBacking < end) {
          const from = Math.max(run.guest, inBacking)
          const e: Extent = { start: from, length: end - from, depth: 0, present: false, zero: true, data: false }
          if (run.type === 'unallocated-alloc') {
            // qemu-img map: the layer's host offset stays valid past a shorter backing file
            e.hostOffset = run.hostOffset! + (from - run.guest)
            e.file = file
          }
          yield e
        }
        return
      }
    }
  }

  async info(): Promise<ImageInfo> {
    const h = this.header
    const data: Record<string, unknown> = {}
    if (h.version === 2) {
      data['compat'] = '0.10'
      data['compression-type'] = 'zlib'
      data['refcount-bits'] = 16
      if (h.cryptMethod !== 0) data['encrypt'] = await this.encryptInfo()
    } else {
      data['compat'] = '1.1'
      data['compression-type'] = h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib'
      data['lazy-refcounts'] = hasLazyRefcounts(h)
      if (this.bitmaps.length > 0) {
        data['bitmaps'] = this.bitmaps.map((b) => ({ flags: bitmapFlagNames(b.flags), name: b.name, granularity: 2 ** b.granularityBits }))
      }
      // qemu-img's order (its QDict's): refcount-bits, data-file, encrypt, data-file-raw, corrupt, extended-l2
      data['refcount-bits'] = 2 ** h.refcountOrder
      if (h.dataFile !== undefined) data['data-file'] = h.dataFile
      if (h.cryptMethod !== 0) data['encrypt'] = await this.encryptInfo()
      if (hasDataFile(h)) data['data-file-raw'] = dataFileRaw(h)
      data['corrupt'] = isCorrupt(h)
      data['extended-l2'] = hasExtendedL2(h)
    }
    const info: ImageInfo = {
      filename: this.filename,
      format: 'qcow2',
      virtualSize: h.size,
      clusterSize: h.clusterSize,
      dirty: isDirty(h),
      formatSpecific: { type: 'qcow2', data },
    }
    if (h.cryptMethod !== 0) info.encrypted = true
    if (this.device.allocatedSize) info.actualSize = await this.device.allocatedSize()
    if (h.backingFile !== undefined) {
      info.backingFilename = h.backingFile
      info.fullBackingFilename = this.fullBackingFilename!
      if (h.backingFormat !== undefined) info.backingFormat = h.backingFormat
    }
    if (this.snapshots.length > 0) info.snapshots = this.snapshots.map(snapshotInfo)
    if (this.backing) info.backing = await this.backing.info()
    return info
  }

  /** qemu-img info's "encrypt": the format, and for LUKS what its header says (no key needed) */
  private async encryptInfo(): Promise<Record<string, unknown>> {
    const h = this.header
    if (h.cryptMethod === CRYPT_AES) return { format: 'aes' }
    return readLuksInfo(this.device, this.filename, h.crypto!)
  }

  /**
   * A read-only view of an internal snapshot (qemu-img convert/measure -l): the snapshot's L1 table over
   * this image's files, the current virtual size (as qemu's qcow2_snapshot_load_tmp), no writer. Closing
   * the view closes nothing; it must not be used after this image is closed.
   */
  async loadSnapshot(selector: SnapshotSelector): Promise<DiskImage> {
    const { findSnapshotToLoad, readSnapshotL1 } = await import('./ops/snapshot-view.js')
    if (!this.readOnly) throw new UnsupportedFeatureError(`qcow2: ${this.filename}: a snapshot is loaded for reading only from an image opened read-only`)
    const sn = findSnapshotToLoad(this.snapshots, selector, this.filename)
    const l1 = await readSnapshotL1(this.state, sn)
    const header: Qcow2Header = { ...this.header, l1Size: sn.l1Size, l1TableOffset: sn.l1TableOffset }
    const inner = new Qcow2Image(this.device, header, l1, this.dataDevice, this.backing, this.snapshots, this.bitmaps, this.context, this.openOptions)
    return {
      format: inner.format,
      filename: inner.filename,
      virtualSize: inner.virtualSize,
      readOnly: true,
      backing: inner.backing,
      read: (offset, length) => inner.read(offset, length),
      extents: (offset, length) => inner.extents(offset, length),
      info: () => inner.info(),
      flush: async () => undefined,
      close: async () => undefined,
    }
  }

  /** qemu-img check's verdict (check.ts) */
  async check(options: CheckOptions = {}): Promise<CheckReport> {
    return (await import('./check/run.js')).checkQcow2(this.state, options)
  }

  /** check, repair, check again (repair.ts) */
  async repair(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
    return (await import('./repair/repair.js')).repairQcow2(this.state, options)
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    return this.requireWriter().write(offset, data)
  }

  async writeZeroes(offset: number, length: number, options?: WriteZeroesOptions): Promise<void> {
    return this.requireWriter().writeZeroes(offset, length, options)
  }

  /** One whole cluster stored compressed (bytes from compress-write.ts). */
  async writeCompressed(offset: number, compressed: Uint8Array): Promise<void> {
    return this.requireWriter().writeCompressed(offset, compressed)
  }

  /** Several whole clusters stored compressed, in one metadata update. */
  async writeCompressedBatch(items: Array<{ offset: number; data: Uint8Array }>): Promise<void> {
    return this.requireWriter().writeCompressedBatch(items)
  }

  /** The end of a compressed stream (qemu-img convert -c): the file's end aligned up to 512 bytes. */
  async finishCompressed(): Promise<void> {
    return this.requireWriter().alignFileEnd()
  }

  private requireWriter(): Qcow2Writer {
    if (this.writer) return this.writer
    throw this.writerRefusal ?? new UnsupportedFeatureError(`qcow2: ${this.filename}: image is not open for writing`)
  }

  /** Writers call this when compressed clusters are freed (their host bytes may be reused). */
  dropCompressedCache(): void {
    this.state.dropCompressedCache()
  }

  async flush(): Promise<void> {
    if (this.writer) return this.writer.flush()
    await this.device.flush()
    if (this.dataDevice !== this.device) await this.dataDevice.flush()
  }

  async close(): Promise<void> {
    if (this.writer) {
      try {
        await this.writer.close()
      } catch (e) {
        await this.closeDevices().catch(() => undefined)
        throw e
      }
    }
    await this.closeDevices()
  }

  private async closeDevices(): Promise<void> {
    if (this.backing) await this.backing.close()
    if (this.dataDevice !== this.device) await this.dataDevice.close()
    await this.device.close()
  }
}

/** Open a qcow2 image on `device`. The caller owns `device` until this returns. */
export async function openQcow2(device: BlockDevice, context: OpenContext, options: OpenImageOptions): Promise<Qcow2Image> {
  const file = device.name
  const forCheck = options.forCheck ?? false
  const h = await readHeader(device, { file, readOnly: device.readOnly, forCheck, infoOnly: options.infoOnly === true })
  const writing = !device.readOnly && !forCheck
  const l1 = await readActiveL1(device, h, writing)

  const opened: Array<{ close(): Promise<void> }> = []
  try {
    let dataDevice = device
    const infoOnly = options.infoOnly ?? false
    if (hasDataFile(h) && !infoOnly) {
      dataDevice = await openDataFile(device, h, context)
      opened.push(dataDevice)
    }
    let backing: DiskImage | undefined
    if (h.backingFile !== undefined && !infoOnly) {
      backing = await openBacking(file, h, context, options)
      opened.push(backing)
    }
    const snapshots = forCheck || h.nbSnapshots === 0 ? [] : await readSnapshotTable(device, file, h.snapshotsOffset, h.nbSnapshots)
    const bitmaps = h.bitmaps && bitmapsValid(h) && !forCheck ? await readBitmapDirectory(device, file, h.bitmaps) : []
    const image = new Qcow2Image(device, h, l1, dataDevice, backing, snapshots, bitmaps, context, options)
    // open read/write to write: unknown autoclear bits go first, as in QEMU (a repair clears them as its
    // first journalled phase)
    if (!device.readOnly && !forCheck) await (await import('./write/dirty.js')).clearUnknownAutoclear(device, h)
    if (!device.readOnly && !forCheck) {
      try {
        // the writer is loaded only for images opened read/write
        const loadBitmaps = async (state: Qcow2State) => (await import('./ops/bitmap-write.js')).PersistentBitmaps.load(state)
        image.writer = await (await import('./write/write.js')).Qcow2Writer.attach(image.state, options.bitmapsByCaller ? undefined : loadBitmaps)
      } catch (e) {
        if (!(e instanceof UnsupportedFeatureError)) throw e
        image.writerRefusal = e
      }
    }
    return image
  } catch (e) {
    for (const o of opened.reverse()) await o.close().catch(() => undefined)
    throw e
  }
}
