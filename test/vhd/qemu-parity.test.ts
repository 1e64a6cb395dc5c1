/**
 * Damage qemu-img 7.2 reads past, read as it reads it (fuzzer classes VHD-DYNHDR-CHECKSUM and
 * VHD-DISKTYPE-REFUSED): a dynamic header whose checksum is wrong (vpc.c never checks it), and a
 * footer at 0 whose checksum holds but whose disk type is neither 2 (fixed) nor 3/4 (vpc.c reads
 * every such type as a dynamic disk). Read-only opens give qemu-img's size, map and bytes (info,
 * map, cat, compare, convert); check names the damage as a corruption; a writable open is refused
 * in one line, writing nothing; and `repair -r all` fixes it, after which qemu-img reads the disk
 * as before the damage. A fixed disk cut short inside its footer is read as qemu-img reads it too.
 * A footer at 0 that says fixed is the one reading imgtool does not copy (docs/differences.md):
 * qemu-img reads such a file 1:1 from offset 0, its own metadata as guest data.
 */
import { copyFileSync, readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { isImgtoolError } from '../../src/errors.js'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

/** one's complement byte sum with the checksum field zero, as the VHD spec defines it */
function fixChecksum(b: Buffer, start: number, length: number, at: number): void {
  b.writeUInt32BE(0, start + at)
  let sum = 0
  for (let i = start; i < start + length; i++) sum += b[i]!
  b.writeUInt32BE(~sum >>> 0, start + at)
}

const diskType = (t: number) => (b: Buffer) => {
  b.writeUInt32BE(t, 60)
  fixChecksum(b, 0, 512, 64)
  return b
}

describeQemu('vpc: damage qemu-img reads past, read as qemu-img reads it', () => {
  const dir = makeTempDir('imgtool-vhd-parity-')
  const base = join(dir, 'base.vhd')

  it('qemu-img makes a dynamic disk with data in three blocks', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', base, '12M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 4M 64k', 'write -P 0x63 9M 4k'], { format: 'vpc' })
  })

  const cases: Array<{ name: string; damage: (b: Buffer) => Buffer; kind: string; structure: string; fix: string }> = [
    {
      name: 'a dynamic header checksum (one bit flipped in the header)',
      damage: (b) => ((b[512 + 700] = b[512 + 700]! ^ 0x80), b),
      kind: 'dynamic-header-checksum',
      structure: 'dynamic header',
      fix: 'header-checksum-rewritten',
    },
    {
      name: 'a dynamic header checksum (the checksum field itself)',
      damage: (b) => ((b[512 + 37] = b[512 + 37]! ^ 0x08), b),
      kind: 'dynamic-header-checksum',
      structure: 'dynamic header',
      fix: 'header-checksum-rewritten',
    },
    ...[0, 1, 5, 0xffffffff].map((t) => ({
      name: `disk type ${t} in the footer at 0 (checksum right)`,
      damage: diskType(t),
      kind: 'footer-disk-type',
      structure: 'footer',
      fix: 'footer-restored',
    })),
  ]

  for (const c of cases) {
    it(`${c.name}: info, map and cat as qemu-img; check names it; writes refused; repair fixes it`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      writeFileSync(path, c.damage(readFileSync(base)))
      const damaged = md5(readFileSync(path))

      // read-only: what qemu-img says
      const qInfo = await qemuImgJson<{ 'virtual-size': number; 'cluster-size'?: number }>(['info', '--output=json', '-f', 'vpc', path])
      const info = await cli('info', '--output=json', path)
      expect(info.code, info.err).toBe(0)
      const itInfo = JSON.parse(info.out) as { 'virtual-size': number; 'cluster-size'?: number; format: string }
      expect(itInfo.format).toBe('vpc')
      expect(itInfo['virtual-size']).toBe(qInfo['virtual-size'])
      expect(itInfo['cluster-size']).toBe(qInfo['cluster-size'])
      const qMap = await qemuImgOk(['map', '--output=json', '-f', 'vpc', path])
      const map = await cli('map', '--output=json', path)
      expect(map.code, map.err).toBe(0)
      expect(JSON.parse(map.out)).toEqual(JSON.parse(qMap))
      const qRaw = join(dir, 'q.raw')
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path, qRaw])
      const cat = await cli('cat', path)
      expect(cat.code, cat.err).toBe(0)
      expect(md5(cat.bytes)).toBe(md5(readFileSync(qRaw)))
      const cmp = await cli('compare', path, base)
      expect(cmp.code, cmp.err + cmp.out).toBe(0)
      const conv = join(dir, `${c.name.replace(/\W+/g, '_')}.qcow2`)
      const cv = await cli('convert', '-O', 'qcow2', path, conv)
      expect(cv.code, cv.err).toBe(0)
      expect((await qemuImg(['compare', '-f', 'qcow2', '-F', 'vpc', conv, base])).code).toBe(0)

      // check: a corruption at the structure, nothing written
      const check = await cli('check', '--output=json', path)
      expect(check.code).toBe(2)
      const report = JSON.parse(check.out) as { findings?: Array<{ kind: string; structure: string }> }
      expect(
        report.findings?.some((f) => f.kind === c.kind && f.structure === c.structure),
        check.out,
      ).toBe(true)
      expect(md5(readFileSync(path))).toBe(damaged)

      // a writable open: refused in one line, naming file and structure, nothing written
      let error: unknown
      try {
        const img = await openImage(path, { format: 'vpc', readOnly: false })
        await img.close()
      } catch (e) {
        error = e
      }
      expect(isImgtoolError(error), String(error)).toBe(true)
      const e = error as Error & { details: { structure?: string } }
      expect(e.message.split('\n')).toHaveLength(1)
      expect(e.message).toContain(path)
      expect(e.message).toMatch(/not opened for writing/)
      expect(e.details.structure).toBe(c.structure)
      expect(md5(readFileSync(path))).toBe(damaged)

      // repair -r all: fixed, clean, and qemu-img reads the undamaged disk's bytes
      const dry = await cli('repair', '--mode', 'all', '--dry-run', '--output', 'json', path)
      expect((JSON.parse(dry.out) as { plan: Array<{ kind: string }> }).plan.map((a) => a.kind)).toContain(c.fix)
      const journal = `${path}.undo`
      const rep = await cli('repair', '--mode', 'all', '--journal', journal, path)
      expect(rep.code, rep.err + rep.out).toBe(0)
      expect((await cli('check', path)).code).toBe(0)
      expect((await qemuImg(['compare', '-f', 'vpc', '-F', 'vpc', base, path])).code).toBe(0)
      const undo = await cli('repair', '--undo', journal, path)
      expect(undo.code, undo.err).toBe(0)
      expect(md5(readFileSync(path))).toBe(damaged)
    })
  }

  it('a footer at 0 that says fixed (type 2): refused in one line, though qemu-img reads the file 1:1', async () => {
    const path = join(dir, 'type2.vhd')
    writeFileSync(path, diskType(2)(readFileSync(base)))
    const damaged = md5(readFileSync(path))
    // qemu-img reads it as a fixed disk from offset 0: its first guest sector is the footer itself
    const qRaw = join(dir, 'type2.raw')
    await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path, qRaw])
    expect(readFileSync(qRaw).subarray(0, 8).toString('latin1')).toBe('conectix')
    for (const cmd of ['info', 'cat']) {
      const r = await cli(cmd, '-f', 'vpc', path)
      expect(r.code).toBe(1)
      expect(r.err.trim().split('\n')).toHaveLength(1)
      expect(r.err).toMatch(/footer at 0x0: disk type 2 \(fixed\) at the start of the file/)
    }
    // check names it; repair restores the footer from its sound copy at the end
    expect((await cli('check', '-f', 'vpc', path)).code).toBe(2)
    expect(md5(readFileSync(path))).toBe(damaged)
    const rep = await cli('repair', '-f', 'vpc', '--mode', 'all', '--no-journal', path)
    expect(rep.code, rep.err + rep.out).toBe(0)
    expect((await qemuImg(['compare', '-f', 'vpc', '-F', 'vpc', base, path])).code).toBe(0)
  })

  for (const short of [1, 308]) {
    it(`a fixed disk cut ${short} bytes short (into its footer's zeros): read as qemu-img reads it, check names it, writes refused`, async () => {
      const fixed = join(dir, `fixed-${short}.vhd`)
      await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixed, '1M'])
      await qemuIoOk(fixed, ['write -P 0x5a 4k 8k'], { format: 'vpc' })
      truncateSync(fixed, statSync(fixed).size - short)
      const cutMd5 = md5(readFileSync(fixed))
      const qInfo = await qemuImgJson<{ 'virtual-size': number }>(['info', '--output=json', '-f', 'vpc', fixed])
      const info = await cli('info', '--output=json', '-f', 'vpc', fixed)
      expect(info.code, info.err).toBe(0)
      expect((JSON.parse(info.out) as { 'virtual-size': number })['virtual-size']).toBe(qInfo['virtual-size'])
      const qRaw = join(dir, `fixed-${short}.raw`)
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', fixed, qRaw])
      const cat = await cli('cat', '-f', 'vpc', fixed)
      expect(cat.code, cat.err).toBe(0)
      expect(md5(cat.bytes)).toBe(md5(readFileSync(qRaw)))
      const check = await cli('check', '-f', 'vpc', '--output=json', fixed)
      expect(check.code).toBe(2)
      expect((JSON.parse(check.out) as { findings: Array<{ kind: string }> }).findings.map((f) => f.kind)).toContain('footer-cut')
      let error: unknown
      try {
        const img = await openImage(fixed, { format: 'vpc', readOnly: false })
        await img.close()
      } catch (e) {
        error = e
      }
      expect(isImgtoolError(error), String(error)).toBe(true)
      expect((error as Error).message).toMatch(/cut short .* not opened for writing/)
      expect(md5(readFileSync(fixed))).toBe(cutMd5)
    })
  }

  it('a footer at 0 with a wrong checksum stays refused, as qemu-img refuses it', async () => {
    const path = join(dir, 'fsum.vhd')
    copyFileSync(base, path)
    const b = readFileSync(path)
    b[30] = b[30]! ^ 1
    writeFileSync(path, b)
    expect((await qemuImg(['info', '-f', 'vpc', path])).code).not.toBe(0)
    const r = await cli('info', path)
    expect(r.code).toBe(1)
    expect(r.err).toMatch(/footer at 0x0: checksum/)
  })
})
