/**
 * imgtool bitmap against the real qemu-img bitmap on copies of the same image
 * (made by qemu-img create and qemu-io; guest writes between the steps are made
 * by qemu-io on both copies, so enabled bitmaps gather real bits): after every
 * step both tools exit alike with the same words, qemu-img info's
 * format-specific data (bitmaps, flags, granularity) agrees, both copies check
 * clean, and every bitmap's contents read back through imgtool's reader are
 * equal.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { readBitmaps } from '../../src/index.js'
import { mergeBits } from '../../src/formats/qcow2/ops/bitmap-edit.js'
import { cli } from '../support/cli.js'
import { setInUse } from '../support/bitmap-damage.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()
const LIMIT = 120_000

type Step = { bitmap: string[] } | { io: string[] } | { inUse: number }

interface Case {
  name: string
  create?: string[]
  size?: string
  /** a second image (other.qcow2, same options unless given) for --merge -b */
  other?: { create?: string[]; size?: string; steps: Step[] }
  steps: Step[]
}

const CASES: Case[] = [
  {
    name: 'add, guest writes, clear, remove',
    steps: [
      { bitmap: ['--add', 'IMG', 'b1'] },
      { io: ['write -P 1 0 100k', 'write -P 2 10M 1M'] },
      { bitmap: ['--add', '-g', '4k', 'IMG', 'b2'] },
      { io: ['write -P 3 5M 5k', 'write -P 4 63M 4k'] },
      { bitmap: ['--clear', 'IMG', 'b1'] },
      { io: ['write -P 5 20M 1k'] },
      { bitmap: ['--remove', 'IMG', 'b2'] },
      { bitmap: ['--remove', 'IMG', 'b1'] },
    ],
  },
  {
    name: 'several operations in one call, in order; disabled bitmaps do not track writes',
    create: ['-o', 'cluster_size=4096'],
    size: '16M',
    steps: [
      { bitmap: ['--add', '--disable', 'IMG', 'off'] },
      { bitmap: ['--add', '--remove', 'IMG', 'gone'] },
      { bitmap: ['--add', '-g', '512', 'IMG', 'fine'] },
      { io: ['write -P 1 7k 3k', 'write -P 1 15M 1M'] },
      { bitmap: ['--enable', 'IMG', 'off'] },
      { io: ['write -P 2 1M 64k'] },
      { bitmap: ['--disable', '--clear', 'IMG', 'fine'] },
      { io: ['write -P 3 2M 64k'] },
    ],
  },
  {
    name: 'merge across granularities, into a disabled bitmap, into itself',
    steps: [
      { bitmap: ['--add', 'IMG', 'a'] },
      { bitmap: ['--add', '-g', '4096', 'IMG', 'small'] },
      { io: ['write 100k 5k', 'write 10M 1M', 'write 40M 512'] },
      { bitmap: ['--add', '--disable', 'IMG', 'c'] },
      { bitmap: ['--merge', 'small', 'IMG', 'c'] },
      { bitmap: ['--clear', 'IMG', 'small'] },
      { io: ['write 50M 4k'] },
      { bitmap: ['--merge', 'a', 'IMG', 'small'] },
      { bitmap: ['--merge', 'a', 'IMG', 'a'] },
      { bitmap: ['--add', '-g', '2M', '--merge', 'small', 'IMG', 'big'] },
    ],
  },
  {
    name: 'merge from another image (-b, -F)',
    other: { steps: [{ bitmap: ['--add', '-g', '8k', 'IMG', 'x'] }, { io: ['write 3M 9k', 'write 60M 1M'] }] },
    steps: [
      { bitmap: ['--add', 'IMG', 'mine'] },
      { bitmap: ['--merge', 'x', '-b', 'OTHER', 'IMG', 'mine'] },
      { bitmap: ['--merge', 'x', '-b', 'OTHER', '-F', 'qcow2', 'IMG', 'mine'] },
      { bitmap: ['--merge', 'nope', '-b', 'OTHER', 'IMG', 'mine'] },
      { bitmap: ['--merge', 'x', '-b', 'OTHER', '-F', 'raw', 'IMG', 'mine'] },
    ],
  },
  {
    name: 'merge from an image of another size is refused',
    other: { size: '32M', steps: [{ bitmap: ['--add', 'IMG', 'x'] }] },
    steps: [{ bitmap: ['--add', 'IMG', 'mine'] }, { bitmap: ['--merge', 'x', '-b', 'OTHER', 'IMG', 'mine'] }],
  },
  {
    name: 'refusals: exists, not found, granularity, name rules; the operations before a failure are kept',
    steps: [
      { bitmap: ['--add', 'IMG', 'b1'] },
      { bitmap: ['--add', 'IMG', 'b1'] },
      { bitmap: ['--add', '--add', 'IMG', 'twice'] },
      { bitmap: ['--remove', 'IMG', 'nope'] },
      { bitmap: ['--clear', 'IMG', 'nope'] },
      { bitmap: ['--enable', 'IMG', 'nope'] },
      { bitmap: ['--disable', 'IMG', 'nope'] },
      { bitmap: ['--merge', 'nope', 'IMG', 'b1'] },
      { bitmap: ['--merge', 'b1', 'IMG', 'nope'] },
      { bitmap: ['--add', '-g', '1000', 'IMG', 'g1'] },
      { bitmap: ['--add', '-g', '256', 'IMG', 'g2'] },
      { bitmap: ['--add', '-g', '4G', 'IMG', 'g3'] },
      { bitmap: ['--add', '-g', '2G', 'IMG', 'g4'] },
      { bitmap: ['--add', '-g', '0', 'IMG', 'g5'] },
      { bitmap: ['--add', '-g', '6G', 'IMG', 'g6'] },
      { bitmap: ['--add', 'IMG', ''] },
      { bitmap: ['--add', 'IMG', 'x'.repeat(1024)] },
      { bitmap: ['--add', 'IMG', 'x'.repeat(1023)] },
      { bitmap: ['--disable', '--remove', '--remove', 'IMG', 'g4'] },
    ],
  },
  {
    name: 'an in-use bitmap: clear, enable, merge refused; remove works',
    steps: [
      { bitmap: ['--add', 'IMG', 'a'] },
      { bitmap: ['--add', '-g', '4k', 'IMG', 'b'] },
      { io: ['write 1M 8k'] },
      { inUse: 0 },
      { bitmap: ['--clear', 'IMG', 'a'] },
      { bitmap: ['--enable', 'IMG', 'a'] },
      { bitmap: ['--disable', 'IMG', 'a'] },
      { bitmap: ['--merge', 'a', 'IMG', 'b'] },
      { bitmap: ['--merge', 'b', 'IMG', 'a'] },
      { bitmap: ['--add', 'IMG', 'a'] },
      { bitmap: ['--clear', 'IMG', 'b'] },
      { bitmap: ['--remove', 'IMG', 'a'] },
      { bitmap: ['--add', 'IMG', 'a'] },
    ],
  },
  {
    name: 'usage errors',
    steps: [
      { bitmap: ['IMG', 'b1'] },
      { bitmap: ['-g', '512', '--clear', 'IMG', 'b1'] },
      { bitmap: ['--add', 'IMG'] },
      { bitmap: ['--add', 'IMG', 'a', 'b'] },
      { bitmap: ['--add', '-b', 'x', 'IMG', 'b3'] },
      { bitmap: ['--merge', 'b1', '-F', 'raw', 'IMG', 'b3'] },
      { bitmap: ['--add', '-g', 'abc', 'IMG', 'b3'] },
      { bitmap: ['--add', '-g', '-1', 'IMG', 'b3'] },
    ],
  },
  {
    name: 'qcow2 v2 cannot hold bitmaps',
    create: ['-o', 'compat=0.10'],
    steps: [{ bitmap: ['--add', 'IMG', 'b'] }, { bitmap: ['--remove', 'IMG', 'b'] }],
  },
  {
    name: '2 MiB clusters: the default granularity is 64 KiB',
    create: ['-o', 'cluster_size=2M'],
    steps: [{ bitmap: ['--add', 'IMG', 'b'] }, { io: ['write 0 3M'] }, { bitmap: ['--add', '-g', '0', 'IMG', 'c'] }],
  },
  {
    name: 'a backing file and lazy refcounts',
    create: ['-o', 'lazy_refcounts=on', '-b', 'base.qcow2', '-F', 'qcow2'],
    steps: [{ bitmap: ['--add', 'IMG', 'b'] }, { io: ['write 1M 1M'] }, { bitmap: ['--add', '--disable', 'IMG', 'c'] }, { bitmap: ['--remove', 'IMG', 'b'] }],
  },
]

