import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { OverlayDevice } from '../../../src/io/overlay-device.js'
import { mulberry32 } from '../../support/prng.js'

/** Every operation applied to an overlay and to a plain copy gives the same bytes; the base is never written. */
describe('OverlayDevice', () => {
  it('reads as a writable copy of its base would, and never writes the base', async () => {
    const rnd = mulberry32(11)
    const baseBytes = new Uint8Array(20_000).map(() => Math.floor(rnd() * 256))
    const base = new MemoryDevice(baseBytes, { readOnly: true, name: 'base' })
    const overlay = new OverlayDevice(base)
    const model = new MemoryDevice(baseBytes)
    for (let step = 0; step < 400; step++) {
      const r = rnd()
      const off = Math.floor(rnd() * 30_000)
      const len = 1 + Math.floor(rnd() * 9000)
      if (r < 0.45) {
        const data = new Uint8Array(len).map(() => Math.floor(rnd() * 256))
        await overlay.write(off, data)
        await model.write(off, data)
      } else if (r < 0.5) {
        const size = Math.floor(rnd() * 30_000)
        await overlay.truncate(size)
        await model.truncate(size)
      } else {
        expect(Buffer.from(await overlay.read(off, len))).toEqual(Buffer.from(await model.read(off, len)))
      }
      expect(overlay.size).toBe(model.size)
    }
    expect(Buffer.from(await overlay.read(0, overlay.size))).toEqual(Buffer.from(model.snapshot()))
    expect(Buffer.from(base.snapshot())).toEqual(Buffer.from(baseBytes))
  })

  it('holds only the pages written', async () => {
    const base = new MemoryDevice(1 << 24, { readOnly: true })
    const overlay = new OverlayDevice(base)
    await overlay.write(5 << 20, new Uint8Array(10))
    await overlay.write((5 << 20) + 4090, new Uint8Array(10))
    expect(overlay.heldBytes).toBe(8192)
  })
})
