/** The dm-snapshot driver through the generic CLI: info, map, and merge (alias commit). */
import { describe, expect, it } from 'vitest'
import { copyFileSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { main } from '../../src/cli/main.js'
import { FIXTURES, md5 } from './helpers.js'

async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = ''
  let err = ''
  const sink = (f: (s: string) => void) => new Writable({ write(c, _e, cb) { f(String(c)); cb() } })
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

  it('merge applies the store like the kernel; commit is an alias', async () => {
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
})
