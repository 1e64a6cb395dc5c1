/**
 * VHD repair under power cuts and I/O errors. Each damage case is repaired
 * on a crash group (the image and its undo journal lose power together); at
 * every crash state:
 *  - the check's verdict is no worse than before the repair (corruptions and
 *    leaks each at most what they were);
 *  - the guest reads what it read before, block for block (or, when the image
 *    cannot be opened, its bytes are still the damaged ones: nothing changed);
 *  - undo from the journal as the crash left it puts back the damaged bytes
 *    exactly (or the journal holds no record and the image was not touched).
 * The fault sweep fails each write, flush and truncate of the image in turn:
 * the repair fails in one line, the verdict is no worse, the guest reads the
 * same, and the journal undoes it exactly.
 */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import type { RepairMode } from '../../src/check/types.js'
import { openImageOnDevice } from '../../src/open.js'
import { applyVhdUndo, checkVhd, createVhd, repairVhd } from '../../src/formats/vhd/index.js'
import { CrashGroup } from '../support/crash-group.js'
import { sweepFaults, type FaultOp } from '../support/faulty-device.js'

const BLOCK = 4096
const SIZE = 64 * 1024
const MiB = 1024 * 1024

/** A dynamic disk of 4 KiB blocks with four blocks written, and its guest bytes. */
async function cleanDisk(): Promise<{ bytes: Uint8Array; guest: Uint8Array }> {
  const dev = new MemoryDevice(new Uint8Array(0), { name: 'base.vhd' })
  await createVhd(dev, { size: SIZE, options: {} }, { blockSize: BLOCK })
  const img = await openImageOnDevice(dev, { format: 'vpc', readOnly: false })
  for (const [off, v] of [
    [0, 0x11],
    [5 * BLOCK + 512, 0x22],
    [9 * BLOCK, 0x33],
    [3 * BLOCK + 1024, 0x44],
  ] as const) {
    await img.write!(off, new Uint8Array(1024).fill(v))
  }
  await img.flush()
  const guest = await img.read(0, img.virtualSize)
  return { bytes: dev.snapshot(), guest }
}

const tail = (b: Uint8Array) => b.length - 512
const flip = (at: (b: Uint8Array) => number) => (b: Uint8Array) => {
  const c = b.slice()
  c[at(c)] = c[at(c)]! ^ 0x40
  return c
}
/** `n` bytes of junk before the footer copy: space no BAT entry reaches (a crashed allocation) */
const leak = (n: number) => (b: Uint8Array) => {
  const c = new Uint8Array(b.length + n)
  c.set(b.subarray(0, tail(b)))
  c.fill(0x5a, tail(b), tail(b) + n)
  c.set(b.subarray(tail(b)), tail(b) + n)
  return c
}
/** the footer copy with another timestamp and a checksum that matches it */
const restamp = (b: Uint8Array) => {
  const c = b.slice()
  const f = Buffer.from(c.buffer, c.byteOffset + tail(c), 512)
  f.writeUInt32BE(f.readUInt32BE(24) + 1, 24)
  f.writeUInt32BE(0, 64)
  let sum = 0
  for (const x of f) sum += x
  f.writeUInt32BE(~sum >>> 0, 64)
  return c
}
/** BAT entry `i` (of the disk cleanDisk makes: BAT at 1536) set to sector `v` */
const bat = (i: number, v: number) => (b: Uint8Array) => {
  const c = b.slice()
  new DataView(c.buffer, c.byteOffset).setUint32(1536 + 4 * i, v, false)
  return c
}
const both =
  (...fs: Array<(b: Uint8Array) => Uint8Array>) =>
  (b: Uint8Array) =>
    fs.reduce((x, f) => f(x), b)

interface Case {
  name: string
  damage: (b: Uint8Array) => Uint8Array
  mode: RepairMode
  /** the findings the repair leaves */
  leftCorruptions: number
  leftLeaks: number
  /** the damage changes what the guest reads (a block mapped over metadata): each block reads as before or as repaired */
  guestChanges?: boolean
}

