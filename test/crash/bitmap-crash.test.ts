/**
 * Crash and fault sweeps of imgtool bitmap (ops/bitmap-edit.ts). Each case
 * prepares a durable image (guest data, bitmaps with bits gathered by the
 * writer), runs one bitmap call on a CrashDevice, and for every image a power
 * cut could leave (prefixes, subsets of the unflushed writes, torn writes):
 * - the bitmaps (names, flags, granularity, bits) are the old ones or the new ones;
 * - imgtool's check finds no corruption (leaks at most), nor does qemu-img check;
 * - the guest bytes are the ones before; once the call returned, no leak.
 * The fault sweep fails each write, then each flush (EIO, ENOSPC): the image is
 * the old or the new state, checks without corruption, and in the old state
 * without a leak (what was allocated is given back).
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { openImageOnDevice } from '../../src/open.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { editQcow2Bitmaps, readQcow2Bitmaps, type BitmapEditOp } from '../../src/formats/qcow2/ops/bitmap-edit.js'
import { CrashDevice } from '../support/crash-device.js'
import { sweepFaults } from '../support/faulty-device.js'
import { breakTableEntry, setInUse } from '../support/bitmap-damage.js'
import { repairQcow2Device } from '../../src/formats/qcow2/repair/repair.js'
import { readHeader } from '../../src/formats/qcow2/spec/header.js'
import { readBitmapDirectory } from '../../src/formats/qcow2/spec/bitmap-directory.js'
import { hasQemuImg, makeTempDir, md5, qemuImg, useTempDirs } from '../support/qemu.js'
import { MemFiles, Unclosable, createOn, openOn, pattern } from '../writer/helpers.js'

useTempDirs()
const K = 1024
const M = 1024 * K
const LIMIT = 900_000
const SWEEP = { subsets: true, torn: true, exhaustiveLimit: 4, randomSubsets: 4, maxTornPerWrite: 2, tornTail: true }

interface Call {
  name: string
  ops: BitmapEditOp[]
}

interface BitmapCase {
  name: string
  create: Record<string, string>
  /** bitmap calls made before (durable), guest writes after each */
  setup: Call[]
  /** bitmaps flagged IN_USE after the setup */
  inUse?: number[]
  call: Call
}

const CASES: BitmapCase[] = [
  { name: 'the first bitmap (the extension and its autoclear bit appear)', create: {}, setup: [], call: { name: 'a', ops: [{ op: 'add' }] } },
  {
    name: 'add and merge next to bitmaps with bits (4 KiB clusters)',
    create: { cluster_size: '4096' },
    setup: [
      { name: 'a', ops: [{ op: 'add' }] },
      { name: 'b', ops: [{ op: 'add', granularity: 512 }] },
    ],
    call: { name: 'c', ops: [{ op: 'add', granularity: 65536 }, { op: 'merge', source: 'b' }, { op: 'disable' }] },
  },
  {
    name: 'clear and disable',
    create: {},
    setup: [
      { name: 'a', ops: [{ op: 'add' }] },
      { name: 'b', ops: [{ op: 'add', granularity: 4096 }] },
    ],
    call: { name: 'a', ops: [{ op: 'clear' }, { op: 'disable' }] },
  },
  {
    name: 'the last bitmap removed (the extension goes)',
    create: {},
    setup: [{ name: 'a', ops: [{ op: 'add', granularity: 4096 }] }],
    call: { name: 'a', ops: [{ op: 'remove' }] },
  },
  {
    name: 'an in-use bitmap removed, another kept',
    create: { cluster_size: '4096' },
    setup: [
      { name: 'a', ops: [{ op: 'add' }] },
      { name: 'b', ops: [{ op: 'add', granularity: 512 }] },
    ],
    inUse: [0],
    call: { name: 'a', ops: [{ op: 'remove' }] },
  },
]

const SIZE = 6 * M
let files = new MemFiles()

async function edit(dev: BlockDevice, call: Call): Promise<void> {
  const img = (await openImageOnDevice(dev instanceof Unclosable ? dev : new Unclosable(dev), {
    format: 'qcow2',
    readOnly: false,
    context: files.context,
    bitmapsByCaller: true,
  })) as Qcow2Image
  const r = await editQcow2Bitmaps(img, call.name, call.ops)
  if (r.error) throw new Error(r.error)
}

