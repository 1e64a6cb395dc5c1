/**
 * The in-memory refcount table (IMRT) that qcow2 check builds by walking the
 * metadata: one counter per host cluster, as wide as the image's refcounts
 * (Uint8Array up to 8 bits, Uint16Array, Uint32Array, Float64Array for 64 bits
 * — exact up to 2^53, far above any real reference count), so a 1 TiB image
 * with 64 KiB clusters (16.8 M clusters, 16-bit refcounts) costs 32 MiB.
 */
import { maxRefcount } from '../spec/refcount-codec.js'

type Counters = Uint8Array | Uint16Array | Uint32Array | Float64Array

export class Imrt {
  private arr: Counters
  /** number of clusters covered (qemu's nb_clusters, grows when a reference reaches past it) */
  size: number
  readonly max: number

  constructor(
    readonly refcountOrder: number,
    initialSize: number,
  ) {
    this.max = maxRefcount(refcountOrder)
    this.size = initialSize
    this.arr = this.alloc(Math.max(initialSize, 1))
  }

  private alloc(n: number): Counters {
    const o = this.refcountOrder
    if (o <= 3) return new Uint8Array(n)
    if (o === 4) return new Uint16Array(n)
    if (o === 5) return new Uint32Array(n)
    return new Float64Array(n)
  }

  /** bytes held by the counters */
  get bytes(): number {
    return this.arr.byteLength
  }

  get(i: number): number {
    return i < this.size ? (this.arr[i] as number) : 0
  }

  set(i: number, v: number): void {
    this.ensure(i + 1)
    this.arr[i] = v
  }

  /** make room for `n` clusters (qemu's realloc_refcount_array: size becomes n) */
  ensure(n: number): void {
    if (n <= this.size) return
    if (n > this.arr.length) {
      const next = this.alloc(Math.max(n, Math.ceil(this.arr.length * 1.5)))
      next.set(this.arr as never)
      this.arr = next
    }
    this.size = n
  }

  /** +1 on cluster i; false when the counter is already at the width's maximum (overflow) */
  inc(i: number): boolean {
    if (i >= this.size) this.ensure(i + 1)
    const v = this.arr[i] as number
    if (v >= this.max) return false
    this.arr[i] = v + 1
    return true
  }

  /** the raw counters (for the comparison loop) */
  get counters(): Counters {
    return this.arr
  }

  fill(v: number): void {
    this.arr.fill(v)
  }

  clone(): Imrt {
    const c = new Imrt(this.refcountOrder, 0)
    c.arr = this.arr.slice() as Counters
    c.size = this.size
    return c
  }
}
