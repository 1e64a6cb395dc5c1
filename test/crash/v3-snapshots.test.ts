/**
 * Crash sweep of snapshot create, delete and apply on v3 images, judged by
 * qemu-img check at every crash state (D22). Each case prepares a durable
 * image (data over several L2 tables, compressed clusters, an existing
 * snapshot), runs one snapshot operation and a guest write after it on a
 * CrashDevice, and for every image a power cut could leave (prefixes, subsets
 * of the unflushed writes, torn writes):
 * - qemu-img check, on the image exactly as the crash left it (no repair, no
 *   read-write open first), finds no corruption: exit 0 or 3, never 2;
 * - imgtool check agrees (0 corruptions, the same number of leaks);
 * - the image is the one from before the operation or the one after it, as a
 *   whole: virtual size, guest data, the snapshot table and each snapshot's
 *   size and data; once the operation has returned, only the one after it.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import { compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { CrashDevice } from '../support/crash-device.js'
import { hasQemuImg, REQUIRE_QEMU, makeTempDir, md5, qemuImg, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { MemFiles, Unclosable, openOn, pattern } from '../writer/helpers.js'
import { compressible } from './workloads.js'
import { u64be } from '../../src/util/bytes.js'

/** wait for a process run whose result is not needed */
const r0 = (p: Promise<unknown>): Promise<void> => p.then(() => undefined)

useTempDirs()
const K = 1024
const M = 1024 * K
const G = 1024 * M
/**
 * qemu-img runs once per crash state, so the default sweep is narrower than the writer sweep's (every prefix,
 * all-but-one and a few random subsets, first and last torn cut); IMGTOOL_CRASH_FULL=1 sweeps as widely as
 * writer-crash.test.ts (1,327 states over these cases).
 */
const FULL = process.env['IMGTOOL_CRASH_FULL'] === '1'
const OPTIONS = FULL
  ? { subsets: true, torn: true, exhaustiveLimit: 8, randomSubsets: 16, maxTornPerWrite: 4, tornTail: true }
  : { subsets: true, torn: true, exhaustiveLimit: 4, randomSubsets: 4, maxTornPerWrite: 2, tornTail: true }
/** a test's time limit: qemu-img runs once per crash state, on a machine that may be busy */
const LIMIT = 900_000

/** The guest view the sweep compares: virtual size, the bytes of each region, and each snapshot's. */
interface View {
  size: number
  data: string[]
  snapshots: Record<string, { size: number; data: string[] }>
}

interface Step {
  /** what a case does: guest writes inside its regions, compressed clusters, snapshot operations, resize */
  (img: Qcow2Image, t: Tools): Promise<Qcow2Image | void>
}
interface Tools {
  write(img: Qcow2Image, offset: number, data: Uint8Array): Promise<void>
  compressed(img: Qcow2Image, offset: number, seed: number): Promise<void>
}

interface SnapCase {
  name: string
  size: number
  options: Record<string, string>
  /** guest ranges compared (everything the case writes lies inside them) */
  regions: Array<[number, number]>
  /** persistent bitmaps added with qemu-img bitmap --add before the preparation */
  bitmaps?: string[]
  prepare: Step
  op: { kind: 'create' | 'delete' | 'apply'; name: string }
  /** a guest write after the operation (copy-on-write of clusters it shares) */
  after: [number, number]
  /** narrower crash-state options (large clusters: every state is a few MiB) */
  sweep?: { exhaustiveLimit?: number; randomSubsets?: number; maxTornPerWrite?: number }
}

const tools: Tools = {
  write: (img, offset, data) => img.write(offset, data),
  async compressed(img, offset, seed) {
    const cs = img.clusterSize
    const z = await compressCluster(compressible(seed, cs), cs, img.header.compressionType)
    if (!z) throw new Error('test data did not compress')
    await img.writeCompressed(offset, z)
  },
}

