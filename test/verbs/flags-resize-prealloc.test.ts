/**
 * qcow2 resize --preallocation=metadata|falloc|full against qemu-img 7.2 resizing a copy of the same
 * image with the same options: exit code, the whole file byte for byte (qemu's layout: allocation
 * cursor, refcount blocks, the refcount area of falloc/full, the copy on write of the head and tail
 * clusters), `map --output=json`, `check` clean and `compare` equal. Cluster sizes 512 B to 2 MiB,
 * compat 0.10 and 1.1, extended L2, refcount widths, lazy refcounts, unaligned old and new sizes,
 * images with data, v3 snapshots, external data files (plain and raw). The one case where the
 * layout differs (a refcount table that must grow while metadata preallocation runs) is compared
 * by guest bytes, map of guest ranges and check. Refusals in qemu-img's words.
 */
import { copyFileSync, mkdirSync, readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(cwd: string | undefined, ...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const old = process.cwd()
  if (cwd) process.chdir(cwd)
  try {
    const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
    return { code, stdout: out.text(), stderr: err.text() }
  } finally {
    process.chdir(old)
  }
}

const firstLine = (s: string) =>
  s
    .trim()
    .split('\n')[0]!
    .replace(/^(qemu-img|imgtool): /, '')

/**
 * guest ranges of map --output=json by allocation alone (neighbours merged): host offsets and the
 * zero flag (which follows the host file's holes) depend on the layout
 */
const guestMap = (json: string) => {
  const out: Array<{ start: number; length: number; data: boolean }> = []
  for (const e of JSON.parse(json) as Array<{ start: number; length: number; data: boolean }>) {
    const last = out[out.length - 1]
    if (last && last.data === e.data && last.start + last.length === e.start) last.length += e.length
    else out.push({ start: e.start, length: e.length, data: e.data })
  }
  return out
}

interface Case {
  opts: string
  size: string
  io?: string
  to: string
  /** a v3 internal snapshot before the resize */
  snapshot?: boolean
  /** the layout differs from qemu's (guest bytes and check compared instead) */
  layout?: 'differs'
}

const CASES: Case[] = [
  { opts: 'cluster_size=65536', size: '1M', io: 'write -P 1 0 64k', to: '3M' },
  { opts: 'cluster_size=512', size: '1M', io: 'write -P 1 0 64k', to: '3M' },
  { opts: 'cluster_size=4096,compat=0.10', size: '1M', io: 'write -P 2 4k 8k', to: '20M' },
  { opts: 'cluster_size=65536', size: '1000k', io: 'write -P 1 512k 488k', to: '3000k' },
  { opts: 'cluster_size=65536', size: '1000k', to: '+1001k' },
  { opts: 'cluster_size=2M', size: '1M', io: 'write -P 1 0 1M', to: '5M' },
  { opts: 'cluster_size=32768,extended_l2=on', size: '1M', io: 'write -P 1 0 40k', to: '7001k' },
  { opts: 'cluster_size=1024,refcount_bits=64', size: '100k', io: 'write -P 3 0 100k', to: '5M' },
  { opts: 'cluster_size=65536,lazy_refcounts=on', size: '1M', io: 'write -P 1 0 64k', to: '+513k' },
  { opts: 'cluster_size=4096', size: '1M', io: 'write -P 1 0 100k', to: '5M', snapshot: true },
  { opts: 'cluster_size=512', size: '64k', io: 'write -P 1 0 64k', to: '20M', layout: 'differs' },
]

describeQemu('qcow2 resize --preallocation against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 900_000 })

  it('metadata, falloc and full: the same file as qemu-img makes, byte for byte', async () => {
    const dir = makeTempDir('imgtool-resize-prealloc-')
    let n = 0
    let identical = 0
    for (const c of CASES) {
      const base = join(dir, `b${n}.qcow2`)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', c.opts, base, c.size])
      if (c.io) await qemuIoOk(base, [c.io])
      if (c.snapshot) {
        await qemuImgOk(['snapshot', '-c', 'snap', base])
        await qemuIoOk(base, ['write -P 9 0 64k'])
      }
      for (const mode of ['metadata', 'falloc', 'full']) {
        const what = `${c.opts} ${c.size} -> ${c.to} --preallocation=${mode}`
        const ours = join(dir, `i${n}-${mode}.qcow2`)
        const theirs = join(dir, `q${n}-${mode}.qcow2`)
        copyFileSync(base, ours)
        copyFileSync(base, theirs)
        const q = await qemuImg(['resize', '-f', 'qcow2', `--preallocation=${mode}`, theirs, c.to])
        const o = await cli(undefined, 'resize', '-f', 'qcow2', `--preallocation=${mode}`, ours, c.to)
        expect(o.code, `${what}: ${o.stderr}`).toBe(q.code)
        expect(o.stdout, what).toBe(q.stdout)
        expect((await qemuImg(['check', ours])).code, what).toBe(0)
        expect((await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs])).code, what).toBe(0)
        const [mo, mq] = [await qemuImgOk(['map', '--output=json', ours]), await qemuImgOk(['map', '--output=json', theirs])]
        if (c.layout === 'differs' && mode === 'metadata') {
          expect(guestMap(mo), what).toEqual(guestMap(mq))
          expect(Buffer.compare(readFileSync(ours), readFileSync(theirs)), `${what}: the layout is known to differ`).not.toBe(0)
        } else {
          expect(mo, what).toBe(mq)
          expect(Buffer.compare(readFileSync(ours), readFileSync(theirs)), `${what}: byte for byte`).toBe(0)
          // host blocks: the same allocation (falloc/full give the data area blocks), up to the filesystem's own noise
          expect(Math.abs(statSync(ours).blocks - statSync(theirs).blocks), what).toBeLessThanOrEqual(64)
          identical++
        }
      }
      n++
    }
    // all but one (metadata with a growing refcount table)
    expect(identical).toBe(CASES.length * 3 - 1)
  })

  it('external data files (plain and data_file_raw): image and data file as qemu-img leaves them', async () => {
    const dir = makeTempDir('imgtool-resize-prealloc-df-')
    let n = 0
    for (const raw of [false, true]) {
      for (const mode of ['off', 'metadata', 'falloc', 'full']) {
        const what = `data_file${raw ? ' raw' : ''} --preallocation=${mode}`
        const b = join(dir, `b${n}`)
        mkdirSync(b)
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `data_file=img.data${raw ? ',data_file_raw=on' : ''}`, join(b, 'img.qcow2'), '1M'], { cwd: b })
        await qemuIoOk(join(b, 'img.qcow2'), ['write -P 1 0 64k'], { cwd: b })
        const [qd, id] = [join(dir, `q${n}`), join(dir, `i${n++}`)]
        for (const d of [qd, id]) {
          mkdirSync(d)
          for (const f of ['img.qcow2', 'img.data']) copyFileSync(join(b, f), join(d, f))
        }
        const q = await qemuImg(['resize', `--preallocation=${mode}`, 'img.qcow2', '3000k'], { cwd: qd })
        const o = await cli(id, 'resize', `--preallocation=${mode}`, 'img.qcow2', '3000k')
        expect(o.code, `${what}: ${o.stderr}`).toBe(q.code)
        for (const f of ['img.qcow2', 'img.data']) {
          expect(Buffer.compare(readFileSync(join(id, f)), readFileSync(join(qd, f))), `${what}: ${f}`).toBe(0)
          expect(Math.abs(statSync(join(id, f)).blocks - statSync(join(qd, f)).blocks), `${what}: ${f} blocks`).toBeLessThanOrEqual(64)
        }
        expect((await qemuImg(['check', 'img.qcow2'], { cwd: id })).code, what).toBe(0)
      }
    }
  })

  it('refusals: shrinking or keeping the size, v2 snapshots; a backing file is refused by imgtool alone', async () => {
    const dir = makeTempDir('imgtool-resize-prealloc-no-')
    const img = join(dir, 'a.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', img, '1M'])
    await qemuImgOk(['snapshot', '-c', 's', img])
    const theirs = join(dir, 'q.qcow2')
    copyFileSync(img, theirs)
    for (const args of [
      ['--preallocation=metadata', '3M'],
      ['--preallocation=falloc', '--shrink', '512k'],
      ['--preallocation=full', '1M'],
    ]) {
      const size = args[args.length - 1]!
      const flags = args.slice(0, -1)
      const before = readFileSync(img)
      const r = await cli(undefined, 'resize', ...flags, img, size)
      const q = await qemuImg(['resize', ...flags, theirs, size])
      expect(r.code, args.join(' ')).toBe(q.code)
      // the same words, nothing added (an extra 'qcow2: FILE:' prefix once broke this)
      expect(firstLine(r.stderr), args.join(' ')).toBe(firstLine(q.stderr))
      expect(Buffer.compare(readFileSync(img), before)).toBe(0)
    }
    // qemu-img would also zero the new range over the backing file: imgtool refuses, the overlay untouched
    const base = join(dir, 'base.qcow2')
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', base, '4M'])
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top, '1M'])
    const before = readFileSync(top)
    const r = await cli(undefined, 'resize', '--preallocation=metadata', top, '3M')
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/backing file is not supported by imgtool/)
    expect(Buffer.compare(readFileSync(top), before)).toBe(0)
  })
})
