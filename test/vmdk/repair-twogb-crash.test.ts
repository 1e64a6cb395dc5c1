/**
 * twoGbMaxExtentSparse repair under power cuts and I/O errors, on the image
 * qemu-img and qemu-io made, damaged per extent as in repair-twogb-cases.ts.
 * Each case is repaired on a crash group (the descriptor, both extent files
 * and both extent journals lose power together); at every crash state:
 *  - imgtool's check is no worse than before the repair (corruptions and
 *    check errors each at most what they were, no finding of a kind the
 *    damaged image did not have; leaked grains are allowed);
 *  - qemu-img check on the state's files exits as on the damaged image, and
 *    qemu-img compare finds the guest the damaged image had (each distinct
 *    state once); imgtool reads that guest too;
 *  - undo from each extent's journal as the crash left it puts that extent
 *    back exactly (or the journal holds no record and the extent was not
 *    touched); the descriptor file is never written.
 * The fault sweep fails each write, flush and truncate of each extent file
 * the repair writes, in turn (EIO and ENOSPC): the repair fails in one line
 * naming that file, and the same invariants hold on what it left.
 */
import { createHash } from 'node:crypto'
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { beforeAll, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { type CheckReport, type RepairMode, type RepairResult } from '../../src/check/types.js'
import { makeContext, openImageOnDevice } from '../../src/open.js'
import { applyVmdkUndo } from '../../src/formats/vmdk/index.js'
import { CrashGroup } from '../support/crash-group.js'
import { sweepFaults, type FaultErrno, type FaultOp } from '../support/faulty-device.js'
import { describeQemu, makeTempDir, md5, qemuImg, useTempDirs } from '../support/qemu.js'
import { EXTENTS, TWOGB_CASES, makeTwoGb, type ExtentName } from './repair-twogb-cases.js'

useTempDirs()

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b))
const NAME: Record<ExtentName, string> = { s001: 'd-s001.vmdk', s002: 'd-s002.vmdk' }
type Files = Record<ExtentName, Uint8Array>
/** hundreds of crash states, each run through qemu-img on a machine others share: a generous limit, not a timing */
const SLOW = 900_000

/** The image on devices: the descriptor `d.vmdk` and its extents by name (fresh memory devices unless given). */
async function openOn(descriptor: Uint8Array, extents: Record<ExtentName, Uint8Array | BlockDevice>, writable: boolean) {
  const devs = new Map<string, BlockDevice>()
  for (const x of EXTENTS) {
    const v = extents[x]
    devs.set(NAME[x], v instanceof Uint8Array ? new MemoryDevice(v.slice(), { name: NAME[x] }) : v)
  }
  const context = makeContext(async (path) => {
    const d = devs.get(path)
    if (!d) throw new Error(`no device ${path}`)
    return d
  })
  return openImageOnDevice(new MemoryDevice(descriptor.slice(), { name: 'd.vmdk' }), { format: 'vmdk', readOnly: !writable, forCheck: true, context })
}

async function checkOf(descriptor: Uint8Array, files: Files): Promise<CheckReport> {
  const img = await openOn(descriptor, files, false)
  try {
    return await img.check!()
  } finally {
    await img.close()
  }
}

/** the guest as imgtool reads it: a hash of every 4 KiB block holding a nonzero byte, with its offset */
async function guestOf(descriptor: Uint8Array, files: Files): Promise<string> {
  const img = await openOn(descriptor, files, false)
  try {
    const h = createHash('md5')
    for await (const e of img.extents()) {
      if (e.zero || !e.data) continue
      for (let at = e.start; at < e.start + e.length; at += 1 << 20) {
        const b = await img.read(at, Math.min(1 << 20, e.start + e.length - at))
        for (let k = 0; k < b.length; k += 4096) {
          const block = b.subarray(k, k + 4096)
          if (block.some((v) => v !== 0)) h.update(`${at + k}:`).update(block)
        }
      }
    }
    return h.digest('hex')
  } finally {
    await img.close()
  }
}

