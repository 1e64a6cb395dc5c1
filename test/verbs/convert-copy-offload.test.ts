/**
 * convert -C (copy offloading) against qemu-img 7.2 -C on the same sources: the same target bytes (raw and
 * qcow2 targets come out byte-identical), the same allocation (qemu-img map), copy_file_range seen by strace
 * with -C and not without it; and the fallback: a copy_file_range that fails (EXDEV) turns offloading off for
 * the rest of the run, as qemu-img's s->copy_range = false, and the chunks after it are sparse again.
 */
import { readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { convert } from '../../src/convert/convert.js'
import { copyRangeAddon, type CopyRange } from '../../src/io/seek-hole.js'
import { openImage } from '../../src/open.js'
import { findExecutable, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, run, useTempDirs } from '../support/qemu.js'

const BIN = resolve(__dirname, '..', '..', 'bin', 'imgtool')
const STRACE = findExecutable('strace')
const addon = copyRangeAddon()

/** imgtool as a process (the built dist/), optionally under strace counting copy_file_range calls */
async function imgtool(args: string[], o: { strace?: string; env?: NodeJS.ProcessEnv } = {}) {
  if (o.strace === undefined) return run(process.execPath, [BIN, ...args], o.env ? { env: o.env, timeout: 300_000 } : { timeout: 300_000 })
  return run(STRACE!, ['-f', '-e', 'trace=copy_file_range', '-o', o.strace, process.execPath, BIN, ...args], { timeout: 300_000 })
}
const calls = (trace: string) =>
  readFileSync(trace, 'utf8')
    .split('\n')
    .filter((l) => l.includes('copy_file_range(')).length
const map = async (f: string, fmt: string) => qemuImgOk(['map', '--output=json', '-f', fmt, f])

describeQemu('convert -C against qemu-img -C', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  /** sources: raw with data, a zero-filled data range and holes; the same as qcow2, compressed qcow2 and vpc */
  async function sources(dir: string): Promise<Record<string, string>> {
    const raw = join(dir, 's.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', raw, '8M'])
    await qemuIoOk(raw, ['write -P 5 0 100000', 'write -P 0 1M 256k', 'write -P 9 2M 4k', 'write -P 0 2052k 8k', 'write -P 7 2060k 4k'], { format: 'raw' })
    const q = join(dir, 's.qcow2')
    await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', raw, q])
    await qemuIoOk(q, ['write -P 0 4M 192k', 'write -z 5M 64k', 'write -P 3 6M 300k'])
    const c = join(dir, 'c.qcow2')
    await qemuImgOk(['convert', '-c', '-O', 'qcow2', q, c])
    await qemuIoOk(c, ['write -P 0 7M 128k']) // zero data after the compressed clusters
    const v = join(dir, 's.vpc')
    await qemuImgOk(['convert', '-O', 'vpc', q, v])
    return { raw, qcow2: q, compressed: c, vpc: v }
  }

  it('raw, qcow2, compressed and vpc sources into raw and qcow2 (and -n): byte-identical to qemu-img -C', async () => {
    const dir = makeTempDir('imgtool-copy-offload-')
    const src = await sources(dir)
    let n = 0
    for (const [name, s] of Object.entries(src)) {
      for (const fmt of ['raw', 'qcow2']) {
        for (const extra of [[], ['-n']]) {
          if (extra.length > 0 && fmt !== 'raw') continue
          const ours = join(dir, `i${n}.${fmt}`)
          const theirs = join(dir, `q${n++}.${fmt}`)
          if (extra.length > 0) {
            const size = (JSON.parse(await qemuImgOk(['info', '--output=json', s])) as { 'virtual-size': number })['virtual-size']
            for (const t of [ours, theirs]) await qemuImgOk(['create', '-q', '-f', 'raw', t, String(size)])
          }
          const what = `${name} -> ${fmt} ${extra.join(' ')}`
          const o = await imgtool(['convert', '-C', ...extra, '-O', fmt, s, ours])
          const q = await qemuImg(['convert', '-C', ...extra, '-O', fmt, s, theirs])
          expect(o.code, `${what}: ${o.stderr}`).toBe(q.code)
          expect(o.code, what).toBe(0)
          expect((await qemuImg(['compare', '-f', fmt, '-F', fmt, ours, theirs])).code, what).toBe(0)
          expect(readFileSync(ours).equals(readFileSync(theirs)), `${what}: the files differ`).toBe(true)
          // allocation: -n writes zeros where qemu-img punches holes, with or without -C (a difference of -n)
          if (extra.length === 0) expect(await map(ours, fmt), what).toBe(await map(theirs, fmt))
          if (extra.length === 0 && fmt === 'raw') expect(statSync(ours).blocks, what).toBe(statSync(theirs).blocks)
          if (fmt === 'qcow2') expect((await qemuImg(['check', ours])).code, what).toBe(0)
        }
      }
    }
    // -C allocates a data range of zeros (no zero detection), a plain convert leaves it sparse: as qemu-img
    const plain = join(dir, 'plain.qcow2')
    const offl = join(dir, 'offl.qcow2')
    await imgtool(['convert', '-O', 'qcow2', src.raw!, plain])
    await imgtool(['convert', '-C', '-O', 'qcow2', src.raw!, offl])
    expect(await map(plain, 'qcow2')).not.toBe(await map(offl, 'qcow2'))
  })

  it.skipIf(!STRACE || !addon)('strace: copy_file_range with -C, none without it, as qemu-img', async () => {
    const dir = makeTempDir('imgtool-copy-strace-')
    const src = await sources(dir)
    for (const [name, s] of [
      ['raw', src.raw!],
      ['qcow2', src.qcow2!],
    ] as const) {
      const t1 = join(dir, `${name}-c.trace`)
      const t2 = join(dir, `${name}-p.trace`)
      const t3 = join(dir, `${name}-q.trace`)
      expect((await imgtool(['convert', '-C', '-O', 'raw', s, join(dir, `${name}-c.raw`)], { strace: t1 })).code).toBe(0)
      expect((await imgtool(['convert', '-O', 'raw', s, join(dir, `${name}-p.raw`)], { strace: t2 })).code).toBe(0)
      expect(
        (await run(STRACE!, ['-f', '-e', 'trace=copy_file_range', '-o', t3, 'qemu-img', 'convert', '-C', '-O', 'raw', s, join(dir, `${name}-q.raw`)])).code,
      ).toBe(0)
      expect(calls(t1), name).toBeGreaterThan(0)
      expect(calls(t2), name).toBe(0)
      // one call per data chunk, as qemu-img (both copy each data range whole)
      expect(calls(t1), name).toBe(calls(t3))
    }
  })

  it('without the addon, -C converts as qemu-img does when copy_file_range fails at once (a plain convert)', async () => {
    const dir = makeTempDir('imgtool-copy-noaddon-')
    const src = await sources(dir)
    for (const fmt of ['raw', 'qcow2']) {
      const ours = join(dir, `n.${fmt}`)
      const plain = join(dir, `p.${fmt}`)
      const o = await imgtool(['convert', '-C', '-O', fmt, src.qcow2!, ours], { env: { ...process.env, IMGTOOL_NO_SEEK_HOLE: '1' } })
      expect(o.code, o.stderr).toBe(0)
      await qemuImgOk(['convert', '-O', fmt, src.qcow2!, plain])
      expect(readFileSync(ours).equals(readFileSync(plain)), fmt).toBe(true)
    }
  })

  it.skipIf(!addon)('a copy_file_range that fails (EXDEV) turns offloading off for the rest of the run', async () => {
    const dir = makeTempDir('imgtool-copy-fallback-')
    const src = await sources(dir)
    for (const fmt of ['raw', 'qcow2']) {
      for (const good of [0, 1, 2]) {
        // `good` calls go through, every later one fails with EXDEV
        let made = 0
        let failed = 0
        const flaky: CopyRange = async (...a) => {
          if (made >= good) {
            failed++
            return -18
          }
          made++
          return addon!(...a)
        }
        const target = join(dir, `f${good}.${fmt}`)
        await qemuImgOk(['create', '-q', '-f', fmt, target, '8M'])
        const s = await openImage(src.raw!, { format: 'raw', readOnly: true })
        const d = await openImage(target, { format: fmt as 'raw' | 'qcow2', readOnly: false })
        try {
          await convert(s, d, { hostFiles: true, copyRange: flaky })
        } finally {
          await d.close()
          await s.close()
        }
        const what = `${fmt}, ${good} good calls`
        expect(failed, what).toBe(fmt === 'raw' ? 1 : 0) // once off, never tried again; qcow2 targets are written whole
        expect((await qemuImg(['compare', '-f', 'raw', '-F', fmt, src.raw!, target])).code, what).toBe(0)
        const m = JSON.parse(await qemuImgOk(['map', '--output=json', '-f', fmt, target])) as Array<{ start: number; length: number; data: boolean }>
        // the zero-filled data range at 1 MiB is the second chunk: allocated while offloading, sparse after it
        const at1M = m.find((e) => e.start <= 1 << 20 && e.length + e.start > 1 << 20)!
        if (fmt === 'raw') expect(at1M.data, what).toBe(good >= 2)
        else expect(at1M.data, what).toBe(true)
      }
    }
  })
})

describe('convert -C refusals (no qemu needed)', () => {
  it('qemu-img 7.2 words for -C with -c, -S and --salvage', async () => {
    for (const [flag, text] of [
      [['-c'], 'Cannot enable copy offloading when -c is used'],
      [['-S', '4k'], 'Cannot enable copy offloading when -S is used'],
      [['--salvage'], 'Cannot use copy offloading in salvaging mode'],
    ] as const) {
      const o = await imgtool(['convert', '-C', ...flag, '-O', 'qcow2', '/nonexistent/a', '/nonexistent/b'])
      expect(o.code).toBe(1)
      expect(o.stderr).toContain(text)
    }
  })
})
