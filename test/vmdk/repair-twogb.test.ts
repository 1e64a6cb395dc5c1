/**
 * vmdk repair of twoGbMaxExtentSparse images through the CLI: a descriptor
 * file and two sparse extent files qemu-img made, damaged per extent
 * (repair-twogb-cases.ts). Judged by qemu-img on the same files: our check's
 * exit code and counts are qemu-img check's before and after the repair; the
 * repaired image reads as the undamaged one in qemu-img (compare), and our
 * reading of it equals qemu-img's (imgtool convert -O raw, then qemu-img
 * compare against the image). Each extent the repair writes gets its own undo
 * journal (NAME-sNNN.vmdk.imgtool-undo) and `repair --undo` of each puts that
 * extent back exactly; extents it does not write and the descriptor file are
 * never changed.
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'
import { leak } from './repair-damage.js'
import { EXTENTS, TWOGB_CASES, extentFile, makeTwoGb, type ExtentName } from './repair-twogb-cases.js'

useTempDirs()

interface QemuCheck {
  code: number | null
  corruptions: number
  leaks: number
  checkErrors: number
}

/** qemu-img check's exit code and counts (JSON; a failed check prints none: its error counts as one check error) */
async function qemuCheck(path: string): Promise<QemuCheck> {
  const q = await qemuImg(['check', '--output=json', '-f', 'vmdk', path])
  if (q.stdout.trim() === '') return { code: q.code, corruptions: -1, leaks: 0, checkErrors: 1 }
  const j = JSON.parse(q.stdout) as { corruptions?: number; leaks?: number; 'check-errors'?: number }
  return { code: q.code, corruptions: j.corruptions ?? 0, leaks: j.leaks ?? 0, checkErrors: j['check-errors'] ?? 0 }
}

/** our check: exit code, counts and the kinds reported (findings of every severity and notices) */
async function ourCheck(path: string) {
  const r = await cli('check', '--output', 'json', path)
  const j = JSON.parse(r.out) as {
    corruptions?: number
    leaks?: number
    'check-errors'?: number
    findings?: Array<{ kind: string }>
    notices?: Array<{ kind: string }>
  }
  return {
    code: r.code,
    corruptions: j.corruptions ?? 0,
    leaks: j.leaks ?? 0,
    checkErrors: j['check-errors'] ?? 0,
    kinds: [...(j.findings ?? []), ...(j.notices ?? [])].map((f) => f.kind),
  }
}

/** our verdict is qemu-img's: the exit code, and the counts where qemu-img prints them */
async function sameVerdict(path: string) {
  const q = await qemuCheck(path)
  const ours = await ourCheck(path)
  expect(ours.code, 'exit code as qemu-img check').toBe(q.code)
  expect(ours.checkErrors).toBe(q.checkErrors)
  if (q.corruptions >= 0) {
    expect(ours.corruptions).toBe(q.corruptions)
    expect(ours.leaks).toBe(q.leaks)
  }
  return ours
}

