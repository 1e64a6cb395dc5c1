/**
 * imgtool repair of qcow2 images whose persistent bitmaps qemu-img refuses to
 * load (it then refuses to open the image) or cannot use (IN_USE): images
 * made by qemu-img and qemu-io, damaged on their bytes. After the repair:
 * exactly the broken bitmaps are gone (named on stderr with the reason), the
 * others are kept with their bits, qemu-img opens the image, check is clean,
 * and qemu-img compare finds the guest bytes of a copy made before the damage.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { readBitmaps } from '../../src/index.js'
import { cli } from '../support/cli.js'
import { breakDirectorySize, breakGranularity, breakTableEntry, breakTableSize, setInUse } from '../support/bitmap-damage.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()
const LIMIT = 120_000

interface Damage {
  name: string
  damage: (b: Uint8Array) => Uint8Array
  /** the bitmaps dropped (by name) */
  dropped: string[]
  /** qemu-img refuses to open the damaged image */
  qemuRefuses: boolean
  reason: RegExp
}

const DAMAGES: Damage[] = [
  { name: 'an IN_USE bitmap', damage: (b) => setInUse(b, 0), dropped: ['b1'], qemuRefuses: false, reason: /in use/ },
  { name: 'an invalid bitmap table entry', damage: (b) => breakTableEntry(b, 1), dropped: ['b2'], qemuRefuses: true, reason: /table entry 0/ },
  { name: 'a table size of 0', damage: (b) => breakTableSize(b, 0), dropped: ['b1'], qemuRefuses: true, reason: /constraints/ },
  { name: 'a granularity below the minimum', damage: (b) => breakGranularity(b, 2), dropped: ['b3'], qemuRefuses: true, reason: /constraints/ },
  { name: 'two broken bitmaps of three', damage: (b) => setInUse(breakTableEntry(b, 2), 0), dropped: ['b1', 'b3'], qemuRefuses: true, reason: /./ },
  { name: 'a broken directory (every bitmap goes)', damage: breakDirectorySize, dropped: ['b1', 'b2', 'b3'], qemuRefuses: true, reason: /directory/ },
  {
    name: 'every bitmap in use (the extension goes)',
    damage: (b) => setInUse(setInUse(setInUse(b, 0), 1), 2),
    dropped: ['b1', 'b2', 'b3'],
    qemuRefuses: false,
    reason: /in use/,
  },
]

type Info = { 'format-specific': { data: { bitmaps?: Array<{ name: string }> } } }

describeQemu('imgtool repair drops the bitmaps qemu-img refuses', () => {
  let cases = 0
  for (const cluster of ['65536', '4096']) {
    for (const d of DAMAGES) {
      it(
        `${d.name} (${cluster}-byte clusters)`,
        async () => {
          const dir = makeTempDir('imgtool-bitmap-repair-')
          const img = join(dir, 'img.qcow2')
          const orig = join(dir, 'orig.qcow2')
          await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, img, '64M'])
          await qemuIoOk(img, ['write -P 7 0 2M'], { format: 'qcow2' })
          await qemuImgOk(['bitmap', '--add', img, 'b1'])
          await qemuImgOk(['bitmap', '--add', '-g', '4k', img, 'b2'])
          await qemuImgOk(['bitmap', '--add', '-g', '512', '--disable', img, 'b3'])
          await qemuIoOk(img, ['write -P 8 1M 2M', 'write -P 9 40M 3k'], { format: 'qcow2' })
          copyFileSync(img, orig)
          const before = await readBitmaps(orig, { format: 'qcow2' })
          writeFileSync(img, d.damage(readFileSync(img)))
          const opened = await qemuImg(['info', img])
          expect(opened.code !== 0, `qemu-img info before the repair\n${opened.stderr}`).toBe(d.qemuRefuses)

          const r = await cli('repair', img)
          expect(r.code, r.stdout + r.stderr).toBe(0)
          for (const n of d.dropped) expect(r.stderr, `the repair names ${n}`).toMatch(new RegExp(`^Repair: drop (bitmap '${n}'|every bitmap): `, 'm'))
          expect(r.stderr).toMatch(d.reason)

          const check = await qemuImg(['check', img])
          expect(check.code, check.stdout + check.stderr).toBe(0)
          const info = await qemuImg(['info', img])
          expect(info.stderr, 'qemu-img opens the image without a warning').toBe('')
          const j = await qemuImgJson<Info>(['info', '--output=json', img])
          const kept = before.filter((b) => !d.dropped.includes(b.name))
          expect((j['format-specific'].data.bitmaps ?? []).map((b) => b.name)).toEqual(kept.map((b) => b.name))
          const after = await readBitmaps(img, { format: 'qcow2' })
          expect(after.map((b) => [b.name, b.flags, b.granularity, b.bits && Buffer.from(b.bits).toString('hex')])).toEqual(
            kept.map((b) => [b.name, b.flags, b.granularity, b.bits && Buffer.from(b.bits).toString('hex')]),
          )
          const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', orig, img])
          expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
          // qemu-img can use the image again: a bitmap added, the image written
          await qemuImgOk(['bitmap', '--add', img, 'fresh'])
          await qemuIoOk(img, ['write -P 1 5M 4k'], { format: 'qcow2' })
          expect((await qemuImg(['check', img])).code).toBe(0)
          cases++
        },
        LIMIT,
      )
    }
  }

  it('repair --mode leaks leaves the bitmaps alone (the drop is an -r all repair)', async () => {
    const dir = makeTempDir('imgtool-bitmap-repair-')
    const img = join(dir, 'img.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '16M'])
    await qemuImgOk(['bitmap', '--add', img, 'b1'])
    writeFileSync(img, setInUse(readFileSync(img), 0))
    const r = await cli('repair', '--mode', 'leaks', img)
    expect(r.stderr).not.toMatch(/drop bitmap/)
    expect((await readBitmaps(img, { format: 'qcow2' })).map((b) => b.flags)).toEqual([['in-use', 'auto']])
    expect(cases).toBe(2 * DAMAGES.length)
  })
})
