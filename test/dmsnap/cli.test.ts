/** The dm-snapshot driver through the generic CLI: info, map, and merge (alias commit). */
import { describe, expect, it } from 'vitest'
import { copyFileSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { main } from '../../src/cli/main.js'
import { FIXTURES, md5 } from './helpers.js'

function md5Of(manifestPath: string): string {
  const m = JSON.parse(readFileSync(manifestPath, 'utf8')) as { expected: { snapshot_md5: string } }
  return m.expected.snapshot_md5
}

async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = ''
  let err = ''
  const sink = (f: (s: string) => void) =>
    new Writable({
      write(c, _e, cb) {
        f(String(c))
        cb()
      },
    })
  const code = await main(['node', 'imgtool', ...args], { stdout: sink((s) => (out += s)), stderr: sink((s) => (err += s)), isTTY: false })
  return { code, out, err }
}

function copyFixture(name: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'dmsnap-cli-'))
  for (const f of ['origin.img', 'cow.img']) copyFileSync(join(FIXTURES, name, f), join(dir, f))
  return dir
}

describe('dmsnap through the CLI', () => {
  it('info --output json shows the kernel status numbers', async () => {
    const dir = copyFixture('c8-basic')
    const r = await run(['info', '-f', 'dmsnap', '--origin', join(dir, 'origin.img'), '--output', 'json', join(dir, 'cow.img')])
    expect(r.err).toBe('')
    expect(r.code).toBe(0)
    const j = JSON.parse(r.out) as { format: string; 'format-specific': { type: string; data: Record<string, unknown> } }
    expect(j.format).toBe('dmsnap')
    expect(j['format-specific'].data.status).toBe('72/256 16')
  })

  it('merge applies the store like the kernel; commit does the same on a dm-snapshot store', async () => {
    for (const cmd of ['merge', 'commit']) {
      const dir = copyFixture('c8-basic')
      const r = await run([cmd, '--origin', join(dir, 'origin.img'), '--output', 'json', join(dir, 'cow.img')])
      expect(r.err).toBe('')
      expect(r.code).toBe(0)
      expect(JSON.parse(r.out)['merged-exceptions']).toBe(7)
      expect(md5(readFileSync(join(dir, 'origin.img')))).toBe(md5(readFileSync(join(FIXTURES, 'merged-c8-basic', 'origin.img'))))
      expect(md5(readFileSync(join(dir, 'cow.img')))).toBe(md5(readFileSync(join(FIXTURES, 'merged-c8-basic', 'cow.img'))))
    }
  })

  it('check reports an invalidated store as a corruption; repair --force-valid re-validates it and check is clean after', async () => {
    const dir = copyFixture('c8-invalid')
    const origin = join(dir, 'origin.img')
    const cow = join(dir, 'cow.img')
    const before = await run(['check', '--origin', origin, '--output', 'json', cow])
    expect(before.code).toBe(2)
    expect(JSON.parse(before.out).corruptions).toBe(1)
    const plain = await run(['repair', '--origin', origin, '--no-journal', cow])
    expect(plain.code).toBe(2) // without --force-valid an invalidated store is left alone
    const forced = await run(['repair', '--force-valid', '--origin', origin, '--output', 'json', '--no-journal', cow])
    expect(forced.code).toBe(0)
    expect(JSON.parse(forced.out)['corruptions-fixed']).toBe(1)
    const after = await run(['check', '--origin', origin, cow])
    expect(after.code).toBe(0)
    expect(after.out).toContain('No errors were found on the image.')
  })

  it('create -f dmsnap --origin makes an empty store; convert -O dmsnap stores only the differing chunks; compare and convert back agree', async () => {
    const dir = copyFixture('c8-basic')
    const origin = join(dir, 'origin.img')
    const created = await run(['create', '-f', 'dmsnap', '--origin', origin, '-o', 'chunk_size=4K', '-q', join(dir, 'fresh.cow'), '1M'])
    expect(created.err).toBe('')
    expect(created.code).toBe(0)
    const fresh = await run(['info', '--origin', origin, '--output', 'json', join(dir, 'fresh.cow')])
    expect(JSON.parse(fresh.out)['format-specific'].data).toMatchObject({ exceptions: 0, 'chunk-size': 4096, status: '16/2048 16' })
    expect((await run(['check', join(dir, 'fresh.cow')])).code).toBe(0)

    // the kernel-made snapshot view, flattened, then stored again as a fresh COW against the same origin
    const view = join(dir, 'view.raw')
    expect((await run(['convert', '-f', 'dmsnap', '--origin', origin, '-O', 'raw', join(dir, 'cow.img'), view])).code).toBe(0)
    expect(md5(readFileSync(view))).toBe(md5Of(join(FIXTURES, 'c8-basic', 'manifest.json')))
    const again = join(dir, 'again.cow')
    expect((await run(['convert', '-O', 'dmsnap', '-o', `origin=${origin},chunk_size=4K`, view, again])).code).toBe(0)
    const info = await run(['info', '--origin', origin, '--output', 'json', again])
    const original = await run(['info', '--origin', origin, '--output', 'json', join(dir, 'cow.img')])
    expect(JSON.parse(info.out)['format-specific'].data.exceptions).toBeLessThanOrEqual(JSON.parse(original.out)['format-specific'].data.exceptions)
    const cmp = await run(['compare', '-f', 'dmsnap', '--origin', origin, again, view])
    expect(cmp.out).toContain('Images are identical.')
    expect(cmp.code).toBe(0)
    expect((await run(['check', '--origin', origin, again])).code).toBe(0)
    expect((await run(['convert', '-O', 'dmsnap', view, join(dir, 'x.cow')])).code).toBe(1) // no origin given
  })
})