/** Data in four regions, one per L2 table (`span` apart), compressed clusters in two. */
function spread(span: number, cs: number): Step {
  return async (img, t) => {
    for (let i = 0; i < 4; i++) await t.write(img, i * span + 1000, pattern(i * 7, 6 * cs + 333, i + 1))
    for (let i = 0; i < 3; i++) await t.compressed(img, span + 8 * cs + i * cs, i)
    for (let i = 0; i < 2; i++) await t.compressed(img, 3 * span + 10 * cs + i * cs, 10 + i)
  }
}

function regionsOf(span: number, cs: number): Array<[number, number]> {
  return [0, 1, 2, 3].map((i): [number, number] => [i * span, 16 * cs])
}

/** Prepare: data, snapshot `old`, more data; then (optionally) more. */
function withOld(span: number, cs: number, more?: Step): Step {
  return async (img, t) => {
    await spread(span, cs)(img, t)
    await createSnapshot(img, 'old')
    await t.write(img, 2 * cs + 100, pattern(5, 3 * cs, 9))
    await t.write(img, 2 * span + cs, pattern(6, cs, 3))
    await t.compressed(img, 3 * span + 10 * cs, 20)
    if (more) return more(img, t)
  }
}

function cases(): SnapCase[] {
  const out: SnapCase[] = []
  // 4 KiB clusters: one L2 table maps 2 MiB; 64 KiB clusters: 512 MiB
  for (const [cs, span, size] of [
    [4 * K, 2 * M, 8 * M],
    [64 * K, 512 * M, 2 * G],
  ] as const) {
    // every state of a 64 KiB-cluster case is a few MiB to copy, check and read
    const sweep =
      cs > 4 * K ? (FULL ? { exhaustiveLimit: 6, randomSubsets: 8, maxTornPerWrite: 2 } : { exhaustiveLimit: 3, randomSubsets: 2, maxTornPerWrite: 1 }) : {}
    const base = { size, options: { cluster_size: String(cs) }, regions: regionsOf(span, cs), after: [cs + 10, 2000] as [number, number], sweep }
    const label = `${cs / K} KiB clusters`
    out.push({
      ...base,
      name: `create (${label}, 4 L2 tables, compressed clusters, a snapshot)`,
      prepare: withOld(span, cs),
      op: { kind: 'create', name: 'new' },
    })
    out.push({
      ...base,
      name: `delete (${label}, of two snapshots)`,
      prepare: withOld(span, cs, async (img, t) => {
        await createSnapshot(img, 'second')
        await t.write(img, span + 3 * cs, pattern(8, 2 * cs, 4))
      }),
      op: { kind: 'delete', name: 'old' },
    })
    out.push({ ...base, name: `apply (${label}, the older snapshot)`, prepare: withOld(span, cs), op: { kind: 'apply', name: 'old' } })
  }
  const cs = 4 * K
  out.push({
    name: 'create (extended L2, lazy refcounts, 16 KiB clusters)',
    size: 16 * M,
    options: { cluster_size: String(16 * K), extended_l2: 'on', lazy_refcounts: 'on' },
    regions: regionsOf(4 * M, 16 * K),
    after: [16 * K + 100, 700],
    prepare: withOld(4 * M, 16 * K),
    op: { kind: 'create', name: 'new' },
  })
  out.push({
    name: 'create (a persistent bitmap, 4 KiB clusters)',
    size: 8 * M,
    options: { cluster_size: String(cs) },
    regions: regionsOf(2 * M, cs),
    bitmaps: ['b0'],
    after: [cs + 10, 2000],
    prepare: withOld(2 * M, cs),
    op: { kind: 'create', name: 'new' },
  })
  out.push({
    name: 'delete (a persistent bitmap, 4 KiB clusters)',
    size: 8 * M,
    options: { cluster_size: String(cs) },
    regions: regionsOf(2 * M, cs),
    bitmaps: ['b0'],
    after: [cs + 10, 2000],
    prepare: withOld(2 * M, cs),
    op: { kind: 'delete', name: 'old' },
  })
  out.push({
    name: 'apply that shrinks the image (4 KiB clusters)',
    size: 4 * M,
    options: { cluster_size: String(cs) },
    regions: [...regionsOf(2 * M, cs).slice(0, 2), [5 * M, 8 * cs]],
    after: [cs + 10, 2000],
    prepare: async (img, t) => {
      await t.write(img, 1000, pattern(1, 6 * cs, 2))
      await t.compressed(img, 2 * M + 8 * cs, 3)
      await createSnapshot(img, 'old')
      await resizeQcow2(img, 6 * M)
      const next = await openOn(img.device)
      await t.write(next, 5 * M + 100, pattern(2, 4 * cs, 5))
      await t.write(next, 500, pattern(3, cs, 6))
      return next
    },
    op: { kind: 'apply', name: 'old' },
  })
  return out
}

