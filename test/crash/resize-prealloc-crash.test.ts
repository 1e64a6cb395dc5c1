/**
 * Crash and fault sweeps of qcow2 resize --preallocation=metadata|falloc|full. Each case prepares a
 * durable image (data, an unaligned old size where the head cluster is copied, a v3 snapshot that
 * shares the last L2 table), runs the resize on a CrashDevice, and for every image a power cut could
 * leave (prefixes, subsets of the unflushed writes, torn writes):
 * - imgtool's check finds no corruption (leaks at most);
 * - the image opens with the old or the new size, the old guest bytes read back and the new range
 *   reads zeros;
 * - once the resize has returned, the image has the new size, every new cluster is mapped and
 *   nothing leaks.
 * The fault sweeps fail each write, flush and truncate in turn (EIO and ENOSPC): the resize reports
 * the error, and the image opens with its old guest bytes and checks clean (not even a leak).
 */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { createSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { CrashDevice } from '../support/crash-device.js'
import { sweepFaults } from '../support/faulty-device.js'
import { md5 } from '../support/qemu.js'
import { MemFiles, Unclosable, openOn, pattern } from '../writer/helpers.js'
import type { BlockDevice } from '../../src/io/block-device.js'

const K = 1024
const LIMIT = 900_000
const SWEEP = { subsets: true, torn: true, exhaustiveLimit: 4, randomSubsets: 4, maxTornPerWrite: 2, tornTail: true }

interface Case {
  name: string
  create: Record<string, string>
  size: number
  to: number
  mode: 'metadata' | 'falloc' | 'full'
  snapshot?: boolean
}

const CASES: Case[] = [
  {
    name: 'metadata, 4 KiB clusters, new L2 tables and an L1 growth',
    create: { cluster_size: '4096' },
    size: 1000 * K,
    to: 4 * 1024 * K + 512,
    mode: 'metadata',
  },
  { name: 'metadata, 512 B clusters, new refcount blocks', create: { cluster_size: '512' }, size: 60 * K + 512, to: 1200 * K, mode: 'metadata' },
  {
    name: 'falloc, 4 KiB clusters, the refcount area and a head copy',
    create: { cluster_size: '4096' },
    size: 1000 * K + 512,
    to: 3 * 1024 * K,
    mode: 'falloc',
  },
  { name: 'full, 1 KiB clusters, compat 0.10', create: { cluster_size: '1024', compat: '0.10' }, size: 200 * K, to: 700 * K, mode: 'full' },
  {
    name: 'metadata over a v3 snapshot (the shared L2 table is copied)',
    create: { cluster_size: '4096' },
    size: 1000 * K,
    to: 2 * 1024 * K,
    mode: 'metadata',
    snapshot: true,
  },
  { name: 'falloc over a v3 snapshot', create: { cluster_size: '16384', extended_l2: 'on' }, size: 1000 * K, to: 2 * 1024 * K, mode: 'falloc', snapshot: true },
]

let files = new MemFiles()

async function prepare(c: Case): Promise<Uint8Array> {
  files = new MemFiles()
  const dev = new MemoryDevice(0, { name: 'img.qcow2' })
  await createQcow2(dev, files.context, { size: c.size, options: c.create })
  const img = await openOn(dev, files)
  await img.write(0, pattern(1, Math.min(64 * K, c.size), 3))
  if (c.snapshot) await createSnapshot(img, 'snap')
  // the last bytes before the old end: the head cluster of the new range holds data
  const tail = Math.min(8 * K, c.size)
  await img.write(c.size - tail, pattern(2, tail, 5))
  await img.close()
  return dev.snapshot()
}

async function state(dev: BlockDevice): Promise<{ size: number; head: string; rest: boolean }> {
  const img = await openOn(dev, files, true)
  try {
    return { size: img.virtualSize, ...(await sample(img)) }
  } finally {
    await img.close()
  }
}

let oldSize = 0
async function sample(img: { virtualSize: number; read(o: number, n: number): Promise<Uint8Array> }): Promise<{ head: string; rest: boolean }> {
  const head = md5(await img.read(0, oldSize))
  let rest = true
  if (img.virtualSize > oldSize) {
    const b = await img.read(oldSize, img.virtualSize - oldSize)
    rest = b.every((x) => x === 0)
  }
  return { head, rest }
}

async function runResize(dev: BlockDevice, c: Case): Promise<void> {
  const img = await openOn(new Unclosable(dev), files)
  await resizeQcow2(img, c.to, c.mode)
}

describe('resize --preallocation: at every crash point the image checks with at most leaks and keeps its bytes', () => {
  let total = 0
  for (const c of CASES) {
    it(
      c.name,
      async () => {
        oldSize = c.size
        const base = await prepare(c)
        const before = await state(new MemoryDevice(base, { name: 'img.qcow2' }))
        const dev = new CrashDevice(base, { name: 'img.qcow2' })
        await runResize(dev, c)
        const done = dev.flushCount
        const after = new MemoryDevice(dev.snapshot(), { name: 'img.qcow2' })
        const a0 = await analyzeQcow2(after)
        expect([a0.report.corruptions, a0.report.leaks, a0.report.checkErrors], 'after the resize').toEqual([0, 0, 0])
        const s0 = await state(after)
        expect(s0).toEqual({ size: c.to, head: before.head, rest: true })
        // every new cluster is mapped (preallocated)
        const img = await openOn(after, files, true)
        for await (const e of img.extents(c.size, c.to - c.size)) expect(e.hostOffset, JSON.stringify(e)).toBeDefined()
        await img.close()
        let states = 0
        let leaky = 0
        for (const s of dev.allCrashStates(SWEEP)) {
          const where = `${c.name}: ${s.description}`
          states++
          const a = await analyzeQcow2(s.device)
          expect({ corruptions: a.report.corruptions, checkErrors: a.report.checkErrors }, `${where}\n${a.report.diagnostics.join('\n')}`).toEqual({
            corruptions: 0,
            checkErrors: 0,
          })
          if (a.report.leaks > 0) leaky++
          const st = await state(s.device)
          expect([c.size, c.to], where).toContain(st.size)
          expect(st.head, `${where}: old guest bytes`).toBe(before.head)
          expect(st.rest, `${where}: the new range reads zeros`).toBe(true)
          if (s.flushes >= done) {
            expect(a.report.leaks, `${where}: the resize had returned`).toBe(0)
            expect(st.size, where).toBe(c.to)
          }
        }
        total += states
        console.log(`[resize prealloc crash] ${String(states).padStart(5)} states (${leaky} leaky)  ${c.name}`)
        expect(states).toBeGreaterThan(4)
      },
      LIMIT,
    )
  }
  it('swept states in all', () => expect(total).toBeGreaterThan(0))
})

describe('resize --preallocation fault sweeps: an error leaves the old image, clean', () => {
  for (const c of CASES) {
    for (const op of ['write', 'flush', 'truncate'] as const) {
      for (const errno of ['EIO', 'ENOSPC'] as const) {
        if (op === 'flush' && errno === 'ENOSPC') continue
        it(
          `${c.name}: each ${op} failing (${errno})`,
          async () => {
            oldSize = c.size
            const base = await prepare(c)
            const before = await state(new MemoryDevice(base, { name: 'img.qcow2' }))
            let failed = 0
            const points = await sweepFaults(
              { op, errno },
              () => new MemoryDevice(base.slice(), { name: 'img.qcow2' }),
              (dev) => runResize(dev, c),
              async ({ device, error, triggered, description }) => {
                if (!triggered) return
                const inner = device.inner
                if (error) failed++
                const a = await analyzeQcow2(inner)
                expect([a.report.corruptions, a.report.leaks, a.report.checkErrors], `${description}\n${a.report.diagnostics.join('\n')}`).toEqual([0, 0, 0])
                const st = await state(inner)
                expect(st.head, description).toBe(before.head)
                expect(st.rest, description).toBe(true)
                if (!error) expect(st.size, description).toBe(c.to)
              },
            )
            if (op !== 'truncate') expect(points).toBeGreaterThan(0)
            if (op === 'write') expect(failed).toBeGreaterThan(0)
          },
          LIMIT,
        )
      }
    }
  }
})
