/**
 * VMDK repair under power cuts and I/O errors, on an image qemu-img and
 * qemu-io made, damaged as in repair-damage.ts. Each case is repaired on a
 * crash group (the image and its undo journal lose power together); at every
 * crash state:
 *  - imgtool's check is no worse than before the repair (corruptions and
 *    check errors each at most what they were, no finding of a kind the
 *    damaged image did not have, warnings included; leaked grains are
 *    allowed);
 *  - qemu-img check on the state's bytes exits as it did on the damaged image
 *    (each distinct state once);
 *  - the guest reads what qemu-img convert -O raw read from the damaged image;
 *  - undo from the journal as the crash left it puts back the damaged bytes
 *    exactly (or the journal holds no record and the image was not touched).
 * The fault sweep fails each write, flush and truncate of the image in turn
 * (EIO and ENOSPC): the repair fails in one line naming the file, and the
 * same invariants hold on what it left.
 */
import { createHash } from 'node:crypto'
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { checkExitCode, type CheckReport, type RepairMode, type RepairResult } from '../../src/check/types.js'
import { openImageOnDevice } from '../../src/open.js'
import { applyVmdkUndo } from '../../src/formats/vmdk/index.js'
import { CrashGroup } from '../support/crash-group.js'
import { sweepFaults, type FaultErrno, type FaultOp } from '../support/faulty-device.js'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { CASES } from './repair-damage.js'

useTempDirs()

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b))

async function checkOf(bytes: Uint8Array): Promise<CheckReport> {
  const img = await openImageOnDevice(new MemoryDevice(bytes.slice(), { name: 'state.vmdk' }), { format: 'vmdk', readOnly: true, forCheck: true })
  try {
    return await img.check!()
  } finally {
    await img.close()
  }
}

/** md5 of the guest as imgtool reads it, or undefined when the image does not open */
async function guestOf(bytes: Uint8Array): Promise<string | undefined> {
  let img
  try {
    img = await openImageOnDevice(new MemoryDevice(bytes.slice(), { name: 'state.vmdk' }), { format: 'vmdk', readOnly: true })
  } catch {
    return undefined
  }
  try {
    const h = createHash('md5')
    for (let at = 0; at < img.virtualSize; at += 1 << 20) h.update(await img.read(at, Math.min(1 << 20, img.virtualSize - at)))
    return h.digest('hex')
  } finally {
    await img.close()
  }
}

async function repairOn(dev: BlockDevice, mode: RepairMode, journal: BlockDevice): Promise<RepairResult> {
  const img = await openImageOnDevice(dev, { format: 'vmdk', readOnly: false, forCheck: true })
  return img.repair!({ repair: mode, journal, journalPath: 'd.vmdk.imgtool-undo' })
}