type Info = { 'format-specific': { data: Record<string, unknown> } }

/** qemu names the node (#blockNNN), imgtool the file */
const normal = (s: string, tool: string, path: string): string =>
  s
    .replaceAll(`${tool}: `, 'TOOL: ')
    .replace(/'#block\d+'|#block\d+/g, 'NODE')
    .replaceAll(`'${path}'`, 'NODE')
    .replace(/\s*\n\s*(?=.)/g, '; ')
    .replaceAll('; TOOL: ', '; ')
    .replace(/^TOOL: (Unknown option|unrecognized option).*$/m, 'TOOL: bad option')

async function bits(path: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {}
  for (const b of await readBitmaps(path, { format: 'qcow2' })) out[b.name] = b.bits ? Buffer.from(b.bits).toString('hex') : 'inconsistent'
  return out
}

describeQemu('imgtool bitmap against qemu-img bitmap', () => {
  let compared = 0
  for (const c of CASES) {
    it(
      c.name,
      async () => {
        const dir = makeTempDir('imgtool-bitmap-')
        const size = c.size ?? '64M'
        if ((c.create ?? []).includes('base.qcow2')) {
          await qemuImgOk(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), size])
          await qemuIoOk(join(dir, 'base.qcow2'), ['write -P 9 0 8M'], { format: 'qcow2' })
        }
        const src = join(dir, 'src.qcow2')
        await qemuImgOk(['create', '-q', '-f', 'qcow2', ...(c.create ?? []), src, size], { cwd: dir })
        const other = join(dir, 'other.qcow2')
        if (c.other) {
          await qemuImgOk(['create', '-q', '-f', 'qcow2', ...(c.other.create ?? c.create ?? []), other, c.other.size ?? size], { cwd: dir })
          for (const s of c.other.steps) {
            if ('io' in s) await qemuIoOk(other, s.io, { format: 'qcow2' })
            else if ('bitmap' in s) await qemuImgOk(['bitmap', ...s.bitmap.map((a) => (a === 'IMG' ? other : a))])
          }
        }
        const ours = join(dir, 'ours.qcow2')
        const theirs = join(dir, 'theirs.qcow2')
        copyFileSync(src, ours)
        copyFileSync(src, theirs)
        for (const s of c.steps) {
          if ('io' in s) {
            for (const f of [ours, theirs]) await qemuIoOk(f, s.io, { format: 'qcow2' })
            continue
          }
          if ('inUse' in s) {
            for (const f of [ours, theirs]) writeFileSync(f, setInUse(readFileSync(f), s.inUse))
            continue
          }
          const args = (f: string) => s.bitmap.map((a) => (a === 'IMG' ? f : a === 'OTHER' ? other : a))
          const what = `${c.name}: bitmap ${s.bitmap.join(' ').slice(0, 200)}`
          const q = await qemuImg(['bitmap', ...args(theirs)], { cwd: dir })
          const o = await cli('bitmap', ...args(ours))
          expect(o.code, `${what}\nqemu: ${q.stderr}\nours: ${o.stderr}`).toBe(q.code)
          expect(o.stdout, what).toBe(q.stdout)
          expect(normal(o.stderr, 'imgtool', ours), what).toBe(normal(q.stderr, 'qemu-img', theirs))
          for (const f of [ours, theirs]) {
            const r = await qemuImg(['check', f])
            expect(r.code, `${what}: qemu-img check ${f}\n${r.stdout}${r.stderr}`).toBe(0)
          }
          const [a, b] = await Promise.all([ours, theirs].map((f) => qemuImgJson<Info>(['info', '--output=json', '-U', f], { cwd: dir })))
          expect(a!['format-specific'], what).toEqual(b!['format-specific'])
          if ((c.create ?? []).includes('compat=0.10')) continue
          expect(await bits(ours), `${what}: bitmap contents`).toEqual(await bits(theirs))
          compared++
        }
        const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs])
        expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      },
      LIMIT,
    )
  }

  it('a raw image has no bitmaps: --add is refused, the others find none', async () => {
    const dir = makeTempDir('imgtool-bitmap-raw-')
    const raw = join(dir, 'r.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', raw, '1M'])
    for (const op of [['--add'], ['--remove'], ['--clear'], ['--merge', 'x']]) {
      const q = await qemuImg(['bitmap', '-f', 'raw', ...op, raw, 'b'])
      const o = await cli('bitmap', '-f', 'raw', ...op, raw, 'b')
      expect([o.code, normal(o.stderr, 'imgtool', raw)], op.join(' ')).toEqual([q.code, normal(q.stderr, 'qemu-img', raw)])
    }
    expect(compared).toBeGreaterThan(20)
  })

  it('--object is refused', async () => {
    const o = await cli('bitmap', '--object', 'secret,id=s,data=x', '--add', 'nothing.qcow2', 'b')
    expect(o.code).toBe(1)
    expect(o.stderr).toMatch(/--object is not supported/)
  })
})

