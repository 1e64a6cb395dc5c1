/**
 * The fast paths of the VMDK data path against the slow ones and qemu-img:
 *  - readInto (convert hands in reused, dirty buffers) against read() and qemu-img convert -O raw, on
 *    qemu-made monolithicSparse and streamOptimized images (batched compressed-grain reads);
 *  - the monolithicSparse writer's batches written from the caller's buffer (whole grains, one buffer)
 *    and assembled in its scratch buffer (partial, overlapping, scattered writes): qemu-img compare
 *    with a raw model, check clean.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImgOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

const GRAIN = 65536
const SIZE = 9 * 1024 * 1024 + 3 * 512

/** raw source: random grains, compressible grains, zero grains, holes, a partial last grain */
function source(seed: number): Uint8Array {
  const r = new Prng(seed)
  const b = new Uint8Array(SIZE)
  for (let at = 0; at < SIZE; at += 16384) {
    const n = Math.min(16384, SIZE - at)
    const kind = r.int(10)
    if (kind < 3) b.set(r.bytes(n), at)
    else if (kind < 6) b.fill(1 + (at % 200), at, at + n)
  }
  return b
}

describeQemu(
  'vmdk fast paths',
  () => {
    for (const subformat of ['monolithicSparse', 'streamOptimized']) {
      it(`readInto a dirty reused buffer equals read() and qemu-img's raw (${subformat})`, async () => {
        const dir = makeTempDir()
        const raw = join(dir, 'src.raw')
        const img = join(dir, 'img.vmdk')
        const out = join(dir, 'out.raw')
        writeFileSync(raw, source(subformat.length))
        await qemuImgOk(['convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${subformat}`, raw, img])
        await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'raw', img, out])
        const truth = readFileSync(out)
        const image = (await openImage(img, { readOnly: true })) as DiskImage & { readInto(o: number, b: Uint8Array): Promise<void> }
        try {
          expect(typeof image.readInto).toBe('function')
          const r = new Prng(99)
          const buf = new Uint8Array(3 * 1024 * 1024)
          for (let k = 0; k < 40; k++) {
            const length = k < 5 ? buf.byteLength : 1 + r.int(buf.byteLength)
            const offset = r.int(SIZE - length + 1)
            buf.fill(0xaa)
            const view = buf.subarray(0, length)
            await image.readInto(offset, view)
            const slow = await image.read(offset, length)
            expect(Buffer.from(view).equals(Buffer.from(slow)), `read ${offset}+${length}`).toBe(true)
            expect(Buffer.from(view).equals(truth.subarray(offset, offset + length)), `qemu ${offset}+${length}`).toBe(true)
          }
          const whole = new Uint8Array(SIZE).fill(0x55)
          await image.readInto(0, whole)
          expect(Buffer.from(whole).equals(truth)).toBe(true)
        } finally {
          await image.close()
        }
      })
    }

    it('sparse writer: whole grains from one buffer and assembled batches give the bytes qemu-img reads', async () => {
      const dir = makeTempDir()
      const img = join(dir, 'w.vmdk')
      const raw = join(dir, 'model.raw')
      await qemuImgOk(['create', '-f', 'vmdk', img, String(SIZE)])
      const model = new Uint8Array(SIZE)
      const image = await openImage(img, { readOnly: false })
      const r = new Prng(5)
      try {
        // rounds of concurrent writes (batched together by the writer): some whole grains cut from one
        // buffer (the no-copy path), some partial or overlapping (assembled; a later write wins)
        for (let round = 0; round < 12; round++) {
          const writes: Array<{ offset: number; data: Uint8Array }> = []
          const big = r.bytes(4 * GRAIN)
          const g = r.int(SIZE / GRAIN - 4)
          for (let i = 0; i < 4; i++) writes.push({ offset: (g + i) * GRAIN, data: big.subarray(i * GRAIN, (i + 1) * GRAIN) })
          for (let i = 0; i < 3; i++) {
            const length = 1 + r.int(2 * GRAIN)
            writes.push({ offset: r.int(SIZE - length), data: r.bytes(length) })
          }
          await Promise.all(writes.map((w) => image.write!(w.offset, w.data)))
          for (const w of writes) model.set(w.data, w.offset)
        }
        await image.flush()
        const back = await image.read(0, SIZE)
        expect(Buffer.from(back).equals(Buffer.from(model))).toBe(true)
      } finally {
        await image.close()
      }
      writeFileSync(raw, model)
      await qemuImgOk(['compare', '-f', 'raw', '-F', 'vmdk', raw, img])
      await qemuImgOk(['check', '-f', 'vmdk', img])
    })
  },
  ['qemu-img'],
)
