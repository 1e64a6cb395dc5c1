/**
 * The pipelines over DiskImage take VMDK sources with no special case:
 * convert -O raw gives qemu-img's bytes, convert -O qcow2 is identical per
 * qemu-img compare, and imgtool compare finds a fixture identical to
 * qemu-img's raw conversion and different from a changed one.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { FIXTURES, FIXTURE_DIR, cli } from './support.js'

useTempDirs()

describeQemu(
  'vmdk sources in convert and compare',
  () => {
    const dir = makeTempDir('imgtool-vmdk-pipe-')
    for (const name of FIXTURES) {
      it(`${name}: convert -O raw and -O qcow2, compare`, async () => {
        const src = join(FIXTURE_DIR, name)
        const raw = join(dir, `${name}.raw`)
        const q = join(dir, `${name}.qcow2`)
        const c1 = await cli('convert', '-O', 'raw', src, raw)
        expect(c1.code, c1.err).toBe(0)
        expect(md5(readFileSync(raw))).toBe(readFileSync(`${src}.md5`, 'utf8').trim())
        const c2 = await cli('convert', '-O', 'qcow2', src, q)
        expect(c2.code, c2.err).toBe(0)
        expect((await qemuImg(['compare', '-f', 'vmdk', '-F', 'qcow2', src, q])).code).toBe(0)
        const theirs = join(dir, `${name}.theirs.raw`)
        await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'raw', src, theirs])
        expect((await cli('compare', src, theirs)).code).toBe(0)
        const b = readFileSync(theirs)
        b[b.length - 1] = b[b.length - 1]! ^ 0xff
        writeFileSync(theirs, b)
        expect((await cli('compare', src, theirs)).code).toBe(1)
      })
    }
  },
  ['qemu-img'],
)
