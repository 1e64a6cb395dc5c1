import { describe, expect, it } from 'vitest'
import type { BlockDevice, HostStatus, IoTag } from '../../../src/io/block-device.js'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { OverlayDevice } from '../../../src/io/overlay-device.js'
import { PassThroughDevice } from '../../../src/io/pass-through-device.js'
import { unsafeCacheDevice } from '../../../src/convert/unsafe-cache.js'
import { FaultyDevice } from '../../support/faulty-device.js'
import { TracingDevice } from '../../support/tracing-device.js'
import { Unclosable } from '../../writer/helpers.js'

/** A memory device with every optional member, so each forward can be seen. */
class FullDevice extends MemoryDevice {
  calls: string[] = []
  async hostStatus(_offset: number, length: number): Promise<HostStatus> {
    this.calls.push('hostStatus')
    return { data: false, length }
  }
  async allocatedSize(): Promise<number> {
    this.calls.push('allocatedSize')
    return 4096
  }
  override async readInto(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void> {
    this.calls.push('readInto')
    return super.readInto(offset, buf, tag)
  }
  override async allocate(offset: number, length: number): Promise<void> {
    this.calls.push('allocate')
    return super.allocate(offset, length)
  }
}

const optional = (d: BlockDevice): string[] => (['readInto', 'hostStatus', 'allocatedSize', 'allocate'] as const).filter((m) => d[m] !== undefined)

describe('PassThroughDevice', () => {
  it('forwards every member to the inner device, the optional ones only where it has them', async () => {
    const inner = new FullDevice(new Uint8Array(1024).fill(3), { name: 'full' })
    const dev = new PassThroughDevice(inner)
    expect([dev.size, dev.readOnly, dev.name]).toEqual([1024, false, 'full'])
    expect(optional(dev)).toEqual(['readInto', 'hostStatus', 'allocatedSize', 'allocate'])
    await dev.write(0, new Uint8Array(4).fill(9))
    expect([...(await dev.read(0, 5))]).toEqual([9, 9, 9, 9, 3])
    await dev.readInto!(0, new Uint8Array(4))
    expect(await dev.hostStatus!(0, 512)).toEqual({ data: false, length: 512 })
    expect(await dev.allocatedSize!()).toBe(4096)
    await dev.allocate!(0, 2048)
    await dev.truncate(3000)
    await dev.flush()
    expect(inner.calls).toEqual(['readInto', 'hostStatus', 'allocatedSize', 'allocate'])
    expect(inner.size).toBe(3000)
    expect(new PassThroughDevice(inner, { name: 'other' }).name).toBe('other')
    expect(optional(new PassThroughDevice(new MemoryDevice(8)))).toEqual(['readInto', 'allocate'])
    await dev.close()
  })

  it('does not forward what would bypass a subclass that changes the bytes', () => {
    class Xor extends PassThroughDevice {
      override async read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
        return (await this.inner.read(offset, length, tag)).map((b) => b ^ 0xff)
      }
    }
    class Grow extends PassThroughDevice {
      override async truncate(size: number): Promise<void> {
        return this.inner.truncate(size + 512)
      }
    }
    const inner = new FullDevice(16)
    expect(optional(new Xor(inner))).toEqual(['hostStatus', 'allocatedSize', 'allocate'])
    expect(optional(new Grow(inner))).toEqual(['readInto', 'hostStatus', 'allocatedSize'])
    expect(optional(new PassThroughDevice(inner, { forward: ['allocatedSize'] }))).toEqual(['allocatedSize'])
  })

  it('keeps what each wrapper passed through before it shared the base', () => {
    const inner = new FullDevice(16)
    expect(optional(new TracingDevice(inner))).toEqual(['readInto', 'hostStatus', 'allocatedSize', 'allocate'])
    expect(optional(new FaultyDevice(inner))).toEqual(['readInto', 'hostStatus', 'allocatedSize', 'allocate'])
    expect(optional(new TracingDevice(new MemoryDevice(16)))).toEqual(['readInto', 'allocate'])
    expect(optional(new Unclosable(inner))).toEqual(['readInto', 'allocate'])
    expect(optional(new Unclosable(new MemoryDevice(16)))).toEqual(['readInto', 'allocate'])
    expect(optional(new OverlayDevice(inner))).toEqual([])
    expect(optional(unsafeCacheDevice(inner))).toEqual(['hostStatus', 'allocatedSize'])
    expect(optional(unsafeCacheDevice(new MemoryDevice(16)))).toEqual([])
  })
})
