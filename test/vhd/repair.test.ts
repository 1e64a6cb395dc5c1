/**
 * vpc repair through the CLI, on disks qemu-img made and the test damaged:
 * each repair leaves a disk our check finds clean (or names what is left),
 * qemu-img reads the repaired disk as the undamaged one (convert -O raw,
 * byte for byte), and `repair --undo` puts the damaged bytes back exactly.
 * `-r leaks` frees leaks only; `-r all` also restores footers and the header
 * checksum; a dry run writes nothing.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

const MiB = 1024 * 1024

describeQemu('vpc repair (CLI), judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vhd-repair-')
  const base = join(dir, 'base.vhd')
  let baseRaw = ''

  it('qemu-img makes a dynamic disk with three blocks of data', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', base, '12M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 4M 64k', 'write -P 0x63 9M 4k'], { format: 'vpc' })
    const raw = join(dir, 'base.raw')
    await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', base, raw])
    baseRaw = md5(readFileSync(raw))
  })

  const tail = (b: Buffer) => b.length - 512
  const leak = (b: Buffer) => Buffer.concat([b.subarray(0, tail(b)), Buffer.alloc(2 * MiB + 512, 0x44), b.subarray(tail(b))])
  const cases: Array<{ name: string; damage: (b: Buffer) => Buffer; mode: 'leaks' | 'all'; before: number; after: number; kinds: string[] }> = [
    { name: 'footer checksum at 0', damage: (b) => ((b[30] = b[30]! ^ 1), b), mode: 'all', before: 2, after: 0, kinds: ['footer-restored'] },
    { name: 'footer cookie at 0', damage: (b) => ((b[0] = 0), b), mode: 'all', before: 2, after: 0, kinds: ['footer-restored'] },
    { name: 'footer copy zeroed', damage: (b) => b.fill(0, tail(b)), mode: 'all', before: 2, after: 0, kinds: ['footer-copy-rewritten'] },
    { name: 'dynamic header checksum', damage: (b) => ((b[512 + 700] = 9), b), mode: 'all', before: 2, after: 0, kinds: ['header-checksum-rewritten'] },
    { name: 'a leaked block, -r leaks', damage: leak, mode: 'leaks', before: 3, after: 0, kinds: ['leak-freed'] },
    {
      name: 'a leak and a header checksum, -r leaks (the corruption stays)',
      damage: (b) => leak(((b[512 + 700] = 9), b)),
      mode: 'leaks',
      before: 2,
      after: 2,
      kinds: ['leak-freed'],
    },
    {
      name: 'a leak and a header checksum, -r all',
      damage: (b) => leak(((b[512 + 700] = 9), b)),
      mode: 'all',
      before: 2,
      after: 0,
      kinds: ['header-checksum-rewritten', 'leak-freed'],
    },
  ]

  for (const c of cases) {
    it(`${c.name}: check exits ${c.before}, repair ${c.after}; qemu-img reads the repaired disk as the original; undo is exact`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      const damaged = c.damage(readFileSync(base))
      writeFileSync(path, damaged)
      expect((await cli('check', '-f', 'vpc', path)).code).toBe(c.before)
      // a dry run plans and writes nothing
      const dry = await cli('repair', '-f', 'vpc', '--mode', c.mode, '--dry-run', '--output', 'json', path)
      expect(readFileSync(path).equals(damaged)).toBe(true)
      expect(dry.code).toBe(c.before) // a dry run reports the check before, and its plan
      const plan = (JSON.parse(dry.out) as { plan: Array<{ kind: string; message: string }> }).plan
      expect(plan.map((a) => a.kind)).toEqual(c.kinds)
      const r = await cli('repair', '-f', 'vpc', '--mode', c.mode, '--output', 'json', path)
      expect(r.code, r.err).toBe(c.after)
      const report = JSON.parse(r.out) as Record<string, number>
      expect((report['leaks-fixed'] ?? 0) + (report['corruptions-fixed'] ?? 0)).toBeGreaterThan(0)
      expect((await cli('check', '-f', 'vpc', path)).code).toBe(c.after)
      const raw = join(dir, 'out.raw')
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path, raw])
      expect(md5(readFileSync(raw))).toBe(baseRaw)
      const info = JSON.parse(await qemuImgOk(['info', '-f', 'vpc', '--output=json', path])) as { 'virtual-size': number }
      expect(info['virtual-size']).toBeGreaterThanOrEqual(12 * MiB)
      const journal = `${path}.imgtool-undo`
      expect(existsSync(journal)).toBe(true)
      const u = await cli('repair', '--undo', journal, path)
      expect(u.code, u.err).toBe(0)
      expect(readFileSync(path).equals(damaged)).toBe(true)
    })
  }

  it('a clean disk: repair exits 0, writes nothing and leaves no journal', async () => {
    const path = join(dir, 'clean.vhd')
    copyFileSync(base, path)
    const r = await cli('repair', '-f', 'vpc', path)
    expect(r.code).toBe(0)
    expect(readFileSync(path).equals(readFileSync(base))).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
    expect((await qemuImg(['check', path])).code).toBe(63)
  })

  it('a footer copy that differs from the footer is not a leak fix under -r leaks: both stay', async () => {
    const path = join(dir, 'copy-differs.vhd')
    const b = readFileSync(base)
    b[tail(b) + 40] = b[tail(b) + 40]! ^ 1
    writeFileSync(path, b)
    const r = await cli('check', '-r', 'leaks', '-f', 'vpc', path)
    expect(r.code).toBe(2)
    expect(readFileSync(path).equals(b)).toBe(true)
  })
})
