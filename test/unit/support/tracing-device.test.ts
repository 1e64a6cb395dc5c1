import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import type { BlockDevice } from '../../../src/io/block-device.js'
import { TracingDevice, describeOp } from '../../support/tracing-device.js'
import { FaultyDevice } from '../../support/faulty-device.js'

const bytes = (n: number, v: number): Uint8Array => new Uint8Array(n).fill(v)

describe('TracingDevice', () => {
  it('passes ops through and records op, offset, length and tag in order', async () => {
    const inner = new MemoryDevice(4096, { name: 'disk' })
    const dev = new TracingDevice(inner)
    expect(dev.name).toBe('disk')
    expect(dev.size).toBe(4096)
    await dev.write(512, bytes(512, 7), 'l2')
    expect(Array.from(await dev.read(510, 4, 'probe'))).toEqual([0, 0, 7, 7])
    await dev.flush()
    await dev.truncate(8192)
    expect(inner.size).toBe(8192)

    expect(dev.trace.map((o) => [o.op, o.offset, o.length, o.tag, o.ok])).toEqual([
      ['write', 512, 512, 'l2', true],
      ['read', 510, 4, 'probe', true],
      ['flush', 0, 0, undefined, true],
      ['truncate', 8192, 0, undefined, true],
    ])
    const seqs = dev.trace.map((o) => o.seq)
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b))
    for (const o of dev.trace) expect(o.done).toBeGreaterThan(o.seq)
    expect(describeOp(dev.trace[0]!)).toMatch(/write l2 0x200\+0x200/)
  })

  it('filters by tag and kind, counts, clears', async () => {
    const dev = new TracingDevice(new MemoryDevice(0))
    await dev.write(0, bytes(16, 1), 'header')
    await dev.write(65536, bytes(8, 2), 'l1')
    await dev.write(131072, bytes(8, 3), 'l1')
    await dev.read(0, 16, 'header')
    await dev.flush()
    expect(dev.writes()).toHaveLength(3)
    expect(dev.writes('l1').map((o) => o.offset)).toEqual([65536, 131072])
    expect(dev.reads('header')).toHaveLength(1)
    expect(dev.flushes()).toHaveLength(1)
    expect(dev.count({ op: 'write', tag: ['l1', 'header'] })).toBe(3)
    expect(dev.count({ at: 65540 })).toBe(1)
    expect(dev.count({ op: 'write', tag: undefined })).toBe(0)
    expect(dev.bytes({ op: 'write', tag: 'l1' })).toBe(16)
    expect(dev.count()).toBe(5)
    const lastSeq = dev.trace[4]!.seq
    dev.clear()
    expect(dev.trace).toHaveLength(0)
    await dev.flush()
    expect(dev.trace[0]!.seq).toBeGreaterThan(lastSeq)
  })

  it('keeps copies of written data on request', async () => {
    const dev = new TracingDevice(new MemoryDevice(0), { keepData: true })
    const buf = bytes(4, 9)
    await dev.write(0, buf, 'data')
    buf.fill(0)
    expect(Array.from(dev.trace[0]!.data!)).toEqual([9, 9, 9, 9])
  })

  it('records failed ops with ok=false', async () => {
    const dev = new TracingDevice(new FaultyDevice(new MemoryDevice(0)).failOn({ op: 'write', nth: 1 }))
    await expect(dev.write(0, bytes(4, 1), 'l2')).rejects.toThrow(/EIO/)
    expect(dev.trace[0]).toMatchObject({ op: 'write', tag: 'l2', ok: false })
    expect(dev.trace[0]!.error).toBeInstanceOf(Error)
    expect(dev.count({ ok: false })).toBe(1)
  })

  describe('flushedBefore', () => {
    const refblock = { op: 'write', tag: 'refblock' } as const
    const l2 = { op: 'write', tag: 'l2' } as const

    it('holds when a flush separates every A from the following B', async () => {
      const dev = new TracingDevice(new MemoryDevice(0))
      await dev.write(0, bytes(8, 1), 'refblock')
      await dev.flush()
      await dev.write(512, bytes(8, 1), 'l2')
      await dev.write(1024, bytes(8, 1), 'refblock')
      await dev.flush()
      await dev.write(1536, bytes(8, 1), 'l2')
      expect(dev.flushedBefore(refblock, l2)).toBe(true)
      expect(() => dev.assertFlushedBefore(refblock, l2)).not.toThrow()
      expect(dev.inOrder(refblock, 'flush', l2, refblock, 'flush', l2)).toBe(true)
      expect(dev.inOrder(l2, l2, l2)).toBe(false)
    })

    it('fails when a later A is not flushed before the next B', async () => {
      const dev = new TracingDevice(new MemoryDevice(0), { name: 'img.qcow2' })
      await dev.write(0, bytes(8, 1), 'refblock')
      await dev.flush()
      await dev.write(512, bytes(8, 1), 'l2')
      await dev.write(1024, bytes(8, 1), 'refblock')
      await dev.write(1536, bytes(8, 1), 'l2') // no flush in between
      await dev.flush()
      expect(dev.flushedBefore(refblock, l2)).toBe(false)
      expect(() => dev.assertFlushedBefore(refblock, l2)).toThrow(
        /img\.qcow2: #\d+ write l2 0x600\+0x8 was issued while #\d+ write refblock 0x400\+0x8 was not flushed/,
      )
      // the reverse order requirement: L2 writes after a refblock write without flush
      expect(dev.flushedBefore(l2, refblock)).toBe(false)
    })

    it('ignores failed flushes', async () => {
      const faulty = new FaultyDevice(new MemoryDevice(0)).failOn({ op: 'flush', nth: 1 })
      const dev = new TracingDevice(faulty)
      await dev.write(0, bytes(8, 1), 'refblock')
      await expect(dev.flush()).rejects.toThrow()
      await dev.write(512, bytes(8, 1), 'l2')
      expect(dev.flushedBefore(refblock, l2)).toBe(false)
    })

    it('does not count a flush that overlaps the A op', async () => {
      const dev = new TracingDevice(new MemoryDevice(0))
      await Promise.all([dev.write(0, bytes(8, 1), 'refblock'), dev.flush()])
      await dev.write(512, bytes(8, 1), 'l2')
      expect(dev.flushedBefore(refblock, l2)).toBe(false)
      await dev.flush()
      await dev.write(1024, bytes(8, 1), 'l2')
      // the first l2 write is still the violation
      expect(dev.flushedBefore(refblock, l2)).toBe(false)
    })

    it('is vacuously true without matches; the assertion rejects that unless allowed', async () => {
      const dev = new TracingDevice(new MemoryDevice(0))
      await dev.write(0, bytes(8, 1), 'l2')
      await dev.write(512, bytes(8, 1), 'refblock') // A after every B: irrelevant
      expect(dev.flushedBefore(refblock, l2)).toBe(true)
      expect(() => dev.assertFlushedBefore(refblock, l2)).toThrow(/vacuous/)
      expect(() => dev.assertFlushedBefore(refblock, l2, { allowVacuous: true })).not.toThrow()
    })

    it('accepts predicates', async () => {
      const dev = new TracingDevice(new MemoryDevice(0))
      await dev.write(0, bytes(8, 1), 'data')
      await dev.flush()
      await dev.write(4096, bytes(8, 1), 'l2')
      expect(
        dev.flushedBefore(
          (o) => o.op === 'write' && o.offset < 4096,
          (o) => o.offset >= 4096,
        ),
      ).toBe(true)
      expect(() => dev.assertInOrder('write', 'flush', 'write')).not.toThrow()
      expect(() => dev.assertInOrder('flush', 'flush')).toThrow(/not found/)
      expect(dev.indexOf('flush')).toBe(1)
      expect(dev.indexOf('flush', 2)).toBe(-1)
    })
  })

  it('exposes optional host queries only when the inner device has them', async () => {
    expect(new TracingDevice(new MemoryDevice(0)).hostStatus).toBeUndefined()
    const inner: BlockDevice = Object.assign(new MemoryDevice(1024), {
      hostStatus: async (_o: number, length: number) => ({ data: false, length }),
    })
    const dev = new TracingDevice(inner)
    expect(await dev.hostStatus!(0, 100)).toEqual({ data: false, length: 100 })
  })
})
