/**
 * vmdk repair through the CLI, on images qemu-img and qemu-io made and the
 * test damaged (repair-damage.ts). The check's verdicts are qemu-img's (the
 * redundant copy's damage and leaked grains are warnings and notices: exit
 * 0, as qemu-img check), asserted against qemu-img check on the same bytes;
 * the repair plans from the kinds the check reports, whatever their
 * severity, and the kinds it repaired are gone from the check after it. The
 * dry run plans and writes nothing and exits as the check; the repair exits
 * with the check after it; qemu-img
 * check finds the repaired image clean and qemu-img compare finds it
 * identical to the undamaged one (or, where the damage itself changed the
 * guest, to the damaged one: nothing was written); `repair --undo` puts the
 * damaged bytes back exactly. Streams and flat descriptor files are left alone;
 * a twoGbMaxExtentSparse image's extent files are repaired (repair-twogb.test.ts).
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { cli, withFooter } from './support.js'
import { CASES, GRAIN, geometry, leak, rgtEntry } from './repair-damage.js'

useTempDirs()

describeQemu('vmdk repair (CLI), judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vmdk-repair-')
  const base = join(dir, 'base.vmdk')
  let baseRaw = ''

  it('qemu-img makes a monolithicSparse image with grains in both grain tables', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vmdk', base, '40M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 64k 4k', 'write -P 0x63 33M 100k', 'write -P 0x64 5M 4k'], { format: 'vmdk' })
    const raw = join(dir, 'base.raw')
    await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'raw', base, raw])
    baseRaw = md5(readFileSync(raw))
    const g = geometry(readFileSync(base))
    expect(g.entries).toBe(2)
    expect(g.rgt(0)).toBeGreaterThan(0)
    expect((await cli('check', base)).code).toBe(0)
  })

  const guestMd5 = async (path: string) => {
    const raw = join(dir, 'guest.raw')
    await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'raw', path, raw])
    return md5(readFileSync(raw))
  }

  /** the kinds a check reports: findings of every severity (warnings included) and notices */
  const reported = async (path: string) => {
    const r = await cli('check', '--output', 'json', path)
    const j = JSON.parse(r.out) as { findings?: Array<{ kind: string }>; notices?: Array<{ kind: string }> }
    return { code: r.code, kinds: [...(j.findings ?? []), ...(j.notices ?? [])].map((f) => f.kind) }
  }

  for (const c of CASES) {
    it(`${c.name}: check ${c.before} as qemu-img, repair ${c.after}; qemu-img check and compare agree; undo is exact`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vmdk`)
      const damaged = Buffer.from(c.damage(readFileSync(base)))
      writeFileSync(path, damaged)
      const damagedGuest = await guestMd5(path)
      if (c.sameAsBase) expect(damagedGuest).toBe(baseRaw)
      const qBefore = (await qemuImg(['check', '-f', 'vmdk', path])).code
      // the verdict is qemu-img's on the same bytes; the damage is still reported, by kind
      expect(qBefore).toBe(c.before)
      const seen = await reported(path)
      expect(seen.code).toBe(qBefore)
      expect(new Set(seen.kinds)).toEqual(new Set(c.reported))
      // a dry run plans and writes nothing, and exits as the check
      const dry = await cli('repair', '--mode', c.mode, '--dry-run', '--output', 'json', path)
      expect(readFileSync(path).equals(damaged)).toBe(true)
      expect(dry.code, dry.err).toBe(c.before)
      const plan = (JSON.parse(dry.out) as { plan: Array<{ kind: string }> }).plan
      expect(plan.map((a) => a.kind)).toEqual(c.kinds)
      const r = await cli('repair', '--mode', c.mode, '--output', 'json', path)
      expect(r.code, r.err).toBe(c.after)
      const report = JSON.parse(r.out) as {
        'leaks-fixed'?: number
        'corruptions-fixed'?: number
        findings?: Array<{ kind: string }>
        notices?: Array<{ kind: string }>
      }
      const after = await reported(path)
      expect(after.code).toBe(c.after)
      // the kinds the repair fixed are gone; what it left is what the case says, and the report says it was left
      expect(new Set(after.kinds)).toEqual(new Set(c.left))
      if (c.left.length > 0) expect(report.notices?.map((n) => n.kind)).toContain('not-repaired')
      const journal = `${path}.imgtool-undo`
      if (c.kinds.length === 0) {
        // not repairable: nothing written, no journal, and the report says so
        expect(readFileSync(path).equals(damaged)).toBe(true)
        expect(existsSync(journal)).toBe(false)
        expect(report.notices?.map((n) => n.kind)).toContain('not-repaired')
        expect((await qemuImg(['check', '-f', 'vmdk', path])).code).toBe(qBefore)
        expect(c.after).toBe(qBefore)
        return
      }
      // leaked grains fixed are counted (notices in a VMDK check, as qemu-img has no leak rule); the redundant
      // copy's damage is a warning that counts nothing: what fixed it is in the plan, and it is gone above
      if (dry.out.includes('"leaked-grain"')) expect(report['leaks-fixed'] ?? 0).toBeGreaterThan(0)
      const left = [...(report.findings ?? []), ...(report.notices ?? [])].map((n) => n.kind)
      for (const k of c.reported) if (!c.left.includes(k)) expect(left, 'the repair report').not.toContain(k)
      // qemu-img: clean, and the guest is the undamaged image's
      const q = await qemuImg(['check', '-f', 'vmdk', path])
      expect(q.code, q.stderr).toBe(0)
      expect(await guestMd5(path)).toBe(damagedGuest)
      const cmp = await qemuImg(['compare', '-f', 'vmdk', '-F', 'vmdk', base, path])
      expect(cmp.code, cmp.stdout).toBe(0)
      // the tail is cut only down to what the metadata reaches
      expect(readFileSync(path).length).toBeLessThanOrEqual(damaged.length + 3 * GRAIN)
      expect(existsSync(journal)).toBe(true)
      const u = await cli('repair', '--undo', journal, path)
      expect(u.code, u.err).toBe(0)
      expect(readFileSync(path).equals(damaged)).toBe(true)
    })
  }

  it('a leak at the end is cut to the size qemu-img left', async () => {
    const path = join(dir, 'leak-size.vmdk')
    writeFileSync(path, leak(3)(readFileSync(base)))
    const r = await cli('repair', '--mode', 'leaks', '--no-journal', path)
    expect(r.code, r.err).toBe(0)
    expect(readFileSync(path).equals(readFileSync(base))).toBe(true)
  })

  it('a leaked grain in the middle stays, and the check still names it', async () => {
    const path = join(dir, 'middle.vmdk')
    // guest grain 0 (the first grain qemu allocated) dropped from both tables: reached by nothing, with grains after it
    const b = readFileSync(base)
    const g = geometry(b)
    b.writeUInt32LE(0, g.gt(0) * 512)
    b.writeUInt32LE(0, g.rgt(0) * 512)
    writeFileSync(path, b)
    const before = await cli('check', '--output', 'json', path)
    expect(before.code).toBe(0)
    expect(before.out).toContain('leaked-grain')
    const r = await cli('repair', path)
    expect(r.code, r.err).toBe(0)
    expect(readFileSync(path).equals(b)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
    expect((await cli('check', '--output', 'json', path)).out).toContain('leaked-grain')
  })

  it('no byte of a redundant table that runs past the end of the file is cut (-r leaks)', async () => {
    const path = join(dir, 'straddle.vmdk')
    const b = Buffer.from(leak(1)(readFileSync(base)))
    b.writeUInt32LE((b.length - 1024) / 512, geometry(b).rgd + 4) // redundant table 1: its first 1 KiB inside the file
    writeFileSync(path, b)
    const q = await qemuImg(['check', '-f', 'vmdk', path])
    const seen = await reported(path)
    expect(seen.code).toBe(q.code)
    expect(seen.kinds).toContain('gt-past-eof')
    expect(seen.kinds).toContain('leaked-grain')
    const r = await cli('repair', '--mode', 'leaks', '--output', 'json', path)
    expect(r.code, r.err).toBe(q.code)
    expect(r.out).toContain('not-repaired')
    expect(readFileSync(path).equals(b)).toBe(true)
  })

  it('check -r all repairs as repair does', async () => {
    const path = join(dir, 'check-r.vmdk')
    writeFileSync(path, rgtEntry(7, 99)(readFileSync(base)))
    const r = await cli('check', '-r', 'all', path)
    expect(r.code, r.err).toBe(0)
    expect((await cli('check', path)).code).toBe(0)
    expect(await guestMd5(path)).toBe(baseRaw)
  })

  it('a clean image: repair exits 0, writes nothing and leaves no journal', async () => {
    const path = join(dir, 'clean.vmdk')
    copyFileSync(base, path)
    const r = await cli('repair', path)
    expect(r.code).toBe(0)
    expect(readFileSync(path).equals(readFileSync(base))).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
  })

  it('a damaged stream-optimized image: nothing written, exit as the check, and the report says so', async () => {
    const path = join(dir, 'stream.vmdk')
    await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'vmdk', '-o', 'subformat=streamOptimized', base, path])
    const b = readFileSync(path)
    const g = geometry(b)
    b.writeUInt32LE(0xffffffff, g.gt(0) * 512 + 4 * 100) // a grain past the end of the file
    writeFileSync(path, b)
    const check = await cli('check', path)
    expect(check.code).toBe((await qemuImg(['check', '-f', 'vmdk', path])).code)
    const dry = await cli('repair', '--dry-run', path)
    expect(dry.code).toBe(check.code)
    const r = await cli('repair', '--output', 'json', path)
    expect(r.code).toBe(check.code)
    expect(r.out).toContain('not-repaired')
    expect(readFileSync(path).equals(b)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
  })

  it('a stream whose header at 0 disagrees with its footer (the footer in force): nothing written, and it says why', async () => {
    const qemuStream = join(dir, 'footer-src.vmdk')
    await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'vmdk', '-o', 'subformat=streamOptimized', base, qemuStream])
    const b = withFooter(readFileSync(qemuStream))
    b.writeBigUInt64LE(b.readBigUInt64LE(12) * 2n, 12) // the header's capacity, not the footer's
    const path = join(dir, 'footer.vmdk')
    writeFileSync(path, b)
    const q = await qemuImg(['check', '-f', 'vmdk', path])
    const check = await reported(path)
    expect(check.code).toBe(q.code)
    expect(check.kinds).toContain('footer-differs')
    const dry = await cli('repair', '--dry-run', '--output', 'json', path)
    expect(dry.code).toBe(q.code)
    expect(dry.out).toContain('footer is the header in force')
    const r = await cli('repair', '--output', 'json', path)
    expect(r.code).toBe(q.code)
    expect(r.out).toContain('footer is the header in force')
    expect(readFileSync(path).equals(b)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
    expect(await guestMd5(path)).toBe(baseRaw)
  })

  it('a twoGbMaxExtentSparse image: its extent file repaired, not the descriptor (more in repair-twogb.test.ts)', async () => {
    const path = join(dir, 'split.vmdk')
    await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentSparse', path, '8M'])
    await qemuIoOk(path, ['write -P 0x71 0 64k'], { format: 'vmdk' })
    const extent = join(dir, 'split-s001.vmdk')
    const good = readFileSync(extent)
    const descriptor = readFileSync(path)
    writeFileSync(extent, Buffer.concat([good, Buffer.alloc(GRAIN, 0x5a)]))
    const check = await cli('check', '--output', 'json', path)
    expect(check.out).toContain('leaked-grain')
    const r = await cli('repair', '--output', 'json', path)
    expect(r.code, r.err).toBe(check.code)
    expect(readFileSync(extent).equals(good)).toBe(true)
    expect(readFileSync(path).equals(descriptor)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
    expect(existsSync(`${extent}.imgtool-undo`)).toBe(true)
  })

  it('a twoGbMaxExtentFlat image: nothing to repair, nothing written, exit as the check', async () => {
    const path = join(dir, 'splitflat.vmdk')
    await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', 'subformat=twoGbMaxExtentFlat', path, '8M'])
    const flat = readFileSync(join(dir, 'splitflat-f001.vmdk'))
    const r = await cli('repair', '--output', 'json', path)
    expect(r.code, r.err).toBe((await qemuImg(['check', '-f', 'vmdk', path])).code)
    expect(readFileSync(join(dir, 'splitflat-f001.vmdk')).equals(flat)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
  })

  it('a monolithicFlat image: nothing to repair, exit as the check', async () => {
    const path = join(dir, 'flat.vmdk')
    await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', path, '1M'])
    const flat = readFileSync(join(dir, 'flat-flat.vmdk'))
    const r = await cli('repair', path)
    expect(r.code, r.err).toBe(0)
    const dry = await cli('repair', '--dry-run', path)
    expect(dry.code).toBe(0)
    expect(readFileSync(join(dir, 'flat-flat.vmdk')).equals(flat)).toBe(true)
    expect(existsSync(`${path}.imgtool-undo`)).toBe(false)
  })
})
