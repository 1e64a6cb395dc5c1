import { afterAll, describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CompressPool, compressCluster } from '../../src/formats/qcow2/compress-write.js'
import { decompressCluster } from '../../src/formats/qcow2/compress.js'
import { Prng } from '../support/prng.js'
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
})