function hashView(v: View): string {
  return JSON.stringify(v)
}

/** md5 of each region's bytes; the active image's bytes of the case's write after the operation read as 0 */
async function readRegions(img: Qcow2Image, c: SnapCase, active: boolean): Promise<string[]> {
  const out: string[] = []
  for (const [off, len] of c.regions) {
    const n = Math.max(0, Math.min(len, img.virtualSize - off))
    if (n === 0) {
      out.push('-')
      continue
    }
    const b = await img.read(off, n)
    if (active) {
      const [wo, wl] = c.after
      const from = Math.max(wo, off)
      const to = Math.min(wo + wl, off + n)
      if (from < to) b.fill(0, from - off, to - off)
    }
    out.push(md5(b))
  }
  return out
}

/**
 * What the image on `dev` holds: its guest data and every snapshot's. A
 * snapshot is read through a read-only open whose mapper is pointed at the
 * snapshot's L1 table and size (nothing is written).
 */
async function view(dev: MemoryDevice, c: SnapCase): Promise<View> {
  const img = await openOn(dev, new MemFiles(), true)
  const v: View = { size: img.virtualSize, data: await readRegions(img, c, true), snapshots: {} }
  const h = img.header
  for (const s of [...img.snapshots]) {
    h.size = s.diskSize ?? h.size
    h.l1Size = s.l1Size
    img.replaceL1(s.l1Size > 0 ? await dev.read(s.l1TableOffset, s.l1Size * 8) : new Uint8Array(0))
    v.snapshots[s.name] = { size: img.virtualSize, data: await readRegions(img, c, false) }
  }
  await img.close()
  return v
}

async function prepare(c: SnapCase, dir: string): Promise<Uint8Array> {
  const dev = new MemoryDevice(0, { name: 'img.qcow2' })
  await createQcow2(dev, new MemFiles().context, { size: c.size, options: c.options })
  let bytes = dev.snapshot()
  if (c.bitmaps) {
    const path = join(dir, `${c.name.replace(/[^a-z0-9]+/gi, '-')}.qcow2`)
    writeFileSync(path, bytes)
    for (const b of c.bitmaps) await qemuImgOk(['bitmap', '--add', '-f', 'qcow2', path, b])
    bytes = readFileSync(path)
  }
  const base = new MemoryDevice(bytes, { name: 'img.qcow2' })
  let img = await openOn(base)
  img = (await c.prepare(img, tools)) ?? img
  await img.close()
  return base.snapshot()
}

async function runOp(img: Qcow2Image, op: SnapCase['op']): Promise<void> {
  if (op.kind === 'create') await createSnapshot(img, op.name)
  else if (op.kind === 'delete') await deleteSnapshot(img, op.name)
  else await applySnapshot(img, op.name)
}

let totalStates = 0
let qemuChecks = 0
let leakyStates = 0
const perCase: string[] = []
afterAll(() => {
  console.log(
    `[v3 snapshot crash sweep] ${totalStates} crash states, ${qemuChecks} judged by qemu-img check (${leakyStates} leaky, 0 corrupt)\n  ${perCase.join('\n  ')}`,
  )
})

