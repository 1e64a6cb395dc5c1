/**
 * The writer's ordering rules, each proven on a trace of the I/O:
 * 1. refcount increments are durable before any L2/L1 entry that points at the new cluster;
 * 2. guest data is durable before the mapping that makes it visible;
 * 3. a failed write frees every allocated-but-unlinked cluster, across all L2 tables it touched,
 *    and never frees a linked one (0 leaks, 0 corruptions after the error);
 * 4. no two on-disk structures share one buffer; concurrent operations are serialised.
 */
import { describe, expect, it } from 'vitest'
import type { BlockDevice, IoTag } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CorruptImageError } from '../../src/errors.js'
import { putU64be, u64be } from '../../src/util/bytes.js'
import { TracingDevice } from '../support/tracing-device.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { MemFiles, Unclosable, checkCounts, createOn, openOn, pattern } from './helpers.js'
import { sameBytes } from './helpers.js'

async function fresh(size: number, options: Record<string, string>): Promise<{ base: MemoryDevice; files: MemFiles }> {
  const base = new MemoryDevice(0, { name: 'o.qcow2' })
  const files = new MemFiles()
  await createOn(base, size, options, files)
  return { base, files }
}

const META: IoTag[] = ['l2', 'l1']

describe('rule 1: refcounts before mappings', () => {
  const optionSets: Array<Record<string, string>> = [
    { cluster_size: '512' },
    { cluster_size: '4096', refcount_bits: '2' },
    { cluster_size: '16384', extended_l2: 'on' },
    { compat: '0.10', cluster_size: '1024' },
  ]
  for (const opts of optionSets) {
    it(`a refcount block write is flushed before any L2/L1 write (${JSON.stringify(opts)})`, async () => {
      const { base, files } = await fresh(2 * 1024 * 1024, opts)
      const dev = new TracingDevice(new Unclosable(base))
      const img = await openOn(dev, files)
      dev.clear()
      // sequential allocating writes across several L2 tables, growing refcount blocks and the table
      for (let off = 0; off < 2 * 1024 * 1024; off += 300_000) await img.write(off, pattern(off, 70_000))
      await img.close()
      dev.assertFlushedBefore({ op: 'write', tag: 'refblock' }, { op: 'write', tag: META })
      dev.assertFlushedBefore({ op: 'write', tag: 'reftable' }, { op: 'write', tag: META }, { allowVacuous: true })
      const c = await checkCounts(base)
      expect(c).toMatchObject({ corruptions: 0, leaks: 0 })
    })
  }

  it('a new refcount block is flushed before the reftable entry that points at it', async () => {
    const { base, files } = await fresh(4 * 1024 * 1024, { cluster_size: '512', refcount_bits: '64' })
    const dev = new TracingDevice(new Unclosable(base), { keepData: true })
    const img = await openOn(dev, files)
    dev.clear()
    await img.write(0, pattern(0, 200_000))
    await img.write(200_000, pattern(200_000, 2_200_000))
    await img.close()
    const entryWrites = dev.trace.filter((o) => o.op === 'write' && o.tag === 'reftable' && o.length === 8)
    expect(entryWrites.length).toBeGreaterThan(0)
    for (const B of entryWrites) {
      const block = Number(u64be(B.data!, 0))
      const firstWrite = dev.trace.find((o) => o.op === 'write' && o.tag === 'refblock' && o.offset === block)
      expect(firstWrite, `block ${block} was written before its reftable entry`).toBeDefined()
      dev.assertFlushedBefore(
        (o) => o === firstWrite,
        (o) => o === B,
      )
    }
    // the table grew: new table durable before the header points at it
    dev.assertFlushedBefore({ op: 'write', tag: 'reftable' }, { op: 'write', tag: 'header', offset: 48 })
  })
})

