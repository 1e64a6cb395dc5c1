import { afterAll, describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CompressPool, compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import { decompressCluster } from '../../src/formats/qcow2/spec/compress.js'
import { Prng } from '../support/prng.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { MemFiles, checkCounts, createOn, openOn, pattern } from './helpers.js'
import { sameBytes } from './helpers.js'

const pool = new CompressPool(2)
afterAll(() => pool.close())

describe('compressed cluster writes', () => {
  for (const ct of ['zlib', 'zstd'] as const) {
    it(`round-trips ${ct} clusters through the codec and the pool`, async () => {
      const type = ct === 'zstd' ? 1 : 0
      const data = pattern(0, 4096)
      data.fill(0, 1000, 3000)
      const a = await compressCluster(data, 4096, type)
      const b = await pool.compress(data, 4096, type)
      expect(a).toBeDefined()
      sameBytes(b!, a!)
      sameBytes(decompressCluster(a!, 4096, type), data)
      const rnd = new Prng(3).bytes(4096)
      expect(await compressCluster(rnd, 4096, type)).toBeUndefined()
    })

    it(`packs ${ct} clusters byte-granular and checks clean after overwrites`, async () => {
      const type = ct === 'zstd' ? 1 : 0
      const dev = new MemoryDevice(0, { name: 'c.qcow2' })
      const files = new MemFiles()
      await createOn(dev, 256 * 1024, { cluster_size: '4096', compression_type: ct }, files)
      const img = await openOn(dev, files)
      const expected = new Uint8Array(256 * 1024)
      for (let c = 0; c < 40; c++) {
        const data = pattern(c * 4096, 4096, c)
        data.fill(c, 0, 2500)
        const z = (await compressCluster(data, 4096, type))!
        await img.writeCompressed(c * 4096, z)
        expected.set(data, c * 4096)
      }
      // overwrite some compressed clusters partly (COW from the compressed data) and wholly
      await img.write(5 * 4096 + 100, new Uint8Array(300).fill(0xee))
      expected.fill(0xee, 5 * 4096 + 100, 5 * 4096 + 400)
      await img.writeZeroes(7 * 4096, 4096)
      expected.fill(0, 7 * 4096, 8 * 4096)
      const again = pattern(0, 4096, 99)
      again.fill(1, 0, 3000)
      await img.writeCompressed(9 * 4096, (await compressCluster(again, 4096, type))!)
      expected.set(again, 9 * 4096)
      sameBytes(await img.read(0, expected.byteLength), expected)
      await img.close()
      const c = await checkCounts(dev)
      expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const again2 = await openOn(dev, files, true)
      sameBytes(await again2.read(0, expected.byteLength), expected)
    })
  }

  /** Compressed entries of the first L2 table: [host offset, sectors]. */
  async function compressedEntries(dev: MemoryDevice, cs: number): Promise<Array<[number, number]>> {
    const h = await dev.read(0, 104)
    const v = new DataView(h.buffer, h.byteOffset)
    const l1 = Number(v.getBigUint64(40))
    const l2 = Number((await dev.read(l1, 8).then((b) => new DataView(b.buffer, b.byteOffset).getBigUint64(0))) & 0x00fffffffffffe00n)
    const t = await dev.read(l2, cs)
    const tv = new DataView(t.buffer, t.byteOffset)
    const bits = Math.log2(cs)
    const x = 62n - BigInt(bits - 8)
    const out: Array<[number, number]> = []
    for (let i = 0; i < cs / 8; i++) {
      const e = tv.getBigUint64(i * 8)
      if (((e >> 62n) & 1n) === 0n) continue
      out.push([Number(e & ((1n << x) - 1n)), Number((e >> x) & ((1n << BigInt(bits - 8)) - 1n)) + 1])
    }
    return out
  }

  /** Clusters that compress to a bit more than half their size: two never fit in one host cluster. */
  function halfCompressible(seed: number, cs: number): Uint8Array {
    const d = new Prng(seed).bytes(cs)
    d.fill(seed & 0xff, 0, Math.floor(cs * 0.4))
    return d
  }

  it('runs compressed bytes on into the next host cluster when it follows, as QEMU packs them', async () => {
    const cs = 4096
    const dev = new MemoryDevice(0, { name: 'span.qcow2' })
    const files = new MemFiles()
    await createOn(dev, 256 * 1024, { cluster_size: String(cs) }, files)
    const img = await openOn(dev, files)
    const expected = new Uint8Array(256 * 1024)
    let bytes = 0
    const before = dev.size
    for (let c = 0; c < 24; c++) {
      const data = halfCompressible(c + 1, cs)
      const z = (await compressCluster(data, cs, 0))!
      expect(z.byteLength).toBeGreaterThan(cs / 2)
      bytes += z.byteLength
      await img.writeCompressed(c * cs, z)
      expected.set(data, c * cs)
    }
    await img.close()
    const entries = await compressedEntries(dev, cs)
    expect(entries.length).toBe(24)
    // packed end to end: each starts where the previous one ended
    for (let i = 1; i < entries.length; i++) {
      const [prev] = entries[i - 1]!
      expect(entries[i]![0]).toBeGreaterThan(prev)
    }
    const spanning = entries.filter(([o, s]) => Math.floor(o / cs) !== Math.floor((o - (o % 512) + s * 512 - 1) / cs))
    expect(spanning.length).toBeGreaterThan(10)
    // no cluster-end waste: the file grew by the compressed bytes and the new L2 table (a cluster
    // per compressed cluster, as before this packing, would be 24 clusters)
    expect(dev.size - before).toBeLessThanOrEqual(Math.ceil(bytes / cs) * cs + 2 * cs)
    const counts = await checkCounts(dev)
    expect(counts, counts.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    const again = await openOn(dev, files, true)
    sameBytes(await again.read(0, expected.byteLength), expected)
    // freeing spanning data drops the reference of both clusters it touches
    const rw = await openOn(dev, files)
    for (let c = 0; c < 24; c += 2) await rw.writeZeroes(c * cs, cs, { discard: true })
    await rw.write(cs + 10, new Uint8Array(100).fill(7))
    for (let c = 0; c < 24; c += 2) expected.fill(0, c * cs, (c + 1) * cs)
    expected.fill(7, cs + 10, cs + 110)
    sameBytes(await rw.read(0, expected.byteLength), expected)
    await rw.close()
    const after = await checkCounts(dev)
    expect(after, after.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it('a failed link after a spanning allocation frees both references and nothing linked', async () => {
    const cs = 4096
    for (let nth = 1; nth <= 3; nth++) {
      const mem = new MemoryDevice(0, { name: 'undo.qcow2' })
      const files = new MemFiles()
      await createOn(mem, 256 * 1024, { cluster_size: String(cs) }, files)
      const dev = new FaultyDevice(mem)
      const img = await openOn(dev, files)
      const expected = new Uint8Array(256 * 1024)
      for (let c = 0; c < 3; c++) {
        const data = halfCompressible(c + 1, cs)
        await img.writeCompressed(c * cs, (await compressCluster(data, cs, 0))!)
        expected.set(data, c * cs)
      }
      await img.flush()
      // the next cluster runs into a new host cluster; its L2 write fails
      dev.failOn({ op: 'write', tag: 'l2', nth })
      const data = halfCompressible(9, cs)
      const z = (await compressCluster(data, cs, 0))!
      const tries = [img.writeCompressed(3 * cs, z), img.writeCompressed(4 * cs, z), img.writeCompressed(5 * cs, z)]
      const results = await Promise.allSettled(tries)
      for (let k = 0; k < 3; k++) if (results[k]!.status === 'fulfilled') expected.set(data, (3 + k) * cs)
      expect(results.some((r) => r.status === 'rejected')).toBe(true)
      dev.clearFaults()
      await img.close()
      const counts = await checkCounts(mem)
      expect(counts, `nth ${nth}: ${counts.diagnostics.join('\n')}`).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const again = await openOn(mem, files, true)
      sameBytes(await again.read(0, expected.byteLength), expected)
    }
  })

  it('compressMany: every whole cluster at its offset, the same results as one at a time (addon or not)', async () => {
    for (const [type, cs] of [
      [0, 512],
      [0, 4096],
      [0, 65536],
      [1, 4096],
    ] as const) {
      const n = 12
      const buf = new Uint8Array((n + 1) * cs)
      const rng = new Prng(cs + type)
      for (let i = 0; i < n + 1; i++) {
        if (i % 4 === 1)
          buf.set(rng.bytes(cs), i * cs) // incompressible
        else for (let k = 0; k < cs; k++) buf[i * cs + k] = 65 + ((k * (i + 1)) % 7)
      }
      // clusters not in order, not all of them, one at an unaligned offset
      const offsets = [cs, 0, 5 * cs, 3 * cs + 100, 9 * cs, 2 * cs]
      const many = await pool.compressMany(buf, offsets, cs, type)
      expect(many.length).toBe(offsets.length)
      for (const [k, o] of offsets.entries()) {
        const plain = buf.subarray(o, o + cs)
        const one = await pool.compress(plain, cs, type)
        const z = many[k]
        expect(z === undefined, `cluster at ${o} (${cs}, type ${type})`).toBe(one === undefined)
        if (z) {
          expect(z.byteLength).toBeLessThan(cs)
          sameBytes(decompressCluster(z, cs, type), plain)
        }
      }
    }
  })
})
