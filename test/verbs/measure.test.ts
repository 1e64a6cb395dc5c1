/**
 * imgtool measure against the real qemu-img measure on the same bytes and the
 * same options: the JSON documents must be equal (required, fully-allocated,
 * bitmaps), the human lines too, and refusals use qemu's words and exit code.
 */
import { readdirSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli, FIXTURES } from '../support/cli.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

async function both(
  args: string[],
  cwd?: string,
): Promise<{ ours: { code: number; stdout: string; stderr: string }; theirs: { code: number | null; stdout: string; stderr: string } }> {
  const [ours, theirs] = await Promise.all([cli('measure', ...args), qemuImg(['measure', ...args], cwd !== undefined ? { cwd } : {})])
  return { ours, theirs }
}

/** `cwd`: where qemu-img runs (it opens a qcow2 data file named relative to its own folder from there) */
async function expectSame(args: string[], cwd?: string): Promise<void> {
  const { ours, theirs } = await both(args, cwd)
  const label = `measure ${args.join(' ')}`
  expect(ours.code, `${label}: ${ours.stderr}`).toBe(theirs.code)
  expect(ours.stdout, label).toBe(theirs.stdout)
  if (theirs.code !== 0) {
    // qemu's lines, joined as imgtool joins a message of several lines
    const words = theirs.stderr
      .trim()
      .split('\n')
      .map((l) => l.replace(/^qemu-img: /, ''))
      .join('; ')
    expect(ours.stderr.trim(), label).toBe(`imgtool: ${words}`)
  }
}

const SIZES = ['0', '1', '512', '1000', '65536', '1M', '1G', '100G', '2T', '16T']
const OPTION_SETS = [
  '',
  'cluster_size=512',
  'cluster_size=4k',
  'cluster_size=2M',
  'refcount_bits=1',
  'refcount_bits=64',
  'cluster_size=4k,refcount_bits=1',
  'extended_l2=on',
  'extended_l2=on,cluster_size=16k',
  'extended_l2=on,cluster_size=2M,refcount_bits=8',
  'preallocation=metadata',
  'preallocation=falloc',
  'preallocation=full',
  'preallocation=full,cluster_size=4k',
  'compat=0.10',
  'compat=1.1,lazy_refcounts=on',
  'data_file=x.raw,data_file_raw=on',
  'compression_type=zstd',
  'backing_file=base.qcow2,backing_fmt=qcow2',
]

