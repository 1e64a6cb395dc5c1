/** exportImage (the engine under imgtool cat): bytes, ranges, progress, abort and a closed pipe, through the public API. */
import { closeSync, openSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createImage, exportImage, openImage } from '../../src/index.js'
import { mulberry32 } from '../support/prng.js'
import { cleanupTempDirs, collector, makeTempDir } from '../support/qemu.js'

const MiB = 1024 * 1024
const SIZE = 5 * MiB + 4096 // more than one placed chunk (2 MiB) and one read (1 MiB), and a short tail

describe('exportImage', () => {
  let dir: string
  let path: string
  let guest: Buffer

  beforeAll(async () => {
    dir = makeTempDir('imgtool-export-')
    path = join(dir, 'a.qcow2')
    await createImage(path, { format: 'qcow2', size: SIZE })
    const rnd = mulberry32(7)
    guest = Buffer.alloc(SIZE)
    const img = await openImage(path, { readOnly: false })
    // data in a few places, holes and zeroes between them
    for (const [at, len] of [
      [0, 70_000],
      [MiB + 12_345, 3 * 65536],
      [4 * MiB - 100, 300_000],
      [SIZE - 4096, 4096],
    ] as const) {
      const data = new Uint8Array(len).map(() => Math.floor(rnd() * 256))
      await img.write!(at, data)
      guest.set(data, at)
    }
    await img.close()
  })
  afterAll(() => cleanupTempDirs(dir))

  it('writes every guest byte to a stream, in order, reporting progress up to the total', async () => {
    const out = collector()
    const seen: Array<[number, number]> = []
    const r = await exportImage(path, out, { onProgress: (done, total) => seen.push([done, total]) })
    expect(r).toEqual({ offset: 0, length: SIZE, outputClosed: false })
    expect(out.bytes().equals(guest)).toBe(true)
    expect(seen.length).toBeGreaterThan(1)
    expect(seen.at(-1)).toEqual([SIZE, SIZE])
    for (let i = 1; i < seen.length; i++) expect(seen[i]![0]).toBeGreaterThan(seen[i - 1]![0])
  })

  it('takes a range in bytes or as qemu-img sizes', async () => {
    const out = collector()
    const r = await exportImage(path, out, { offset: '1M', length: '64K' })
    expect(r).toMatchObject({ offset: MiB, length: 65536 })
    expect(out.bytes().equals(guest.subarray(MiB, MiB + 65536))).toBe(true)
    const tail = collector()
    await exportImage(path, tail, { offset: SIZE - 5000 })
    expect(tail.bytes().equals(guest.subarray(SIZE - 5000))).toBe(true)
  })

  it('writes a regular file by position, after what the file held', async () => {
    const file = join(dir, 'out.bin')
    const fd = openSync(file, 'w')
    try {
      const r = await exportImage(path, { fd } as unknown as NodeJS.WritableStream, { offset: 1000, length: SIZE - 1000 })
      expect(r.length).toBe(SIZE - 1000)
    } finally {
      closeSync(fd)
    }
    expect(readFileSync(file).equals(guest.subarray(1000))).toBe(true)
  })

  it('refuses a range past the end, and names the image', async () => {
    await expect(exportImage(path, collector(), { offset: SIZE + 1 })).rejects.toMatchObject({ code: 'USAGE', message: expect.stringContaining(path) })
    await expect(exportImage(path, collector(), { offset: 4096, length: SIZE })).rejects.toMatchObject({ code: 'USAGE' })
  })

  it('stops when its signal fires, before or during the copy', async () => {
    await expect(exportImage(path, collector(), { signal: AbortSignal.abort() })).rejects.toMatchObject({ code: 'INTERRUPTED' })
    const ac = new AbortController()
    const out = collector()
    await expect(exportImage(path, out, { signal: ac.signal, onProgress: () => ac.abort() })).rejects.toMatchObject({ code: 'INTERRUPTED' })
    expect(out.bytes().length).toBeLessThan(SIZE)
  })

  it('ends quietly when the reader goes away (EPIPE)', async () => {
    let writes = 0
    const pipe = new Writable({
      write(_chunk, _enc, cb) {
        writes++
        cb(Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }))
      },
    })
    pipe.on('error', () => undefined)
    const r = await exportImage(path, pipe)
    expect(r.outputClosed).toBe(true)
    expect(writes).toBe(1)
  })
})
