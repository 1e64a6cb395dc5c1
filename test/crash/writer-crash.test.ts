/**
 * Crash sweep of the qcow2 writer: every workload runs on a CrashDevice; for
 * every crash point (each write since the last flush, subsets and torn writes
 * included), the image that a power cut could leave is checked:
 * - our check (qemu-img check's algorithm) finds 0 corruptions;
 * - every byte that was flushed before the crash (and not rewritten since) reads back;
 * - our `repair -r leaks` leaves leaky states clean (every third one);
 * - qemu-img check agrees (0 corruptions) on a sample of states, and after
 *   `qemu-img check -r leaks` the leaky ones are clean;
 * and the image the workload left at its clean close has no leaks either.
 * A dirty image is first opened read-write, which repairs it, as QEMU does
 * on open; only lazy refcounts may leave one (snapshot operations are shadow
 * commits, judged as the crash left them).
 * An image with an external data file runs on a CrashGroup: the data file
 * loses its unflushed writes (all, some, torn) at the same crash point as the
 * image, and the flushed bytes are read back through the image from the data
 * file as the crash left it; qemu-img checks the pair side by side.
 */
import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, describe, expect, it } from 'vitest'
import { u32be, u64be } from '../../src/util/bytes.js'
import type { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { repairQcow2Device } from '../../src/formats/qcow2/repair/repair.js'
import { MemoryDevice as MemDev } from '../../src/io/memory-device.js'
import { CrashDevice } from '../support/crash-device.js'
import { CrashGroup } from '../support/crash-group.js'
import { hasQemuImg, REQUIRE_QEMU, makeTempDir, mapLimit, qemuImg, useTempDirs } from '../support/qemu.js'
import { openOn, Unclosable } from '../writer/helpers.js'
import { WORKLOADS, copyFiles, dataFileOf, prepareBase, runWorkload, type RunRecord, type Workload } from './workloads.js'

useTempDirs()

const OPTIONS = { subsets: true, torn: true, exhaustiveLimit: 8, randomSubsets: 16, maxTornPerWrite: 4, tornTail: true }
/** qemu-img checks per workload (leaky states first come, then every 17th state) */
const QEMU_PER_WORKLOAD = 6
let totalStates = 0
let leakyStates = 0
let repaired = 0
const perWorkload: string[] = []
/** sampled states, with the files that sit next to the image (data file, backing file) */
const qemuSample: Array<{ name: string; bytes: Uint8Array; beside: Array<{ name: string; bytes: Uint8Array }>; leaks: number }> = []

afterAll(() => {
  console.log(
    `[writer crash sweep] ${totalStates} crash states checked over ${WORKLOADS.length} workloads; ${repaired} leaky ones repaired clean by repair -r leaks; ${qemuSample.length} also checked by qemu-img\n  ${perWorkload.join('\n  ')}`,
  )
})

/** One crash image: the image file and, for an external data file, that file as the crash left it. */
interface Crashed {
  device: MemoryDevice
  data?: MemoryDevice
  flushes: number
  description: string
}

function expectedAt(rec: RunRecord, flushes: number): { content: Uint8Array; skip: Array<{ offset: number; length: number }> } {
  let cp = rec.checkpoints[0]!
  for (const c of rec.checkpoints) if (c.flushes <= flushes) cp = c
  return { content: cp.content, skip: rec.touched.slice(cp.touchedFrom) }
}

async function verify(state: Crashed, rec: RunRecord, w: Workload, quota: { taken: number }, sampleEvery: number): Promise<void> {
  const dev: MemoryDevice = state.device
  const dataName = dataFileOf(w)
  const files = dataName && state.data ? copyFiles(rec.files, { [dataName]: state.data }) : rec.files
  const head = await dev.read(0, 112)
  if (u32be(head, 0) !== 0x514649fb) {
    // create had not written its header yet: no image, nothing to check
    expect(state.flushes, 'the header is missing after create returned').toBeLessThan(rec.imageFrom)
    return
  }
  if ((u64be(head, 72) & 1n) !== 0n && u32be(head, 4) === 3) {
    expect(w.options['lazy_refcounts'], 'a dirty image without lazy refcounts').toBe('on')
    const img = await openOn(dev, files) // repairs
    await img.close()
  }
  const a = await analyzeQcow2(dev, state.data ? { dataDevice: state.data } : {})
  expect({ corruptions: a.report.corruptions, checkErrors: a.report.checkErrors }, a.report.diagnostics.join('\n')).toEqual({ corruptions: 0, checkErrors: 0 })
  // flushed bytes read back
  const { content, skip } = expectedAt(rec, state.flushes)
  const img = await openOn(dev, files, true)
  const n = Math.min(img.virtualSize, content.byteLength)
  const got = await img.read(0, n)
  const mask = new Uint8Array(n)
  for (const r of skip) mask.fill(1, Math.min(n, r.offset), Math.min(n, r.offset + r.length))
  for (let i = 0; i < n; i++) {
    if (mask[i] === 0 && got[i] !== content[i]) throw new Error(`flushed byte at guest 0x${i.toString(16)} reads ${got[i]}, expected ${content[i]}`)
  }
  // data_file_raw: the data file alone is the guest disk, flushed bytes included
  if (state.data && w.options['data_file_raw'] === 'on') {
    const raw = await state.data.read(0, n)
    for (let i = 0; i < n; i++) {
      if (mask[i] === 0 && raw[i] !== content[i]) throw new Error(`raw data file byte 0x${i.toString(16)} is ${raw[i]}, expected ${content[i]}`)
    }
  }
  // our repair -r leaks leaves a leaky state clean (every few leaky states)
  if (a.report.leaks > 0 && leakyStates % 3 === 0) {
    const copy = new MemDev(dev.snapshot(), { name: 'repair.qcow2' })
    const r = await repairQcow2Device(copy, { repair: 'leaks' })
    expect({ c: r.after.corruptions, l: r.after.leaks, e: r.after.checkErrors }, r.after.diagnostics?.join('\n')).toEqual({ c: 0, l: 0, e: 0 })
    repaired++
  }
  // a bounded sample for qemu-img, from every workload: some leaky states (to repair) and some others
  const leaky = a.report.leaks > 0 && leakyStates++ % 6 === 0
  if (quota.taken < QEMU_PER_WORKLOAD && (leaky || totalStates % sampleEvery === 0)) {
    quota.taken++
    qemuSample.push({
      name: `${w.name}: ${state.description}`,
      bytes: dev.snapshot(),
      beside: [
        ...(dataName && state.data ? [{ name: dataName, bytes: state.data.snapshot() }] : []),
        ...(w.backing ? [{ name: 'base.raw', bytes: w.backing }] : []),
      ],
      leaks: a.report.leaks,
    })
  }
}

/** A workload that ran to its clean close leaves an image without leaks or corruptions. */
async function expectCleanClose(w: Workload, image: Uint8Array, data?: Uint8Array): Promise<void> {
  const a = await analyzeQcow2(new MemDev(image, { name: 'img.qcow2' }), data ? { dataDevice: new MemDev(data, { name: 'img.data' }) } : {})
  expect(
    { corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors },
    `${w.name}: after close\n${a.report.diagnostics.join('\n')}`,
  ).toEqual({
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
  })
}

/** Run the workload on crash devices; every crash image of the run, in order. */
async function* crashImages(w: Workload): AsyncGenerator<{ state: Crashed; rec: RunRecord }> {
  const { base, files, expected } = await prepareBase(w)
  const options = { ...OPTIONS, ...(w.sweep ?? {}) }
  const dataName = dataFileOf(w)
  if (!dataName) {
    const dev = new CrashDevice(base, { name: 'img.qcow2' })
    const rec = await runWorkload(w, new Unclosable(dev), files, expected.slice(), () => dev.flushCount)
    await expectCleanClose(w, dev.snapshot())
    for (const s of dev.allCrashStates(options)) yield { state: s, rec }
    return
  }
  // the image and its data file lose power together
  const group = new CrashGroup()
  const dev = group.add('img.qcow2', base)
  const data = group.add(dataName, (files.files.get(dataName) as MemoryDevice).snapshot())
  const runFiles = copyFiles(files, { [dataName]: data })
  const rec = await runWorkload(w, new Unclosable(dev), runFiles, expected.slice(), () => group.flushCount)
  await expectCleanClose(w, await dev.read(0, dev.size), await data.read(0, data.size))
  for (const s of group.allCrashStates(options))
    yield { state: { device: s.devices[0]!, data: s.devices[1]!, flushes: s.flushes, description: s.description }, rec }
}

describe('qcow2 writer crash sweep', () => {
  for (const w of WORKLOADS) {
    it(`${w.name}: 0 corruptions and flushed data intact at every crash point`, async () => {
      const started = Date.now()
      const quota = { taken: 0 }
      let states = 0
      for await (const { state, rec } of crashImages(w)) {
        states++
        totalStates++
        try {
          await verify(state, rec, w, quota, 17)
        } catch (e) {
          throw new Error(`${w.name}: ${state.description}: ${(e as Error).message}`, { cause: e })
        }
      }
      perWorkload.push(`${String(states).padStart(5)} states (${quota.taken} for qemu-img) ${String(Date.now() - started).padStart(6)} ms  ${w.name}`)
      expect(states).toBeGreaterThan(3)
    })
  }

  it.skipIf(!hasQemuImg && !REQUIRE_QEMU)('qemu-img check agrees on sampled crash states, and -r leaks leaves them clean', async () => {
    const dir = makeTempDir('imgtool-crash-')
    const picks = qemuSample
    expect(picks.length).toBeGreaterThan(20)
    await mapLimit(picks, 2, async (s, i) => {
      // each state in its own directory, qemu-img run there: a data file or backing file sits next to its
      // image under its own name (qemu 7.2 opens a relative data_file name from its working directory)
      const sub = join(dir, `s${i}`)
      mkdirSync(sub)
      const path = join(sub, 'img.qcow2')
      writeFileSync(path, s.bytes)
      for (const f of s.beside) writeFileSync(join(sub, f.name), f.bytes)
      const r = await qemuImg(['check', '--output=json', '-f', 'qcow2', 'img.qcow2'], { cwd: sub })
      expect([0, 2, 3], `${s.name}: qemu-img check could not check the image\n${r.stderr}`).toContain(r.code)
      const j = JSON.parse(r.stdout || '{}') as Record<string, number>
      expect(j['filename'], `${s.name}: no JSON from qemu-img check\n${r.stderr}`).toBeDefined()
      expect(j['corruptions'] ?? 0, `${s.name}\n${r.stderr}`).toBe(0)
      expect(j['check-errors'] ?? 0, `${s.name}\n${r.stderr}`).toBe(0)
      if ((j['leaks'] ?? 0) > 0) {
        const fix = await qemuImg(['check', '-r', 'leaks', '-f', 'qcow2', 'img.qcow2'], { cwd: sub })
        expect(fix.code, `${s.name}\n${fix.stdout}${fix.stderr}`).toBe(0)
        const again = await qemuImg(['check', '-f', 'qcow2', 'img.qcow2'], { cwd: sub })
        expect(again.code, `${s.name}\n${again.stdout}${again.stderr}`).toBe(0)
      }
    })
  })
})
