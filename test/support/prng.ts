/**
 * A small seeded PRNG (mulberry32) so randomised tests are reproducible:
 * the same seed always gives the same sequence.
 */
export class Prng {
  private state: number

  constructor(seed = 1) {
    this.state = seed >>> 0
  }

  /** Next 32-bit unsigned integer. */
  nextU32(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0
    let t = this.state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return (t ^ (t >>> 14)) >>> 0
  }

  /** Uniform float in [0, 1). */
  next(): number {
    return this.nextU32() / 0x1_0000_0000
  }

  /** Uniform integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n)
  }

  /** true with probability p. */
  chance(p = 0.5): boolean {
    return this.next() < p
  }

  /** length random bytes. */
  bytes(length: number): Uint8Array {
    const out = new Uint8Array(length)
    for (let i = 0; i < length; i++) out[i] = this.nextU32() & 0xff
    return out
  }

  /** Shuffles in place (Fisher-Yates) and returns the array. */
  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1)
      const a = items[i] as T
      items[i] = items[j] as T
      items[j] = a
    }
    return items
  }
}

/** A function form: `const rnd = mulberry32(seed); rnd()` gives floats in [0, 1). */
export function mulberry32(seed: number): () => number {
  const p = new Prng(seed)
  return () => p.next()
}
