/**
 * Crash and fault sweeps of imgtool amend: downgrade (with zero clusters to
 * clear), upgrade, lazy_refcounts on and off, refcount_bits changes. Each
 * case prepares a durable image (data, zero clusters, compressed clusters, a
 * snapshot where the options allow), runs the amend on a CrashDevice, and for
 * every image a power cut could leave (prefixes, subsets of the unflushed
 * writes, torn writes):
 * - the image opens and reads the guest bytes it held before;
 * - imgtool's check finds no corruption (leaks at most), and so does
 *   qemu-img check on the same bytes when qemu-img is there;
 * - once the amend has returned, the image is the amended one, with no leak.
 * The fault sweep fails each write (EIO), then each flush, in turn: the amend
 * reports the error and the image still opens, reads the same guest bytes and
 * checks clean (not even a leak).
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import { amendQcow2, parseAmendOptions } from '../../src/formats/qcow2/ops/amend.js'
import { createSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import { CrashDevice } from '../support/crash-device.js'
import { stripSnapshotExtraData } from '../support/snapshot-extra.js'
import { sweepFaults } from '../support/faulty-device.js'
import { hasQemuImg, makeTempDir, md5, qemuImg, useTempDirs } from '../support/qemu.js'
import { MemFiles, Unclosable, openOn, pattern } from '../writer/helpers.js'
import { compressible } from './workloads.js'

useTempDirs()
const K = 1024
const M = 1024 * K
const LIMIT = 900_000
const SWEEP = { subsets: true, torn: true, exhaustiveLimit: 4, randomSubsets: 4, maxTornPerWrite: 2, tornTail: true }

interface AmendCase {
  name: string
  create: Record<string, string>
  amend: Record<string, string>
  /** compressed clusters (refcounts of 16 and more: not with narrow refcount widths) */
  compressed?: boolean
  snapshot?: boolean
  /** on a backing file (base.qcow2, with data of its own): the name moves when the header is rewritten */
  backing?: boolean
  /** snapshots without extra data (as old qemu wrote v2 ones): the upgrade writes a new table */
  stripExtra?: boolean
  /** header fields after the amend: version, refcount order, compatible features */
  expect: { version: 2 | 3; refcountOrder: number; compat: bigint }
}

const SIZE = 6 * M

