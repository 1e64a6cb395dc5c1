import { describe, expect, it } from 'vitest'
import { Imrt } from '../../../src/formats/qcow2/check/imrt.js'
import { maxRefcount } from '../../../src/formats/qcow2/spec/refcount-codec.js'
import { Prng } from '../../support/prng.js'

const CHUNK = 1 << 15

/** The same operations on the compact IMRT and on a plain array of counters (qemu's layout). */
function drive(order: number, seed: number, ops: number, span: number, hot: number): { imrt: Imrt; ref: number[]; overflows: [number, number] } {
  const rng = new Prng(seed)
  const max = maxRefcount(order)
  const imrt = new Imrt(order, span / 2)
  const ref: number[] = []
  let overflowsA = 0
  let overflowsB = 0
  for (let n = 0; n < ops; n++) {
    // most references land once on a wide range; some pile onto a few hot clusters
    const i = rng.int(4) === 0 ? rng.int(hot) * 7 : rng.int(span)
    const op = rng.int(200)
    if (op === 0) {
      const v = rng.int(Math.min(max, 5) + 1)
      imrt.set(i, v)
      ref[i] = v
    } else {
      const cur = ref[i] ?? 0
      if (cur < max) ref[i] = cur + 1
      else overflowsB++
      if (!imrt.inc(i)) overflowsA++
    }
  }
  expect(overflowsA).toBe(overflowsB)
  return { imrt, ref, overflows: [overflowsA, overflowsB] }
}

describe('compact in-memory refcount table', () => {
  for (const order of [0, 1, 3, 4, 5, 6]) {
    it(`counts exactly like an array of counters (refcount order ${order})`, () => {
      const span = 20 * CHUNK + 123
      const { imrt, ref } = drive(order, 1000 + order, 100_000, span, 3000)
      let size = span / 2
      for (let i = 0; i < ref.length; i++) if (ref[i] !== undefined) size = Math.max(size, i + 1)
      expect(imrt.size).toBe(size)
      for (let i = 0; i < span + 10; i++) {
        if (imrt.get(i) !== (ref[i] ?? 0)) expect([i, imrt.get(i)]).toEqual([i, ref[i] ?? 0])
      }
      // the 3000 hot clusters make chunk 0 fall back to counters but for the widest and 1-bit refcounts; the
      // other chunks stay sparse with a few shared clusters each: both forms are exercised
      expect(imrt.denseChunks).toBe(order === 0 || order === 6 ? 0 : 1)
      // a clone is independent of its original
      const c = imrt.clone()
      c.set(7, 0)
      c.inc(span + 5)
      expect(imrt.get(7)).toBe(ref[7] ?? 0)
      expect(imrt.get(span + 5)).toBe(0)
      expect(c.get(span + 5)).toBe(1)
    })
  }

  it('holds a bit per cluster when references are single, counters only where many are shared', () => {
    const n = 64 * CHUNK // 2 Mi clusters
    const imrt = new Imrt(4, n)
    for (let i = 1; i < n; i++) imrt.inc(i)
    // a few shared clusters (compressed neighbours) stay in the sparse form
    for (let i = 0; i < 1000; i++) imrt.inc(i * 1000 + 1)
    expect(imrt.denseChunks).toBe(0)
    expect(imrt.bytes / n).toBeLessThan(0.3)
    // a snapshot sharing one whole chunk: that chunk alone falls back to 16-bit counters
    for (let i = 5 * CHUNK; i < 6 * CHUNK; i++) imrt.inc(i)
    expect(imrt.denseChunks).toBe(1)
    expect(imrt.get(5 * CHUNK + 17)).toBe(2)
    expect(imrt.get(6 * CHUNK + 17)).toBe(1)
    expect(imrt.get(1001)).toBe(2)
    expect(imrt.bytes).toBeLessThan(n / 8 + 2 * CHUNK + 1000 * 64 + 64 * 1024)
  })

  it('remembers whether any cluster was ever counted twice (shared), in every form and through a clone', () => {
    const a = new Imrt(4, 4 * CHUNK)
    for (let i = 0; i < 4 * CHUNK; i += 3) a.inc(i)
    expect(a.shared).toBe(false) // single references only
    a.set(5, 1)
    a.set(6, 0)
    expect(a.shared).toBe(false)
    a.inc(3)
    expect(a.shared).toBe(true) // sparse chunk, second reference
    expect(a.clone().shared).toBe(true)
    const b = new Imrt(4, 2 * CHUNK)
    b.set(9, 2)
    expect(b.shared).toBe(true) // set to 2
    const c = new Imrt(4, 2 * CHUNK)
    // a chunk that turns dense (many shared clusters) before the flag is looked at
    for (let i = 0; i < CHUNK; i++) c.inc(i)
    expect(c.shared).toBe(false)
    for (let i = 0; i < CHUNK; i++) c.inc(i)
    expect(c.denseChunks).toBe(1)
    expect(c.shared).toBe(true)
    // 1-bit refcounts: a second reference overflows and is not counted: nothing is shared
    const d = new Imrt(0, 16)
    d.inc(2)
    expect(d.inc(2)).toBe(false)
    expect(d.shared).toBe(false)
    // random operations: the flag is set exactly when some counter reached 2 or more
    for (const order of [1, 4, 6]) {
      const { imrt, ref } = drive(order, 77 + order, 20_000, 4 * CHUNK, 50)
      expect(ref.some((v) => (v ?? 0) >= 2)).toBe(true) // the hot clusters are shared
      expect(imrt.shared).toBe(true)
    }
  })

  it('saturates at the refcount width and says so', () => {
    const one = new Imrt(0, 4)
    expect(one.inc(2)).toBe(true)
    expect(one.inc(2)).toBe(false)
    expect(one.get(2)).toBe(1)
    const eight = new Imrt(3, 4)
    for (let k = 0; k < 255; k++) expect(eight.inc(3)).toBe(true)
    expect(eight.inc(3)).toBe(false)
    expect(eight.get(3)).toBe(255)
  })

  it('covers clusters far past 2^31 (references past the end of a huge file)', () => {
    const imrt = new Imrt(4, 10)
    const far = 2 ** 33 + 5
    expect(imrt.inc(far)).toBe(true)
    expect(imrt.inc(far)).toBe(true)
    expect(imrt.get(far)).toBe(2)
    expect(imrt.get(far - CHUNK * 2 ** 18)).toBe(0)
    expect(imrt.size).toBe(far + 1)
  })
})
