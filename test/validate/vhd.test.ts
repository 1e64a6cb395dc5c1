/**
 * VHD (qemu-img's vpc) under validate: identity by footer (fixed) or head copy
 * (dynamic), the sizes qemu-img reports, the structure check `imgtool check`
 * runs, Azure's rules, and a differencing disk's parent reported, never opened.
 * Fixtures: fixtures/make.sh (qemu-img create/convert -O vpc).
 */
import { execFileSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { check, validate } from '../../src/index.js'
import { describeQemu, QEMU_IMG, useTempDirs } from '../support/qemu.js'
import { codes, damaged, makeFixtures, permissive, PERMISSIVE, run, u32 } from './fixtures.js'

useTempDirs()

const qemuInfo = (file: string): { 'virtual-size': number; format: string } =>
  JSON.parse(execFileSync(QEMU_IMG ?? 'qemu-img', ['info', '-f', 'vpc', '--output=json', file], { encoding: 'utf8' })) as {
    'virtual-size': number
    format: string
  }

/** one's complement checksum of a footer/header with its 4 checksum bytes at `at` zeroed (the VHD specification) */
function vhdChecksum(b: Uint8Array, at: number): number[] {
  let sum = 0
  for (let i = 0; i < b.length; i++) if (i < at || i >= at + 4) sum += b[i]!
  return u32(~sum >>> 0)
}

describeQemu('validate on VHD', () => {
  let dir = ''
  beforeAll(() => {
    dir = makeFixtures()
  })

  it('fixed disks are found by their footer, dynamic ones by their head copy; sizes agree with qemu-img info', async () => {
    for (const [f, footerAt] of [
      ['azure.vhd', 1 << 20],
      ['dynamic.vhd', 0],
    ] as const) {
      const r = await run(dir, f, PERMISSIVE)
      expect({ f, format: r.format, codes: codes(r) }).toEqual({ f, format: 'vhd', codes: [] })
      expect(r.signatures).toContainEqual({ signature: 'vhd', offset: footerAt })
      expect(r.virtualSize).toBe(qemuInfo(join(dir, f))['virtual-size'])
      expect(r.checks).toMatchObject({ identity: 'pass', structure: 'pass', content: 'pass' })
      expect(r.fileSize).toBe(statSync(join(dir, f)).size)
    }
  })

  it('the guest digest of a VHD is sha256 of what qemu-img convert -O raw makes of it', async () => {
    for (const f of ['azure.vhd', 'dynamic.vhd', 'near-miss.vhd']) {
      const out = join(dir, `${f}.raw`)
      execFileSync(QEMU_IMG ?? 'qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', join(dir, f), out])
      const expected = createHash('sha256').update(readFileSync(out)).digest('hex')
      expect({ f, hex: (await run(dir, f, PERMISSIVE)).digest!.hex }).toEqual({ f, hex: expected })
    }
  })

  it('structure: the same check as imgtool check; a BAT entry into the footer copy is a corruption', async () => {
    const file = join(dir, 'dynamic.vhd')
    const bytes = readFileSync(file)
    const batAt = Number(bytes.readBigUInt64BE(512 + 16))
    // the first block moved to the footer copy's sector
    const bad = damaged(dir, 'dynamic.vhd', 'bat', [[batAt, u32((bytes.length - 512) / 512)]])
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toContain('CHECK_CORRUPTIONS')
    const engine = await check(bad)
    expect(engine.corruptions).toBeGreaterThan(0)
    const v = r.violations.find((x) => x.code === 'CHECK_CORRUPTIONS')!
    expect(v.message).toContain(engine.findings.find((f) => f.severity === 'corruption')!.message)
  })

  it('HEADER_INVALID: a footer whose checksum is wrong is reported, not opened', async () => {
    const bad = damaged(dir, 'azure.vhd', 'sum', [[(1 << 20) + 64, [0, 0, 0, 1]]])
    const r = await validate(bad, PERMISSIVE)
    expect(codes(r)).toEqual(['HEADER_INVALID'])
    expect(r.violations[0]!.offset).toBe((1 << 20) + 64)
    expect(r.checks.structure).toBe('skip')
  })

  it('LIMIT_TABLE_SIZE: a BAT of 16 Mi entries is refused before it is read', async () => {
    const head = readFileSync(join(dir, 'dynamic.vhd')).subarray(512, 1536)
    const patched = Uint8Array.from(head)
    patched.set(u32(16 << 20), 28)
    patched.set(vhdChecksum(patched, 36), 36)
    const huge = damaged(dir, 'dynamic.vhd', 'bat16m', [[512, patched]])
    const r = await validate(huge, permissive({ limits: { maxTableBytes: 32 << 20 } }))
    // its 64 MiB would also end past the end of this 2 MiB file
    expect(codes(r)).toEqual(['LIMIT_TABLE_SIZE', 'TRUNCATED'])
    expect(r.checks.structure).toBe('skip')
  })

  it("a differencing disk's parent is reported from its header and locator, never opened", async () => {
    const r = await run(dir, 'differencing.vhd', permissive({ references: { backingFile: false, parentDirNames: false } }))
    expect(codes(r)).toEqual(['BACKING_FILE', 'CONTENT_SKIPPED', 'PARENT_DIR_NAME'])
    const names = r.violations.filter((v) => v.code === 'BACKING_FILE').map((v) => v.structure)
    expect(names).toEqual(['parent name', 'parent locator 0 (W2ru)'])
    expect(r.violations.find((v) => v.code === 'BACKING_FILE')!.message).toMatch(/names parent '\.\.\\parent\.vhd'; not opened/)
    // the structure check runs on the child alone
    expect(r.checks.structure).toBe('pass')
    expect(r.virtualSize).toBe(qemuInfo(join(dir, 'differencing.vhd'))['virtual-size'])
    expect(codes(await run(dir, 'differencing.vhd', permissive({ vhd: { subformats: ['fixed', 'dynamic'] } })))).toEqual(['CONTENT_SKIPPED', 'VHD_SUBFORMAT'])
  })

  it('polyglot rules still apply: a fixed VHD whose guest starts with a qcow2 header', async () => {
    const qcow2Head = readFileSync(join(dir, 'good.qcow2')).subarray(0, 512)
    const poly = damaged(dir, 'azure.vhd', 'poly', [[0, qcow2Head]])
    const r = await validate(poly, PERMISSIVE)
    expect(r.format).toBe('qcow2')
    expect(codes(r)).toContain('POLYGLOT')
    expect(r.violations.find((v) => v.code === 'POLYGLOT')!.message).toMatch(/vhd signature/)
  })

  it('--expect-format vpc and vhd both declare a VHD', async () => {
    expect(codes(await validate(join(dir, 'azure.vhd'), PERMISSIVE, { expectFormat: 'vpc' }))).toEqual([])
    expect(codes(await validate(join(dir, 'azure.vhd'), PERMISSIVE, { expectFormat: 'qcow2' }))).toEqual(['FORMAT_MISMATCH'])
  })
})
