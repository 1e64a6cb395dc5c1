/**
 * convert -r / commit -r (rate limit, bytes per second with qemu's suffixes) and convert -C (copy
 * offloading): the limiter's waits on a fake clock (no timed assertion), and against qemu-img 7.2 the same
 * exit codes, words and guest bytes, with -C's refusals (-c, -S, --salvage) in qemu-img's words.
 */
import { copyFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { RateLimiter, type RateClock } from '../../src/util/rate.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

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
    .replace(/;.*/, '')

describe('the rate limiter (fake clock)', () => {
  it('100 ms slices of speed/10 bytes; a request past the quota waits for the slices it overran', async () => {
    let t = 0
    const waits: number[] = []
    const clock: RateClock = {
      now: () => t,
      sleep: async (ms) => {
        waits.push(ms)
        t += ms
      },
    }
    const r = new RateLimiter(1000, clock) // 100 bytes per slice
    await r.take(60)
    await r.take(60) // 120 of 100: still goes (the quota was not reached before it)
    expect(waits).toEqual([])
    await r.take(10) // the slice is used up: waits for its end
    expect(waits).toEqual([100])
    await r.take(1000) // 10 in this slice, then 1000 more: goes, 1010 dispatched
    await r.take(1) // 10.1 slices overrun: waits the rest of this one and 9 more
    expect(waits).toEqual([100, 1000])
    // over 1 s of fake time for a few kilobytes: the average stays near the speed
    expect(t).toBe(1100)
  })
})

describeQemu('-r and -C against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  async function source(dir: string): Promise<string> {
    const src = join(dir, 's.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '4M'])
    await qemuIoOk(src, ['write -P 1 0 1M', 'write -z 1M 64k', 'write -P 0 2M 128k', 'write -P 3 3M 64k'])
    return src
  }

  it('convert -r and -C: exit codes, words and guest bytes as qemu-img', async () => {
    const dir = makeTempDir('imgtool-rate-copy-')
    const src = await source(dir)
    const cases: string[][] = [
      ['-r', '1G', '-O', 'raw'],
      ['-r', '0', '-O', 'qcow2'],
      ['-r', '64M', '-O', 'qcow2'],
      ['-C', '-O', 'raw'],
      ['-C', '-O', 'qcow2'],
      ['-r', '-1', '-O', 'raw'],
      ['-r', 'abc', '-O', 'raw'],
      ['-C', '-c', '-O', 'qcow2'],
      ['-C', '-S', '4k', '-O', 'raw'],
      ['-C', '-S', '0', '-O', 'raw'],
      ['-C', '--salvage', '-O', 'raw'],
    ]
    let n = 0
    for (const c of cases) {
      const fmt = c[c.length - 1]!
      const ours = join(dir, `i${n}.${fmt}`)
      const theirs = join(dir, `q${n++}.${fmt}`)
      const o = await cli('convert', ...c, src, ours)
      const q = await qemuImg(['convert', ...c, src, theirs])
      const what = c.join(' ')
      expect(o.code, `${what}: ${o.stderr}`).toBe(q.code)
      if (q.code !== 0) {
        expect(firstLine(o.stderr), what).toBe(firstLine(q.stderr))
        continue
      }
      expect((await qemuImg(['compare', '-f', fmt, '-F', fmt, ours, theirs])).code, what).toBe(0)
      if (fmt === 'qcow2') expect((await qemuImg(['check', ours])).code, what).toBe(0)
    }
  })

  it('commit -r: the base as qemu-img commits it; a bad rate refused in its words', async () => {
    const dir = makeTempDir('imgtool-commit-r-')
    const base = join(dir, 'base.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '4M'])
    await qemuIoOk(base, ['write -P 7 0 4M'])
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top])
    await qemuIoOk(top, ['write -P 1 0 1M', 'write -z 2M 64k'])
    const qdir = makeTempDir('imgtool-commit-r-q-')
    copyFileSync(base, join(qdir, 'base.qcow2'))
    copyFileSync(top, join(qdir, 'top.qcow2'))
    const o = await cli('commit', '-r', '256M', top)
    const q = await qemuImg(['commit', '-r', '256M', join(qdir, 'top.qcow2')])
    expect(o.code, o.stderr).toBe(q.code)
    expect(o.stdout).toBe(q.stdout)
    expect((await qemuImg(['compare', base, join(qdir, 'base.qcow2')])).code).toBe(0)
    expect((await qemuImg(['check', base])).code).toBe(0)
    const bad = await cli('commit', '-r', '-5', top)
    const qbad = await qemuImg(['commit', '-r', '-5', join(qdir, 'top.qcow2')])
    expect(bad.code).toBe(qbad.code)
    expect(firstLine(bad.stderr)).toBe(firstLine(qbad.stderr))
  })
})