async function prepare(c: BitmapCase): Promise<Uint8Array> {
  files = new MemFiles()
  const dev = new MemoryDevice(0, { name: 'img.qcow2' })
  await createOn(dev, SIZE, c.create, files)
  let img = await openOn(dev, files)
  await img.write(1000, pattern(1, 200 * K, 3))
  await img.close()
  let i = 0
  for (const s of c.setup) {
    await edit(dev, s)
    img = await openOn(dev, files) // the writer tracks the bitmaps: enabled ones gather bits
    await img.write((i + 1) * M + 333 * i, pattern(10 + i, 70 * K + i, 5 + i))
    await img.write(5 * M + 4 * K * i, pattern(20 + i, 3 * K, 2))
    await img.close()
    i++
  }
  let bytes = dev.snapshot()
  for (const n of c.inUse ?? []) bytes = setInUse(bytes, n)
  return bytes
}

/** what the image holds: guest bytes and bitmaps with bits */
async function stateOf(dev: BlockDevice): Promise<{ guest: string; bitmaps: string }> {
  const img = await readOnlyCopy(dev)
  try {
    const list = await readQcow2Bitmaps(img)
    const bitmaps = JSON.stringify(list.map((b) => [b.name, b.flags, b.granularity, b.bits ? md5(b.bits) : null]))
    return { guest: md5(await img.read(0, img.virtualSize)), bitmaps }
  } finally {
    await img.close()
  }
}

/** open a read-only copy of the device's bytes (nothing the open does may change the state under test) */
async function readOnlyCopy(dev: BlockDevice): Promise<Qcow2Image> {
  const bytes = (dev as unknown as { snapshot(): Uint8Array }).snapshot()
  const ro = new MemoryDevice(bytes, { name: 'img.qcow2', readOnly: true })
  return (await openImageOnDevice(ro, { format: 'qcow2', readOnly: true, context: files.context })) as Qcow2Image
}

let total = 0
const lines: string[] = []
afterAll(() => console.log(`[bitmap crash sweep] ${total} crash states\n  ${lines.join('\n  ')}`))

describe('bitmap: at every crash point the image holds the old or the new bitmaps, checks with at most leaks', () => {
  for (const c of CASES) {
    it(
      c.name,
      async () => {
        const base = await prepare(c)
        const before = await stateOf(new MemoryDevice(base, { name: 'img.qcow2' }))
        const dev = new CrashDevice(base, { name: 'img.qcow2' })
        await edit(dev, c.call)
        const done = dev.flushCount
        const afterDev = new MemoryDevice(dev.snapshot(), { name: 'img.qcow2' })
        const after = await stateOf(afterDev)
        expect(after.bitmaps, 'the call changed the bitmaps').not.toBe(before.bitmaps)
        expect(after.guest).toBe(before.guest)
        const a0 = await analyzeQcow2(afterDev)
        expect([a0.report.corruptions, a0.report.leaks, a0.report.checkErrors], 'after the call').toEqual([0, 0, 0])
        const dir = hasQemuImg ? makeTempDir('imgtool-bitmap-crash-') : ''
        let states = 0
        let leaky = 0
        let olds = 0
        for (const s of dev.allCrashStates(SWEEP)) {
          const where = `${c.name}: ${s.description}`
          states++
          const a = await analyzeQcow2(s.device)
          expect({ corruptions: a.report.corruptions, checkErrors: a.report.checkErrors }, `${where}\n${a.report.diagnostics.join('\n')}`).toEqual({
            corruptions: 0,
            checkErrors: 0,
          })
          if (a.report.leaks > 0) leaky++
          if (s.flushes >= done) expect(a.report.leaks, `${where}: the call had returned`).toBe(0)
          const st = await stateOf(s.device)
          expect(st.guest, `${where}: guest bytes`).toBe(before.guest)
          expect([before.bitmaps, after.bitmaps], `${where}: old or new bitmaps`).toContain(st.bitmaps)
          if (st.bitmaps === before.bitmaps) olds++
          if (hasQemuImg) {
            const path = join(dir, `s${states % 4}.qcow2`)
            writeFileSync(path, s.device.snapshot())
            const r = await qemuImg(['check', '--output=json', '-f', 'qcow2', path])
            const j = JSON.parse(r.stdout || '{}') as Record<string, number>
            expect({ code: r.code, corruptions: j['corruptions'] ?? 0 }, `${where}: qemu-img check\n${r.stdout}${r.stderr}`).toEqual({
              code: (j['leaks'] ?? 0) > 0 ? 3 : 0,
              corruptions: 0,
            })
            // a cluster allocated past the end of the file whose write did not land: qemu-img counts it as a leak, imgtool's check not
            expect(j['leaks'] ?? 0, `${where}: qemu-img counts at least imgtool's leaks`).toBeGreaterThanOrEqual(a.report.leaks)
          }
        }
        total += states
        lines.push(`${String(states).padStart(5)} states (${olds} old, ${leaky} leaky)  ${c.name}`)
        expect(olds).toBeGreaterThan(0)
        expect(states - olds).toBeGreaterThan(0)
      },
      LIMIT,
    )
  }
})

