/**
 * The fast paths of the VHD data path against the slow ones and qemu-img:
 *  - readInto (convert hands in reused, dirty buffers: every mapped block's part read at once, unmapped
 *    parts zero-filled) against read() and qemu-img convert -O raw, on qemu-made dynamic and fixed disks
 *    of random sparse and dense sources whose sizes are no multiple of a block;
 *  - the dynamic writer's allocations without a read of the old tail (the footer copy it wrote itself):
 *    imgtool convert -O vpc byte for byte as qemu-img's (footer stamp, checksum and UUID aside), and
 *    scattered, concurrent writes into a fresh disk as qemu-img reads them (check clean);
 *  - convert from both kinds of disk to raw: byte-identical to qemu-img's raw.
 */
import { readFileSync, statSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { convert } from '../../src/api/ops.js'
import { openImage } from '../../src/open.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

const BLOCK = 2 * 1024 * 1024

/** raw source: random runs, filled runs, zero runs (written zeros) and holes; `dense` leaves few blocks empty */
function source(seed: number, size: number, dense: boolean): Uint8Array {
  const r = new Prng(seed)
  const b = new Uint8Array(size)
  for (let at = 0; at < size;) {
    const n = Math.min(size - at, 4096 * (1 + r.int(dense ? 64 : 300)))
    const kind = r.int(10)
    if (kind < (dense ? 5 : 2)) b.set(r.bytes(n), at)
    else if (kind < (dense ? 8 : 3)) b.fill(1 + r.int(255), at, at + n)
    at += n
  }
  return b
}

/** The bytes that differ between two creations of the same disk: footer timestamp (24), checksum (64) and UUID (68..84). */
function masked(path: string): Buffer {
  const b = Buffer.from(readFileSync(path))
  for (const at of b.subarray(0, 8).toString('latin1') === 'conectix' ? [0, b.length - 512] : [b.length - 512]) {
    b.fill(0, at + 24, at + 28)
    b.fill(0, at + 64, at + 84)
  }
  return b
}

type ReadsInto = DiskImage & { readInto(o: number, b: Uint8Array): Promise<void> }

const CASES = [
  { name: 'sparse', seed: 1, size: 9 * BLOCK + 3 * 512 + 77 * 1024, dense: false },
  { name: 'dense', seed: 2, size: 5 * BLOCK + 1536, dense: true },
  { name: 'small', seed: 3, size: 700 * 1024 + 512, dense: true },
]

describeQemu(
  'vpc fast paths',
  () => {
    for (const c of CASES) {
      for (const subformat of ['dynamic', 'fixed']) {
        it(`${c.name} ${subformat}: readInto a dirty reused buffer equals read() and qemu-img's raw; convert both ways as qemu-img`, async () => {
          const dir = makeTempDir()
          const raw = join(dir, 'src.raw')
          const theirs = join(dir, 'theirs.vhd')
          const ours = join(dir, 'ours.vhd')
          const truthPath = join(dir, 'truth.raw')
          const back = join(dir, 'back.raw')
          writeFileSync(raw, source(c.seed, c.size, c.dense))
          await qemuImgOk(['convert', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${subformat}`, raw, theirs])
          await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', theirs, truthPath])
          const truth = readFileSync(truthPath)

          // reads: readInto with reused dirty buffers against read() and qemu-img
          const image = (await openImage(theirs, { format: 'vpc', readOnly: true })) as ReadsInto
          try {
            expect(typeof image.readInto).toBe('function')
            const size = image.virtualSize
            expect(size).toBe(truth.length)
            const r = new Prng(c.seed + 100)
            const buf = new Uint8Array(Math.min(size, 3 * BLOCK))
            for (let k = 0; k < 40; k++) {
              const length = k < 4 ? buf.byteLength : 1 + r.int(buf.byteLength)
              const offset = k === 1 ? size - length : r.int(size - length + 1)
              buf.fill(0xaa)
              const view = buf.subarray(0, length)
              await image.readInto(offset, view)
              const slow = await image.read(offset, length)
              expect(Buffer.from(view).equals(Buffer.from(slow)), `read ${offset}+${length}`).toBe(true)
              expect(Buffer.from(view).equals(truth.subarray(offset, offset + length)), `qemu ${offset}+${length}`).toBe(true)
            }
            const whole = new Uint8Array(size).fill(0x55)
            await image.readInto(0, whole)
            expect(Buffer.from(whole).equals(truth)).toBe(true)
          } finally {
            await image.close()
          }

          // raw -> vpc: qemu-img's bytes (stamp and UUID aside), the same blocks mapped
          await convert(raw, ours, { format: 'raw', targetFormat: 'vpc', options: { subformat } })
          expect(statSync(ours).size).toBe(statSync(theirs).size)
          expect(masked(ours).equals(masked(theirs))).toBe(true)
          const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vpc', raw, ours])
          expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)

          // vpc -> raw: qemu-img's raw byte for byte
          await convert(theirs, back, { format: 'vpc', targetFormat: 'raw' })
          expect(readFileSync(back).equals(truth)).toBe(true)
        })
      }
    }

    it('dynamic writer: scattered concurrent writes allocate without re-reading the tail; qemu-img reads the model, check clean', async () => {
      const dir = makeTempDir()
      const img = join(dir, 'w.vhd')
      const raw = join(dir, 'model.raw')
      await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', img, String(12 * BLOCK)])
      const image = await openImage(img, { format: 'vpc', readOnly: false })
      const size = image.virtualSize
      const model = new Uint8Array(size)
      const r = new Prng(7)
      try {
        for (let round = 0; round < 10; round++) {
          const writes: Array<{ offset: number; data: Uint8Array }> = []
          for (let i = 0; i < 4; i++) {
            const length = 1 + r.int(BLOCK + 4096)
            writes.push({ offset: r.int(size - length + 1), data: r.bytes(length) })
          }
          await Promise.all(writes.map((w) => image.write!(w.offset, w.data)))
          for (const w of writes) model.set(w.data, w.offset)
          // reads between rounds see every write, through readInto too
          const buf = new Uint8Array(size).fill(0x3c)
          await (image as ReadsInto).readInto(0, buf)
          expect(Buffer.from(buf).equals(Buffer.from(model)), `round ${round}`).toBe(true)
        }
        await image.flush()
      } finally {
        await image.close()
      }
      writeFileSync(raw, model)
      await qemuImgOk(['compare', '-f', 'raw', '-F', 'vpc', raw, img])
      // the file ends in a footer copy after the last block
      const b = readFileSync(img)
      expect(b.subarray(b.length - 512, b.length - 504).toString('latin1')).toBe('conectix')
      expect(b.subarray(b.length - 512).equals(b.subarray(0, 512))).toBe(true)
      const again = await openImage(img, { format: 'vpc', readOnly: true, forCheck: true })
      try {
        const report = await again.check!()
        expect(report.findings).toEqual([])
      } finally {
        await again.close()
      }
    })
  },
  ['qemu-img'],
)