describe('rule 2: data before the mapping that makes it visible', () => {
  const cases: Array<[string, Record<string, string>, (img: Awaited<ReturnType<typeof openOn>>) => Promise<void>]> = [
    [
      'new clusters',
      { cluster_size: '4096' },
      async (img) => {
        for (let i = 0; i < 20; i++) await img.write(i * 50_000, pattern(i, 9000))
      },
    ],
    [
      'COW of partial clusters from the backing file',
      { cluster_size: '4096' },
      async (img) => {
        for (let i = 0; i < 20; i++) await img.write(i * 50_000 + 100, pattern(i, 300))
      },
    ],
    [
      'subclusters (extended L2)',
      { cluster_size: '16384', extended_l2: 'on' },
      async (img) => {
        await img.write(0, pattern(0, 100))
        for (let i = 1; i < 20; i++) await img.write(i * 1024 + 7, pattern(i, 100))
      },
    ],
    [
      'preallocated zero clusters',
      { cluster_size: '4096', preallocation: 'metadata' },
      async (img) => {
        await img.writeZeroes(0, 64 * 1024)
        for (let i = 0; i < 16; i++) await img.write(i * 4096 + 9, pattern(i, 10))
      },
    ],
  ]
  for (const [name, opts, work] of cases) {
    it(`guest data is flushed before L2/L1 writes: ${name}`, async () => {
      const files = new MemFiles()
      let backing: { backingFile: string; backingFormat: string } | undefined
      if (name.includes('backing')) {
        const b = new MemoryDevice(pattern(0, 2 * 1024 * 1024, 5), { name: 'base.raw' })
        files.files.set('base.raw', b)
        backing = { backingFile: 'base.raw', backingFormat: 'raw' }
      }
      const base = new MemoryDevice(0, { name: 'o.qcow2' })
      await createOn(base, 2 * 1024 * 1024, opts, files, backing ?? {})
      const dev = new TracingDevice(new Unclosable(base))
      const img = await openOn(dev, files)
      dev.clear()
      await work(img)
      await img.close()
      dev.assertFlushedBefore({ op: 'write', tag: 'data' }, { op: 'write', tag: META })
    })
  }

  it('a crash after the data write but before the flush never exposes the new cluster', async () => {
    const { base, files } = await fresh(1024 * 1024, { cluster_size: '4096' })
    const dev = new TracingDevice(new Unclosable(base), { keepData: true })
    const img = await openOn(dev, files)
    dev.clear()
    await img.write(8192, pattern(8192, 4096))
    const firstL2 = dev.indexOf({ op: 'write', tag: META })
    const lastFlushBefore = dev.trace
      .slice(0, firstL2)
      .map((o) => o.op)
      .lastIndexOf('flush')
    const dataWrite = dev.indexOf({ op: 'write', tag: 'data' })
    expect(dataWrite).toBeGreaterThanOrEqual(0)
    expect(dataWrite).toBeLessThan(lastFlushBefore)
    await img.close()
  })
})

describe('rule 3: a failed write undoes its unlinked allocations', () => {
  const where: Array<[string, { op: 'write' | 'flush' | 'read'; tag?: IoTag; nth: number; errno?: 'EIO' | 'ENOSPC' }]> = [
    ['the second L1 link (first table linked, later ones not)', { op: 'write', tag: 'l1', nth: 2 }],
    ['the third L1 link', { op: 'write', tag: 'l1', nth: 3, errno: 'ENOSPC' }],
    ['a data write', { op: 'write', tag: 'data', nth: 2, errno: 'ENOSPC' }],
    ['a new L2 table write', { op: 'write', tag: 'l2', nth: 2 }],
    ['a refcount block write', { op: 'write', tag: 'refblock', nth: 1 }],
    ['the flush before linking', { op: 'flush', nth: 2 }],
  ]
  for (const [name, rule] of where) {
    it(`leaves 0 leaks and 0 corruptions when ${name} fails`, async () => {
      const { base, files } = await fresh(1024 * 1024, { cluster_size: '512' })
      const img0 = await openOn(base, files)
      await img0.write(0, pattern(0, 1000)) // an existing table that is linked and must stay
      await img0.close()
      const dev = new FaultyDevice(new Unclosable(base))
      const img = await openOn(dev, files)
      dev.failOn(rule)
      // one request spanning four L2 tables (512 B clusters: 32 KiB each)
      await expect(img.write(20_000, pattern(20_000, 110_000))).rejects.toThrow(/injected/)
      await img.close().catch(() => undefined)
      const c = await checkCounts(base)
      expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const again = await openOn(base, files, true)
      sameBytes(await again.read(0, 1000), pattern(0, 1000))
    })
  }
})