describeQemu('vmdk repair: crash and fault sweeps, judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vmdk-repair-crash-')
  let base: Uint8Array
  beforeAll(async () => {
    const path = join(dir, 'base.vmdk')
    await qemuImgOk(['create', '-q', '-f', 'vmdk', path, '40M'])
    await qemuIoOk(path, ['write -P 0x61 0 64k', 'write -P 0x62 64k 4k', 'write -P 0x63 33M 100k', 'write -P 0x64 5M 4k'], { format: 'vmdk' })
    base = new Uint8Array(readFileSync(path))
  })

  /** qemu-img's view of some bytes: check's exit code and the guest's md5, each distinct image once */
  const qemuSeen = new Map<string, { check: number; guest: string }>()
  async function qemuView(bytes: Uint8Array): Promise<{ check: number; guest: string }> {
    const key = md5(bytes)
    const known = qemuSeen.get(key)
    if (known) return known
    const path = join(dir, 'state.vmdk')
    const raw = join(dir, 'state.raw')
    writeFileSync(path, bytes)
    const check = (await qemuImg(['check', '-f', 'vmdk', path])).code ?? -1
    const conv = await qemuImg(['convert', '-f', 'vmdk', '-O', 'raw', path, raw])
    const v = { check, guest: conv.code === 0 ? md5(readFileSync(raw)) : `convert exit ${conv.code}` }
    qemuSeen.set(key, v)
    return v
  }

  interface Before {
    damaged: Uint8Array
    report: CheckReport
    qemu: { check: number; guest: string }
  }

  async function judge(bytes: Uint8Array, journal: Uint8Array, b: Before): Promise<void> {
    const rep = await checkOf(bytes)
    expect(rep.corruptions, JSON.stringify(rep.findings)).toBeLessThanOrEqual(b.report.corruptions)
    // warnings count nothing (qemu-img's verdicts), so they are judged by kind: no kind the damaged image lacked
    const was = new Set(b.report.findings.map((f) => f.kind))
    for (const f of rep.findings) expect(was.has(f.kind), `a new finding: ${f.message}`).toBe(true)
    expect(rep.checkErrors).toBeLessThanOrEqual(b.report.checkErrors)
    const q = await qemuView(bytes)
    expect(q.check, 'qemu-img check as on the damaged image').toBe(b.qemu.check)
    expect(q.guest, 'qemu-img reads the guest it read before').toBe(b.qemu.guest)
    const g = await guestOf(bytes)
    if (g !== undefined) expect(g, 'imgtool reads the guest qemu-img read before').toBe(b.qemu.guest)
    const undone = new MemoryDevice(bytes.slice(), { name: 'undo.vmdk' })
    let applied = true
    try {
      await applyVmdkUndo(new MemoryDevice(journal.slice(), { name: 'j' }), undone, { allowUnsealed: true })
    } catch (e) {
      expect((e as Error).message).toMatch(/no complete record|does not start/)
      applied = false
    }
    if (!applied) expect(same(bytes, b.damaged), 'no journal record: the image is untouched').toBe(true)
    expect(same(undone.snapshot(), b.damaged), 'undo puts back the damaged bytes exactly').toBe(true)
  }

  async function before(damaged: Uint8Array): Promise<Before> {
    return { damaged, report: await checkOf(damaged), qemu: await qemuView(damaged) }
  }

  let totalStates = 0
  for (const c of CASES) {
    it(`${c.name}: every crash state no worse, the guest as qemu-img read it, undo exact`, async () => {
      const damaged = c.damage(base)
      const b = await before(damaged)
      const group = new CrashGroup()
      const image = group.add('d.vmdk', damaged)
      const journal = group.add('d.vmdk.imgtool-undo', 0)
      const r = await repairOn(image, c.mode, journal)
      expect(r.actions.map((a) => a.kind)).toEqual(c.kinds)
      expect(checkExitCode(r.after)).toBe(c.after)
      // the kinds the repair fixed are gone from the check after it, warnings and notices included
      const after = [...r.after.findings, ...(r.after.notices ?? [])].map((f) => f.kind).filter((k) => k !== 'not-repaired')
      expect(new Set(after)).toEqual(new Set(c.left))
      let states = 0
      for (const s of group.allCrashStates({ subsets: true, torn: true, tornTail: true })) {
        states++
        try {
          await judge(s.devices[0]!.snapshot(), s.devices[1]!.snapshot(), b)
        } catch (e) {
          throw new Error(`${s.description}: ${(e as Error).message}`, { cause: e })
        }
      }
      totalStates += states
      if (process.env['VMDK_REPAIR_STATS']) process.stderr.write(`states ${c.name}: ${states}, qemu-distinct so far ${qemuSeen.size}\n`)
      if (c.kinds.length > 0) {
        expect(states).toBeGreaterThan(2)
        // the sealed journal undoes the finished repair, with every check on
        const done = new MemoryDevice(await image.read(0, image.size), { name: 'd.vmdk' })
        await applyVmdkUndo(new MemoryDevice(await journal.read(0, journal.size), { name: 'j' }), done)
        expect(same(done.snapshot(), damaged)).toBe(true)
      } else {
        expect(group.events.filter((e) => e.kind !== 'flush')).toEqual([])
      }
    })
  }

  it('tables are durable before the directory, the directory before the header, and the cut comes first', async () => {
    const moved = CASES.find((c) => c.kinds.includes('rgd-moved'))!
    const group = new CrashGroup()
    const image = group.add('d.vmdk', moved.damage(base))
    const journal = group.add('j', 0)
    await repairOn(image, 'all', journal)
    const ev = group.events.filter((e) => e.member === 0)
    const idx = (tag: string) => ev.findIndex((e) => e.kind === 'write' && e.tag === tag)
    const flushBetween = (a: number, b: number) => ev.slice(a, b).some((e) => e.kind === 'flush')
    expect(idx('l2')).toBeGreaterThanOrEqual(0)
    expect(idx('l1')).toBeGreaterThan(idx('l2'))
    expect(idx('header')).toBeGreaterThan(idx('l1'))
    expect(flushBetween(idx('l2'), idx('l1'))).toBe(true)
    expect(flushBetween(idx('l1'), idx('header'))).toBe(true)
    // the journal (the other member) was flushed before the image's first change
    const all = group.events
    const first = all.findIndex((e) => e.member === 0 && e.kind === 'write')
    expect(all.slice(0, first).some((e) => e.member === 1 && e.kind === 'flush')).toBe(true)
    // a cut and new tables: the cut is flushed before the tables are appended
    const cutCase = CASES.find((c) => c.kinds[0] === 'leak-freed' && c.kinds.includes('rgt-rewritten'))!
    const g2 = new CrashGroup()
    await repairOn(g2.add('e.vmdk', cutCase.damage(base)), 'all', g2.add('j', 0))
    const ev2 = g2.events.filter((e) => e.member === 0)
    const cut = ev2.findIndex((e) => e.kind === 'truncate')
    const write = ev2.findIndex((e) => e.kind === 'write')
    expect(cut).toBeGreaterThanOrEqual(0)
    expect(write).toBeGreaterThan(cut)
    expect(ev2.slice(cut, write).some((e) => e.kind === 'flush')).toBe(true)
    expect(totalStates).toBeGreaterThan(CASES.length * 2)
  })

  for (const errno of ['EIO', 'ENOSPC'] as FaultErrno[]) {
    for (const op of ['write', 'flush', 'truncate'] as FaultOp[]) {
      it(`every image ${op} failing with ${errno}: one-line error naming the file, no worse, undo exact`, async () => {
        let points = 0
        for (const c of CASES.filter((x) => x.kinds.length > 0)) {
          const damaged = c.damage(base)
          const b = await before(damaged)
          let inner: MemoryDevice | undefined
          let journal: MemoryDevice | undefined
          points += await sweepFaults(
            { op, errno },
            () => (inner = new MemoryDevice(damaged.slice(), { name: 'd.vmdk' })),
            async (dev) => {
              journal = new MemoryDevice(new Uint8Array(0), { name: 'j' })
              await repairOn(dev, c.mode, journal)
            },
            async (p) => {
              if (p.triggered) {
                expect(p.error).toBeDefined()
                expect((p.error as Error).message.split('\n')).toHaveLength(1)
                expect((p.error as Error).message).toContain('d.vmdk')
              }
              await judge(inner!.snapshot(), journal!.snapshot(), b)
            },
          )
        }
        expect(points).toBeGreaterThan(0)
        if (process.env['VMDK_REPAIR_STATS']) process.stderr.write(`fault points ${op} ${errno}: ${points}\n`)
      })
    }
  }
})
