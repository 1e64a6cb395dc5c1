import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { Prng } from '../support/prng.js'
import { MemFiles, checkCounts, createOn, openOn, sameBytes } from './helpers.js'

const SETS: Array<Record<string, string>> = [
  { cluster_size: '512' },
  { cluster_size: '4096', refcount_bits: '4' },
  { cluster_size: '16384', extended_l2: 'on' },
  { compat: '0.10', cluster_size: '1024' },
  { cluster_size: '2048', lazy_refcounts: 'on' },
]

describe('internal snapshots', () => {
  for (const opts of SETS) {
    it(`create, write, apply, delete keep contents and refcounts right (${JSON.stringify(opts)})`, async () => {
      const size = 1024 * 1024
      const dev = new MemoryDevice(0, { name: 's.qcow2' })
      const files = new MemFiles()
      await createOn(dev, size, opts, files)
      const rng = new Prng(7)
      let img = await openOn(dev, files)
      const v0 = new Uint8Array(size)
      for (let i = 0; i < 10; i++) {
        const off = rng.int(size - 40_000)
        const d = rng.bytes(1 + rng.int(40_000))
        await img.write(off, d)
        v0.set(d, off)
      }
      await createSnapshot(img, 'first')
      const v1 = v0.slice()
      for (let i = 0; i < 10; i++) {
        const off = rng.int(size - 40_000)
        const d = rng.bytes(1 + rng.int(40_000))
        await img.write(off, d)
        v1.set(d, off)
      }
      await img.writeZeroes(0, 100_000, { discard: true })
      v1.fill(0, 0, 100_000)
      await createSnapshot(img, 'second')
      expect(listSnapshots(img).map((s) => [s.id, s.name])).toEqual([
        ['1', 'first'],
        ['2', 'second'],
      ])
      await img.close()
      expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
      img = await openOn(dev, files)
      sameBytes(await img.read(0, size), v1, 'after second snapshot')
      await applySnapshot(img, 'first')
      sameBytes(await img.read(0, size), v0, 'after apply first')
      await img.write(5000, new Uint8Array(3000).fill(9))
      v0.fill(9, 5000, 8000)
      await deleteSnapshot(img, 'second')
      await deleteSnapshot(img, '1')
      sameBytes(await img.read(0, size), v0, 'after deletes')
      await img.close()
      const c = await checkCounts(dev)
      expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    })
  }
})