describe('rule 4: separate buffers, serialised metadata', () => {
  it('never hands the device one buffer for two structures', async () => {
    const { base, files } = await fresh(1024 * 1024, { cluster_size: '512' })
    const seen = new Map<ArrayBufferLike, string>()
    const clash: string[] = []
    const rec: BlockDevice = new Proxy(new Unclosable(base), {
      get(t, p, r) {
        if (p === 'write') {
          return async (o: number, d: Uint8Array, tag?: string) => {
            if (tag !== 'data') {
              const what = `${tag}@${o}`
              const prev = seen.get(d.buffer)
              if (prev !== undefined && prev !== what) clash.push(`${prev} and ${what}`)
              seen.set(d.buffer, what)
            }
            return t.write(o, d, tag)
          }
        }
        return Reflect.get(t, p, r)
      },
    })
    const img = await openOn(rec, files)
    await Promise.all(Array.from({ length: 40 }, (_, i) => img.write(i * 20_000 + 77, pattern(i, 3000))))
    await img.writeZeroes(0, 100_000, { discard: true })
    await img.close()
    expect(clash).toEqual([])
    expect(seen.size).toBeGreaterThan(10)
  })

  it('serialises concurrent writes, zero writes and flushes on one image', async () => {
    const { base, files } = await fresh(2 * 1024 * 1024, { cluster_size: '1024', refcount_bits: '4' })
    const img = await openOn(base, files)
    const expected = new Uint8Array(2 * 1024 * 1024)
    const ops: Array<Promise<void>> = []
    for (let i = 0; i < 60; i++) {
      const off = i * 33_333
      const data = pattern(off, 20_000, i)
      expected.set(data, off)
      ops.push(img.write(off, data))
      if (i % 7 === 0) ops.push(img.flush())
    }
    await Promise.all(ops)
    const z = [img.writeZeroes(100_000, 50_000), img.write(400_000, pattern(1, 5000, 9))]
    expected.fill(0, 100_000, 150_000)
    expected.set(pattern(1, 5000, 9), 400_000)
    await Promise.all(z)
    sameBytes(await img.read(0, expected.byteLength), expected)
    await img.close()
    const c = await checkCounts(base)
    expect(c).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})

describe('lazy refcounts and the dirty bit', () => {
  it('sets the dirty bit (flushed) before the first deferred write and clears it on close', async () => {
    const { base, files } = await fresh(1024 * 1024, { cluster_size: '4096', lazy_refcounts: 'on' })
    const dev = new TracingDevice(new Unclosable(base))
    const img = await openOn(dev, files)
    dev.clear()
    await img.write(0, pattern(0, 50_000))
    await img.write(300_000, pattern(1, 50_000))
    expect(dev.count({ op: 'write', tag: 'refblock' })).toBe(0) // deferred
    dev.assertInOrder({ op: 'write', tag: 'header', offset: 72 }, 'flush', { op: 'write', tag: META })
    dev.assertFlushedBefore({ op: 'write', tag: 'header', offset: 72 }, { op: 'write', tag: META })
    expect(u64be(base.snapshot(), 72) & 1n).toBe(1n)
    await img.close()
    expect(u64be(base.snapshot(), 72) & 1n).toBe(0n)
    expect(await checkCounts(base)).toMatchObject({ corruptions: 0, leaks: 0 })
  })

  it('rebuilds refcounts when a dirty image is opened read-write, and says so', async () => {
    const { base, files } = await fresh(1024 * 1024, { cluster_size: '4096', lazy_refcounts: 'on' })
    const img = await openOn(base, files)
    await img.write(0, pattern(0, 90_000))
    await img.flush() // data and mappings durable, refcounts written but image still dirty
    await img.write(500_000, pattern(2, 10_000))
    const crashed = new MemoryDevice(base.snapshot(), { name: 'crashed.qcow2' }) // no close: power cut
    expect(u64be(crashed.snapshot(), 72) & 1n).toBe(1n)
    const re = await openOn(crashed, files)
    expect(re.writer!.notices.join('\n')).toMatch(/not closed cleanly; refcounts were rebuilt/)
    sameBytes(await re.read(0, 90_000), pattern(0, 90_000))
    await re.close()
    expect(await checkCounts(crashed)).toMatchObject({ corruptions: 0, leaks: 0 })
  })
})

describe('metadata overlap guard', () => {
  it('refuses a write that would land on an L2 table, marks the image corrupt, refuses more', async () => {
    const { base, files } = await fresh(1024 * 1024, { cluster_size: '512' })
    const img0 = await openOn(base, files)
    await img0.write(0, pattern(0, 600))
    await img0.close()
    // damage: the refcount of the L2 table (cluster after the L1) drops to 0, so it looks free
    const bytes = base.snapshot()
    const l1 = Number(u64be(bytes, 40))
    const l2 = Number(u64be(bytes, l1) & 0x00fffffffffffe00n)
    const refblock = Number(u64be(bytes, Number(u64be(bytes, 48))))
    const b = new Uint8Array(2)
    await base.write(refblock + (l2 / 512) * 2, b)
    const img = await openOn(base, files)
    await expect(img.write(600_000, pattern(1, 512))).rejects.toThrow(CorruptImageError)
    await expect(img.write(700_000, pattern(1, 512))).rejects.toThrow(/marked corrupt/)
    expect(u64be(base.snapshot(), 72) & 2n).toBe(2n)
    void putU64be
  })
})
