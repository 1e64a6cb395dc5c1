import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { Prng } from '../support/prng.js'
import { MemFiles, checkCounts, createOn, openOn } from './helpers.js'
import { sameBytes } from './helpers.js'

const OPTION_SETS: Array<Record<string, string>> = [
  {},
  { cluster_size: '512' },
  { cluster_size: '4096', refcount_bits: '1' },
  { cluster_size: '1024', refcount_bits: '64' },
  { compat: '0.10', cluster_size: '4096' },
  { cluster_size: '16384', extended_l2: 'on' },
  { cluster_size: '4096', lazy_refcounts: 'on' },
  { cluster_size: '2048', refcount_bits: '8' },
]

describe('qcow2 writer: random writes read back and check clean', () => {
  for (const opts of OPTION_SETS) {
    it(`writes random ranges (${JSON.stringify(opts)})`, async () => {
      const size = 3 * 1024 * 1024
      const dev = new MemoryDevice(0, { name: 'w.qcow2' })
      const files = new MemFiles()
      await createOn(dev, size, opts, files)
      const expected = new Uint8Array(size)
      const rng = new Prng(42)
      let img = await openOn(dev, files)
      for (let i = 0; i < 60; i++) {
        const off = rng.int(size - 1)
        const len = Math.min(size - off, 1 + rng.int(rng.chance(0.3) ? 200_000 : 5000))
        if (rng.chance(0.2)) {
          await img.writeZeroes(off, len, { discard: rng.chance(0.5) })
          expected.fill(0, off, off + len)
        } else {
          const data = rng.bytes(len)
          await img.write(off, data)
          expected.set(data, off)
        }
        if (i % 20 === 19) {
          await img.close()
          img = await openOn(dev, files)
        }
      }
      const got = await img.read(0, size)
      sameBytes(got, expected)
      await img.close()
      const c = await checkCounts(dev)
      expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    })
  }
})

describe('extended L2 with preallocated metadata over a backing file', () => {
  it('keeps subclusters unallocated (backing shows through) until written', async () => {
    const files = new MemFiles()
    const backing = new Prng(5).bytes(512 * 1024)
    files.files.set('base.raw', new MemoryDevice(backing, { name: 'base.raw' }))
    const dev = new MemoryDevice(0, { name: 'x.qcow2' })
    await createOn(dev, 512 * 1024, { extended_l2: 'on', cluster_size: '32768', preallocation: 'metadata' }, files, {
      backingFile: 'base.raw',
      backingFormat: 'raw',
    })
    const img = await openOn(dev, files)
    const expected = backing.slice()
    sameBytes(await img.read(0, expected.byteLength), expected, 'before writes')
    const rng = new Prng(6)
    for (let i = 0; i < 30; i++) {
      const off = rng.int(expected.byteLength - 5000)
      const d = rng.bytes(1 + rng.int(5000))
      await img.write(off, d)
      expected.set(d, off)
    }
    await img.writeZeroes(40_000, 3000)
    expected.fill(0, 40_000, 43_000)
    sameBytes(await img.read(0, expected.byteLength), expected, 'after writes')
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})
