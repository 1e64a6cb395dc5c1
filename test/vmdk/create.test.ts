/**
 * create -f vmdk against qemu-img create -f vmdk: the same bytes (the CID
 * qemu-img draws aside), qemu-img check clean, the same virtual size; option
 * mistakes refused before a file is made.
 */
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

/**
 * The file with its CID taken out: qemu writes the CID with `%x` (no leading zeros), so the descriptor's
 * length varies with it. The embedded descriptor is compared as text with the CID masked, the rest of the
 * file with the descriptor area zeroed (its binary parts sit at fixed offsets).
 */
function maskCid(b: Buffer): string {
  const mask = (t: string) => t.replace(/\nCID=[0-9a-f]{1,8}\n/, '\nCID=X\n')
  if (b.toString('latin1', 0, 4) !== 'KDMV') return mask(b.toString('latin1'))
  const off = Number(b.readBigUInt64LE(28)) * 512
  const size = Number(b.readBigUInt64LE(36)) * 512
  const area = b.subarray(off, off + size)
  const end = area.indexOf(0)
  const text = area.toString('latin1', 0, end < 0 ? area.length : end)
  const rest = Buffer.from(b)
  rest.fill(0, off, off + size)
  return `${mask(text)}\u0000${rest.toString('latin1')}`
}

const SETS: Array<{ o: string; size: string }> = [
  { o: 'subformat=monolithicSparse', size: '5M' },
  { o: 'subformat=monolithicSparse', size: '1234567' },
  { o: 'subformat=monolithicSparse,zeroed_grain=on', size: '100M' },
  { o: 'subformat=monolithicSparse,adapter_type=lsilogic,hwversion=7', size: '3G' },
  { o: 'compat6=on,adapter_type=buslogic', size: '64M' },
  { o: 'subformat=streamOptimized', size: '10M' },
  { o: 'subformat=monolithicFlat', size: '3M' },
  { o: 'subformat=monolithicFlat,adapter_type=legacyESX,toolsversion=1234', size: '1000000' },
]

describeQemu(
  'vmdk create against qemu-img create',
  () => {
    const dir = makeTempDir('imgtool-vmdk-create-')
    for (const [i, s] of SETS.entries()) {
      it(`-o ${s.o} ${s.size}: qemu-img's bytes (CID aside), check clean, same virtual size`, async () => {
        const ours = join(dir, `mine${i}.vmdk`)
        const theirs = join(dir, `qemu${i}.vmdk`)
        const r = await cli('create', '-q', '-f', 'vmdk', '-o', s.o, ours, s.size)
        expect(r.code, r.err).toBe(0)
        await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', s.o, theirs, s.size])
        const a = maskCid(readFileSync(ours)).replaceAll(`mine${i}`, 'NAME')
        const b = maskCid(readFileSync(theirs)).replaceAll(`qemu${i}`, 'NAME')
        let at = 0
        while (at < a.length && a[at] === b[at]) at++
        expect(a === b, `first difference at byte ${at}: ours ${JSON.stringify(a.slice(at, at + 60))}, qemu-img ${JSON.stringify(b.slice(at, at + 60))}`).toBe(
          true,
        )
        if (s.o.includes('monolithicFlat')) {
          expect(readFileSync(join(dir, `mine${i}-flat.vmdk`)).length).toBe(readFileSync(join(dir, `qemu${i}-flat.vmdk`)).length)
        }
        const check = await qemuImg(['check', '-f', 'vmdk', ours])
        expect(check.code, check.stdout + check.stderr).toBe(0)
        const qi = await qemuImgJson<{ 'virtual-size': number }>(['info', '-f', 'vmdk', '--output=json', ours])
        const ti = await qemuImgJson<{ 'virtual-size': number }>(['info', '-f', 'vmdk', '--output=json', theirs])
        expect(qi['virtual-size']).toBe(ti['virtual-size'])
        expect((await cli('check', ours)).code).toBe(0)
      })
    }

    for (const [o, text] of [
      ['subformat=fancy', /Unknown subformat: fancy/],
      ['adapter_type=scsi', /Unknown adapter type: 'scsi'/],
      ['compat6=on,hwversion=7', /compat6 cannot be enabled with hwversion set/],
      ['cluster_size=4k', /Invalid parameter 'cluster_size' for vmdk/],
    ] as const) {
      it(`-o ${o}: refused before a file is made`, async () => {
        const p = join(dir, `bad-${o.replace(/\W+/g, '-')}.vmdk`)
        const r = await cli('create', '-q', '-f', 'vmdk', '-o', o, p, '1M')
        expect(r.code).toBe(1)
        expect(r.err).toMatch(text)
        expect(existsSync(p)).toBe(false)
      })
    }
  },
  ['qemu-img'],
)
