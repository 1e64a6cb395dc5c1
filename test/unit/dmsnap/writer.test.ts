/** Writing through the snapshot view and to the origin: allocation, commit order, full stores. */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { checkStore, convertToCow, createStore } from '../../../src/formats/dmsnap/index.js'
import { TracingDevice } from '../../support/tracing-device.js'
import { md5, openStore, rawImage } from '../../dmsnap/helpers.js'
import { Prng } from '../../support/prng.js'

const ORIGIN = new Prng(7).bytes(64 * 1024)

async function freshStore(chunkBytes: number, cowBytes: number): Promise<MemoryDevice> {
  const dev = new MemoryDevice(0, { name: 'cow' })
  await createStore(dev, { chunkSectors: chunkBytes / 512, cowSize: cowBytes })
  return dev
}

describe('dmsnap writer', () => {
  it('allocates data chunks in order, skipping the metadata area, like the kernel (…, 33, 35)', async () => {
    const dev = await freshStore(512, 40 * 512) // E = 32: area 1 is chunk 34
    const img = await openStore(dev, rawImage(ORIGIN))
    for (let i = 0; i < 33; i++) await img.write(i * 1024, new Uint8Array(10).fill(i))
    await img.flush()
    const back = await openStore(new MemoryDevice(dev.snapshot()), rawImage(ORIGIN), { readOnly: true })
    expect(back.records.map((r) => r.new)).toEqual([...Array.from({ length: 32 }, (_, i) => i + 2), 35])
    expect(back.records[32]).toMatchObject({ area: 1, slot: 0, old: 64 })
    expect((await checkStore(dev)).findings).toEqual([])
  })

  it('keeps the partial chunk write merged with the origin copy', async () => {
    const dev = await freshStore(4096, 64 * 1024)
    const img = await openStore(dev, rawImage(ORIGIN))
    await img.write(5000, new Uint8Array([1, 2, 3]))
    const expected = ORIGIN.slice()
    expected.set([1, 2, 3], 5000)
    expect(md5(await img.read(0, ORIGIN.byteLength))).toBe(md5(expected))
    await img.flush()
    const back = await openStore(new MemoryDevice(dev.snapshot()), rawImage(ORIGIN), { readOnly: true })
    expect(md5(await back.read(0, ORIGIN.byteLength))).toBe(md5(expected))
  })

  it('makes the data durable before the area that maps it, and zeroes the next area before filling one', async () => {
    const inner = await freshStore(512, 40 * 512)
    const dev = new TracingDevice(inner)
    const img = await openStore(dev, rawImage(ORIGIN))
    for (let i = 0; i < 33; i++) await img.write(i * 1024, new Uint8Array(512).fill(i))
    await img.flush()
    dev.assertFlushedBefore({ op: 'write', tag: 'cow-data' }, { op: 'write', tag: 'cow-area', offset: 512 })
    // area 1 (chunk 34) is zeroed and flushed before area 0's last sector makes it reachable
    dev.assertFlushedBefore({ op: 'write', tag: 'cow-area', offset: 34 * 512 }, { op: 'write', tag: 'cow-area', offset: 512 })
    expect(dev.indexOf({ op: 'write', tag: 'cow-area', offset: 34 * 512 })).toBeLessThan(dev.indexOf({ op: 'write', tag: 'cow-area', offset: 512 }))
  })

  it('copies the origin chunk out before an origin write, preserving the snapshot', async () => {
    const dev = await freshStore(4096, 64 * 1024)
    const odev = new MemoryDevice(ORIGIN)
    const img = await openStore(dev, rawImage(odev))
    await img.writeOrigin(8192 + 100, new Uint8Array(5000).fill(0xee))
    expect(md5(await img.read(0, ORIGIN.byteLength))).toBe(md5(ORIGIN))
    expect(odev.snapshot()[8192 + 100]).toBe(0xee)
    expect(img.mapping(2)).toBe(2)
    expect(img.mapping(3)).toBe(3)
  })

  it('refuses a write that does not fit, before anything changes (on_full=refuse)', async () => {
    const dev = await freshStore(4096, 5 * 4096) // 3 data chunks
    const img = await openStore(dev, rawImage(ORIGIN), { onFull: 'refuse' })
    await img.write(0, new Uint8Array(8192).fill(1))
    await img.flush()
    const before = md5(dev.snapshot())
    await expect(img.write(16384, new Uint8Array(8192).fill(2))).rejects.toMatchObject({ errno: 'ENOSPC' })
    await img.flush()
    expect(md5(dev.snapshot())).toBe(before)
    expect(img.valid).toBe(true)
  })

  it('invalidates the store like the kernel when it overflows (default)', async () => {
    const dev = await freshStore(4096, 5 * 4096)
    const img = await openStore(dev, rawImage(ORIGIN))
    await expect(img.write(0, new Uint8Array(4 * 4096))).rejects.toMatchObject({ errno: 'ENOSPC' })
    const r = await checkStore(new MemoryDevice(dev.snapshot()))
    expect(r.findings.map((f) => f.kind)).toEqual(['invalidated'])
    await expect(img.read(0, 512)).rejects.toThrow(/invalidated/)
  })

  it('converts an image to a COW holding only the differing chunks, in ascending order', async () => {
    const target = ORIGIN.slice()
    target[4096 * 9 + 1] = target[4096 * 9 + 1]! ^ 1
    target[4096 * 3] = target[4096 * 3]! ^ 1
    target[65535] = target[65535]! ^ 1
    const dev = new MemoryDevice(0, { name: 'cow' })
    const r = await convertToCow(rawImage(target), rawImage(ORIGIN), dev, { chunkSize: 4096 })
    expect(r.exceptions).toBe(3)
    const img = await openStore(dev, rawImage(ORIGIN), { readOnly: true })
    expect(img.records.map((x) => [x.old, x.new])).toEqual([
      [3, 2],
      [9, 3],
      [15, 4],
    ])
    expect(md5(await img.read(0, target.byteLength))).toBe(md5(target))
    expect((await checkStore(dev)).findings).toEqual([])
  })

  it('creates a store through the driver with -o chunk_size, and refuses bad options', async () => {
    const { dmsnapDriver } = await import('../../../src/formats/dmsnap/index.js')
    const { makeContext } = await import('../../../src/open.js')
    const ctx = makeContext(async () => new MemoryDevice(ORIGIN))
    const dev = new MemoryDevice(0, { name: 'cow' })
    await dmsnapDriver.create!(dev, ctx, { size: 64 * 1024, options: { chunk_size: '8K' } })
    const img = await openStore(dev, undefined, { readOnly: true })
    expect((await img.info()).formatSpecific!.data).toMatchObject({ 'chunk-size': 8192, status: '32/128 32', exceptions: 0, valid: 1 })
    await expect(dmsnapDriver.create!(new MemoryDevice(0), ctx, { size: 65536, options: { chunk_size: '3000' } })).rejects.toThrow(/power of two/)
    await expect(dmsnapDriver.create!(new MemoryDevice(0), ctx, { size: 65536, options: { cluster_size: '4K' } })).rejects.toThrow(/unknown create option/)
  })
})