describeQemu('vmdk twoGbMaxExtentSparse repair: crash and fault sweeps, judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vmdk-repair-twogb-crash-')
  let descriptor: Uint8Array
  const base = {} as Files
  beforeAll(async () => {
    const path = join(dir, 'base', 'd.vmdk')
    mkdirSync(join(dir, 'base'))
    await makeTwoGb(path)
    descriptor = new Uint8Array(readFileSync(path))
    for (const x of EXTENTS) base[x] = new Uint8Array(readFileSync(join(dir, 'base', NAME[x])))
  })

  /** write the files of a state into `sub` */
  const put = (sub: string, files: Files) => {
    mkdirSync(join(dir, sub), { recursive: true })
    writeFileSync(join(dir, sub, 'd.vmdk'), descriptor)
    for (const x of EXTENTS) writeFileSync(join(dir, sub, NAME[x]), files[x])
    return join(dir, sub, 'd.vmdk')
  }

  /** qemu-img ARGS run to an exit code: a run killed by the time limit on a busy machine is run again (twice at most) */
  async function decisive(args: string[]) {
    let r = await qemuImg(args, { timeout: 300_000 })
    for (let i = 0; i < 2 && r.code === null; i++) r = await qemuImg(args, { timeout: 300_000 })
    return r
  }

  /** qemu-img's view of some files: check's exit code and whether compare finds the damaged image's guest; each distinct state once */
  const qemuSeen = new Map<string, { check: number; sameGuest: boolean; compare: string }>()
  async function qemuView(files: Files, damagedPath: string): Promise<{ check: number; sameGuest: boolean; compare: string }> {
    const key = `${damagedPath}:${md5(files.s001)}:${md5(files.s002)}`
    const known = qemuSeen.get(key)
    if (known) return known
    const path = put('state', files)
    const check = await decisive(['check', '-f', 'vmdk', path])
    const cmp = await decisive(['compare', '-f', 'vmdk', '-F', 'vmdk', damagedPath, path])
    const v = { check: check.code ?? -1, sameGuest: cmp.code === 0, compare: `${cmp.code}: ${cmp.stdout}${cmp.stderr}`.trim() }
    // only a verdict is remembered: a run killed on a busy machine (no exit code) is not, and fails here by itself
    if (check.code !== null && cmp.code !== null) qemuSeen.set(key, v)
    return v
  }

  interface Before {
    damaged: Files
    path: string
    report: CheckReport
    guest: string
    qemuCheck: number
  }

  async function before(name: string, damaged: Files): Promise<Before> {
    const path = put(`damaged-${name}`, damaged)
    return {
      damaged,
      path,
      report: await checkOf(descriptor, damaged),
      guest: await guestOf(descriptor, damaged),
      qemuCheck: (await decisive(['check', '-f', 'vmdk', path])).code ?? -1,
    }
  }

  async function judge(desc: Uint8Array, files: Files, journals: Files, b: Before): Promise<void> {
    expect(same(desc, descriptor), 'the descriptor file is never written').toBe(true)
    const rep = await checkOf(descriptor, files)
    expect(rep.corruptions, JSON.stringify(rep.findings)).toBeLessThanOrEqual(b.report.corruptions)
    const was = new Set(b.report.findings.map((f) => f.kind))
    for (const f of rep.findings) expect(was.has(f.kind), `a new finding: ${f.message}`).toBe(true)
    expect(rep.checkErrors).toBeLessThanOrEqual(b.report.checkErrors)
    const q = await qemuView(files, b.path)
    expect(q.check, 'qemu-img check as on the damaged image').toBe(b.qemuCheck)
    expect(q.sameGuest, `qemu-img compare: the guest of the damaged image (${q.compare})`).toBe(true)
    expect(await guestOf(descriptor, files), 'imgtool reads the guest it read before').toBe(b.guest)
    for (const x of EXTENTS) {
      const undone = new MemoryDevice(files[x].slice(), { name: NAME[x] })
      let applied = true
      try {
        await applyVmdkUndo(new MemoryDevice(journals[x].slice(), { name: 'j' }), undone, { allowUnsealed: true })
      } catch (e) {
        expect((e as Error).message).toMatch(/no complete record|does not start/)
        applied = false
      }
      if (!applied) expect(same(files[x], b.damaged[x]), `${x}: no journal record, the extent is untouched`).toBe(true)
      expect(same(undone.snapshot(), b.damaged[x]), `${x}: undo puts back the damaged bytes exactly`).toBe(true)
    }
  }

  /** repair the image on these devices, each extent's journal on the device given for it */
  async function repairOn(
    desc: BlockDevice,
    extents: Record<ExtentName, BlockDevice>,
    journals: Record<ExtentName, BlockDevice>,
    mode: RepairMode,
  ): Promise<RepairResult> {
    const devs = new Map<string, BlockDevice>(EXTENTS.map((x) => [NAME[x], extents[x]]))
    const context = makeContext(async (path) => devs.get(path)!)
    const img = await openImageOnDevice(desc, { format: 'vmdk', readOnly: false, forCheck: true, context })
    return img.repair!({
      repair: mode,
      journal: new MemoryDevice(new Uint8Array(0), { name: 'd.vmdk.imgtool-undo' }),
      journalPath: 'd.vmdk.imgtool-undo',
      extentJournal: async (file) => {
        const x = EXTENTS.find((k) => NAME[k] === file)!
        return { device: journals[x], path: `${file}.imgtool-undo` }
      },
    })
  }

  const damage = (c: (typeof TWOGB_CASES)[number]): Files => {
    const out = {} as Files
    for (const x of EXTENTS) out[x] = c.damage[x] ? c.damage[x](base[x]) : base[x]
    return out
  }

  let totalStates = 0
  TWOGB_CASES.forEach((c, n) => {
    it(
      `${c.name}: every crash state no worse, the guest as before, undo of each extent exact`,
      async () => {
        const damaged = damage(c)
        const b = await before(String(n), damaged)
        const group = new CrashGroup()
        const desc = group.add('d.vmdk', descriptor)
        const ext = { s001: group.add(NAME.s001, damaged.s001), s002: group.add(NAME.s002, damaged.s002) }
        const jr = { s001: group.add('j1', 0), s002: group.add('j2', 0) }
        const r = await repairOn(desc, ext, jr, c.mode)
        expect(r.actions.map((a) => a.kind).filter((k) => k !== 'undo-journal')).toEqual(c.kinds)
        let states = 0
        for (const s of group.allCrashStates({ subsets: true, torn: true, tornTail: true })) {
          states++
          const [d, s1, s2, j1, j2] = s.devices.map((x) => x.snapshot())
          try {
            await judge(d!, { s001: s1!, s002: s2! }, { s001: j1!, s002: j2! }, b)
          } catch (e) {
            throw new Error(`${s.description}: ${(e as Error).message}`, { cause: e })
          }
        }
        totalStates += states
        if (process.env['VMDK_REPAIR_STATS']) process.stderr.write(`states ${c.name}: ${states}, qemu-distinct so far ${qemuSeen.size}\n`)
        expect(states).toBeGreaterThan(2)
        // the sealed journals undo the finished repair, with every check on; an extent not written has none
        for (const x of EXTENTS) {
          if (!c.written.includes(x)) {
            expect(jr[x].size).toBe(0)
            continue
          }
          const done = new MemoryDevice(await ext[x].read(0, ext[x].size), { name: NAME[x] })
          await applyVmdkUndo(new MemoryDevice(await jr[x].read(0, jr[x].size), { name: 'j' }), done)
          expect(same(done.snapshot(), damaged[x])).toBe(true)
        }
        // each extent's journal is flushed before that extent's first change
        const all = group.events
        for (const x of c.written) {
          const m = x === 's001' ? 1 : 2
          const first = all.findIndex((e) => e.member === m && e.kind !== 'flush')
          expect(all.slice(0, first).some((e) => e.member === m + 2 && e.kind === 'flush')).toBe(true)
        }
      },
      SLOW,
    )
  })

  it('the sweeps covered the cases', () => {
    expect(totalStates).toBeGreaterThan(TWOGB_CASES.length * 2)
    if (process.env['VMDK_REPAIR_STATS']) process.stderr.write(`crash states in all: ${totalStates}\n`)
  })

  for (const errno of ['EIO', 'ENOSPC'] as FaultErrno[]) {
    for (const op of ['write', 'flush', 'truncate'] as FaultOp[]) {
      it(
        `every ${op} of an extent file failing with ${errno}: one-line error naming it, no worse, undo exact`,
        async () => {
          let points = 0
          for (const [n, c] of TWOGB_CASES.entries()) {
            const damaged = damage(c)
            const b = await before(String(n), damaged)
            for (const target of c.written) {
              let devs = {} as Record<ExtentName, MemoryDevice>
              let journals = {} as Record<ExtentName, MemoryDevice>
              const desc = new MemoryDevice(descriptor.slice(), { name: 'd.vmdk' })
              points += await sweepFaults(
                { op, errno },
                () => {
                  devs = {
                    s001: new MemoryDevice(damaged.s001.slice(), { name: NAME.s001 }),
                    s002: new MemoryDevice(damaged.s002.slice(), { name: NAME.s002 }),
                  }
                  journals = { s001: new MemoryDevice(new Uint8Array(0), { name: 'j1' }), s002: new MemoryDevice(new Uint8Array(0), { name: 'j2' }) }
                  return devs[target]
                },
                async (faulty) => {
                  await repairOn(desc, { ...devs, [target]: faulty }, journals, c.mode)
                },
                async (p) => {
                  if (p.triggered) {
                    expect(p.error).toBeDefined()
                    expect((p.error as Error).message.split('\n')).toHaveLength(1)
                    expect((p.error as Error).message).toContain(NAME[target])
                  }
                  await judge(
                    desc.snapshot(),
                    { s001: devs.s001.snapshot(), s002: devs.s002.snapshot() },
                    { s001: journals.s001.snapshot(), s002: journals.s002.snapshot() },
                    b,
                  )
                },
              )
            }
          }
          expect(points).toBeGreaterThan(0)
          if (process.env['VMDK_REPAIR_STATS']) process.stderr.write(`fault points ${op} ${errno}: ${points}\n`)
        },
        SLOW,
      )
    }
  }
})