describe('bitmap: a failed write or flush leaves the old bitmaps (no leak) or the new ones', () => {
  for (const c of CASES) {
    for (const op of ['write', 'flush'] as const) {
      for (const errno of ['EIO', 'ENOSPC'] as const) {
        it(
          `${c.name}: every ${op} failing with ${errno}`,
          async () => {
            const base = await prepare(c)
            const before = await stateOf(new MemoryDevice(base, { name: 'img.qcow2' }))
            const ref = new MemoryDevice(base.slice(), { name: 'img.qcow2' })
            await edit(ref, c.call)
            const after = await stateOf(ref)
            let failed = 0
            const points = await sweepFaults(
              { op, errno },
              () => new MemoryDevice(base.slice(), { name: 'img.qcow2' }),
              (d) => edit(d, c.call),
              async (p) => {
                if (p.error !== undefined) {
                  failed++
                  expect(String(p.error)).toMatch(/EIO|ENOSPC|I\/O|space/)
                }
                const inner = p.device.inner as MemoryDevice
                const a = await analyzeQcow2(inner)
                const st = await stateOf(inner)
                expect(st.guest).toBe(before.guest)
                expect([before.bitmaps, after.bitmaps]).toContain(st.bitmaps)
                const leaksOk = st.bitmaps === after.bitmaps && p.error !== undefined
                expect([a.report.corruptions, leaksOk ? 0 : a.report.leaks, a.report.checkErrors], a.report.diagnostics.join('\n')).toEqual([0, 0, 0])
                if (p.error === undefined) expect(st.bitmaps).toBe(after.bitmaps)
              },
            )
            expect(points).toBeGreaterThan(0)
            expect(failed).toBeGreaterThan(0)
          },
          LIMIT,
        )
      }
    }
  }
})

/** the names in the bitmap directory the header points at ([] without a valid extension) */
async function directoryNames(dev: BlockDevice): Promise<string[]> {
  const h = await readHeader(dev, { file: 'img.qcow2', readOnly: true, forCheck: true })
  if (!h.bitmaps || (h.autoclearFeatures & 1n) === 0n) return []
  return (await readBitmapDirectory(dev, 'img.qcow2', h.bitmaps)).map((b) => b.name)
}

async function guestOf(dev: BlockDevice): Promise<string> {
  const img = await readOnlyCopy(dev)
  try {
    return md5(await img.read(0, img.virtualSize))
  } finally {
    await img.close()
  }
}

const REPAIRS: Array<{ name: string; create: Record<string, string>; damage: (b: Uint8Array) => Uint8Array; kept: string[] }> = [
  { name: 'an IN_USE bitmap dropped, one kept', create: {}, damage: (b) => setInUse(b, 0), kept: ['b'] },
  {
    name: 'a bitmap with an invalid table entry dropped (4 KiB clusters)',
    create: { cluster_size: '4096' },
    damage: (b) => breakTableEntry(b, 1),
    kept: ['a'],
  },
  { name: 'every bitmap in use: the extension goes', create: {}, damage: (b) => setInUse(setInUse(b, 0), 1), kept: [] },
]