describeQemu(
  'imgtool measure vs qemu-img measure',
  () => {
    it('gives the same JSON and human lines as qemu-img for every size and qcow2 option set (--size)', async () => {
      let cases = 0
      for (const size of SIZES) {
        for (const o of OPTION_SETS) {
          const opts = o ? ['-o', o] : []
          await expectSame(['--output=json', '-O', 'qcow2', ...opts, '--size', size])
          cases++
        }
        await expectSame(['--size', size, '-O', 'qcow2'])
        await expectSame(['--size', size, '--output=json'])
        await expectSame(['--size', size, '-O', 'raw', '-o', 'preallocation=full'])
      }
      expect(cases).toBe(SIZES.length * OPTION_SETS.length)
    }, 600_000)

    it('refuses what qemu-img refuses, in its words and with its exit code', async () => {
      const dir = makeTempDir()
      const img = join(dir, 'a.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '1M'])
      for (const args of [
        ['--size', '1G', '-O', 'vpc'],
        ['--size', '1G', '-O', 'nonsense'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=3k'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'cluster_size=1k,extended_l2=on'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.10,refcount_bits=8'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'compat=0.9'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=3'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'refcount_bits=abc'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'extended_l2=maybe'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'preallocation=bogus'],
        ['--size', '1G', '-O', 'qcow2', '-o', 'foo=1'],
        ['--size', '1G', '-O', 'raw', '-o', 'foo=1'],
        ['--size', '1T', '-O', 'qcow2', '-o', 'cluster_size=512'],
        ['--size', 'abc'],
        ['--size', '1000', '--output=xml'],
        ['--size', '1000', '-f', 'qcow2'],
        ['--size', '1000', img],
        ['-O', 'qcow2'],
        [img, img],
        [img, '-O', 'vpc'],
      ])
        await expectSame(args)
    }, 300_000)

    it('measures every qcow2 fixture as qemu-img does (data clusters, chains, bitmaps size)', async () => {
      const names = readdirSync(FIXTURES).filter((n) => n.endsWith('.qcow2'))
      expect(names.length).toBeGreaterThan(20)
      for (const name of names) {
        const path = join(FIXTURES, name)
        await expectSame(['--output=json', '-O', 'qcow2', path], FIXTURES)
        await expectSame(['-O', 'qcow2', '-o', 'cluster_size=4k', path], FIXTURES)
        await expectSame(['--output=json', '-O', 'raw', path], FIXTURES)
      }
    }, 600_000)

    it('prints the bitmaps size of a qcow2 v3 source with persistent bitmaps, and none for a v2 target', async () => {
      const dir = makeTempDir()
      const img = join(dir, 'b.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '100M'])
      await qemuImgOk(['bitmap', '--add', '-g', '4096', img, 'a-bitmap'])
      await qemuImgOk(['bitmap', '--add', img, 'b'])
      await expectSame(['-O', 'qcow2', img])
      await expectSame(['--output=json', '-O', 'qcow2', '-o', 'cluster_size=512', img])
      await expectSame(['--output=json', '-O', 'qcow2', '-o', 'compat=0.10', img])
      const r = await cli('measure', '-O', 'qcow2', img)
      expect(r.stdout).toMatch(/^bitmaps size: [1-9]\d*$/m)
    }, 300_000)

    it('matches qemu-img on seeded random sources (raw, qcow2, vpc with random allocation) and targets', async () => {
      const rnd = new Prng(14)
      const dir = makeTempDir()
      for (let i = 0; i < 24; i++) {
        const fmt = (['raw', 'qcow2', 'vpc'] as const)[i % 3]!
        const size = (1 + rnd.int(64)) * 65536 + (rnd.chance(0.5) ? rnd.int(65536) & ~511 : 0)
        const src = join(dir, `s${i}.${fmt}`)
        const createOpts = fmt === 'qcow2' ? ['-o', `cluster_size=${[512, 4096, 65536][rnd.int(3)]}`] : []
        await qemuImgOk(['create', '-q', '-f', fmt, ...createOpts, src, String(size)])
        const info = JSON.parse(await qemuImgOk(['info', '--output=json', src])) as { 'virtual-size': number }
        const virtual = info['virtual-size']
        const cmds: string[] = []
        for (let w = rnd.int(6); w > 0; w--) {
          const off = rnd.int(Math.floor(virtual / 512)) * 512
          const len = Math.min(virtual - off, (1 + rnd.int(64)) * 512)
          if (len <= 0) continue
          cmds.push(rnd.chance(0.25) ? `write -z ${off} ${len}` : `write -P ${1 + rnd.int(255)} ${off} ${len}`)
        }
        if (cmds.length > 0) await qemuIoOk(src, cmds, { format: fmt })
        const cluster = 2 ** (9 + rnd.int(13))
        const refcount = 2 ** rnd.int(7)
        const ext = cluster >= 16384 && rnd.chance(0.3) ? ',extended_l2=on' : ''
        await expectSame(['--output=json', '-f', fmt, '-O', 'qcow2', '-o', `cluster_size=${cluster},refcount_bits=${refcount}${ext}`, src])
        await expectSame(['--output=json', '-O', 'raw', src])
        const sized = 1 + rnd.int(2 ** 40)
        await expectSame(['--output=json', '-O', 'qcow2', '-o', `cluster_size=${cluster},refcount_bits=${refcount}${ext}`, '--size', String(sized)])
      }
    }, 600_000)
  },
  ['qemu-img', 'qemu-io'],
)
