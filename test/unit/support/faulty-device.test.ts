import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { ImageIoError } from '../../../src/errors.js'
import { FaultyDevice, sweepFaults } from '../../support/faulty-device.js'

const bytes = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v)

async function catchErr(p: Promise<unknown>): Promise<unknown> {
  try {
    await p
  } catch (e) {
    return e
  }
  throw new Error('expected a rejection')
}

describe('FaultyDevice', () => {
  it('passes everything through without rules, counting ops', async () => {
    const inner = new MemoryDevice(1024, { name: 'disk' })
    const dev = new FaultyDevice(inner)
    await dev.write(0, bytes(4, 1), 'header')
    await dev.write(512, bytes(4, 2), 'l2')
    await dev.write(600, bytes(4, 3), 'l2')
    await dev.read(0, 4, 'header')
    await dev.flush()
    await dev.truncate(2048)
    expect(dev.counts).toEqual({ read: 1, write: 3, flush: 1, truncate: 1 })
    expect(dev.count('write', 'l2')).toBe(2)
    expect(dev.count('write', 'refblock')).toBe(0)
    expect(dev.count()).toBe(6)
    expect(inner.size).toBe(2048)
    expect(Array.from(await inner.read(600, 4))).toEqual([3, 3, 3, 3])
    dev.resetCounts()
    expect(dev.count()).toBe(0)
    expect(dev.count('write', 'l2')).toBe(0)
  })

  it('fails exactly the Nth write with EIO and does not apply it', async () => {
    const inner = new MemoryDevice(4096, { name: 'img.qcow2' })
    const dev = new FaultyDevice(inner).failOn({ op: 'write', nth: 2 })
    await dev.write(0, bytes(4, 1), 'header')
    const err = await catchErr(dev.write(0x30000, bytes(512, 2), 'l2'))
    expect(err).toBeInstanceOf(ImageIoError)
    const e = err as ImageIoError
    expect(e.errno).toBe('EIO')
    expect(e.code).toBe('IO')
    expect(e.message).toContain('img.qcow2')
    expect(e.message).toContain('write')
    expect(e.message).toContain('l2')
    expect(e.message).toContain('0x30000')
    expect(e.details).toMatchObject({ file: 'img.qcow2', offset: 0x30000, op: 'write', tag: 'l2', injected: true })
    expect(inner.size).toBe(4096) // not extended, not written
    expect(dev.injected).toBe(1)
    expect(dev.faults[0]).toMatchObject({ op: 'write', tag: 'l2', offset: 0x30000, errno: 'EIO' })
    // once: the third write goes through
    await dev.write(0x30000, bytes(512, 3), 'l2')
    expect(Array.from(await inner.read(0x30000, 2))).toEqual([3, 3])
    expect(dev.counts.write).toBe(3)
  })

  it('counts only ops with the given tag', async () => {
    const inner = new MemoryDevice(8192)
    const dev = new FaultyDevice(inner).failOn({ op: 'write', tag: 'l2', nth: 2, errno: 'ENOSPC' })
    await dev.write(0, bytes(4, 1), 'l2') // l2 #1
    await dev.write(512, bytes(4, 1), 'refblock')
    await dev.write(1024, bytes(4, 1), 'data')
    const err = (await catchErr(dev.write(1536, bytes(4, 9), 'l2'))) as ImageIoError // l2 #2
    expect(err.errno).toBe('ENOSPC')
    expect(err.code).toBe('NO_SPACE')
    expect(Array.from(await inner.read(1536, 4))).toEqual([0, 0, 0, 0])
    await dev.write(2048, bytes(4, 1), 'l2') // l2 #3 succeeds
  })

  it('fails persistently from the Nth op on', async () => {
    const dev = new FaultyDevice(new MemoryDevice(0)).failOn({ op: 'write', nth: 2, persistent: true })
    await dev.write(0, bytes(1, 1))
    await expect(dev.write(0, bytes(1, 1))).rejects.toBeInstanceOf(ImageIoError)
    await expect(dev.write(0, bytes(1, 1))).rejects.toBeInstanceOf(ImageIoError)
    await dev.read(0, 1) // other kinds unaffected
    await dev.flush()
    expect(dev.injected).toBe(2)
    dev.clearFaults()
    await dev.write(0, bytes(1, 1))
  })

  it('counts from when the rule is added', async () => {
    const dev = new FaultyDevice(new MemoryDevice(0))
    await dev.write(0, bytes(1, 1))
    await dev.write(0, bytes(1, 1))
    dev.failOn({ op: 'write', nth: 1 })
    await expect(dev.write(0, bytes(1, 1))).rejects.toThrow(/EIO/)
  })

  it('can tear the failed write', async () => {
    const inner = new MemoryDevice(4096)
    const dev = new FaultyDevice(inner).failOn({ op: 'write', nth: 1, tornBytes: 512 })
    await expect(dev.write(1024, bytes(2048, 5), 'data')).rejects.toThrow(/0x200 bytes written before the failure/)
    const back = await inner.read(1024, 2048)
    expect(back.subarray(0, 512).every((b) => b === 5)).toBe(true)
    expect(back.subarray(512).every((b) => b === 0)).toBe(true)
  })

  it('fails reads, flushes and truncates', async () => {
    const inner = new MemoryDevice(1024)
    const dev = new FaultyDevice(inner, {
      rules: [
        { op: 'read', nth: 1, tag: 'l1' },
        { op: 'flush', nth: 2 },
        { op: 'truncate', nth: 1, errno: 'ENOSPC' },
      ],
    })
    await dev.read(0, 4, 'header')
    const r = (await catchErr(dev.read(64, 8, 'l1'))) as ImageIoError
    expect(r.message).toMatch(/read .* at offset 0x40 \(tag l1\) failed: EIO/)
    await dev.flush()
    const f = (await catchErr(dev.flush())) as ImageIoError
    expect(f.details.op).toBe('flush')
    const t = (await catchErr(dev.truncate(4096))) as ImageIoError
    expect(t.errno).toBe('ENOSPC')
    expect(t.message).toContain('truncate to 0x1000')
    expect(inner.size).toBe(1024)
  })

  it('simulates a size limit with ENOSPC', async () => {
    const inner = new MemoryDevice(0)
    const dev = new FaultyDevice(inner, { sizeLimit: 1024 })
    await dev.write(0, bytes(1024, 1))
    await expect(dev.write(1000, bytes(100, 1))).rejects.toMatchObject({ errno: 'ENOSPC' })
    await expect(dev.truncate(2048)).rejects.toMatchObject({ errno: 'ENOSPC' })
    await dev.truncate(512)
    expect(inner.size).toBe(512)
  })

  it('sweepFaults fails each matching op once, on a fresh device', async () => {
    const seen: Array<{ nth: number; triggered: boolean; err: boolean; content: number[] }> = []
    const total = await sweepFaults(
      { op: 'write', tag: 'l2' },
      () => new MemoryDevice(16),
      async (dev) => {
        await dev.write(0, bytes(1, 1), 'l2')
        await dev.write(1, bytes(1, 2), 'data')
        await dev.write(2, bytes(1, 3), 'l2')
        await dev.write(3, bytes(1, 4), 'l2')
      },
      async (p) => {
        const content = Array.from(await p.device.inner.read(0, 4))
        seen.push({ nth: p.nth, triggered: p.triggered, err: p.error instanceof ImageIoError, content })
        expect(p.description).toContain(`write l2 #${p.nth} of 3`)
      },
    )
    expect(total).toBe(3)
    expect(seen).toEqual([
      { nth: 1, triggered: true, err: true, content: [0, 0, 0, 0] },
      { nth: 2, triggered: true, err: true, content: [1, 2, 0, 0] },
      { nth: 3, triggered: true, err: true, content: [1, 2, 3, 0] },
    ])
  })

  it('sweepFaults reports the point when check fails', async () => {
    await expect(
      sweepFaults(
        { op: 'flush', errno: 'ENOSPC' },
        () => new MemoryDevice(0),
        async (dev) => {
          await dev.flush()
        },
        () => {
          throw new Error('boom')
        },
      ),
    ).rejects.toThrow(/fault sweep, flush #1 of 1 failed with ENOSPC: boom/)
  })
})
