/**
 * convert and compare reading host files directly (hostFiles: extents that map
 * 1:1 to a host range are read into reused buffers) give exactly what the
 * image read path gives; the convert target's write-back metadata cache
 * (cache=unsafe) gives the same image as writing through.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { openFileDevice } from '../../src/io/file-device.js'
import { makeContext, openImage } from '../../src/open.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import { convert } from '../../src/convert/convert.js'
import { compareImages } from '../../src/convert/compare.js'
import { BufferPool, HostFiles } from '../../src/convert/host-reads.js'
import { unsafeCacheDevice } from '../../src/convert/unsafe-cache.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { MemFiles, Unclosable, checkCounts, createOn, openOn, pattern, sameBytes } from './helpers.js'

const dir = mkdtempSync(join(tmpdir(), 'imgtool-hostreads-'))
afterAll(() => rmSync(dir, { recursive: true, force: true }))

const MiB = 1024 * 1024
const SIZE = 6 * MiB

/** A qcow2 on a raw backing file: own data, a compressed cluster, zero clusters, backing data. */
async function makeImages(): Promise<{ top: string; base: string; want: Uint8Array }> {
  const base = join(dir, 'base.raw')
  const want = new Uint8Array(SIZE)
  const b = pattern(0, SIZE, 5)
  b.fill(0, 2 * MiB, 3 * MiB) // a zero stretch in the backing file
  writeFileSync(base, b)
  want.set(b)
  const top = join(dir, 'top.qcow2')
  const dev = await openFileDevice(top, { readOnly: false, create: true })
  await createQcow2(dev, makeContext(openFileDevice), { size: SIZE, options: { cluster_size: '65536' }, backingFile: 'base.raw', backingFormat: 'raw' })
  await dev.close()
  const img = (await openImage(top, { readOnly: false })) as Qcow2Image
  const own = pattern(100_000, 1_500_000, 9)
  await img.write(100_000, own)
  want.set(own, 100_000)
  const c = new Uint8Array(65536).fill(0x33)
  await img.writeCompressed(4 * MiB, (await compressCluster(c, 65536, 0))!)
  want.set(c, 4 * MiB)
  await img.writeZeroes(5 * MiB, MiB - 65536)
  want.fill(0, 5 * MiB, 6 * MiB - 65536)
  await img.close()
  return { top, base, want }
}

async function readAll(img: DiskImage): Promise<Uint8Array> {
  return img.read(0, img.virtualSize)
}

describe('host reads for convert and compare', () => {
  it('compare gives the same verdicts and offsets with and without host reads', async () => {
    const { top, want } = await makeImages()
    const rawPath = join(dir, 'want.raw')
    const offsets = [-1, 0, 100_000 + 777, 1_000_000, 2 * MiB + 4096, 4 * MiB + 100, 5 * MiB + 9000, SIZE - 1]
    for (const at of offsets) {
      const copy = want.slice()
      if (at >= 0) copy[at] = copy[at]! ^ 0x5a
      writeFileSync(rawPath, copy)
      const a = await openImage(top, { readOnly: true })
      const b = await openImage(rawPath, { readOnly: true, format: 'raw' })
      try {
        sameBytes(await readAll(a), want, 'the test image')
        for (const inFlight of [1, 3]) {
          const direct = await compareImages(a, b, { hostFiles: true, chunkSize: 256 * 1024, inFlight })
          const plain = await compareImages(a, b, { hostFiles: false, chunkSize: 256 * 1024, inFlight })
          expect(direct).toEqual(plain)
          if (at < 0) expect(direct).toEqual({ identical: true, sizeMismatch: false, sizeWarning: false })
          else expect(direct).toMatchObject({ identical: false, offset: at - (at % 512) })
          expect(await compareImages(b, a, { hostFiles: true, inFlight })).toEqual(await compareImages(b, a, { inFlight }))
        }
      } finally {
        await a.close()
        await b.close()
      }
    }
  })

  it('convert with host reads copies the same bytes, into qcow2 through the write-back cache', async () => {
    const { top, want } = await makeImages()
    const src = await openImage(top, { readOnly: true })
    try {
      for (const [opts, target] of [
        [{ cluster_size: '512' }, 'unsafe'],
        [{ cluster_size: '65536' }, 'unsafe'],
        [{ cluster_size: '16384', extended_l2: 'on' }, 'through'],
      ] as const) {
        const disk = new MemoryDevice(0, { name: 'dst.qcow2' })
        const files = new MemFiles()
        await createOn(disk, SIZE, opts, files)
        const dev = target === 'unsafe' ? unsafeCacheDevice(new Unclosable(disk)) : new Unclosable(disk)
        const dst = await openOn(dev, files)
        await convert(src, dst, { hostFiles: true, chunkSize: 512 * 1024, inFlight: 3 })
        await dst.close()
        await dev.close()
        expect(await checkCounts(disk)).toMatchObject({ corruptions: 0, leaks: 0 })
        const back = await openOn(disk, files, true)
        sameBytes(await readAll(back), want, `converted (${JSON.stringify(opts)}, ${target})`)
        await back.close()
      }
    } finally {
      await src.close()
    }
  })

  it('the write-back cache stays right past its budget, with data and metadata sharing pages', async () => {
    // 512-byte clusters: L2 tables and refcount blocks sit between data clusters in every 64 KiB page
    const size = 80 * MiB
    const srcDisk = new MemoryDevice(0, { name: 'src.qcow2' })
    const files = new MemFiles()
    await createOn(srcDisk, size, { cluster_size: '65536' }, files)
    const src = await openOn(srcDisk, files)
    const want = new Uint8Array(size)
    for (let off = 0; off < size; off += 3 * MiB) {
      const d = pattern(off, Math.min(2 * MiB + 700, size - off), off)
      await src.write(off, d)
      want.set(d, off)
    }
    const disk = new MemoryDevice(0, { name: 'dst.qcow2' })
    await createOn(disk, size, { cluster_size: '512' }, files)
    const dev = unsafeCacheDevice(new Unclosable(disk))
    const dst = await openOn(dev, files)
    await convert(src, dst, { inFlight: 4 })
    sameBytes(await readAll(dst), want, 'read back before the write-back')
    await dst.close()
    await dev.close()
    expect(await checkCounts(disk)).toMatchObject({ corruptions: 0, leaks: 0 })
    const back = await openOn(disk, files, true)
    sameBytes(await readAll(back), want, 'after the write-back')
    await back.close()
    await src.close()
  })

  it('host reads past the end of a file give zeros; pooled buffers are handed out once', async () => {
    const p = join(dir, 'short.bin')
    writeFileSync(p, new Uint8Array(1000).fill(9))
    const files = new HostFiles()
    const pool = new BufferPool(4096)
    const buf = pool.get()
    buf.fill(0xff)
    expect(await files.read(p, 500, buf, 4096)).toBe(true)
    expect(buf.subarray(0, 500).every((x) => x === 9)).toBe(true)
    expect(buf.subarray(500).every((x) => x === 0)).toBe(true)
    expect(await files.read(join(dir, 'missing.bin'), 0, buf, 10)).toBe(false)
    pool.put(buf)
    pool.put(buf.subarray(0, 100)) // the same buffer again: ignored
    pool.put(new Uint8Array(4096)) // not the pool's: ignored
    const x = pool.get()
    const y = pool.get()
    expect(x.buffer).toBe(buf.buffer)
    expect(y.buffer).not.toBe(buf.buffer)
    await files.close()
  })
})
