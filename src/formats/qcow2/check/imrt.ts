/**
 * The in-memory refcount table (IMRT) that qcow2 check builds by walking the
 * metadata: the number of references to every host cluster, exact, in far
 * less memory than qemu's array of counters as wide as the image's refcounts.
 *
 * Almost every cluster is referenced at most once, so the clusters are kept
 * in chunks of 32 Ki clusters, each chunk one of:
 * - absent: no cluster of it referenced (costs nothing);
 * - sparse: one bit per cluster ("referenced at least once", 4 KiB a chunk)
 *   plus a Map of the few clusters referenced more than once (snapshots,
 *   compressed clusters sharing a host cluster) with their full counts;
 * - dense: a counter per cluster as wide as the image's refcounts (qemu's
 *   layout), taken by a chunk once its Map would cost more than that.
 * A 1 TiB image of 64 KiB clusters (16.8 M clusters, 16-bit refcounts) costs
 * 2 MiB where qemu's array costs 32 MiB; an image whose every cluster is
 * shared (a snapshot of a full disk) falls back to qemu's size chunk by chunk.
 * Counters saturate at the width's maximum (`inc` then returns false: the
 * caller reports the overflow, as qemu does).
 */
import { maxRefcount } from '../spec/refcount-codec.js'

type Counters = Uint8Array | Uint16Array | Uint32Array | Float64Array

const SHIFT = 15
/** clusters per chunk */
const CHUNK = 1 << SHIFT
const MASK = CHUNK - 1
/** bytes one Map entry is taken to cost (key, value, hash table slot) */
const MAP_ENTRY_BYTES = 64

class Chunk {
  /** bit j: cluster (chunk start + j) is referenced (sparse chunks; null once dense) */
  bits: Int32Array | null = new Int32Array(CHUNK / 32)
  /** counts of the sparse chunk's clusters referenced more than once */
  over: Map<number, number> | null = null
  /** the counters of a dense chunk */
  dense: Counters | null = null
}

export class Imrt {
  private chunks: Array<Chunk | undefined> = []
  /** number of clusters covered (qemu's nb_clusters, grows when a reference reaches past it) */
  size: number
  readonly max: number
  /** Map entries a sparse chunk may hold before it becomes dense */
  private readonly denseAt: number
  /** some cluster has been counted at 2 or more (set by inc and set, never cleared) */
  shared = false

  constructor(
    readonly refcountOrder: number,
    initialSize: number,
  ) {
    this.max = maxRefcount(refcountOrder)
    this.size = initialSize
    this.denseAt = Math.max(16, Math.floor((CHUNK * this.width) / MAP_ENTRY_BYTES))
  }

  /** bytes of one dense counter */
  private get width(): number {
    const o = this.refcountOrder
    return o <= 3 ? 1 : o === 4 ? 2 : o === 5 ? 4 : 8
  }

  private alloc(n: number): Counters {
    const o = this.refcountOrder
    if (o <= 3) return new Uint8Array(n)
    if (o === 4) return new Uint16Array(n)
    if (o === 5) return new Uint32Array(n)
    return new Float64Array(n)
  }

  /** bytes held (an estimate for the Maps) */
  get bytes(): number {
    let n = this.chunks.length * 8
    for (const c of this.chunks) {
      if (c === undefined) continue
      if (c.dense !== null) n += c.dense.byteLength
      else n += CHUNK / 8 + (c.over === null ? 0 : c.over.size * MAP_ENTRY_BYTES)
    }
    return n
  }

  /** chunks that fell back to full counters (for tests and the benchmark) */
  get denseChunks(): number {
    let n = 0
    for (const c of this.chunks) if (c !== undefined && c.dense !== null) n++
    return n
  }

  private chunkAt(i: number): Chunk | undefined {
    return this.chunks[i < 0x80000000 ? i >>> SHIFT : Math.floor(i / CHUNK)]
  }

  private makeChunk(i: number): Chunk {
    const ci = i < 0x80000000 ? i >>> SHIFT : Math.floor(i / CHUNK)
    const c = new Chunk()
    this.chunks[ci] = c
    return c
  }

  get(i: number): number {
    if (i >= this.size) return 0
    const c = this.chunkAt(i)
    if (c === undefined) return 0
    const j = i & MASK
    if (c.dense !== null) return c.dense[j] as number
    if (((c.bits as Int32Array)[j >>> 5]! & (1 << (j & 31))) === 0) return 0
    if (c.over === null) return 1
    return c.over.get(j) ?? 1
  }

  set(i: number, v: number): void {
    this.ensure(i + 1)
    const c = this.chunkAt(i) ?? (v === 0 ? undefined : this.makeChunk(i))
    if (c === undefined) return
    const j = i & MASK
    if (c.dense !== null) {
      c.dense[j] = v
      if (v >= 2) this.shared = true
      return
    }
    const bits = c.bits as Int32Array
    const w = j >>> 5
    const m = 1 << (j & 31)
    if (v === 0) bits[w] = bits[w]! & ~m
    else bits[w] = bits[w]! | m
    if (v <= 1) {
      c.over?.delete(j)
      return
    }
    this.shared = true
    ;(c.over ??= new Map()).set(j, v)
    if (c.over.size > this.denseAt) this.densify(c)
  }

  /** make room for `n` clusters (qemu's realloc_refcount_array: size becomes n) */
  ensure(n: number): void {
    if (n > this.size) this.size = n
  }

  /** +1 on cluster i; false when the counter is already at the width's maximum (overflow) */
  inc(i: number): boolean {
    if (i >= this.size) this.size = i + 1
    const c = this.chunkAt(i) ?? this.makeChunk(i)
    const j = i & MASK
    const d = c.dense
    if (d !== null) {
      const v = d[j] as number
      if (v >= this.max) return false
      d[j] = v + 1
      if (v >= 1) this.shared = true
      return true
    }
    const bits = c.bits as Int32Array
    const w = j >>> 5
    const m = 1 << (j & 31)
    const b = bits[w]!
    if ((b & m) === 0) {
      bits[w] = b | m
      return true
    }
    return this.incShared(c, j)
  }

  /** a second or later reference to a cluster of a sparse chunk */
  private incShared(c: Chunk, j: number): boolean {
    const over = (c.over ??= new Map())
    const v = over.get(j) ?? 1
    if (v >= this.max) return false
    this.shared = true
    over.set(j, v + 1)
    if (over.size > this.denseAt) this.densify(c)
    return true
  }

  private densify(c: Chunk): void {
    const d = this.alloc(CHUNK)
    const bits = c.bits as Int32Array
    for (let w = 0; w < bits.length; w++) {
      const b = bits[w]!
      if (b === 0) continue
      for (let k = 0; k < 32; k++) if ((b & (1 << k)) !== 0) d[w * 32 + k] = 1
    }
    if (c.over !== null) for (const [j, v] of c.over) d[j] = v
    c.dense = d
    c.bits = null
    c.over = null
  }

  clone(): Imrt {
    const copy = new Imrt(this.refcountOrder, this.size)
    copy.shared = this.shared
    copy.chunks = this.chunks.map((c) => {
      if (c === undefined) return undefined
      const n = new Chunk()
      n.bits = c.bits === null ? null : c.bits.slice()
      n.over = c.over === null ? null : new Map(c.over)
      n.dense = c.dense === null ? null : (c.dense.slice() as Counters)
      return n
    })
    return copy
  }
}