const CASES: AmendCase[] = [
  {
    name: 'downgrade (64 KiB clusters, zero clusters to clear, a snapshot)',
    create: {},
    amend: { compat: '0.10' },
    compressed: true,
    snapshot: true,
    expect: { version: 2, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'downgrade (4 KiB clusters, lazy refcounts)',
    create: { cluster_size: '4096', lazy_refcounts: 'on' },
    amend: { compat: '0.10' },
    compressed: true,
    expect: { version: 2, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'downgrade over preallocated zero clusters (zeroes written, 4 KiB clusters)',
    create: { cluster_size: '4096', preallocation: 'metadata' },
    amend: { compat: '0.10' },
    expect: { version: 2, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'upgrade (64 KiB clusters: the header grows past the first sector)',
    create: { compat: '0.10' },
    amend: { compat: '1.1' },
    compressed: true,
    snapshot: true,
    expect: { version: 3, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'upgrade on a backing file (64 KiB clusters: its name moves past the first sector)',
    create: { compat: '0.10' },
    amend: { compat: '1.1' },
    backing: true,
    expect: { version: 3, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'downgrade on a backing file (64 KiB clusters: its name moves into the first sector)',
    create: {},
    amend: { compat: 'v2' },
    backing: true,
    expect: { version: 2, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'upgrade of snapshots without extra data (a new snapshot table, 4 KiB clusters)',
    create: { compat: '0.10', cluster_size: '4096' },
    amend: { compat: '1.1' },
    snapshot: true,
    stripExtra: true,
    expect: { version: 3, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'upgrade with lazy refcounts (4 KiB clusters)',
    create: { compat: '0.10', cluster_size: '4096' },
    amend: { compat: '1.1', lazy_refcounts: 'on' },
    expect: { version: 3, refcountOrder: 4, compat: 1n },
  },
  {
    name: 'lazy_refcounts on',
    create: {},
    amend: { lazy_refcounts: 'on' },
    compressed: true,
    expect: { version: 3, refcountOrder: 4, compat: 1n },
  },
  {
    name: 'lazy_refcounts off',
    create: { lazy_refcounts: 'on' },
    amend: { lazy_refcounts: 'off' },
    expect: { version: 3, refcountOrder: 4, compat: 0n },
  },
  {
    name: 'refcount_bits=1 (4 KiB clusters)',
    create: { cluster_size: '4096' },
    amend: { refcount_bits: '1' },
    expect: { version: 3, refcountOrder: 0, compat: 0n },
  },
  {
    name: 'refcount_bits=64 (4 KiB clusters, a snapshot)',
    create: { cluster_size: '4096' },
    amend: { refcount_bits: '64' },
    compressed: true,
    snapshot: true,
    expect: { version: 3, refcountOrder: 6, compat: 0n },
  },
  {
    name: 'refcount_bits=8 and a downgrade back to 16 bits, from 8',
    create: { refcount_bits: '8' },
    amend: { refcount_bits: '16', compat: '0.10' },
    compressed: true,
    snapshot: true,
    expect: { version: 2, refcountOrder: 4, compat: 0n },
  },
]

/** the backing file of the cases that have one (read-only from the amend on) */
let files = new MemFiles()

async function prepare(c: AmendCase): Promise<Uint8Array> {
  files = new MemFiles()
  const dev = new MemoryDevice(0, { name: 'img.qcow2' })
  if (c.backing) {
    const b = new MemoryDevice(0, { name: 'base.qcow2' })
    await createQcow2(b, files.context, { size: SIZE, options: {} })
    const bi = await openOn(b, files)
    await bi.write(0, pattern(9, SIZE, 11))
    await bi.close()
    files.files.set('base.qcow2', b)
  }
  await createQcow2(dev, files.context, { size: SIZE, options: c.create, ...(c.backing ? { backingFile: 'base.qcow2', backingFormat: 'qcow2' } : {}) })
  const img = await openOn(dev, files)
  const cs = img.clusterSize
  await img.write(1000, pattern(1, 5 * cs + 77, 3))
  await img.write(2 * M + 300, pattern(2, 2 * cs, 5))
  if (c.snapshot) await createSnapshot(img, 'snap')
  await img.write(2 * M + cs, pattern(3, cs, 7))
  // (zero clusters over a backing file are refused by a downgrade: imgtool does not expand them)
  if (c.create['compat'] !== '0.10' && !c.backing) {
    // preallocated images: data first, so the zero clusters keep old bytes the expansion must overwrite
    if (c.create['preallocation'] !== undefined) await img.write(4 * M, pattern(4, 3 * cs, 13))
    await img.writeZeroes(4 * M, 3 * cs)
  }
  if (c.compressed) {
    for (let i = 0; i < 3; i++) {
      const z = await compressCluster(compressible(i, cs), cs, img.header.compressionType)
      if (!z) throw new Error('test data did not compress')
      await img.writeCompressed(5 * M + i * cs, z)
    }
  }
  await img.close()
  return c.stripExtra ? stripSnapshotExtraData(dev.snapshot()) : dev.snapshot()
}

async function guest(dev: MemoryDevice): Promise<string> {
  const img = await openOn(dev, files, true)
  try {
    return md5(await img.read(0, img.virtualSize))
  } finally {
    await img.close()
  }
}

function headerFields(b: Uint8Array): { version: number; refcountOrder: number; compat: bigint } {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength)
  const version = dv.getUint32(4)
  return version === 2 ? { version, refcountOrder: 4, compat: 0n } : { version, refcountOrder: dv.getUint32(96), compat: dv.getBigUint64(80) }
}

async function runAmend(dev: MemoryDevice | CrashDevice | import('../support/faulty-device.js').FaultyDevice, c: AmendCase): Promise<void> {
  const img = await openOn(new Unclosable(dev), files)
  await amendQcow2(img, parseAmendOptions(c.amend))
}

let total = 0
const lines: string[] = []
afterAll(() => console.log(`[amend crash sweep] ${total} crash states\n  ${lines.join('\n  ')}`))

describe('amend: at every crash point the image opens, holds its guest bytes and checks with at most leaks', () => {
  for (const c of CASES) {
    it(
      c.name,
      async () => {
        const base = await prepare(c)
        const before = await guest(new MemoryDevice(base, { name: 'img.qcow2' }))
        const dev = new CrashDevice(base, { name: 'img.qcow2' })
        await runAmend(dev, c)
        const done = dev.flushCount
        const after = new MemoryDevice(dev.snapshot(), { name: 'img.qcow2' })
        expect(headerFields(after.snapshot()), 'the amended header').toEqual(c.expect)
        const a0 = await analyzeQcow2(after)
        expect([a0.report.corruptions, a0.report.leaks, a0.report.checkErrors], 'after the amend').toEqual([0, 0, 0])
        expect(await guest(after)).toBe(before)
        const dir = hasQemuImg ? makeTempDir('imgtool-amend-crash-') : ''
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
          if (s.flushes >= done) expect(a.report.leaks, `${where}: the amend had returned`).toBe(0)
          expect(await guest(s.device), `${where}: guest bytes`).toBe(before)
          if (hasQemuImg && !c.backing) {
            const path = join(dir, `s${states % 4}.qcow2`)
            writeFileSync(path, s.device.snapshot())
            const r = await qemuImg(['check', '--output=json', '-f', 'qcow2', path])
            const j = JSON.parse(r.stdout || '{}') as Record<string, number>
            expect({ code: r.code, corruptions: j['corruptions'] ?? 0 }, `${where}: qemu-img check\n${r.stdout}${r.stderr}`).toEqual({
              code: (j['leaks'] ?? 0) > 0 ? 3 : 0,
              corruptions: 0,
            })
            expect(j['leaks'] ?? 0, `${where}: qemu-img and imgtool count the same leaks`).toBe(a.report.leaks)
          }
        }
        total += states
        lines.push(`${String(states).padStart(5)} states (${leaky} leaky)  ${c.name}`)
        // a field change is one write: the image before it and after it
        expect(states).toBeGreaterThanOrEqual(2)
      },
      LIMIT,
    )
  }
})

describe('amend: a failed write or flush leaves the image as it was or amended, clean', () => {
  for (const c of CASES) {
    for (const op of ['write', 'flush'] as const) {
      it(
        `${c.name}: every ${op} failing with EIO`,
        async () => {
          const base = await prepare(c)
          const before = await guest(new MemoryDevice(base, { name: 'img.qcow2' }))
          let failed = 0
          const points = await sweepFaults(
            { op },
            () => new MemoryDevice(base.slice(), { name: 'img.qcow2' }),
            (d) => runAmend(d as never, c),
            async (p) => {
              if (p.error !== undefined) {
                failed++
                expect(String(p.error)).toMatch(/EIO|I\/O/)
              }
              const inner = p.device.inner as MemoryDevice
              const a = await analyzeQcow2(inner)
              expect([a.report.corruptions, a.report.leaks, a.report.checkErrors], a.report.diagnostics.join('\n')).toEqual([0, 0, 0])
              expect(await guest(inner)).toBe(before)
              const f = headerFields(inner.snapshot())
              if (p.error === undefined) expect(f).toEqual(c.expect)
            },
          )
          expect(points).toBeGreaterThan(0)
          expect(failed).toBeGreaterThan(0)
        },
        LIMIT,
      )
    }
  }
})
