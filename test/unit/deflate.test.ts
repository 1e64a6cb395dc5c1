import { inflateSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { adler32, deflateAddon, zlibBlocks } from '../../src/util/deflate.js'

/** runs of one pseudo-random byte (compressible), and pseudo-random bytes (not) */
function data(n: number, seed: number, runs: boolean): Uint8Array {
  const b = new Uint8Array(n)
  let x = seed
  for (let i = 0; i < n;) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    const len = runs ? 1 + (x & 63) : 1
    b.fill(x & 0xff, i, Math.min(n, i + len))
    i += len
  }
  return b
}

describe('util/deflate', () => {
  it("adler32 gives zlib's checksums", () => {
    expect(adler32(new TextEncoder().encode('Wikipedia'))).toBe(0x11e60398)
    expect(adler32(new Uint8Array(0))).toBe(1)
    // long input (past the 5552-byte reduction blocks), every byte 0xff: checked against the trailer zlib writes
    const ff = new Uint8Array(100_000).fill(0xff)
    const z = zlibBlocks(ff, [0], ff.byteLength)
    return z.then(([s]) => {
      const t = s!.subarray(s!.byteLength - 4)
      expect(adler32(ff)).toBe(((t[0]! << 24) | (t[1]! << 16) | (t[2]! << 8) | t[3]!) >>> 0)
    })
  })

  it('zlibBlocks: zlib streams that inflate (Adler-32 verified) to each block, compressible or not', async () => {
    const gs = 65536
    const buf = new Uint8Array(4 * gs)
    buf.set(data(gs, 7, true), 0)
    buf.set(data(gs, 9, false), gs) // does not fit in gs - 1 bytes deflated: the fallback path
    buf.set(data(gs, 11, true), 3 * gs)
    const zs = await zlibBlocks(buf, [0, gs, 3 * gs], gs)
    expect(zs).toHaveLength(3)
    for (const [i, at] of [0, gs, 3 * gs].entries()) {
      const z = zs[i]!
      expect(z[0]).toBe(0x78)
      expect(((z[0]! << 8) | z[1]!) % 31).toBe(0)
      expect(Buffer.from(inflateSync(z)).equals(Buffer.from(buf.subarray(at, at + gs)))).toBe(true)
    }
    expect(zs[0]!.byteLength).toBeLessThan(gs / 2)
  })

  it("with the addon, the bytes are the system zlib's compress2() (header 78 9c at level 6)", async () => {
    if (!deflateAddon()) return
    const gs = 65536
    const zs = await zlibBlocks(data(gs, 5, true), [0], gs, 6)
    expect([zs[0]![0], zs[0]![1]]).toEqual([0x78, 0x9c])
    const z1 = await zlibBlocks(data(gs, 5, true), [0], gs, 1)
    expect([z1[0]![0], z1[0]![1]]).toEqual([0x78, 0x01])
  })
})