describeQemu('vmdk twoGbMaxExtentSparse repair (CLI), judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vmdk-repair-twogb-')
  const baseDir = join(dir, 'base')
  const base = join(baseDir, 'd.vmdk')
  const bytesOf = (x: ExtentName) => readFileSync(extentFile(base, x))

  it('qemu-img makes a twoGbMaxExtentSparse image of two extents, each with grains in two tables', async () => {
    mkdirSync(baseDir)
    await makeTwoGb(base)
    for (const x of EXTENTS) expect(existsSync(extentFile(base, x))).toBe(true)
    expect(existsSync(join(baseDir, 'd-s003.vmdk'))).toBe(false)
    const ours = await sameVerdict(base)
    expect(ours.code).toBe(0)
    expect(ours.kinds).toEqual([])
  })

  /** qemu-img reads `a` and `b` as the same guest */
  const sameGuest = async (a: string, b: string) => {
    const cmp = await qemuImg(['compare', '-f', 'vmdk', '-F', 'vmdk', a, b])
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
  }
  /** imgtool reads `path` as qemu-img does: our raw conversion compared by qemu-img with the image */
  const weReadAsQemu = async (path: string) => {
    const raw = join(dir, 'ours.raw')
    const c = await cli('convert', '-f', 'vmdk', '-O', 'raw', path, raw)
    expect(c.code, c.err).toBe(0)
    const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, path])
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
  }

  for (const c of TWOGB_CASES) {
    it(`${c.name}: check as qemu-img before and after, guest kept, one journal per written extent, undo exact`, async () => {
      const caseDir = join(dir, c.name.replace(/\W+/g, '_').slice(0, 80))
      mkdirSync(caseDir)
      const path = join(caseDir, 'd.vmdk')
      const pristine = join(caseDir, 'pristine')
      mkdirSync(pristine)
      copyFileSync(base, path)
      const damaged: Record<string, Buffer> = {}
      for (const x of EXTENTS) {
        const f = c.damage[x]
        damaged[x] = f ? Buffer.from(f(bytesOf(x))) : bytesOf(x)
        writeFileSync(extentFile(path, x), damaged[x]!)
      }
      // a copy of the damaged image, for qemu-img compare of the guest before and after
      copyFileSync(base, join(pristine, 'd.vmdk'))
      for (const x of EXTENTS) writeFileSync(extentFile(join(pristine, 'd.vmdk'), x), damaged[x]!)
      const descriptor = readFileSync(path)
      if (c.sameAsBase) await sameGuest(base, path)

      const seen = await sameVerdict(path)
      expect(seen.code).toBe(c.before)
      expect(new Set(seen.kinds)).toEqual(new Set(c.reported))

      // a dry run plans and writes nothing, and exits as the check
      const dry = await cli('repair', '--mode', c.mode, '--dry-run', '--output', 'json', path)
      expect(dry.code, dry.err).toBe(c.before)
      expect((JSON.parse(dry.out) as { plan: Array<{ kind: string }> }).plan.map((a) => a.kind)).toEqual(c.kinds)
      for (const x of EXTENTS) expect(readFileSync(extentFile(path, x)).equals(damaged[x]!)).toBe(true)

      const r = await cli('repair', '--mode', c.mode, '--output', 'json', path)
      expect(r.code, r.err).toBe(c.after)
      const report = JSON.parse(r.out) as { 'leaks-fixed'?: number; notices?: Array<{ kind: string }> }
      if (c.left.length > 0) expect(report.notices?.map((n) => n.kind)).toContain('not-repaired')
      if (c.kinds.includes('leak-freed')) expect(report['leaks-fixed'] ?? 0).toBeGreaterThan(0)

      // after: our verdict is still qemu-img's, the repaired kinds are gone, the guest is kept
      const after = await sameVerdict(path)
      expect(after.code).toBe(c.after)
      expect(new Set(after.kinds)).toEqual(new Set(c.left))
      await sameGuest(join(pristine, 'd.vmdk'), path)
      if (c.sameAsBase) await sameGuest(base, path)
      await weReadAsQemu(path)

      // the descriptor is never written, nor an extent no plan needs; one sealed journal per written extent
      expect(readFileSync(path).equals(descriptor)).toBe(true)
      expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
      for (const x of EXTENTS) {
        const file = extentFile(path, x)
        const journal = `${file}.imgtool-undo`
        if (!c.written.includes(x)) {
          expect(readFileSync(file).equals(damaged[x]!), `${x} untouched`).toBe(true)
          expect(existsSync(journal)).toBe(false)
          continue
        }
        expect(readFileSync(file).equals(damaged[x]!), `${x} repaired`).toBe(false)
        expect(r.err).toContain(`restore with: imgtool repair --undo ${journal} ${file}`)
        const u = await cli('repair', '--undo', journal, file)
        expect(u.code, u.err).toBe(0)
        expect(readFileSync(file).equals(damaged[x]!), `${x} undone`).toBe(true)
      }
      expect((await qemuCheck(path)).code).toBe(c.before)
    })
  }

  it('--journal PATH: the extent journals are PATH.NAME-sNNN.vmdk; --no-journal writes none', async () => {
    const caseDir = join(dir, 'journal-path')
    mkdirSync(caseDir)
    const path = join(caseDir, 'd.vmdk')
    copyFileSync(base, path)
    const damaged = Buffer.from(leak(1)(bytesOf('s002')))
    copyFileSync(extentFile(base, 's001'), extentFile(path, 's001'))
    writeFileSync(extentFile(path, 's002'), damaged)
    const j = join(dir, 'j.undo')
    const r = await cli('repair', '--journal', j, path)
    expect(r.code, r.err).toBe(0)
    expect(existsSync(j)).toBe(false)
    expect(existsSync(`${j}.d-s001.vmdk`)).toBe(false)
    expect(existsSync(`${j}.d-s002.vmdk`)).toBe(true)
    expect(readFileSync(extentFile(path, 's002')).equals(bytesOf('s002'))).toBe(true)
    expect((await cli('repair', '--undo', `${j}.d-s002.vmdk`, extentFile(path, 's002'))).code).toBe(0)
    expect(readFileSync(extentFile(path, 's002')).equals(damaged)).toBe(true)
    // the journal is sealed to its own extent file: refused on the other one
    const wrong = await cli('repair', '--undo', `${j}.d-s002.vmdk`, extentFile(path, 's001'))
    expect(wrong.code).not.toBe(0)
    expect(readFileSync(extentFile(path, 's001')).equals(bytesOf('s001'))).toBe(true)
    const n = await cli('repair', '--no-journal', path)
    expect(n.code, n.err).toBe(0)
    expect(readFileSync(extentFile(path, 's002')).equals(bytesOf('s002'))).toBe(true)
    expect(existsSync(`${extentFile(path, 's002')}.imgtool-undo`)).toBe(false)
  })

  it("an extent named outside the descriptor's directory is refused, nothing written; a symlink inside it is followed", async () => {
    const caseDir = join(dir, 'confined')
    const sub = join(caseDir, 'sub')
    mkdirSync(sub, { recursive: true })
    const outside = join(caseDir, 'd-s002.vmdk')
    const damaged = Buffer.from(leak(1)(bytesOf('s002')))
    writeFileSync(outside, damaged)
    copyFileSync(extentFile(base, 's001'), join(sub, 'd-s001.vmdk'))
    const text = readFileSync(base, 'latin1').replace(/\0+$/, '')
    expect(text).toContain('"d-s002.vmdk"')
    const path = join(sub, 'd.vmdk')
    writeFileSync(path, text.replace('"d-s002.vmdk"', '"../d-s002.vmdk"'))
    const r = await cli('repair', path)
    expect(r.code).not.toBe(0)
    expect(r.err).toContain("leaves the descriptor's directory")
    expect(r.err.trim().split('\n')).toHaveLength(1)
    expect(readFileSync(outside).equals(damaged)).toBe(true)
    expect(existsSync(`${outside}.imgtool-undo`)).toBe(false)
    // the same extent through a symbolic link inside the directory: repaired as check reads it
    const linked = join(caseDir, 'linked')
    mkdirSync(linked)
    copyFileSync(base, join(linked, 'd.vmdk'))
    copyFileSync(extentFile(base, 's001'), join(linked, 'd-s001.vmdk'))
    symlinkSync(outside, join(linked, 'd-s002.vmdk'))
    const l = await cli('repair', join(linked, 'd.vmdk'))
    expect(l.code, l.err).toBe(0)
    expect(readFileSync(outside).equals(bytesOf('s002'))).toBe(true)
    await sameGuest(base, join(linked, 'd.vmdk'))
  })

  it('check -r leaks repairs the extents as repair does; a clean image is left alone', async () => {
    const caseDir = join(dir, 'check-r')
    mkdirSync(caseDir)
    const path = join(caseDir, 'd.vmdk')
    copyFileSync(base, path)
    writeFileSync(extentFile(path, 's001'), leak(3)(bytesOf('s001')))
    copyFileSync(extentFile(base, 's002'), extentFile(path, 's002'))
    const r = await cli('check', '-r', 'leaks', '--no-journal', path)
    expect(r.code, r.err).toBe(0)
    for (const x of EXTENTS) expect(readFileSync(extentFile(path, x)).equals(bytesOf(x))).toBe(true)
    const clean = await cli('repair', path)
    expect(clean.code, clean.err).toBe(0)
    for (const x of EXTENTS) {
      expect(readFileSync(extentFile(path, x)).equals(bytesOf(x))).toBe(true)
      expect(existsSync(`${extentFile(path, x)}.imgtool-undo`)).toBe(false)
    }
    await qemuImgOk(['check', '-f', 'vmdk', path])
  })
})