describe('refcount overflow', () => {
  it('refuses a snapshot apply that would overflow 2-bit refcounts, changing nothing', async () => {
    const dev = new MemoryDevice(0, { name: 'o.qcow2' })
    const files = new MemFiles()
    await createOn(dev, 256 * 1024, { cluster_size: '4096', refcount_bits: '2' }, files)
    const img = await openOn(dev, files)
    await img.write(0, new Uint8Array(50_000).fill(1))
    await createSnapshot(img, 'a')
    await img.write(0, new Uint8Array(100).fill(2))
    await createSnapshot(img, 'b')
    await expect(applySnapshot(img, 'a')).rejects.toThrow(/would exceed 3.*nothing was changed/)
    await img.write(60_000, new Uint8Array(10).fill(3))
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})

describe('resize', () => {
  it('grows the L1 table and keeps data; shrinks only unallocated space', async () => {
    const dev = new MemoryDevice(0, { name: 'r.qcow2' })
    const files = new MemFiles()
    await createOn(dev, 64 * 1024, { cluster_size: '512' }, files)
    let img = await openOn(dev, files)
    await img.write(1000, new Uint8Array(5000).fill(3))
    await resizeQcow2(img, 3 * 1024 * 1024)
    img = await openOn(dev, files)
    expect(img.virtualSize).toBe(3 * 1024 * 1024)
    await img.write(3 * 1024 * 1024 - 700, new Uint8Array(700).fill(4))
    const want = new Uint8Array(3 * 1024 * 1024)
    want.fill(3, 1000, 6000)
    want.fill(4, want.byteLength - 700)
    sameBytes(await img.read(0, want.byteLength), want)
    await expect(resizeQcow2(img, 1024 * 1024)).rejects.toThrow(/allocated at/)
    img = await openOn(dev, files)
    await img.writeZeroes(2 * 1024 * 1024, 1024 * 1024, { discard: true })
    await img.close()
    img = await openOn(dev, files)
    // plain zero clusters hold no data: shrinking over them is allowed
    await resizeQcow2(img, 1024 * 1024)
    img = await openOn(dev, files)
    expect(img.virtualSize).toBe(1024 * 1024)
    sameBytes(await img.read(0, 6000), want.subarray(0, 6000))
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})

describe('snapshot apply with another disk size (qcow2_snapshot_goto resizes)', () => {
  for (const opts of [
    { cluster_size: '512' },
    { cluster_size: '4096', refcount_bits: '4' },
    { cluster_size: '16384', extended_l2: 'on' },
    { cluster_size: '2048', lazy_refcounts: 'on' },
  ] as Array<Record<string, string>>) {
    it(`takes the snapshot's size, growing and shrinking, with a new L1 table when needed (${JSON.stringify(opts)})`, async () => {
      const dev = new MemoryDevice(0, { name: 'g.qcow2' })
      const files = new MemFiles()
      const small = 96 * 1024
      const big = 5 * 1024 * 1024 + 512
      await createOn(dev, small, opts, files)
      let img = await openOn(dev, files)
      const vSmall = new Uint8Array(small)
      vSmall.fill(1, 1000, 50_000)
      await img.write(1000, vSmall.subarray(1000, 50_000))
      await createSnapshot(img, 'small')
      await resizeQcow2(img, big)
      img = await openOn(dev, files)
      const vBig = new Uint8Array(big)
      vBig.set(vSmall)
      vBig.fill(2, 30_000, 40_000)
      vBig.fill(3, big - 70_000, big - 1000)
      await img.write(30_000, vBig.subarray(30_000, 40_000))
      await img.write(big - 70_000, vBig.subarray(big - 70_000, big - 1000))
      await createSnapshot(img, 'big')
      const bigL1 = img.header.l1Size

      // shrink: back to the small snapshot, on the open image
      await applySnapshot(img, 'small')
      expect(img.virtualSize).toBe(small)
      sameBytes(await img.read(0, small), vSmall, 'after applying the small snapshot')
      await expect(img.read(small, 512)).rejects.toThrow(/beyond the virtual size/)
      await img.write(60_000, new Uint8Array(3000).fill(9))
      vSmall.fill(9, 60_000, 63_000)
      sameBytes(await img.read(0, small), vSmall, 'after a write on the shrunk image')
      await img.close()
      expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
      img = await openOn(dev, files)
      expect(img.virtualSize).toBe(small)
      sameBytes(await img.read(0, small), vSmall, 'after reopening')

      // grow: the big snapshot's L1 table is larger than the active one now
      expect(listSnapshots(img).find((s) => s.name === 'big')!.l1Size).toBe(bigL1)
      await applySnapshot(img, 'big')
      expect(img.virtualSize).toBe(big)
      expect(img.header.l1Size).toBeGreaterThanOrEqual(bigL1)
      sameBytes(await img.read(0, big), vBig, 'after applying the big snapshot')
      await img.write(big - 512, new Uint8Array(512).fill(8))
      vBig.fill(8, big - 512)
      await img.close()
      expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
      img = await openOn(dev, files)
      expect(img.virtualSize).toBe(big)
      sameBytes(await img.read(0, big), vBig, 'after reopening the grown image')
      await deleteSnapshot(img, 'small')
      await deleteSnapshot(img, 'big')
      await img.close()
      expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
    })
  }

  it('refuses on a v2 image (which cannot be resized with snapshots), changing nothing', async () => {
    const dev = new MemoryDevice(0, { name: 'v2.qcow2' })
    const files = new MemFiles()
    await createOn(dev, 64 * 1024, { compat: '0.10', cluster_size: '1024' }, files)
    const img = await openOn(dev, files)
    await img.write(0, new Uint8Array(5000).fill(1))
    await createSnapshot(img, 's')
    // a v2 image cannot be resized while it has snapshots: make the recorded size differ in memory
    img.snapshots[0]!.diskSize = 128 * 1024
    await expect(applySnapshot(img, 's')).rejects.toThrow(/Can't resize a v2 image which has snapshots/)
    expect(img.virtualSize).toBe(64 * 1024)
    await img.write(6000, new Uint8Array(10).fill(2))
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})
