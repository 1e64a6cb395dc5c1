/**
 * --image-opts / --target-image-opts in the simple spellings scripts use (driver=FMT,file.filename=PATH,
 * file.driver=file) on info, check, map, convert, compare, measure and cat: the same output and exit code as
 * qemu-img on the same files and as imgtool without the flag; qemu-img's refusals in its words; every
 * other spelling refused with a clear error.
 */
import { copyFileSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { parseImageOptsArg } from '../../src/cli/common.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string; raw: Buffer }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text(), raw: Buffer.from(out.text(), 'latin1') }
}

const firstLine = (s: string) =>
  s
    .trim()
    .split('\n')[0]!
    .replace(/^(qemu-img|imgtool): /, '')

describe('--image-opts parsing', () => {
  it('driver, file.filename and file.driver=file; everything else refused', () => {
    expect(parseImageOptsArg('driver=qcow2,file.filename=a,,b.qcow2')).toEqual({ path: 'a,b.qcow2', format: 'qcow2' })
    expect(parseImageOptsArg('file.driver=file,file.filename=x')).toEqual({ path: 'x', format: undefined })
    expect(() => parseImageOptsArg('x.qcow2')).toThrow(/driver=FMT,file.filename=PATH/)
    expect(() => parseImageOptsArg('driver=qcow2,file.filename=x,cache.direct=on')).toThrow(/not 'cache.direct'/)
    expect(() => parseImageOptsArg('driver=qcow2,file.driver=nbd,file.filename=x')).toThrow(/local files only/)
    expect(() => parseImageOptsArg('driver=qcow2')).toThrow(/A block device must be specified for "file"/)
    expect(() => parseImageOptsArg('driver=bogus,file.filename=x')).toThrow(/Unknown driver 'bogus'/)
  })
})

