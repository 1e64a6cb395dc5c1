/** imgtool check / repair: parsing, rendering and exit codes (qemu-img's). */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { PassThrough } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { main } from '../../src/cli/main.js'
import { Qcow2Bytes } from '../support/damage.js'
import { makeTempDir, useTempDirs } from '../support/qemu.js'
import { QCOW2_DIR, fixture, fixtureBytes } from './fixtures.js'

async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  const stdout = new PassThrough()
  const stderr = new PassThrough()
  let out = ''
  let err = ''
  stdout.on('data', (d) => (out += d))
  stderr.on('data', (d) => (err += d))
  const code = await main(['node', 'imgtool', ...args], { stdout, stderr, isTTY: false })
  return { code, out, err }
}

function damaged(dir: string, name: string, damage: (i: Qcow2Bytes) => unknown): string {
  const img = new Qcow2Bytes(fixtureBytes(fixture(name)))
  damage(img)
  const p = join(dir, `${name}.qcow2`)
  writeFileSync(p, img.bytes)
  return p
}

describe('imgtool check', () => {
  useTempDirs()
  it('prints qemu-img check --output=json for a clean fixture, exit 0', async () => {
    const golden = readFileSync(join(QCOW2_DIR, 'v3-c64k.qcow2.check.json'), 'utf8')
    const dir = makeTempDir()
    const p = join(dir, 'v3-c64k.qcow2')
    copyFileSync(join(QCOW2_DIR, 'v3-c64k.qcow2'), p)
    const r = await cli('check', '--output', 'json', p)
    expect(r.code).toBe(0)
    const j = JSON.parse(r.out) as Record<string, unknown>
    expect(j['findings']).toEqual([])
    delete j['findings']
    expect(j).toEqual({ ...JSON.parse(golden), filename: p })
  })

  it("reports 3 leaked clusters with exit 3: qemu-img's lines then the findings on stderr, the summary alone on stdout", async () => {
    const p = damaged(makeTempDir(), 'v3-c4k', (i) => i.leak(3))
    const r = await cli('check', p)
    expect(r.code).toBe(3)
    expect(r.err).toMatch(/^Leaked cluster \d+ refcount=1 reference=0\n/)
    expect(r.err).toMatch(/\nleak: qcow2: cluster \d+ /)
    expect(r.out).toMatch(/^\n3 leaked clusters were found on the image\.\nThis means waste of disk space, but no harm to data\.\n/)
    expect(r.out).toMatch(/Image end offset: \d+\n$/)
  })

  it('exit 2 for a corruption; -r all repairs it, prints the banner and exits 0', async () => {
    const p = damaged(makeTempDir(), 'v3-c4k', (i) => i.setRefcount(i.firstData().cluster, 0))
    expect((await cli('check', p)).code).toBe(2)
    const r = await cli('check', '-r', 'all', p)
    expect(r.code).toBe(0)
    expect(r.out).toContain(
      'The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\n',
    )
    expect(r.out).toContain('No errors were found on the image.')
    expect(existsSync(p + '.imgtool-undo')).toBe(true)
    expect((await cli('check', p)).code).toBe(0)
  })

  it('repair --undo puts the bytes back', async () => {
    const p = damaged(makeTempDir(), 'v3-c4k', (i) => i.leak(2))
    const damagedBytes = readFileSync(p)
    expect((await cli('repair', '--mode', 'leaks', '--journal', p + '.j', p)).code).toBe(0)
    expect(readFileSync(p).equals(damagedBytes)).toBe(false)
    const u = await cli('repair', '--undo', p + '.j', p)
    expect(u.code).toBe(0)
    expect(readFileSync(p).equals(damagedBytes)).toBe(true)
  })

  it('--dry-run prints the plan and writes nothing', async () => {
    const p = damaged(makeTempDir(), 'v3-c4k', (i) => i.leak(2))
    const bytes = readFileSync(p)
    const r = await cli('repair', '--dry-run', '--output', 'json', p)
    expect(r.code).toBe(3)
    const j = JSON.parse(r.out) as { plan: { kind: string }[]; leaks: number }
    expect(j.leaks).toBe(2)
    expect(j.plan.map((a) => a.kind)).toEqual(['free-leaks'])
    expect(readFileSync(p).equals(bytes)).toBe(true)
    expect(existsSync(p + '.imgtool-undo')).toBe(false)
  })

  it('repairs a dirty lazy-refcount image with -r leaks (qemu-img aborts there), JSON with fixed counts', async () => {
    const dir = makeTempDir()
    const p = join(dir, 'dirty.qcow2')
    copyFileSync(join(QCOW2_DIR, 'v3-dirty-lazy.qcow2'), p)
    const before = await cli('check', '--output', 'json', p)
    expect(before.code).toBe(2)
    const r = await cli('check', '-r', 'leaks', '--output', 'json', p)
    expect(r.code).toBe(0)
    const j = JSON.parse(r.out) as Record<string, unknown>
    expect(j['corruptions-fixed']).toBe(3) // qemu-img -r all reports 3 too (the COPIED errors vanish with the refcounts)
    expect(j['corruptions']).toBeUndefined()
    expect(Object.keys(j).slice(0, 4)).toEqual(['image-end-offset', 'total-clusters', 'corruptions-fixed', 'check-errors'])
    const after = await cli('info', '--output', 'json', p)
    expect((JSON.parse(after.out) as Record<string, unknown>)['dirty-flag']).toBe(false)
  })

  it('raw images have no check: exit 63', async () => {
    const dir = makeTempDir()
    const p = join(dir, 'disk.raw')
    writeFileSync(p, new Uint8Array(4096))
    const r = await cli('check', '-f', 'raw', p)
    expect(r.code).toBe(63)
    expect(r.err).toBe('imgtool: This image format does not support checks\n')
    expect(r.out).toBe('')
  })

  it('an unknown -r value and a missing file fail with exit 1', async () => {
    const r = await cli('check', '-r', 'some', join(QCOW2_DIR, 'v3-c4k.qcow2'))
    expect(r.code).toBe(1)
    expect(r.err).toContain("Unknown option value for -r (expecting 'leaks' or 'all'): some")
    const m = await cli('check', '/nonexistent/x.qcow2')
    expect(m.code).toBe(1)
    expect(m.err).toMatch(/^imgtool: Could not open '\/nonexistent\/x.qcow2': /)
  })

  it('an unreadable snapshot table fails the check like qemu-img (exit 1, no JSON)', async () => {
    const p = damaged(makeTempDir(), 'v3-snapshot', (i) => i.snapshotExtraTooBig())
    const r = await cli('check', '--output', 'json', p)
    expect(r.code).toBe(1)
    expect(r.out).toBe('')
    expect(r.err).toContain('Check failed: File too large')
  })
})
