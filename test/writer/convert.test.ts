import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { convert, dataRuns, rawStream } from '../../src/convert/convert.js'
import { compareImages } from '../../src/convert/compare.js'
import { CompressPool } from '../../src/formats/qcow2/write/compress-write.js'
import { MemFiles, createOn, openOn, pattern, sameBytes } from './helpers.js'

describe('convert over DiskImage', () => {
  it('finds the data runs of a buffer at -S granularity', () => {
    const b = new Uint8Array(16384)
    b.fill(1, 100, 200)
    b.fill(2, 9000, 9001)
    expect(dataRuns(b, 0, 4096)).toEqual([
      { offset: 0, length: 4096 },
      { offset: 8192, length: 4096 },
    ])
    expect(dataRuns(b, 0, 0)).toEqual([{ offset: 0, length: 16384 }])
  })

  it('copies qcow2 to qcow2 sparsely, compressed, with progress, and compares identical', async () => {
    const files = new MemFiles()
    const a = new MemoryDevice(0, { name: 'a.qcow2' })
    await createOn(a, 2 * 1024 * 1024, { cluster_size: '4096' }, files)
    const src = await openOn(a, files)
    await src.write(0, pattern(0, 300_000))
    await src.write(1_000_000, new Uint8Array(100_000)) // zeros as data
    await src.write(1_500_000, pattern(9, 5000))
    for (const compress of [false, true]) {
      const b = new MemoryDevice(0, { name: 'b.qcow2' })
      await createOn(b, 2 * 1024 * 1024, { cluster_size: '4096' }, files)
      const dst = await openOn(b, files)
      const pool = compress ? new CompressPool(2) : undefined
      const seen: number[] = []
      const r = await convert(src, dst, {
        onProgress: (d) => seen.push(d),
        ...(pool ? { compress: (c: Uint8Array) => pool.compress(c, 4096, 0) } : {}),
      })
      await pool?.close()
      expect(seen[seen.length - 1]).toBe(2 * 1024 * 1024)
      expect(r.bytesWritten).toBeLessThan(compress ? 100_000 : 320_000)
      if (compress) expect(r.compressedClusters).toBeGreaterThan(50)
      expect(await compareImages(src, dst)).toEqual({ identical: true, sizeMismatch: false, sizeWarning: false })
      const chunks: Uint8Array[] = []
      for await (const c of rawStream(dst)) chunks.push(c)
      sameBytes(Buffer.concat(chunks), await src.read(0, 2 * 1024 * 1024))
      await dst.write(1_700_000, new Uint8Array([7]))
      expect(await compareImages(src, dst)).toMatchObject({ identical: false, offset: 1_700_000 - (1_700_000 % 512) })
      await dst.close()
    }
  })
})
