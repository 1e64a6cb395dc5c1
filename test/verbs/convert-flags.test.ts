/**
 * convert's qemu-img flags: -n (write into an existing target), --target-is-zero, -t/-T cache modes; each
 * against qemu-img on the same inputs (guest bytes by qemu-img compare, exit codes and words).
 */
import { copyFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { CACHE_MODES, unsafeCacheDevice } from '../../src/convert/unsafe-cache.js'
import { collector, describeQemu, makeTempDir, parseJson, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

const firstLine = (s: string) =>
  s
    .trim()
    .split('\n')[0]!
    .replace(/^(qemu-img|imgtool): /, '')

describe('cache modes', () => {
  it('writethrough and directsync flush every write; unsafe none at all; writeback and none once, at close', async () => {
    for (const mode of CACHE_MODES) {
      const inner = new MemoryDevice(1 << 20)
      let flushes = 0
      const f = inner.flush.bind(inner)
      inner.flush = async () => {
        flushes++
        await f()
      }
      const d = unsafeCacheDevice(inner, mode)
      await d.write(0, new Uint8Array(4096).fill(1), 'data')
      await d.write(65536, new Uint8Array(512).fill(2), 'l2')
      const during = flushes
      await d.close()
      const expected = { unsafe: [0, 0], writeback: [0, 1], none: [0, 1], writethrough: [2, 2], directsync: [2, 2] }[mode]
      expect([during, flushes], mode).toEqual(expected)
      expect(Buffer.from(inner.snapshot().subarray(65536, 65536 + 512)).equals(Buffer.alloc(512, 2)), mode).toBe(true)
    }
  })
})

describeQemu('convert -n, --target-is-zero, -t, -T against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  async function source(dir: string): Promise<string> {
    const src = join(dir, 'src.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', src, '8M'])
    await qemuIoOk(src, ['write -P 1 0 1M', 'write -P 2 3M 64k', 'write -z 5M 1M'], { format: 'raw' })
    return src
  }

  for (const fmt of ['qcow2', 'raw'] as const) {
    it(`-n into a ${fmt} target holding data: the guest bytes qemu-img's -n leaves, past the source untouched`, async () => {
      const dir = makeTempDir('imgtool-convert-n-')
      const src = await source(dir)
      const target = join(dir, `t.${fmt}`)
      await qemuImgOk(['create', '-q', '-f', fmt, target, '16M'])
      await qemuIoOk(target, ['write -P 9 0 16M'], { format: fmt })
      const theirs = join(dir, `q.${fmt}`)
      copyFileSync(target, theirs)
      const ours = await cli('convert', '-n', '-f', 'raw', '-O', fmt, src, target)
      expect(ours.code, ours.stderr).toBe(0)
      await qemuImgOk(['convert', '-n', '-f', 'raw', '-O', fmt, src, theirs])
      const cmp = await qemuImg(['compare', '-f', fmt, '-F', fmt, target, theirs])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      if (fmt === 'qcow2') expect((await qemuImg(['check', target])).code).toBe(0)
    })
  }

  it('-n --target-is-zero into a fresh qcow2: zero ranges left unallocated, guest bytes as qemu-img', async () => {
    const dir = makeTempDir('imgtool-convert-tz-')
    const src = await source(dir)
    const target = join(dir, 't.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', target, '8M'])
    const theirs = join(dir, 'q.qcow2')
    copyFileSync(target, theirs)
    const ours = await cli('convert', '-n', '--target-is-zero', '-O', 'qcow2', src, target)
    expect(ours.code, ours.stderr).toBe(0)
    await qemuImgOk(['convert', '-n', '--target-is-zero', '-O', 'qcow2', src, theirs])
    expect((await qemuImg(['compare', target, theirs])).code).toBe(0)
    type M = { start: number; length: number; data: boolean }
    const dataBytes = async (p: string) =>
      parseJson<M[]>(await qemuImgOk(['map', '--output=json', p]))
        .filter((m) => m.data)
        .reduce((n, m) => n + m.length, 0)
    expect(await dataBytes(target)).toBe(await dataBytes(theirs))
    expect(await dataBytes(target)).toBe(1024 * 1024 + 64 * 1024)
  })

  it('the refusals: exit code and words as qemu-img; the target is not touched', async () => {
    const dir = makeTempDir('imgtool-convert-refuse-')
    const src = await source(dir)
    const small = join(dir, 'small.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', small, '1M'])
    const cases: string[][] = [
      ['-n', '-O', 'qcow2', src, small],
      ['--target-is-zero', '-O', 'qcow2', src, join(dir, 'x.qcow2')],
      ['-n', '-o', 'cluster_size=4096', '-O', 'qcow2', src, small],
      ['-t', 'bogus', '-O', 'raw', src, join(dir, 'y.raw')],
      ['-T', 'bogus', '-O', 'raw', src, join(dir, 'y.raw')],
    ]
    for (const args of cases) {
      const before = await qemuImgOk(['info', '--output=json', small])
      const q = await qemuImg(['convert', ...args])
      const o = await cli('convert', ...args)
      expect(o.code, args.join(' ')).toBe(q.code)
      expect(firstLine(o.stderr), args.join(' ')).toBe(firstLine(q.stderr))
      expect(await qemuImgOk(['info', '--output=json', small])).toBe(before)
    }
    const c = await cli('convert', '-n', '-c', '-O', 'qcow2', src, small)
    expect(c.code).toBe(1)
  })

  it('every -t mode writes the same target; -T accepts every qemu mode', async () => {
    const dir = makeTempDir('imgtool-convert-t-')
    const src = await source(dir)
    for (const mode of CACHE_MODES) {
      const t = join(dir, `t-${mode}.qcow2`)
      const r = await cli('convert', '-t', mode, '-T', mode, '-O', 'qcow2', src, t)
      expect(r.code, `${mode}: ${r.stderr}`).toBe(0)
      expect((await qemuImg(['compare', '-f', 'raw', src, t])).code, mode).toBe(0)
    }
    writeFileSync(join(dir, 'done'), '')
  })
})
