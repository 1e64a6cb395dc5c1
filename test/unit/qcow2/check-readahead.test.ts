/**
 * qcow2 check's read-ahead (src/formats/qcow2/check/prefetch.ts) and the walk's
 * synchronous path through it: a table whose read has finished is scanned
 * without a promise (takeReady), every other one is awaited (take). The same
 * tables come back in the same order either way, a failed read is surfaced by
 * take and never handed out by takeReady, and the abort signal is still polled
 * before each L2 table.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { check, createImage } from '../../../src/index.js'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { PassThroughDevice } from '../../../src/io/pass-through-device.js'
import type { BlockDevice, IoTag } from '../../../src/io/block-device.js'
import { makeContext, openImageOnDevice } from '../../../src/open.js'
import { Prefetcher } from '../../../src/formats/qcow2/check/prefetch.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { cleanupTempDirs, makeTempDir } from '../../support/qemu.js'
import { Prng } from '../../support/prng.js'

afterAll(() => cleanupTempDirs())

const tick = () => new Promise((r) => setImmediate(r))

/** a device whose reads finish only when the test lets them (release) */
class GatedDevice extends PassThroughDevice {
  private readonly waiting: (() => void)[] = []
  constructor(inner: BlockDevice) {
    super(inner, { forward: [] })
  }
  override async read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    await new Promise<void>((r) => this.waiting.push(r))
    return super.read(offset, length, tag)
  }
  release(n = Infinity): number {
    let k = 0
    while (k < n && this.waiting.length > 0) {
      this.waiting.shift()!()
      k++
    }
    return k
  }
}

describe('Prefetcher', () => {
  const bytes = new Prng(7).bytes(64 * 1024)
  const offsets = Float64Array.from([0, 8192, 4096, 60 * 1024, 4096, 12345])
  const want = (k: number) => bytes.slice(offsets[k]!, offsets[k]! + 1024)

  it('takeReady gives nothing until a read has finished, then the tables in order; take and takeReady mix', async () => {
    const gated = new GatedDevice(new MemoryDevice(bytes.slice(), { name: 'm' }))
    const p = new Prefetcher(gated, offsets, 1024, 'l2', 2)
    expect(p.takeReady()).toBeUndefined() // started two reads, none finished
    gated.release(1)
    await tick()
    const t0 = p.takeReady()
    expect(t0 && Buffer.from(t0).equals(Buffer.from(want(0)))).toBe(true)
    expect(p.takeReady()).toBeUndefined() // the second is still held
    const pending = p.take()
    gated.release()
    expect(Buffer.from(await pending).equals(Buffer.from(want(1)))).toBe(true)
    p.release(t0!)
    const got: Uint8Array[] = []
    for (let k = 2; k < offsets.length; k++) {
      gated.release()
      await tick()
      const t = k % 2 === 0 ? p.takeReady() : undefined
      const table = t ?? (gated.release(), await p.take())
      got.push(table.slice())
      p.release(table)
    }
    for (let k = 2; k < offsets.length; k++) expect(Buffer.from(got[k - 2]!).equals(Buffer.from(want(k))), `table ${k}`).toBe(true)
    expect(() => p.take()).toThrow(/nothing left/)
  })

  it('a failed read is never handed out by takeReady; take surfaces it', async () => {
    const faulty = new FaultyDevice(new MemoryDevice(bytes.slice(), { name: 'm' }), { rules: [{ op: 'read', nth: 2 }] })
    const p = new Prefetcher(faulty, offsets, 1024, 'l2', 4)
    p.takeReady()
    for (let i = 0; i < 5; i++) await tick()
    const t0 = p.takeReady()
    expect(t0).toBeDefined()
    expect(p.takeReady()).toBeUndefined() // the second read failed: not ready, ever
    await expect(p.take()).rejects.toThrow()
    const t2 = p.takeReady() ?? (await p.take())
    expect(Buffer.from(t2).equals(Buffer.from(want(2)))).toBe(true)
  })
})

describe('qcow2 check through the read-ahead', () => {
  const dir = makeTempDir('imgtool-check-readahead-')

  async function image(): Promise<Uint8Array> {
    // 512-byte clusters: 64 entries per L2 table, so a 4 MiB image has 128 of them
    const path = join(dir, 'small.qcow2')
    await createImage(path, { format: 'qcow2', size: 4 << 20, options: { cluster_size: '512', preallocation: 'metadata' } })
    return new Uint8Array(readFileSync(path))
  }

  async function checkOn(dev: BlockDevice, signal?: AbortSignal) {
    const img = await openImageOnDevice(dev, { format: 'qcow2', readOnly: true, forCheck: true, context: makeContext(async () => dev) })
    try {
      return await img.check!(signal ? { signal } : {})
    } finally {
      await img.close()
    }
  }

  it('the same report whether the tables were ready or awaited', async () => {
    const bytes = await image()
    const direct = await checkOn(new MemoryDevice(bytes.slice(), { name: 'small.qcow2' }))
    expect(direct.corruptions).toBe(0)
    expect(direct.leaks).toBe(0)
    // reads that finish a turn of the event loop late: most tables are awaited
    class Late extends PassThroughDevice {
      override async read(o: number, n: number, t?: IoTag) {
        await tick()
        return super.read(o, n, t)
      }
    }
    const late = await checkOn(new Late(new MemoryDevice(bytes.slice(), { name: 'small.qcow2' }), { forward: [] }))
    expect(JSON.stringify(late)).toBe(JSON.stringify(direct))
    const onFile = await check(join(dir, 'small.qcow2'))
    expect(onFile.corruptions).toBe(0)
    expect(onFile.leaks).toBe(0)
  })

  it('a failed L2 read fails the check as an I/O error, whichever path took the table', async () => {
    const bytes = await image()
    for (const nth of [1, 5, 60, 128]) {
      const dev = new FaultyDevice(new MemoryDevice(bytes.slice(), { name: 'small.qcow2' }), { rules: [{ op: 'read', tag: 'l2', nth }] })
      await expect(checkOn(dev), `l2 read ${nth}`).rejects.toThrow(/cannot read l2 at 0x/)
    }
  })

  it('an abort between L2 tables stops the walk before the next table', async () => {
    const bytes = await image()
    for (const after of [1, 3, 40]) {
      const ac = new AbortController()
      let l2Reads = 0
      class Aborting extends PassThroughDevice {
        override read(o: number, n: number, t?: IoTag) {
          if (t === 'l2' && ++l2Reads === after) ac.abort()
          return super.read(o, n, t)
        }
      }
      const dev = new Aborting(new MemoryDevice(bytes.slice(), { name: 'small.qcow2' }), { forward: [] })
      await expect(checkOn(dev, ac.signal), `abort after ${after}`).rejects.toThrow(/check stopped before the l2 table at 0x/)
      expect(l2Reads).toBeLessThan(128)
    }
  })
})