describeQemu('--image-opts against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  async function images(dir: string): Promise<{ q: string; r: string }> {
    const q = join(dir, 'a.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', q, '4M'])
    await qemuIoOk(q, ['write -P 1 0 1M', 'write -z 2M 64k', 'write -P 3 3M 128k'])
    const r = join(dir, 'a.raw')
    await qemuImgOk(['convert', '-O', 'raw', q, r])
    return { q, r }
  }

  it('info, check, map, compare, measure: output and exit code as qemu-img, and as imgtool with -f', async () => {
    const dir = makeTempDir('imgtool-image-opts-')
    const { q, r } = await images(dir)
    const spellings = [`driver=qcow2,file.filename=${q}`, `driver=qcow2,file.driver=file,file.filename=${q}`, `file.filename=${q}`]
    for (const o of spellings) {
      const cases: string[][] = [
        ['info', '--image-opts', o],
        ['info', '--output=json', '--image-opts', o],
        ['check', '--image-opts', o],
        ['map', '--output=json', '--image-opts', o],
        ['compare', '--image-opts', o, `driver=raw,file.filename=${r}`],
        ['measure', '--output=json', '-O', 'qcow2', '--image-opts', o],
      ]
      for (const args of cases) {
        const ours = await cli(...args)
        const theirs = await qemuImg(args)
        expect(ours.code, `${args.join(' ')}: ${ours.stderr}`).toBe(theirs.code)
        expect(ours.code).toBe(0)
        if (args[0] === 'info' && !args.includes('--output=json')) {
          // the human info's first lines (qemu-img adds fields imgtool keeps for --output=json)
          expect(ours.stdout.split('\n').slice(0, 3)).toEqual(theirs.stdout.split('\n').slice(0, 3))
        } else if (args.includes('--output=json')) {
          const plain = await cli(...args.filter((a) => a !== '--image-opts' && a !== o), '-f', 'qcow2', q)
          expect(ours.stdout, args.join(' ')).toBe(plain.stdout)
          if (args[0] !== 'info') expect(JSON.parse(ours.stdout)).toEqual(JSON.parse(theirs.stdout))
        } else {
          expect(ours.stdout, args.join(' ')).toBe(theirs.stdout)
        }
      }
    }
    // cat: the guest bytes, as the raw file qemu-img made
    const cat = await cli('cat', '--image-opts', spellings[0]!)
    expect(cat.code).toBe(0)
    expect(cat.raw.equals(readFileSync(r))).toBe(true)
  })

  it('convert --image-opts, and -n --target-image-opts into an existing image: guest bytes as qemu-img', async () => {
    const dir = makeTempDir('imgtool-image-opts-convert-')
    const { q, r } = await images(dir)
    for (const fmt of ['raw', 'qcow2'] as const) {
      const ours = join(dir, `i.${fmt}`)
      const o = await cli('convert', '--image-opts', `driver=qcow2,file.filename=${q}`, '-O', fmt, ours)
      expect(o.code, o.stderr).toBe(0)
      expect((await qemuImg(['compare', '-F', fmt, q, ours])).code).toBe(0)
      // into an existing target holding other data
      const t = join(dir, `t.${fmt}`)
      await qemuImgOk(['create', '-q', '-f', fmt, t, '4M'])
      await qemuIoOk(t, ['write -P 9 0 4M'], { format: fmt })
      const t2 = join(dir, `t2.${fmt}`)
      copyFileSync(t, t2)
      const n = await cli('convert', '-n', '--image-opts', `driver=raw,file.filename=${r}`, '--target-image-opts', `driver=${fmt},file.filename=${t}`)
      expect(n.code, n.stderr).toBe(0)
      await qemuImgOk(['convert', '-n', '--image-opts', `driver=raw,file.filename=${r}`, '--target-image-opts', `driver=${fmt},file.filename=${t2}`])
      expect((await qemuImg(['compare', '-f', fmt, '-F', fmt, t, t2])).code).toBe(0)
      expect((await qemuImg(['compare', '-F', fmt, q, t])).code).toBe(0)
      if (fmt === 'qcow2') expect((await qemuImg(['check', t])).code).toBe(0)
    }
  })

  it("the refusals: qemu-img's exit code and words", async () => {
    const dir = makeTempDir('imgtool-image-opts-refuse-')
    const { q, r } = await images(dir)
    const o = `driver=qcow2,file.filename=${q}`
    const cases: string[][] = [
      ['info', '--image-opts', '-f', 'qcow2', o],
      ['check', '--image-opts', '-f', 'qcow2', o],
      ['map', '--image-opts', '-f', 'qcow2', o],
      ['measure', '--image-opts', '-f', 'qcow2', '-O', 'qcow2', o],
      ['compare', '--image-opts', '-f', 'qcow2', o, `driver=raw,file.filename=${r}`],
      ['convert', '--image-opts', '-f', 'qcow2', '-O', 'raw', o, join(dir, 'x.raw')],
      ['convert', '--target-image-opts', '-O', 'raw', q, `driver=raw,file.filename=${r}`],
      ['convert', '-n', '--target-image-opts', '-O', 'raw', q, `driver=raw,file.filename=${r}`],
      ['info', '--image-opts', `driver=qcow2`],
      ['info', '--image-opts', `driver=bogus,file.filename=${q}`],
    ]
    for (const args of cases) {
      const ours = await cli(...args)
      const theirs = await qemuImg(args)
      expect(ours.code, args.join(' ')).toBe(theirs.code)
      expect(ours.code).not.toBe(0)
      expect(firstLine(ours.stderr), args.join(' ')).toBe(firstLine(theirs.stderr))
    }
    // spellings imgtool does not take: refused, exit 1, the key named
    for (const bad of [q, `${o},cache.direct=on`, `driver=qcow2,file.driver=nbd,file.filename=${q}`]) {
      const ours = await cli('info', '--image-opts', bad)
      expect(ours.code).toBe(1)
      expect(ours.stderr).toMatch(/^imgtool: Could not open '/)
    }
  })
})
