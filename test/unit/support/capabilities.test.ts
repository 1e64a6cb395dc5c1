/** The optional device capabilities through the test devices: readInto and allocate are seen as a read and a write. */
import { describe, expect, it } from 'vitest'
import { readInto, type BlockDevice } from '../../../src/io/block-device.js'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { CrashDevice } from '../../support/crash-device.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { TracingDevice } from '../../support/tracing-device.js'

/** A device without readInto: the helper must fall back to read() and a copy. */
function plain(inner: BlockDevice): BlockDevice {
  return {
    get size() {
      return inner.size
    },
    readOnly: false,
    name: 'plain',
    read: (o, l, t) => inner.read(o, l, t),
    write: (o, d, t) => inner.write(o, d, t),
    flush: () => inner.flush(),
    truncate: (s) => inner.truncate(s),
    close: () => inner.close(),
  }
}

const filled = (n: number): Uint8Array => Uint8Array.from({ length: n }, (_, i) => (i * 7 + 1) & 0xff)

describe('readInto through the test devices', () => {
  for (const [name, wrap] of [
    ['memory', (m: MemoryDevice) => m],
    ['a device without readInto', (m: MemoryDevice) => plain(m)],
  ] as const) {
    it(`fills the caller's buffer, zeros past the end (${name})`, async () => {
      const dev = wrap(new MemoryDevice(filled(1000), { name: 'm' }))
      const buf = new Uint8Array(64).fill(0xee)
      await readInto(dev, 980, buf)
      expect([...buf.subarray(0, 20)]).toEqual([...filled(1000).subarray(980)])
      expect(buf.subarray(20).every((b) => b === 0)).toBe(true)
    })
  }

  it('the faulty device counts it as a read, fails it by the read rules and leaves the buffer alone', async () => {
    const dev = new FaultyDevice(new MemoryDevice(filled(4096), { name: 'f' }))
    dev.failOn({ op: 'read', tag: 'l2', nth: 2 })
    const buf = new Uint8Array(512).fill(0xaa)
    await readInto(dev, 0, buf, 'l2')
    expect(buf[1]).toBe(8)
    buf.fill(0xaa)
    await expect(readInto(dev, 512, buf, 'l2')).rejects.toThrow(/injected/)
    expect(buf.every((b) => b === 0xaa)).toBe(true)
    expect(dev.counts.read).toBe(2)
    await readInto(dev, 512, buf, 'refblock')
    expect(dev.count('read', 'refblock')).toBe(1)
  })

  it('the tracing device records it as a read of the buffer length, over an inner device without readInto', async () => {
    const dev = new TracingDevice(plain(new MemoryDevice(filled(2048), { name: 't' })))
    const buf = new Uint8Array(300)
    await readInto(dev, 100, buf, 'data')
    expect(dev.trace.map((o) => [o.op, o.offset, o.length, o.tag])).toEqual([['read', 100, 300, 'data']])
    expect(buf[0]).toBe(filled(2048)[100])
  })

  it('the crash device serves the current bytes, unflushed writes included', async () => {
    const dev = new CrashDevice(filled(1024), { name: 'c' })
    await dev.write(10, new Uint8Array([9, 9, 9]))
    const buf = new Uint8Array(16)
    await readInto(dev, 8, buf)
    expect([...buf.subarray(0, 6)]).toEqual([filled(1024)[8], filled(1024)[9], 9, 9, 9, filled(1024)[13]])
  })
})

describe('allocate (posix_fallocate) through the test devices', () => {
  it('the crash device grows the file by an extending truncate that a crash before the next flush loses', async () => {
    const dev = new CrashDevice(filled(1024), { name: 'c' })
    await dev.allocate(512, 4096)
    expect(dev.size).toBe(4608)
    expect((await dev.read(1024, 16)).every((b) => b === 0)).toBe(true)
    const sizes = [...dev.allCrashStates()].map((s) => s.device.size)
    expect(sizes).toContain(1024)
    expect(sizes).toContain(4608)
    await dev.flush()
    await dev.allocate(0, 100) // inside the file: nothing to do
    expect(dev.events.filter((e) => e.kind === 'truncate').length).toBe(1)
  })

  it('the faulty device counts and fails it as a write, and refuses past its size limit (ENOSPC)', async () => {
    const dev = new FaultyDevice(new MemoryDevice(0, { name: 'f' }), { sizeLimit: 8192 })
    dev.failOn({ op: 'write', nth: 1 })
    await expect(dev.allocate(0, 4096)).rejects.toThrow(/injected/)
    await dev.allocate(0, 4096)
    expect(dev.size).toBe(4096)
    await expect(dev.allocate(4096, 8192)).rejects.toThrow(/ENOSPC|No space/)
    expect(dev.counts.write).toBe(3)
  })

  it('the tracing device records it as allocate, passing it on (or writing zeros where the inner device cannot)', async () => {
    const dev = new TracingDevice(plain(new MemoryDevice(0, { name: 't' })))
    await dev.allocate(0, 2048)
    expect(dev.trace[0]!.op).toBe('allocate')
    expect(dev.trace.length).toBe(1)
    expect(dev.size).toBe(2048)
  })
})
