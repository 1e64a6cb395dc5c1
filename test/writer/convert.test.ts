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

  it('data runs agree with a byte-by-byte reference (unaligned offsets, every block size)', () => {
    // the reference: each block of [offset, offset + n) aligned to `block`, zero when every byte is 0
    const slow = (buf: Uint8Array, offset: number, block: number) => {
      const runs: Array<{ offset: number; length: number }> = []
      for (let i = 0; i < buf.byteLength;) {
        const next = Math.min(buf.byteLength, (Math.floor((offset + i) / block) + 1) * block - offset)
        if (buf.subarray(i, next).some((x) => x !== 0)) {
          const last = runs[runs.length - 1]
          if (last && last.offset + last.length === offset + i) last.length += next - i
          else runs.push({ offset: offset + i, length: next - i })
        }
        i = next
      }
      return runs
    }
    let seed = 12345
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) >>> 0
      return seed % n
    }
    for (let round = 0; round < 60; round++) {
      const block = [512, 4096, 65536, 3 * 1024 * 1024][round % 4]!
      const n = 1 + rnd(4 * 1024 * 1024)
      const backing = new Uint8Array(n + 100)
      const buf = backing.subarray(rnd(100), rnd(100) + n) // a view at an odd byteOffset
      // sparse non-zero bytes, some at block edges
      for (let k = rnd(40); k > 0; k--) buf[rnd(buf.byteLength)] = 1 + rnd(255)
      if (round % 3 === 0) buf[buf.byteLength - 1] = 7
      const offset = rnd(8) * 512 + (round % 5 === 0 ? rnd(512) : 0)
      expect(dataRuns(buf, offset, block), `round ${round}`).toEqual(slow(buf, offset, block))
    }
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