it('mergeBits: every destination chunk overlapping a dirty source chunk becomes dirty', () => {
  // source 4 KiB chunks, destination 64 KiB chunks, 1 MiB disk: bits 0 and 17 -> chunks 0 and 1
  const src = new Uint8Array(32)
  src[0] = 1
  src[2] = 2
  const dst = new Uint8Array(2)
  mergeBits(dst, 16, src, 12, 1 << 20)
  expect([...dst]).toEqual([3, 0])
  // coarse into fine: one 64 KiB chunk is 16 chunks of 4 KiB
  const fine = new Uint8Array(32)
  mergeBits(fine, 12, new Uint8Array([2, 0]), 16, 1 << 20)
  expect([...fine.subarray(0, 5)]).toEqual([0, 0, 0xff, 0xff, 0])
})

describeQemu('imgtool convert --bitmaps against qemu-img convert --bitmaps', () => {
  it(
    'bitmaps copied with flags, granularity and bits; the refusals and the skip warning',
    async () => {
      const dir = makeTempDir('imgtool-convert-bitmaps-')
      const src = join(dir, 'src.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', src, '16M'])
      await qemuImgOk(['bitmap', '--add', src, 'a'])
      await qemuImgOk(['bitmap', '--add', '-g', '512', src, 'fine'])
      await qemuIoOk(src, ['write -P 1 1M 64k', 'write -P 2 9M 3k'], { format: 'qcow2' })
      await qemuImgOk(['bitmap', '--disable', src, 'fine'])
      await qemuIoOk(src, ['write -P 3 12M 8k'], { format: 'qcow2' })
      const raw = join(dir, 'src.raw')
      await qemuImgOk(['create', '-q', '-f', 'raw', raw, '1M'])
      const broken = join(dir, 'broken.qcow2')
      writeFileSync(broken, setInUse(readFileSync(src), 0))
      const runs: Array<{ args: string[]; ok: boolean }> = [
        { args: ['--bitmaps', '-O', 'qcow2', src], ok: true },
        { args: ['--bitmaps', '-O', 'qcow2', '-o', 'cluster_size=65536', src], ok: true },
        { args: ['--bitmaps', '--skip-broken-bitmaps', '-O', 'qcow2', broken], ok: true },
        { args: ['--bitmaps', '-O', 'qcow2', broken], ok: false },
        { args: ['--skip-broken-bitmaps', '-O', 'qcow2', src], ok: false },
        { args: ['--bitmaps', '-O', 'raw', src], ok: false },
        { args: ['--bitmaps', '-f', 'raw', '-O', 'qcow2', raw], ok: false },
      ]
      let n = 0
      for (const r of runs) {
        const theirs = join(dir, `theirs${n}.out`)
        const ours = join(dir, `ours${n}.out`)
        n++
        const q = await qemuImg(['convert', ...r.args, theirs])
        const o = await cli('convert', ...r.args, ours)
        const what = `convert ${r.args.join(' ')}`
        expect([o.code, normal(o.stderr, 'imgtool', ours)], what).toEqual([q.code, normal(q.stderr, 'qemu-img', theirs)])
        expect(q.code === 0, `${what}: qemu-img\n${q.stderr}`).toBe(r.ok)
        if (!r.ok) {
          expect(existsSync(ours), `${what}: no target left`).toBe(false)
          continue
        }
        const [a, b] = await Promise.all([ours, theirs].map((f) => qemuImgJson<Info>(['info', '--output=json', f])))
        expect(a!['format-specific'], what).toEqual(b!['format-specific'])
        expect(await bits(ours), `${what}: bitmap contents`).toEqual(await bits(theirs))
        expect((await qemuImg(['check', ours])).code).toBe(0)
        expect((await qemuImg(['compare', ours, theirs])).code).toBe(0)
      }
    },
    LIMIT,
  )

  it('a compat=0.10 target is refused before it is created (qemu-img creates it, then fails)', async () => {
    const dir = makeTempDir('imgtool-convert-bitmaps-')
    const src = join(dir, 'src.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '1M'])
    await qemuImgOk(['bitmap', '--add', src, 'a'])
    const q = await qemuImg(['convert', '--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', src, join(dir, 'theirs.qcow2')])
    const o = await cli('convert', '--bitmaps', '-O', 'qcow2', '-o', 'compat=0.10', src, join(dir, 'ours.qcow2'))
    expect([o.code, normal(o.stderr, 'imgtool', '')]).toEqual([q.code, normal(q.stderr, 'qemu-img', '')])
    expect(existsSync(join(dir, 'theirs.qcow2'))).toBe(true)
    expect(existsSync(join(dir, 'ours.qcow2'))).toBe(false)
  })
})
