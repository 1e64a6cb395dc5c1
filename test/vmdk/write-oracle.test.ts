/**
 * Guest writes into existing VMDKs that qemu-img made, read back by qemu-io
 * and qemu-img: monolithicSparse (grains allocated at the end of the file,
 * in place when allocated; zeroed grains from qemu-io's write -z), and
 * monolithicFlat (in place). qemu-img check stays clean and compare matches
 * a raw model with the same writes; a stream-optimized image is refused for
 * writing with one line.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { isImgtoolError } from '../../src/errors.js'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

const MiB = 1024 * 1024
const SIZE = 36 * MiB + 3 * 512

/** pattern writes qemu-io can verify with read -P, at grain-odd offsets, across the table boundary */
const WRITES = [
  { offset: 0, length: 4096, pattern: 0x11 },
  { offset: 65536 - 700, length: 1400, pattern: 0x22 },
  { offset: 5 * 65536 + 512, length: 3 * 65536, pattern: 0x33 },
  { offset: 32 * MiB - 1024, length: 4096, pattern: 0x44 },
  { offset: 100, length: 300, pattern: 0x55 }, // into an allocated grain: in place
  { offset: SIZE - 2048, length: 2048, pattern: 0x66 }, // the disk's last, partial grain
]

describeQemu('vmdk guest writes, read by qemu-io', () => {
  const dir = makeTempDir('imgtool-vmdk-write-')

  for (const o of ['subformat=monolithicSparse', 'subformat=monolithicSparse,zeroed_grain=on', 'subformat=monolithicFlat']) {
    it(`-o ${o}: our writes read back in qemu-io; qemu-img check clean; compare equals a raw model`, async () => {
      const name = o.replace(/\W+/g, '-')
      const path = join(dir, `${name}.vmdk`)
      await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', o, path, String(SIZE)])
      // qemu's own data first: grains 2 and 8, then zeros written over grain 8 (a zeroed grain with zeroed_grain=on)
      await qemuIoOk(path, ['write -P 0x77 131072 65536', 'write -P 0x78 524288 65536', 'write -z 524288 65536'], { format: 'vmdk' })
      const model = Buffer.alloc(SIZE)
      model.fill(0x77, 131072, 131072 + 65536)
      const random = new Prng(3).bytes(70000)
      const img = await openImage(path, { readOnly: false })
      try {
        expect(img.readOnly).toBe(false)
        if (o.includes('zeroed_grain')) {
          // qemu's write -z left grain 8 a zeroed grain (entry 1): present, zero, no data
          const g8 = []
          for await (const x of img.extents(524288, 65536)) g8.push(x)
          expect(g8).toHaveLength(1)
          expect(g8[0]).toMatchObject({ present: true, zero: true, data: false })
        }
        for (const w of WRITES) {
          await img.write!(w.offset, new Uint8Array(w.length).fill(w.pattern))
          model.fill(w.pattern, w.offset, w.offset + w.length)
        }
        // into the zeroed grain (8) and qemu's allocated grain (2), partly
        await img.write!(524288 + 1000, random.subarray(0, 3000))
        model.set(random.subarray(0, 3000), 524288 + 1000)
        await img.write!(131072 + 60000, random.subarray(3000, 13000))
        model.set(random.subarray(3000, 13000), 131072 + 60000)
        await img.flush()
      } finally {
        await img.close()
      }
      const cmds = WRITES.filter((w) => w.pattern !== 0x11).map((w) => `read -P ${w.pattern} ${w.offset} ${w.length}`)
      cmds.push('read -P 0x11 400 3696', 'read -P 0x11 0 100', 'read -P 0 528288 4000', 'read -P 0 4096 57000')
      await qemuIoOk(path, cmds, { format: 'vmdk' })
      const check = await qemuImg(['check', '-f', 'vmdk', path])
      expect(check.code, check.stdout + check.stderr).toBe(0)
      const raw = join(dir, `${name}.raw`)
      writeFileSync(raw, model)
      const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, path])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      // and our own check: nothing found
      const again = await openImage(path, { readOnly: true })
      try {
        const rep = await again.check!()
        expect(rep.findings).toEqual([])
        expect((rep.notices ?? []).filter((n) => n.kind !== 'leaked-grain')).toEqual([])
      } finally {
        await again.close()
      }
    })
  }

  for (const sub of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']) {
    it(`${sub} (5 GiB, three extent files): writes across the extent boundaries read back in qemu-io`, async () => {
      const path = join(dir, `${sub}.vmdk`)
      await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, path, '5G'])
      const G = 2 ** 31
      const img = await openImage(path, { readOnly: false })
      try {
        await img.write!(G - 1000, new Uint8Array(3000).fill(0x5a))
        await img.write!(2 * G - 65536 + 7, new Uint8Array(200000).fill(0x6b))
        await img.flush()
      } finally {
        await img.close()
      }
      await qemuIoOk(
        path,
        [`read -P 0x5a ${G - 1000} 3000`, `read -P 0x6b ${2 * G - 65536 + 7} 200000`, `read -P 0 ${G + 2000} 60000`, `read -P 0 ${G - 66536} 65536`],
        { format: 'vmdk' },
      )
      const check = await qemuImg(['check', '-f', 'vmdk', path])
      expect(check.code, check.stdout + check.stderr).toBe(0)
    })
  }

  it('a streamOptimized image is refused for writing with one line naming the file', async () => {
    const path = join(dir, 'stream.vmdk')
    await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', 'subformat=streamOptimized', path, '1M'])
    const before = readFileSync(path)
    const err = await openImage(path, { readOnly: false }).then(
      () => undefined,
      (e: unknown) => e,
    )
    expect(isImgtoolError(err)).toBe(true)
    expect((err as Error).message).toContain(path)
    expect((err as Error).message).toContain('stream-optimized')
    expect(readFileSync(path).equals(before)).toBe(true)
  })
})
