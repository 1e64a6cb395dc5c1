/**
 * resize --preallocation and raw resize, against qemu-img 7.2 on the same files: growing with off, falloc
 * and full (file size, allocated blocks, guest bytes), shrinking only with --shrink, and the refusals in
 * qemu-img's words (metadata on raw, preallocation when not growing, an unknown mode). qcow2's other modes
 * are in flags-resize-prealloc.test.ts. Fault sweeps: a
 * raw growth that fails at any write, truncate or flush leaves the file at its old length and bytes.
 */
import { copyFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { RawImage, resizeRaw } from '../../src/formats/raw/index.js'
import { sweepFaults } from '../support/faulty-device.js'
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

describeQemu('resize --preallocation and raw resize against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  it('raw: every mode and size change as qemu-img (exit, words, size, blocks, guest bytes)', async () => {
    const dir = makeTempDir('imgtool-resize-raw-')
    const base = join(dir, 'base.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', base, '1M'])
    await qemuIoOk(base, ['write -P 1 0 1M'], { format: 'raw' })
    const cases: string[][] = [
      ['3M'],
      ['--preallocation=off', '3M'],
      ['--preallocation=falloc', '3M'],
      ['--preallocation=full', '3M'],
      ['--preallocation=full', '+1000'],
      ['--preallocation=falloc', '+64k'],
      ['--preallocation=metadata', '3M'],
      ['--preallocation=bogus', '3M'],
      ['--preallocation=falloc', '512k'],
      ['--shrink', '--preallocation=full', '512k'],
      ['--preallocation=full', '1M'],
      ['512k'],
      ['--shrink', '512k'],
      ['--shrink', '--', '-256k'],
      ['1M'],
    ]
    let n = 0
    for (const c of cases) {
      const ours = join(dir, `i${n}.raw`)
      const theirs = join(dir, `q${n++}.raw`)
      copyFileSync(base, ours)
      copyFileSync(base, theirs)
      const size = c[c.length - 1]!
      const flags = c.slice(0, -1)
      const o = await cli('resize', '-f', 'raw', ...flags, ours, size)
      const q = await qemuImg(['resize', '-f', 'raw', ...flags, theirs, size])
      const what = c.join(' ')
      expect(o.code, `${what}: ${o.stderr}`).toBe(q.code)
      expect(o.stdout, what).toBe(q.stdout)
      if (q.code !== 0) expect(firstLine(o.stderr), what).toBe(firstLine(q.stderr))
      const [so, sq] = [statSync(ours), statSync(theirs)]
      expect(so.size, what).toBe(sq.size)
      expect(so.blocks, what).toBe(sq.blocks)
      const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', ours, theirs])
      expect(cmp.code, what).toBe(0)
    }
  })

  it('qcow2: --preallocation=off grows as qemu-img; the shared refusals in its words', async () => {
    const dir = makeTempDir('imgtool-resize-qcow2-')
    const img = join(dir, 'a.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '1M'])
    await qemuIoOk(img, ['write -P 1 0 64k'])
    const theirs = join(dir, 'q.qcow2')
    copyFileSync(img, theirs)
    const o = await cli('resize', '--preallocation=off', img, '3M')
    expect(o.code, o.stderr).toBe(0)
    await qemuImgOk(['resize', '--preallocation=off', theirs, '3M'])
    expect((await qemuImg(['compare', '-s', img, theirs])).code).toBe(0)
    expect((await qemuImg(['check', img])).code).toBe(0)
    // metadata, falloc and full: test/verbs/flags-resize-prealloc.test.ts (byte for byte against qemu-img)
    // the shared refusals come first, in qemu-img's words
    for (const args of [
      ['--preallocation=full', '--shrink', '1M'],
      ['--preallocation=bogus', '8M'],
    ]) {
      const size = args.pop()!
      const r = await cli('resize', ...args, img, size)
      const q = await qemuImg(['resize', ...args, theirs, size])
      expect(r.code).toBe(q.code)
      expect(firstLine(r.stderr)).toBe(firstLine(q.stderr))
    }
  })
})

describe('raw resize fault sweeps', () => {
  const OLD = 256 * 1024
  const make = async () => {
    const d = new MemoryDevice(OLD)
    await d.write(0, new Uint8Array(OLD).fill(7), 'data')
    return d
  }
  for (const mode of ['off', 'falloc', 'full'] as const) {
    for (const op of ['write', 'truncate', 'flush'] as const) {
      for (const errno of ['EIO', 'ENOSPC'] as const) {
        it(`growing with ${mode}: ${op} failures (${errno}) leave the old length and bytes`, async () => {
          let points = 0
          await sweepFaults(
            { op, errno },
            make,
            (dev) => resizeRaw(new RawImage(dev), 5 * 1024 * 1024 + 512, mode),
            async ({ device, error, triggered }) => {
              points++
              if (!triggered) return
              expect(error).toBeDefined()
              const inner = device.inner
              expect(inner.size).toBe(OLD)
              expect(Buffer.from(await inner.read(0, OLD)).equals(Buffer.alloc(OLD, 7))).toBe(true)
            },
          )
          if (op === 'write' && mode !== 'off') expect(points).toBeGreaterThan(0)
        })
      }
    }
  }
})
