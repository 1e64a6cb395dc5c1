/**
 * The open image's shared state, owned by this room: the devices, the header,
 * the active L1 table and the L2 cache behind it (the mapper), the refcount
 * reader, the snapshot table and bitmap directory as read at open, and the
 * guest read path. The façade (image.ts) owns one; check, repair, write and
 * ops are handed it instead of reaching into the façade.
 */
import { CorruptImageError, UnsupportedFeatureError, UsageError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { DiskImage } from '../../../image/disk-image.js'
import { checkGuestRange } from '../../../image/range.js'
import { Lru } from '../../../util/lru.js'
import type { Qcow2Bitmap } from '../spec/bitmap-directory.js'
import { decompressCluster } from '../spec/compress.js'
import { COMPRESSION_ZSTD } from '../spec/constants.js'
import type { L1Entry, L2DecodeContext } from '../spec/entries.js'
import { hasDataFile, type Qcow2Header } from '../spec/header.js'
import type { Qcow2Snapshot } from '../spec/snapshot-table.js'
import { ClusterMapper, L2Cache, type MappingRun } from './cluster.js'
import { RefcountReader } from './refcount.js'

export class Qcow2State {
  /** replaced (with the active L1) only by `replaceL1`, under the writer's mutex */
  private activeMapper: ClusterMapper
  readonly refcounts: RefcountReader
  private readonly compressedCache = new Lru<number, Uint8Array>(4)

  constructor(
    readonly device: BlockDevice,
    readonly header: Qcow2Header,
    /** the active L1 table; writers change its entries with `setL1Entry` (or replace it: `replaceL1`) */
    l1: Uint8Array,
    /** where guest data lives: the image file, or the external data file */
    readonly dataDevice: BlockDevice,
    readonly backing: DiskImage | undefined,
    readonly snapshots: Qcow2Snapshot[],
    readonly bitmaps: Qcow2Bitmap[],
    /** the L2 cache's budget in bytes */
    l2CacheBytes: number,
    /** opened for info only: no backing or data file is open, guest data cannot be read */
    private readonly infoOnly: boolean,
  ) {
    this.activeMapper = new ClusterMapper(device, header, device.name, l1, new L2Cache(header.clusterSize, l2CacheBytes))
    this.refcounts = new RefcountReader(device, header, device.name)
  }

  get filename(): string {
    return this.device.name
  }
  get clusterSize(): number {
    return this.header.clusterSize
  }

  /** The mapper over the active L1 table and the L2 cache. */
  get mapper(): ClusterMapper {
    return this.activeMapper
  }

  /** The active L1 table's bytes (l1Size * 8). Read it; change entries with `setL1Entry`. */
  get l1(): Uint8Array {
    return this.activeMapper.l1
  }

  get decodeContext(): L2DecodeContext {
    return this.activeMapper.decodeContext
  }

  /** Entries per L2 table. */
  get l2Entries(): number {
    return this.activeMapper.l2Entries
  }

  l1Entry(index: number): L1Entry {
    return this.activeMapper.l1Entry(index)
  }

  /** Store the 8 encoded bytes of L1 entry `index` in the active table (memory only). */
  setL1Entry(index: number, entry: Uint8Array): void {
    this.activeMapper.l1.set(entry, index * 8)
  }

  /**
   * The writer switched to another active L1 table, possibly of another size
   * (snapshot apply that resized the image; header fields are already
   * updated). The mapper follows it; cached L2 tables stay valid.
   */
  replaceL1(l1: Uint8Array): void {
    this.activeMapper = new ClusterMapper(this.device, this.header, this.device.name, l1, this.activeMapper.l2cache)
  }

  /** Mapping runs of guest [offset, offset+length). */
  map(offset: number, length: number): AsyncGenerator<MappingRun> {
    return this.activeMapper.map(offset, length)
  }

  /** The L2 table L1 entry `l1Index` points at (cached). */
  loadL2(l1Index: number, l2Offset: number): Promise<Uint8Array> {
    return this.activeMapper.loadL2(l1Index, l2Offset)
  }

  /** The L2 table at `l2Offset` now holds `table` (as written, or about to be). */
  cacheL2(l2Offset: number, table: Uint8Array): void {
    this.activeMapper.l2cache.set(l2Offset, table)
  }

  forgetL2(l2Offset: number): void {
    this.activeMapper.l2cache.delete(l2Offset)
  }

  clearL2Cache(): void {
    this.activeMapper.l2cache.clear()
  }

  /** Writers call this when compressed clusters are freed (their host bytes may be reused). */
  dropCompressedCache(): void {
    this.compressedCache.clear()
  }

  /** Guest bytes, without any lock: the façade takes the writer's mutex, the writer holds it. */
  async readGuest(offset: number, length: number): Promise<Uint8Array> {
    checkGuestRange(`qcow2: ${this.filename}: read`, offset, length, this.header.size)
    this.refuseInfoOnly()
    this.refuseEncrypted()
    // One mapping run covering the whole request: hand back the device buffer as
    // is (no second buffer, no copy); otherwise pieces go into one zeroed buffer.
    let out: Uint8Array | undefined
    for await (const run of this.activeMapper.map(offset, length)) {
      const at = run.guest - offset
      const piece = await this.readRun(run)
      if (piece) {
        if (run.guest === offset && run.length === length) return piece
        out ??= new Uint8Array(length)
        out.set(piece, at)
      }
    }
    return out ?? new Uint8Array(length)
  }

  /** Bytes of one run, or undefined when it reads as zeros. */
  private async readRun(run: MappingRun): Promise<Uint8Array | undefined> {
    switch (run.type) {
      case 'normal':
        return this.dataDevice.read(run.hostOffset!, run.length, 'data')
      case 'zero':
      case 'zero-alloc':
        return undefined
      case 'compressed': {
        const c = run.compressed!
        const cluster = await this.compressedCluster(c.hostOffset, c.size, c.clusterGuest)
        const from = run.guest - c.clusterGuest
        return cluster.subarray(from, from + run.length)
      }
      case 'unallocated':
      case 'unallocated-alloc':
        return this.readBacking(run.guest, run.length)
    }
  }

  private async readBacking(offset: number, length: number): Promise<Uint8Array | undefined> {
    const b = this.backing
    if (!b || offset >= b.virtualSize) return undefined
    const n = Math.min(length, b.virtualSize - offset)
    const data = await b.read(offset, n)
    if (n === length) return data
    const out = new Uint8Array(length)
    out.set(data)
    return out
  }

  private async compressedCluster(hostOffset: number, size: number, guest: number): Promise<Uint8Array> {
    const hit = this.compressedCache.get(hostOffset)
    if (hit) return hit
    const file = this.device.name
    if (hasDataFile(this.header)) {
      throw new CorruptImageError(
        `qcow2: ${file}: compressed cluster for guest ${hex(guest)} in an image with an external data file (compressed cluster at ${hex(hostOffset)})`,
        {
          file,
          structure: 'l2',
          offset: hostOffset,
        },
      )
    }
    const eofLimit = Math.ceil(this.device.size / 512) * 512
    if (hostOffset + size > eofLimit) {
      throw new CorruptImageError(
        `qcow2: ${file}: compressed cluster descriptor out of range: ${size} bytes for guest ${hex(guest)} run past the end of the file (size ${hex(this.device.size)}) (compressed cluster at ${hex(hostOffset)})`,
        { file, structure: 'compressed', offset: hostOffset },
      )
    }
    const raw = await this.device.read(hostOffset, size, 'compressed')
    let data: Uint8Array
    try {
      data = decompressCluster(raw, this.clusterSize, this.header.compressionType)
    } catch (e) {
      const codec = this.header.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'deflate'
      throw new CorruptImageError(
        `qcow2: ${file}: cannot decompress ${codec} cluster of ${size} bytes for guest ${hex(guest)}: ${(e as Error).message.replace(/^(zstd|deflate): /, '')} (compressed cluster at ${hex(hostOffset)})`,
        { file, structure: 'compressed', offset: hostOffset },
      )
    }
    this.compressedCache.set(hostOffset, data)
    return data
  }

  /** An image opened for info has no backing or data file open: its guest data cannot be read. */
  refuseInfoOnly(): void {
    if (this.infoOnly) throw new UsageError(`qcow2: ${this.filename}: opened for info only; guest data cannot be read`, { file: this.filename })
  }

  private refuseEncrypted(): void {
    if (this.header.cryptMethod !== 0) {
      throw new UnsupportedFeatureError(`qcow2: ${this.filename}: encrypted images (crypt_method ${this.header.cryptMethod}) cannot be read by imgtool`, {
        file: this.filename,
        structure: 'header',
        offset: 32,
      })
    }
  }
}
