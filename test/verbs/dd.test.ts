/**
 * imgtool dd against the real qemu-img dd on the same inputs and operands:
 * the same exit code, the same error words, an output of the same format and
 * virtual size, and the same guest bytes (qemu-img compare).
 * Deliberate difference: an output that is the input (or a file it reads) is
 * refused; qemu-img would create it over the input.
 */
import { existsSync, readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { cli, fx } from '../support/cli.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

interface Info {
  'virtual-size': number
  format: string
}

/** run both tools with `args` (operands and options) into two outputs, and compare everything */
async function expectSameDd(dir: string, label: string, args: string[], outFmt = 'raw'): Promise<void> {
  const theirs = join(dir, `${label}.qemu`)
  const ours = join(dir, `${label}.ours`)
  const q = await qemuImg(['dd', ...args, `of=${theirs}`])
  const r = await cli('dd', ...args, `of=${ours}`)
  const what = `dd ${args.join(' ')}`
  expect(r.code, `${what}: ${r.stderr}`).toBe(q.code)
  const words = q.stderr
    .trim()
    .split('\n')
    .filter((l) => l)
    .map((l) => l.replace(/^qemu-img: /, ''))
    .join('; ')
  expect(r.stderr.trim(), what).toBe(words ? `imgtool: ${words}` : '')
  expect(existsSync(ours), what).toBe(existsSync(theirs))
  if (!existsSync(theirs)) return
  const qi = JSON.parse(await qemuImgOk(['info', '--output=json', '-f', outFmt, theirs])) as Info
  const oi = JSON.parse(await qemuImgOk(['info', '--output=json', '-f', outFmt, ours])) as Info
  expect(oi['virtual-size'], what).toBe(qi['virtual-size'])
  const cmp = await qemuImg(['compare', '-f', outFmt, '-F', outFmt, theirs, ours])
  expect(cmp.code, `${what}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
  rmSync(theirs)
  rmSync(ours)
}

describeQemu(
  'imgtool dd vs qemu-img dd',
  () => {
    it('copies the same blocks into an output of the same size (a table of operands, every output format)', async () => {
      const dir = makeTempDir()
      const src = join(dir, 'src.qcow2')
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4k', src, '1M'])
      await qemuIoOk(src, ['write -P 0x11 0 64k', 'write -P 0x22 300k 3k', 'write -z 320k 64k', 'write -P 0x33 1020k 4k'], { format: 'qcow2' })
      let n = 0
      for (const fmt of ['raw', 'qcow2', 'vpc']) {
        for (const ops of [
          [],
          ['bs=4k', 'count=10', 'skip=4'],
          ['bs=4k', 'skip=1000'],
          ['bs=1M', 'skip=1'],
          ['bs=3000', 'count=100'],
          ['bs=1', 'count=1k'],
          ['bs=512', 'skip=600', 'count=700'],
          ['count=0'],
          ['count=1E'],
          ['skip=1E'],
          ['bs=64k', 'count=3', 'bs=1k'],
          ['bs=1k', 'skip=299', 'count=305'],
        ]) {
          await expectSameDd(dir, `t${n++}`, ['-O', fmt, `if=${src}`, ...ops], fmt)
        }
      }
    }, 600_000)

    it('reads every kind of input (qcow2 fixtures with chains and compression, raw, vpc) as qemu-img does', async () => {
      const dir = makeTempDir()
      const raw = join(dir, 'in.raw')
      const vpc = join(dir, 'in.vhd')
      await qemuImgOk(['create', '-q', '-f', 'raw', raw, '300k'])
      await qemuIoOk(raw, ['write -P 0x44 7k 9k'], { format: 'raw' })
      await qemuImgOk(['create', '-q', '-f', 'vpc', vpc, '2M'])
      await qemuIoOk(vpc, ['write -P 0x55 1M 5k'], { format: 'vpc' })
      const inputs: Array<[string, string]> = [
        [fx('chain-top.qcow2'), 'qcow2'],
        [fx('v3-compressed-zstd-c4k.qcow2'), 'qcow2'],
        [fx('v2-c512.qcow2'), 'qcow2'],
        [raw, 'raw'],
        [vpc, 'vpc'],
      ]
      let n = 0
      for (const [input, fmt] of inputs) {
        await expectSameDd(dir, `i${n++}`, ['-f', fmt, `if=${input}`, 'bs=4k', 'skip=1', 'count=40'])
        await expectSameDd(dir, `i${n++}`, [`if=${input}`, '-O', 'qcow2', 'bs=1k'], 'qcow2')
      }
    }, 600_000)

    it('gives qemu-img its errors and exit codes for bad operands', async () => {
      const dir = makeTempDir()
      const src = join(dir, 'src.raw')
      await qemuImgOk(['create', '-q', '-f', 'raw', src, '64k'])
      let n = 0
      for (const ops of [
        [`if=${src}`, 'bs=0'],
        [`if=${src}`, 'bs=2G'],
        [`if=${src}`, 'bs=abc'],
        [`if=${src}`, 'count=-1'],
        [`if=${src}`, 'skip=x'],
        [`if=${src}`, 'foo=1'],
        [`if=${src}`, 'bogus'],
        [`if=${src}`, '-O', 'nonsense'],
      ]) {
        await expectSameDd(dir, `e${n++}`, ops)
      }
      // a missing input: exit 1 from both, no output; the words are imgtool's open error (naming the file)
      const missing = join(dir, 'missing.raw')
      const qm = await qemuImg(['dd', `if=${missing}`, `of=${join(dir, 'm.qemu')}`])
      const rm = await cli('dd', `if=${missing}`, `of=${join(dir, 'm.ours')}`)
      expect([rm.code, existsSync(join(dir, 'm.ours'))]).toEqual([qm.code, existsSync(join(dir, 'm.qemu'))])
      expect(rm.stderr).toBe(`imgtool: ${missing}: No such file or directory\n`)
      // no output operand: both say so
      const q = await qemuImg(['dd', `if=${src}`])
      const r = await cli('dd', `if=${src}`)
      expect([r.code, r.stderr.trim()]).toEqual([q.code, q.stderr.trim().replace(/^qemu-img: /, 'imgtool: ')])
    }, 300_000)

    it('matches qemu-img dd on seeded random inputs and operands', async () => {
      const rnd = new Prng(1402)
      const dir = makeTempDir()
      for (let i = 0; i < 12; i++) {
        const inFmt = (['raw', 'qcow2', 'vpc'] as const)[i % 3]!
        const outFmt = (['raw', 'qcow2', 'vpc'] as const)[rnd.int(3)]!
        const src = join(dir, `r${i}.${inFmt}`)
        const size = (1 + rnd.int(32)) * 32768
        await qemuImgOk(['create', '-q', '-f', inFmt, src, String(size)])
        const cmds: string[] = []
        for (let w = 1 + rnd.int(5); w > 0; w--) {
          const off = rnd.int(size / 512) * 512
          cmds.push(`write -P ${1 + rnd.int(255)} ${off} ${Math.min(size - off, (1 + rnd.int(32)) * 512)}`)
        }
        await qemuIoOk(src, cmds, { format: inFmt })
        // (not bs=1 over a whole image: qemu-img dd makes one request per block, a minute for 500 KiB)
        const bs = [512, 1000, 4096, 65536][rnd.int(4)]!
        const ops = [`bs=${bs}`]
        if (rnd.chance(0.7)) ops.push(`count=${rnd.int(Math.ceil((size * 1.2) / bs))}`)
        if (rnd.chance(0.7)) ops.push(`skip=${rnd.int(Math.ceil((size * 1.1) / bs))}`)
        await expectSameDd(dir, `r${i}`, ['-f', inFmt, '-O', outFmt, `if=${src}`, ...rnd.shuffle(ops)], outFmt)
      }
    }, 600_000)
  },
  ['qemu-img', 'qemu-io'],
)

it('refuses an output that is the input, and leaves the input as it was', async () => {
  const dir = makeTempDir()
  const src = join(dir, 'keep.raw')
  const { writeFileSync, symlinkSync } = await import('node:fs')
  writeFileSync(src, Buffer.alloc(8192, 7))
  symlinkSync(src, join(dir, 'link.raw'))
  const before = md5(readFileSync(src))
  for (const of of [src, join(dir, 'link.raw')]) {
    const r = await cli('dd', `if=${src}`, `of=${of}`, 'bs=1k', 'count=2')
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/^imgtool: dd: the target '.*' is the source image.*refusing to overwrite it\n$/)
  }
  expect(md5(readFileSync(src))).toBe(before)
})