describe.skipIf(!hasQemuImg && !REQUIRE_QEMU)('v3 snapshot operations: qemu-img check finds at most leaks at every crash point', () => {
  for (const c of cases()) {
    it(
      c.name,
      async () => {
        const started = Date.now()
        const dir = makeTempDir('imgtool-v3snap-')
        const base = await prepare(c, dir)
        const before = hashView(await view(new MemoryDevice(base, { name: 'img.qcow2' }), c))
        // the swept run: the operation, a guest write after it, a clean close
        const dev = new CrashDevice(base, { name: 'img.qcow2' })
        const img = await openOn(new Unclosable(dev))
        await runOp(img, c.op)
        const opDone = dev.flushCount
        await img.write(c.after[0], pattern(99, c.after[1], 7))
        await img.close()
        const afterOp = new MemoryDevice(dev.snapshot(), { name: 'img.qcow2' })
        expect(await analyzeQcow2(afterOp).then((a) => [a.report.corruptions, a.report.leaks])).toEqual([0, 0])
        // the view right after the operation (the bytes of the write after it are masked)
        const after = hashView(await view(afterOp, c))
        let states = 0
        let leaky = 0
        let dirty = 0
        // one state at a time (each is a full copy of the image); qemu-img runs while imgtool checks and reads it
        for (const s of dev.allCrashStates({ ...OPTIONS, ...(c.sweep ?? {}) })) {
          const where = `${c.name}: ${s.description}`
          const path = join(dir, `s${states++ % 4}.qcow2`)
          writeFileSync(path, s.device.snapshot())
          const qemu = qemuImg(['check', '--output=json', '-f', 'qcow2', path])
          const a = await analyzeQcow2(s.device)
          const head = await s.device.read(0, 80)
          if ((u64be(head, 72) & 1n) !== 0n) {
            // only the guest write after the operation marks the image dirty (lazy refcounts: refcounts may lag
            // behind the L2 tables by design; the next read-write open rebuilds them, as QEMU's open does)
            expect({ lazy: c.options['lazy_refcounts'], returned: s.flushes >= opDone }, `${where}: dirty`).toEqual({ lazy: 'on', returned: true })
            await r0(qemu)
            const img = await openOn(s.device)
            await img.close()
            expect(
              await analyzeQcow2(s.device).then((x) => [x.report.corruptions, x.report.leaks, x.report.checkErrors]),
              `${where}: after the repairing open`,
            ).toEqual([0, 0, 0])
            expect(hashView(await view(s.device, c)), `${where}: after the repairing open`).toBe(after)
            dirty++
            continue
          }
          const got = hashView(await view(s.device, c))
          const r = await qemu
          const j = JSON.parse(r.stdout || '{}') as Record<string, number>
          expect({ code: r.code, corruptions: j['corruptions'] ?? 0, checkErrors: j['check-errors'] ?? 0 }, `${where}\n${r.stdout}${r.stderr}`).toEqual({
            code: (j['leaks'] ?? 0) > 0 ? 3 : 0,
            corruptions: 0,
            checkErrors: 0,
          })
          expect(
            { corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors },
            `${where}: imgtool check\n${a.report.diagnostics.join('\n')}`,
          ).toEqual({
            corruptions: 0,
            leaks: j['leaks'] ?? 0,
            checkErrors: 0,
          })
          if (a.report.leaks > 0) leaky++
          if (s.flushes >= opDone) expect(got, `${where}: the operation had returned`).toBe(after)
          else expect([before, after], `${where}: neither the image before the operation nor the one after`).toContain(got)
        }
        totalStates += states
        qemuChecks += states
        leakyStates += leaky
        perCase.push(
          `${String(states).padStart(5)} states (${leaky} leaky, ${dirty} dirty: lazy refcounts) ${String(Date.now() - started).padStart(6)} ms  ${c.name}`,
        )
        expect(states).toBeGreaterThan(10)
      },
      LIMIT,
    )
  }
})
