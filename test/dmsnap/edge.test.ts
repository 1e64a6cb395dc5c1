/**
 * dm-snapshot edge defects (issue 9: D9, D17, items 10 and from issue 10): a header whose
 * chunk size is not one never hangs the check; a header the kernel refuses is a check that
 * cannot start (exit 1, one line); dry-run works read-only; repair writes nothing where
 * check finds nothing; u64 values print exactly, in human output and JSON.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { createHash } from 'node:crypto'
import { beforeAll, describe, expect, it } from 'vitest'
import { makeTempDir, useTempDirs } from '../support/qemu.js'
import { cli, imgtoolChild, damaged as qcow2Image } from '../journal/helpers.js'
import { FIXTURES, loadFixture } from './helpers.js'
import { pokeBytes, setHeader, setRecord } from './damage.js'

const md5 = (p: string): string => createHash('md5').update(readFileSync(p)).digest('hex')
const { cow, origin } = loadFixture('c8-basic') // chunk 4 KiB, 32 chunks, records (0,2) (2,3) (3,4) (16,5) (64,6) (65,7) (66,8)

describe('dm-snapshot edge cases through the CLI', () => {
  useTempDirs()
  let dir = ''
  let originPath = ''
  const store = (name: string, bytes: Uint8Array): string => {
    const p = join(dir, name)
    writeFileSync(p, bytes)
    return p
  }
  beforeAll(() => {
    if (!existsSync(join(import.meta.dirname, '..', '..', 'dist', 'cli', 'main.js'))) throw new Error('dist/ is missing: run npm run build')
    dir = makeTempDir()
    originPath = join(dir, 'origin.img')
    writeFileSync(originPath, origin)
  })

  it('D9: bad magic with chunk size 0 ends at once: exit 1, one line (it ran forever)', async () => {
    const p = store('d9.cow', setHeader(setHeader(cow, 'magic', 0x71416e53), 'chunkSize', 0))
    for (const cmd of [['check'], ['repair'], ['repair', '--dry-run']]) {
      const r = await imgtoolChild(
        [...cmd, '-f', 'dmsnap', '--origin', originPath, '--no-journal', p].filter((a) => cmd[0] === 'repair' || a !== '--no-journal'),
        30_000,
      )
      expect(r.signal, cmd.join(' ')).toBe(null)
      expect(r.code, cmd.join(' ')).toBe(1)
      expect(r.stderr).toBe(`imgtool: dmsnap: ${p}: bad magic 0x71416e53 at offset 0x0 (expected 0x70416e53 "SnAp"); the kernel refuses it (ENXIO)\n`)
    }
  })

  it('D9: check -f dmsnap of a qcow2 file ends at once: exit 1, one line', async () => {
    const q = qcow2Image(dir, 'v3-c4k', () => undefined, 'q.qcow2')
    const r = await imgtoolChild(['check', '-f', 'dmsnap', q], 60_000)
    expect(r.signal).toBe(null)
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(
      new RegExp(`^imgtool: dmsnap: ${q}: bad magic 0x[0-9a-f]+ at offset 0x0 \\(expected 0x70416e53 "SnAp"\\); the kernel refuses it \\(ENXIO\\)\\n$`),
    )
  })

  for (const [name, bytes, line] of [
    ['bad magic', () => setHeader(cow, 'magic', 0x12345678), 'bad magic 0x12345678 at offset 0x0'],
    ['chunk size 0', () => setHeader(cow, 'chunkSize', 0), 'invalid chunk size 0 sectors at offset 0xc'],
    ['unknown version', () => setHeader(cow, 'version', 2), 'unsupported version 2 at offset 0x8'],
  ] as const) {
    it(`item 10: ${name}: check cannot start: exit 1, one line on stderr, nothing on stdout (was exit 2)`, async () => {
      const p = store(`h-${name.replace(/ /g, '-')}.cow`, bytes())
      for (const output of ['human', 'json']) {
        const r = await cli('check', '-f', 'dmsnap', '--origin', originPath, '--output', output, p)
        expect(r.code).toBe(1)
        expect(r.out).toBe('')
        expect(r.err).toMatch(new RegExp(`^imgtool: dmsnap: ${p}: ${line} [^\\n]*\\n$`))
      }
    })
  }

  it('D17: repair --dry-run works on a read-only open and prints the plan, writing nothing', async () => {
    const p = store('d17.cow', setRecord(cow, 9, 500, 19)) // a record after the terminator
    const sum = md5(p)
    const r = await cli('repair', '--dry-run', '-f', 'dmsnap', '--origin', originPath, p)
    // the finding on stderr (as check prints its per-record lines), nothing else
    expect(r.err).toBe(
      "corruption: area 0 (chunk 1) slot 9, after the terminator at slot 7, holds 500→19: ignored now, but live after the kernel's next append to this area\n",
    )
    expect(r.code).toBe(2)
    expect(r.out).toContain('Repair plan (1 steps, nothing written):\n  zero-garbage: zero 1 slot(s) after the terminator in area 0\n')
    expect(md5(p)).toBe(sum)
    const inv = store('c8-invalid.cow', readFileSync(join(FIXTURES, 'c8-invalid', 'cow.img')))
    const j = await cli('repair', '--dry-run', '--force-valid', '--output', 'json', '-f', 'dmsnap', '--origin', join(FIXTURES, 'c8-invalid', 'origin.img'), inv)
    expect(j.code).toBe(2)
    expect((JSON.parse(j.out) as { plan: { kind: string }[] }).plan.map((a) => a.kind)).toEqual(['force-valid'])
  })

  it('issue 10: repair writes nothing where check finds nothing (valid=2, bytes after the header)', async () => {
    const p = store('clean-notices.cow', pokeBytes(setHeader(cow, 'valid', 2), 100, [1]))
    const c = await cli('check', '-f', 'dmsnap', '--origin', originPath, p)
    expect(c.code).toBe(0)
    const sum = md5(p)
    const r = await cli('repair', '-f', 'dmsnap', '--origin', originPath, p)
    expect(r.code).toBe(0)
    expect(md5(p)).toBe(sum)
    expect(existsSync(p + '.imgtool-undo')).toBe(false)
  })

  it('issue 10: a garbage record prints exact integers, in human output and in JSON', async () => {
    const p = store('garbage.cow', setRecord(setRecord(cow, 1, 0xffffffffffff1234n, 3), 4, 64, 0x00ffffffffffff03n))
    const h = await cli('check', '-f', 'dmsnap', '--origin', originPath, p)
    expect(h.code).toBe(2)
    // the findings go to stderr, the summary to stdout (as qemu-img check splits them)
    expect(h.out + h.err).not.toMatch(/\de\+\d/)
    expect(h.err).toContain('old_chunk 18446744073709490740 is beyond the origin')
    expect(h.err).toContain('new_chunk 72057594037927683 is beyond the end of the COW')
    expect(h.err).toContain('next free chunk 72057594037927684 ')
    expect(h.out).toContain(`Image end offset: ${72057594037927684n * 4096n}\n`)
    const j = await cli('check', '-f', 'dmsnap', '--origin', originPath, '--output', 'json', p)
    expect(j.out).toContain('"old-chunk": 18446744073709490740,')
    expect(j.out).toContain('"new-chunk": 72057594037927683,')
    expect(j.out).toContain(`"image-end-offset": ${72057594037927684n * 4096n},`)
    expect(j.out).not.toMatch(/72057594037927680|18446744073709490000/)
    const beyond = (JSON.parse(j.out) as { findings: { kind: string; chunks: unknown[]; cluster?: number }[] }).findings.find(
      (f) => f.kind === 'new-chunk-beyond-end',
    )!
    expect(beyond.cluster).toBeUndefined() // not a number JSON readers hold exactly: the exact value is in chunks/new-chunk
  })
})