const CASES: Case[] = [
  { name: 'footer at 0 with a bad checksum', damage: flip(() => 30), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'footer at 0 without its cookie (the image cannot be opened)', damage: flip(() => 0), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'footer copy differs', damage: flip((b) => tail(b) + 40), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'footer copy missing (zeroed)', damage: (b) => b.slice().fill(0, tail(b)), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'footer copy cut off the end', damage: (b) => b.slice(0, tail(b)), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'dynamic header checksum', damage: flip(() => 512 + 700), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'a leaked block (-r leaks)', damage: leak(BLOCK + 512), mode: 'leaks', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'a leaked block (-r all)', damage: leak(BLOCK + 512), mode: 'all', leftCorruptions: 0, leftLeaks: 0 },
  { name: 'a leak of 3 MiB (journalled in pieces)', damage: leak(3 * MiB), mode: 'leaks', leftCorruptions: 0, leftLeaks: 0 },
  {
    name: 'a leak and a header checksum (-r leaks frees the leak only)',
    damage: both(
      leak(2 * BLOCK),
      flip(() => 512 + 700),
    ),
    mode: 'leaks',
    leftCorruptions: 1,
    leftLeaks: 0,
  },
  {
    name: 'a leak and a header checksum (-r all)',
    damage: both(
      leak(2 * BLOCK),
      flip(() => 512 + 700),
    ),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
  },
  {
    name: 'both footers bad, and a leak (-r all: the footer rebuilt from both, proven by a stored checksum; the leak freed)',
    damage: both(
      leak(BLOCK),
      flip((b) => tail(b) + 40),
      flip(() => 30),
    ),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
  },
  {
    name: 'both footers bad alike (the same timestamp bit: rebuilt, checksum recomputed)',
    damage: both(
      flip((b) => tail(b) + 26),
      flip(() => 26),
    ),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
  },
  {
    name: 'both footers bad, the footer at 0 in its checksum field (rebuilt)',
    damage: both(
      flip((b) => tail(b) + 33),
      flip(() => 65),
    ),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
  },
  {
    name: 'a BAT entry mapping a block over the dynamic header (cleared)',
    damage: bat(7, 1),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
    guestChanges: true,
  },
  {
    name: 'two BAT entries over the BAT and the footer at 0, and a leak (both cleared, the leak freed)',
    damage: both(leak(BLOCK), bat(12, 3), bat(13, 0)),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
    guestChanges: true,
  },
  {
    name: 'a whole footer copy that differs (another timestamp), and a leak',
    damage: both(leak(BLOCK), restamp),
    mode: 'all',
    leftCorruptions: 0,
    leftLeaks: 0,
  },
  {
    name: 'a leak and a differing copy (-r leaks keeps the copy as it is)',
    damage: both(
      leak(BLOCK),
      flip((b) => tail(b) + 40),
    ),
    mode: 'leaks',
    leftCorruptions: 1,
    leftLeaks: 0,
  },
]

async function guestOf(dev: BlockDevice): Promise<Uint8Array | undefined> {
  // (a check-open reads through a footer whose checksum is wrong; one whose cookie is gone does not open)
  let img
  try {
    img = await openImageOnDevice(dev, { format: 'vpc', readOnly: true, forCheck: true })
    if (img.virtualSize === 0) return undefined
  } catch {
    return undefined
  }
  try {
    return await img.read(0, img.virtualSize)
  } finally {
    await img.close()
  }
}

const same = (a: Uint8Array, b: Uint8Array) => Buffer.from(a).equals(Buffer.from(b))
/** every block of `g` equals that block of `a` or of `b` */
const blockwise = (g: Uint8Array, a: Uint8Array, b: Uint8Array) => {
  for (let o = 0; o < g.length; o += BLOCK) {
    const x = g.subarray(o, o + BLOCK)
    if (!same(x, a.subarray(o, o + BLOCK)) && !same(x, b.subarray(o, o + BLOCK))) return false
  }
  return true
}

/** The invariants of one state the repair may leave (crash or failure). */
async function judge(
  image: MemoryDevice,
  journal: MemoryDevice,
  damaged: Uint8Array,
  guest: Uint8Array,
  before: { corruptions: number; leaks: number },
  was?: Uint8Array,
) {
  const bytes = image.snapshot()
  const rep = await checkVhd(new MemoryDevice(bytes.slice(), { name: 'state.vhd' }))
  expect(rep.corruptions, JSON.stringify(rep.findings)).toBeLessThanOrEqual(before.corruptions)
  expect(rep.leaks).toBeLessThanOrEqual(before.leaks)
  const g = await guestOf(new MemoryDevice(bytes.slice(), { name: 'state.vhd' }))
  if (g && was) expect(blockwise(g, guest, was), 'each block reads as it did or as the repair leaves it').toBe(true)
  else if (g) expect(same(g, guest), 'the guest reads what it read before').toBe(true)
  else expect(same(bytes, damaged), 'an image that does not open is untouched').toBe(true)
  const undone = new MemoryDevice(bytes.slice(), { name: 'undo.vhd' })
  let applied = true
  try {
    await applyVhdUndo(new MemoryDevice(journal.snapshot(), { name: 'j' }), undone, { allowUnsealed: true })
  } catch (e) {
    expect((e as Error).message).toMatch(/no complete record|does not start/)
    applied = false
  }
  if (!applied) expect(same(bytes, damaged), 'no journal record: the image is untouched').toBe(true)
  expect(same(undone.snapshot(), damaged), 'undo puts back the damaged bytes exactly').toBe(true)
}