describe('repair of broken bitmaps: at every crash point the damaged or the repaired bitmaps, no corruption', () => {
  for (const c of REPAIRS) {
    it(
      c.name,
      async () => {
        const base = c.damage(
          await prepare({
            name: c.name,
            create: c.create,
            setup: [
              { name: 'a', ops: [{ op: 'add' }] },
              { name: 'b', ops: [{ op: 'add', granularity: 4096 }] },
            ],
            call: { name: 'a', ops: [] },
          }),
        )
        const guest = await guestOf(new MemoryDevice(base, { name: 'img.qcow2' }))
        const a0 = await analyzeQcow2(new MemoryDevice(base, { name: 'img.qcow2' }))
        const dev = new CrashDevice(base, { name: 'img.qcow2' })
        const r = await repairQcow2Device(dev, { repair: 'all' })
        expect(r.actions.filter((x) => x.kind === 'drop-bitmap').length).toBe(2 - c.kept.length)
        const done = dev.flushCount
        const fixed = new MemoryDevice(dev.snapshot(), { name: 'img.qcow2' })
        expect(await directoryNames(fixed)).toEqual(c.kept)
        const a1 = await analyzeQcow2(fixed)
        expect([a1.report.corruptions, a1.report.leaks, a1.report.checkErrors], a1.report.diagnostics.join('\n')).toEqual([0, 0, 0])
        const dir = hasQemuImg ? makeTempDir('imgtool-bitmap-repair-crash-') : ''
        let states = 0
        let olds = 0
        for (const s of dev.allCrashStates(SWEEP)) {
          const where = `${c.name}: ${s.description}`
          states++
          const names = await directoryNames(s.device)
          const a = await analyzeQcow2(s.device)
          expect(await guestOf(s.device), `${where}: guest bytes`).toBe(guest)
          if (JSON.stringify(names) === JSON.stringify(c.kept) && c.kept.length !== 2) {
            expect([a.report.corruptions, a.report.checkErrors], `${where}: repaired\n${a.report.diagnostics.join('\n')}`).toEqual([0, 0])
            if (s.flushes >= done) expect(a.report.leaks, where).toBe(0)
            if (hasQemuImg) {
              const path = join(dir, `s${states % 4}.qcow2`)
              writeFileSync(path, s.device.snapshot())
              const q = await qemuImg(['check', '-f', 'qcow2', path])
              expect(q.code === 0 || q.code === 3, `${where}: qemu-img check\n${q.stdout}${q.stderr}`).toBe(true)
            }
          } else {
            olds++
            expect(names, `${where}: the damaged directory`).toEqual(['a', 'b'])
            expect([a.report.corruptions, a.report.checkErrors], `${where}: as damaged`).toEqual([a0.report.corruptions, a0.report.checkErrors])
          }
        }
        total += states
        lines.push(`${String(states).padStart(5)} states (${olds} damaged)  repair: ${c.name}`)
        expect(olds).toBeGreaterThan(0)
        expect(states - olds).toBeGreaterThan(0)
      },
      LIMIT,
    )
    for (const op of ['write', 'flush'] as const) {
      it(
        `${c.name}: every ${op} failing with EIO`,
        async () => {
          const base = c.damage(
            await prepare({
              name: c.name,
              create: c.create,
              setup: [
                { name: 'a', ops: [{ op: 'add' }] },
                { name: 'b', ops: [{ op: 'add', granularity: 4096 }] },
              ],
              call: { name: 'a', ops: [] },
            }),
          )
          const guest = await guestOf(new MemoryDevice(base, { name: 'img.qcow2' }))
          let failed = 0
          const n = await sweepFaults(
            { op },
            () => new MemoryDevice(base.slice(), { name: 'img.qcow2' }),
            (d) => repairQcow2Device(d, { repair: 'all' }).then(() => undefined),
            async (p) => {
              if (p.error !== undefined) failed++
              const inner = p.device.inner as MemoryDevice
              const names = await directoryNames(inner)
              expect([['a', 'b'], c.kept]).toContainEqual(names)
              expect(await guestOf(inner)).toBe(guest)
              const a = await analyzeQcow2(inner)
              if (JSON.stringify(names) === JSON.stringify(c.kept)) expect(a.report.corruptions, a.report.diagnostics.join('\n')).toBe(0)
              if (p.error === undefined) expect([a.report.corruptions, a.report.leaks, a.report.checkErrors]).toEqual([0, 0, 0])
            },
          )
          expect(n).toBeGreaterThan(0)
          expect(failed).toBeGreaterThan(0)
        },
        LIMIT,
      )
    }
  }
})
