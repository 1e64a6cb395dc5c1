/**
 * Guest-to-host mapping inside a sparse extent: the grain directory names
 * grain tables, a grain table entry names a grain (decoded once into a
 * GrainEntry). Grain tables are cached (a byte budget); a compressed grain is
 * decoded whole and the last one kept.
 */
import { inflateSync } from 'node:zlib'
import { CorruptImageError, hex } from '../../errors.js'
import { Lru } from '../../util/lru.js'
import { corrupt, type SparseExtent } from './open.js'
import { SECTOR, decodeGrainEntry, type GrainEntry } from './spec.js'

const GT_CACHE_BYTES = 4 * 1024 * 1024

export class GrainMap {
  private readonly gtCache: Lru<number, Uint32Array>
  private lastGrain: { sector: number; bytes: Uint8Array } | undefined

  /**
   * `zerosPastEof`: a grain table past the end of the file reads as zeros (qemu-img's reads, for a
   * read-only open and for check); false for a writable image, which refuses to write through it.
   */
  constructor(
    readonly extent: SparseExtent,
    private readonly zerosPastEof = true,
  ) {
    this.gtCache = new Lru(Math.max(4, Math.floor(GT_CACHE_BYTES / (extent.gtes * 4))))
  }

  /** guest bytes one grain table covers */
  get gtSpan(): number {
    return this.extent.gtes * this.extent.grainSize
  }

  /** The grain table at a grain directory index, or undefined when the entry is 0. */
  async table(gdIndex: number): Promise<Uint32Array | undefined> {
    const e = this.extent
    const sector = e.gd[gdIndex]!
    if (sector === 0) return undefined
    const cached = this.gtCache.get(sector)
    if (cached) return cached
    const offset = sector * SECTOR
    const bytes = e.gtes * 4
    if (offset + bytes > e.device.size && !this.zerosPastEof) {
      throw corrupt(
        e.file,
        'grain table',
        offset,
        `grain directory entry ${gdIndex} (at ${hex(e.gdOffset + gdIndex * 4)}) names a table that extends past the end of the file (size ${hex(e.device.size)}); the image is open for writing`,
      )
    }
    const raw = await e.device.read(offset, bytes, 'l2')
    const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
    const t = new Uint32Array(e.gtes)
    for (let i = 0; i < e.gtes; i++) t[i] = dv.getUint32(i * 4, true)
    this.gtCache.set(sector, t)
    return t
  }

  /** The entry for the grain holding extent-relative byte `rel`. */
  async entry(rel: number): Promise<GrainEntry> {
    const e = this.extent
    const grain = Math.floor(rel / e.grainSize)
    const gdIndex = Math.floor(grain / e.gtes)
    if (gdIndex >= e.gd.length) throw corrupt(e.file, 'grain directory', e.gdOffset, `no entry ${gdIndex} for byte ${hex(rel)} of the extent`)
    const t = await this.table(gdIndex)
    if (!t) return { kind: 'unallocated' }
    return decodeGrainEntry(t[grain % e.gtes]!, e.zeroGrain, e.compressed)
  }

  /** A compressed grain, decoded: at most one grain of bytes (the last grain of an extent may be shorter). */
  async compressedGrain(sector: number): Promise<Uint8Array> {
    if (this.lastGrain?.sector === sector) return this.lastGrain.bytes
    const e = this.extent
    const offset = sector * SECTOR
    let data: Uint8Array
    if (e.markers) {
      const head = await e.device.read(offset, 12, 'compressed')
      const dv = new DataView(head.buffer, head.byteOffset, 12)
      const size = dv.getUint32(8, true)
      if (size === 0 || size > 2 * e.grainSize) {
        throw corrupt(e.file, 'grain marker', offset, `compressed size ${size} (1 to ${2 * e.grainSize} bytes for a grain of ${e.grainSize})`)
      }
      // past the end of the file the bytes read as zeros, as in qemu-img; the marker's sector number is not
      // looked at (qemu-img reads the grain the table names; check warns of a wrong one)
      data = await e.device.read(offset + 12, size, 'compressed')
    } else {
      data = await e.device.read(offset, 2 * e.grainSize, 'compressed')
    }
    let out: Uint8Array
    try {
      out = inflateSync(data, { maxOutputLength: e.grainSize })
    } catch (err) {
      throw new CorruptImageError(`vmdk: ${e.file}: compressed grain at ${hex(offset)}: does not inflate to at most one grain (${(err as Error).message})`, {
        file: e.file,
        structure: 'compressed grain',
        offset,
      })
    }
    this.lastGrain = { sector, bytes: out }
    return out
  }

  /**
   * Several compressed grains, decoded (as compressedGrain, each): for a stream (markers) whose grains
   * lie in ascending order, close together, the bytes from the first grain to the last one are read in
   * one request instead of two per grain. Anything else (a grain whose bytes
   * reach past the span, grains out of order or far apart, no markers) is read grain by grain.
   */
  async compressedGrains(sectors: readonly number[]): Promise<Uint8Array[]> {
    const e = this.extent
    const n = sectors.length
    let together = e.markers && n > 1
    for (let i = 1; together && i < n; i++) if (sectors[i]! <= sectors[i - 1]!) together = false
    const first = sectors[0]! * SECTOR
    const last = sectors[n - 1]! * SECTOR
    // at most what n - 1 grains of the largest size a marker may give, with their metadata between, take
    if (!together || last - first > (n - 1) * (2 * e.grainSize + 4096)) return Promise.all(sectors.map((s) => this.compressedGrain(s)))
    const span = await e.device.read(first, last - first, 'compressed')
    const dv = new DataView(span.buffer, span.byteOffset, span.byteLength)
    const out: Array<Uint8Array | Promise<Uint8Array>> = []
    for (const [i, sector] of sectors.entries()) {
      const at = sector * SECTOR - first
      const size = at + 12 <= span.byteLength ? dv.getUint32(at + 8, true) : 0
      // the last grain (its length unknown before its marker), a cached one, anything unusual: alone
      if (i === n - 1 || this.lastGrain?.sector === sector || size === 0 || size > 2 * e.grainSize || at + 12 + size > span.byteLength) {
        out.push(this.compressedGrain(sector))
      } else out.push(new Promise<Uint8Array>((resolve) => resolve(this.inflateNow(sector * SECTOR, span.subarray(at + 12, at + 12 + size))))) // a throw rejects it
    }
    return Promise.all(out)
  }

  private inflateNow(offset: number, data: Uint8Array): Uint8Array {
    try {
      const out = inflateSync(data, { maxOutputLength: this.extent.grainSize, chunkSize: this.extent.grainSize + 1024 })
      return new Uint8Array(out.buffer, out.byteOffset, out.byteLength)
    } catch (err) {
      throw new CorruptImageError(
        `vmdk: ${this.extent.file}: compressed grain at ${hex(offset)}: does not inflate to at most one grain (${(err as Error).message})`,
        {
          file: this.extent.file,
          structure: 'compressed grain',
          offset,
        },
      )
    }
  }

  /** Forget cached tables (after a writer changed them). */
  invalidate(): void {
    this.gtCache.clear()
    this.lastGrain = undefined
  }
}