describe('vpc repair: crash sweep over every repair path', () => {
  let totalStates = 0
  for (const c of CASES) {
    it(`${c.name}: every crash state no worse, guest intact, undo exact`, async () => {
      const { bytes, guest } = await cleanDisk()
      const damaged = c.damage(bytes)
      const before = await checkVhd(new MemoryDevice(damaged.slice(), { name: 'd.vhd' }))
      expect(before.corruptions + before.leaks).toBeGreaterThan(0)
      const was = c.guestChanges ? await guestOf(new MemoryDevice(damaged.slice(), { name: 'd.vhd' })) : undefined
      if (c.guestChanges) expect(same(was!, guest)).toBe(false)
      const group = new CrashGroup()
      const image = group.add('d.vhd', damaged)
      const journal = group.add('d.vhd.imgtool-undo', 0)
      const r = await repairVhd(image, { repair: c.mode, journal, journalPath: 'd.vhd.imgtool-undo' })
      expect(r.actions.length).toBeGreaterThan(0)
      expect([r.after.corruptions, r.after.leaks]).toEqual([c.leftCorruptions, c.leftLeaks])
      expect(r.before.corruptionsFixed + r.before.leaksFixed).toBeGreaterThan(0)
      // the repaired image reads as the clean one did, and so does qemu's view of its size
      expect(same((await guestOf(new MemoryDevice(await image.read(0, image.size))))!, guest)).toBe(true)
      let states = 0
      for (const s of group.allCrashStates({ subsets: true, torn: true, tornTail: true })) {
        states++
        try {
          await judge(s.devices[0]!, s.devices[1]!, damaged, guest, before, was)
        } catch (e) {
          throw new Error(`${s.description}: ${(e as Error).message}`, { cause: e })
        }
      }
      totalStates += states
      expect(states).toBeGreaterThan(3)
      // the sealed journal undoes the finished repair, with every check on
      const done = new MemoryDevice(await image.read(0, image.size), { name: 'd.vhd' })
      await applyVhdUndo(new MemoryDevice(await journal.read(0, journal.size), { name: 'j' }), done)
      expect(same(done.snapshot(), damaged)).toBe(true)
    })
  }

  it('a clean disk: repair writes nothing and keeps no journal record', async () => {
    const { bytes } = await cleanDisk()
    const group = new CrashGroup()
    const image = group.add('c.vhd', bytes)
    const journal = group.add('j', 0)
    const r = await repairVhd(image, { repair: 'all', journal })
    expect(r.actions).toEqual([])
    expect(group.events.filter((e) => e.kind !== 'flush')).toEqual([])
    expect(journal.size).toBe(0)
    expect(totalStates).toBeGreaterThan(CASES.length * 3)
  })

  it('the leak fix writes the new footer copy and flushes it before the cut', async () => {
    const { bytes } = await cleanDisk()
    const group = new CrashGroup()
    const image = group.add('l.vhd', leak(BLOCK)(bytes))
    const journal = group.add('j', 0)
    await repairVhd(image, { repair: 'leaks', journal })
    const ev = group.events.filter((e) => e.member === 0)
    const cut = ev.findIndex((e) => e.kind === 'truncate')
    const copy = ev.findIndex((e) => e.kind === 'write' && e.tag === 'footer')
    expect(copy).toBeGreaterThanOrEqual(0)
    expect(cut).toBeGreaterThan(copy)
    expect(ev.slice(copy, cut).some((e) => e.kind === 'flush')).toBe(true)
    // and the journal (the other member) was flushed before the image's first change
    const all = group.events
    const firstImageWrite = all.findIndex((e) => e.member === 0 && e.kind === 'write')
    expect(all.slice(0, firstImageWrite).some((e) => e.member === 1 && e.kind === 'flush')).toBe(true)
  })
})

describe('vpc repair: fault sweep', () => {
  for (const op of ['write', 'flush', 'truncate'] as FaultOp[]) {
    for (const c of [CASES[0]!, CASES[3]!, CASES[5]!, CASES[7]!, CASES[11]!, CASES[14]!, CASES[15]!, CASES[16]!]) {
      it(`every image ${op} failing (${c.name}): one-line error, no worse, undo exact`, async () => {
        const { bytes, guest } = await cleanDisk()
        const damaged = c.damage(bytes)
        const before = await checkVhd(new MemoryDevice(damaged.slice(), { name: 'd.vhd' }))
        const was = c.guestChanges ? await guestOf(new MemoryDevice(damaged.slice(), { name: 'd.vhd' })) : undefined
        let inner: MemoryDevice | undefined
        let journal: MemoryDevice | undefined
        const points = await sweepFaults(
          { op },
          () => (inner = new MemoryDevice(damaged.slice(), { name: 'd.vhd' })),
          async (dev) => {
            journal = new MemoryDevice(new Uint8Array(0), { name: 'j' })
            await repairVhd(dev, { repair: c.mode, journal, journalPath: 'j' })
          },
          async (p) => {
            if (p.triggered) {
              expect(p.error).toBeDefined()
              expect((p.error as Error).message.split('\n')).toHaveLength(1)
              expect((p.error as Error).message).toContain('d.vhd')
            }
            await judge(inner!, journal!, damaged, guest, before, was)
          },
        )
        if (op !== 'truncate') expect(points).toBeGreaterThan(0)
      })
    }
  }
})
