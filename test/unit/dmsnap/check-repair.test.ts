/**
 * Each finding kind, made by the damage library on a kernel-made store, detected
 * with the right chunk numbers; then repaired to a clean store that keeps the view
 * of every surviving record.
 */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { checkExitCode } from '../../../src/check/types.js'
import { applyUndoJournal } from '../../../src/formats/dmsnap/journal.js'
import { checkStore, repairStore } from '../../../src/formats/dmsnap/index.js'
import { loadFixture, md5, openStore, rawImage } from '../../dmsnap/helpers.js'
import { removeRecord, setHeader, setRecord, truncateTo, pokeBytes } from '../../dmsnap/damage.js'

// c8-basic: chunk 4 KiB, 32 COW chunks, records (0,2) (2,3) (3,4) (16,5) (64,6) (65,7) (66,8)
const { origin, cow } = loadFixture('c8-basic')
const ORIGIN = origin.byteLength

async function check(bytes: Uint8Array, withOrigin = true) {
  return checkStore(new MemoryDevice(bytes, { name: 'cow' }), withOrigin ? { originSize: ORIGIN } : {})
}
const kinds = (r: { findings: { kind: string }[] }): string[] => [...new Set(r.findings.map((f) => f.kind))].sort()

interface Case {
  name: string
  cow: () => Uint8Array
  kind: string
  expect: { cluster?: number; chunks?: number[]; newChunk?: number; oldChunk?: number; slot?: number; area?: number }
  also?: string[]
  exit: number
  /** repair -r all makes it clean */
  repairable: boolean
}

// a header the kernel refuses: the check cannot start, exit 1 (issue item 10; exit 2 before)
const CASES: Case[] = [
  {
    name: 'a record removed by hand leaks its chunk',
    cow: () => removeRecord(cow, 3, 7),
    kind: 'leaked-chunk',
    expect: { cluster: 5, chunks: [5] },
    exit: 3,
    repairable: true,
  },
  {
    name: 'new_chunk with high bits aliasing the header',
    cow: () => setRecord(cow, 1, 2, 1n << 56n),
    kind: 'new-chunk-header',
    expect: { cluster: 0, slot: 1 },
    also: ['leaked-chunk'],
    exit: 2,
    repairable: true,
  },
  {
    name: 'new_chunk with high bits set',
    cow: () => setRecord(cow, 1, 2, (1n << 56n) + 3n),
    kind: 'new-chunk-high-bits',
    expect: { cluster: 3, slot: 1 },
    also: ['leaked-chunk'],
    exit: 2,
    repairable: true,
  },
  {
    name: 'new_chunk pointing at metadata area 0',
    cow: () => setRecord(cow, 1, 2, 1),
    kind: 'new-chunk-in-metadata',
    expect: { newChunk: 1, oldChunk: 2, slot: 1 },
    also: ['leaked-chunk'],
    exit: 2,
    repairable: true,
  },
  {
    name: 'new_chunk beyond the end of the COW',
    cow: () => setRecord(cow, 6, 66, 40),
    kind: 'new-chunk-beyond-end',
    expect: { newChunk: 40, slot: 6 },
    also: ['leaked-chunk'],
    exit: 2,
    repairable: true,
  },
  {
    name: 'two origin chunks sharing one data chunk',
    cow: () => setRecord(cow, 4, 64, 5),
    kind: 'duplicate-new-chunk',
    expect: { newChunk: 5, oldChunk: 64 },
    also: ['leaked-chunk'],
    exit: 2,
    repairable: true,
  },
  {
    name: 'an origin chunk mapped twice',
    cow: () => setRecord(cow, 4, 16, 6),
    kind: 'duplicate-old-chunk',
    expect: { chunks: [5, 6], oldChunk: 16 },
    exit: 2,
    repairable: true,
  },
  {
    name: 'an exact duplicate record',
    cow: () => setRecord(cow, 7, 66, 8),
    kind: 'duplicate-record',
    expect: { newChunk: 8, slot: 7 },
    exit: 3,
    repairable: true,
  },
  {
    name: 'old_chunk beyond the origin',
    cow: () => setRecord(cow, 4, 500, 6),
    kind: 'old-chunk-beyond-origin',
    expect: { oldChunk: 500, newChunk: 6 },
    exit: 2,
    repairable: true,
  },
  {
    name: 'a record after the terminator',
    cow: () => setRecord(cow, 9, 500, 19),
    kind: 'garbage-after-terminator',
    expect: { cluster: 1, slot: 9, area: 0 },
    exit: 2,
    repairable: true,
  },
  { name: 'bad magic', cow: () => setHeader(cow, 'magic', 0x12345678), kind: 'bad-magic', expect: { cluster: 0 }, exit: 1, repairable: true },
  { name: 'bad version', cow: () => setHeader(cow, 'version', 2), kind: 'bad-version', expect: { cluster: 0 }, exit: 1, repairable: true },
  {
    name: 'chunk size not a power of two',
    cow: () => setHeader(cow, 'chunkSize', 12),
    kind: 'bad-chunk-size',
    expect: { cluster: 0 },
    exit: 1,
    repairable: false,
  },
  { name: 'chunk size zero', cow: () => setHeader(cow, 'chunkSize', 0), kind: 'bad-chunk-size', expect: { cluster: 0 }, exit: 1, repairable: false },
  { name: 'uninitialised store (magic 0)', cow: () => setHeader(cow, 'magic', 0), kind: 'uninitialised', expect: { cluster: 0 }, exit: 1, repairable: false },
  { name: 'invalidated store', cow: () => setHeader(cow, 'valid', 0), kind: 'invalidated', expect: { cluster: 0 }, exit: 2, repairable: false },
]

describe('dmsnap check: one finding kind at a time', () => {
  it('reports nothing on the kernel-made store', async () => {
    const r = await check(cow)
    expect(r.findings).toEqual([])
    expect(checkExitCode(r)).toBe(0)
  })

  for (const c of CASES) {
    it(`reports ${c.kind} for ${c.name}`, async () => {
      const r = await check(c.cow())
      expect(kinds(r)).toEqual([c.kind, ...(c.also ?? [])].sort())
      expect(r.findings.find((f) => f.kind === c.kind)).toMatchObject(c.expect)
      expect(checkExitCode(r)).toBe(c.exit)
    })
  }

  it('reports a truncated COW whose next area is missing, with its chunk', async () => {
    const full = loadFixture('c1-fullarea').cow // chunk 512 B, area 0 full, area 1 at chunk 34
    const r = await check(truncateTo(full, 34 * 512), false)
    expect(r.findings).toMatchObject([{ kind: 'truncated-cow', cluster: 34, area: 1, severity: 'corruption' }])
  })

  it('reports 2 leaked chunks after two records are removed', async () => {
    const r = await check(removeRecord(removeRecord(cow, 1, 7), 3, 6))
    expect(r.findings.filter((f) => f.kind === 'leaked-chunk').map((f) => f.cluster)).toEqual([3, 6])
    expect(r.leaks).toBe(2)
  })

  it('notices a full store without calling it corrupt', async () => {
    const r = await check(loadFixture('c8-full-po').cow, false)
    expect(r.findings).toEqual([])
    expect(r.notices!.map((n) => n.kind)).toContain('store-full')
  })

  it('notices a non-standard valid value and garbage in the header chunk', async () => {
    const r = await check(pokeBytes(setHeader(cow, 'valid', 2), 100, [1]))
    expect(r.findings).toEqual([])
    expect(r.notices!.map((n) => n.kind).sort()).toEqual(['header-tail-garbage', 'valid-nonstandard'])
  })
})

async function viewByChunk(bytes: Uint8Array): Promise<Map<number, string>> {
  const img = await openStore(new MemoryDevice(bytes), rawImage(origin), { readOnly: true, forCheck: true })
  const out = new Map<number, string>()
  for (const r of img.records) {
    if (out.has(r.old) || !img.layout!.fits(r.new) || img.layout!.isMetadata(r.new) || r.old * 4096 >= ORIGIN) continue
    out.set(r.old, md5(await img.read(r.old * 4096, 4096)))
  }
  return out
}

async function wholeView(bytes: Uint8Array, originBytes = origin): Promise<string> {
  const img = await openStore(new MemoryDevice(bytes), rawImage(originBytes), { readOnly: true })
  return md5(await img.read(0, originBytes.byteLength))
}

describe('dmsnap repair of a shared data chunk (duplicate new_chunk) keeps the view the kernel serves', () => {
  const repairAll = async (bytes: Uint8Array, originSize = ORIGIN) => {
    const dev = new MemoryDevice(bytes, { name: 'cow' })
    const res = await repairStore(dev, { repair: 'all', originSize })
    const img = await openStore(new MemoryDevice(dev.snapshot()), undefined, { readOnly: true })
    return { dev, res, records: img.records.map((r) => [r.old, r.new]), info: (await img.info()).formatSpecific!.data }
  }

  it('copies the shared chunk into a leaked chunk when there is one', async () => {
    // record 4 (64→6) now shares chunk 5 with record 3 (16→5); chunk 6 leaks
    const damaged = setRecord(cow, 4, 64, 5)
    const { dev, res, records } = await repairAll(damaged)
    expect(res.actions.map((a) => a.kind)).toEqual(['split-shared-chunk'])
    expect(res.actions[0]!.message).toMatch(/chunk 5 .* into free chunk 6 and repoint record 4 \(origin chunk 64\)/)
    expect(records).toEqual([
      [0, 2],
      [2, 3],
      [3, 4],
      [16, 5],
      [64, 6],
      [65, 7],
      [66, 8],
    ])
    expect(res.after.findings).toEqual([])
    expect(await wholeView(dev.snapshot())).toBe(await wholeView(damaged))
  })

  it('allocates like the writer when nothing leaks: the next free chunk', async () => {
    const damaged = setRecord(cow, 7, 70, 5) // a record appended that shares chunk 5
    const { dev, res, records, info } = await repairAll(damaged)
    expect(res.actions.map((a) => a.kind)).toEqual(['split-shared-chunk'])
    expect(records.at(-1)).toEqual([70, 9])
    expect(info['next-free-chunk']).toBe(10)
    expect(res.after.findings).toEqual([])
    expect(await wholeView(dev.snapshot())).toBe(await wholeView(damaged))
  })

  it('skips a metadata area when allocating, as the writer does', async () => {
    const fx = loadFixture('c1-fullarea') // chunk 512 B, area 0 full (chunks 2..33), area 1 at chunk 34, 40 chunks
    const damaged = setRecord(fx.cow, 32, 40, 5) // area 1 slot 0: origin chunk 40 shares chunk 5
    const { dev, res, records } = await repairAll(damaged, fx.origin.byteLength)
    expect(res.after.findings).toEqual([])
    expect(records.at(-1)).toEqual([40, 35])
    expect(await wholeView(dev.snapshot(), fx.origin)).toBe(await wholeView(damaged, fx.origin))
  })

  it('gives every later user of a chunk its own copy', async () => {
    const damaged = setRecord(setRecord(cow, 4, 64, 5), 5, 65, 5) // three records on chunk 5; 6 and 7 leak
    const { dev, res, records } = await repairAll(damaged)
    expect(res.actions.filter((a) => a.kind === 'split-shared-chunk')).toHaveLength(2)
    expect(new Set(records.map((r) => r[1])).size).toBe(7)
    expect(res.after.findings).toEqual([])
    expect(await wholeView(dev.snapshot())).toBe(await wholeView(damaged))
  })

  it('without any free chunk drops the later record, and says that its data is lost', async () => {
    const fx = loadFixture('c8-full-po') // 16 chunks, all used: no leak, no room
    const damaged = setRecord(fx.cow, 14, 30, 2) // origin chunk 30 shares chunk 2 with origin chunk 0
    const { dev, res, records } = await repairAll(damaged, fx.origin.byteLength)
    expect(res.actions).toHaveLength(1)
    expect(res.actions[0]).toMatchObject({ kind: 'drop-record' })
    expect(res.actions[0]!.message).toMatch(
      /record 14 \(30→2\): duplicate-new-chunk: no free chunk left .* origin chunk 30 falls back to the origin: its snapshot data is lost/,
    )
    expect(records).toHaveLength(14)
    expect(res.after.findings).toEqual([])
    const img = await openStore(new MemoryDevice(dev.snapshot()), rawImage(fx.origin), { readOnly: true })
    expect(md5(await img.read(30 * 4096, 4096))).toBe(md5(fx.origin.subarray(30 * 4096, 31 * 4096)))
  })

  it('plans the split on --dry-run without writing', async () => {
    const damaged = setRecord(cow, 7, 70, 5)
    const dev = new MemoryDevice(damaged)
    const res = await repairStore(dev, { repair: 'all', dryRun: true })
    expect(res.actions.map((a) => a.kind)).toEqual(['split-shared-chunk'])
    expect(md5(dev.snapshot())).toBe(md5(damaged))
  })

  it('is left alone by -r leaks (a corruption, not a leak)', async () => {
    const damaged = setRecord(cow, 7, 70, 5)
    const dev = new MemoryDevice(damaged)
    const res = await repairStore(dev, { repair: 'leaks' })
    expect(res.actions).toEqual([])
    expect(md5(dev.snapshot())).toBe(md5(damaged))
  })
})

describe('dmsnap repair', () => {
  for (const c of CASES) {
    it(`${c.repairable ? 'fixes' : 'leaves alone'} ${c.kind} (${c.name}) with -r all`, async () => {
      const damaged = c.cow()
      const dev = new MemoryDevice(damaged, { name: 'cow' })
      const res = await repairStore(dev, { repair: 'all', originSize: ORIGIN })
      if (!c.repairable) {
        expect(res.actions).toEqual([])
        expect(md5(dev.snapshot())).toBe(md5(damaged))
        return
      }
      expect(res.after.findings).toEqual([])
      expect(checkExitCode(res.after)).toBe(0)
      // every record that survives serves the data it served before the repair
      const before = await viewByChunk(damaged.slice(0, 16).every((b, i) => b === cow[i]) ? damaged : cow)
      const after = await viewByChunk(dev.snapshot())
      for (const [old, sum] of after) if (before.has(old)) expect(sum, `chunk ${old}`).toBe(before.get(old))
      // a shared chunk is split, not dropped: the whole view stays the kernel's
      if (c.kind === 'duplicate-new-chunk') expect(await wholeView(dev.snapshot())).toBe(await wholeView(damaged))
    })
  }

  it('reclaims leaks with -r leaks, keeping the view byte for byte', async () => {
    const damaged = removeRecord(removeRecord(cow, 1, 7), 3, 6)
    const viewBefore = md5(await (await openStore(new MemoryDevice(damaged), rawImage(origin), { readOnly: true })).read(0, ORIGIN))
    const dev = new MemoryDevice(damaged)
    const res = await repairStore(dev, { repair: 'leaks' })
    expect(res.before.leaks).toBe(2)
    expect(res.before.leaksFixed).toBe(2)
    expect(res.after.leaks + res.after.corruptions).toBe(0)
    const img = await openStore(new MemoryDevice(dev.snapshot()), rawImage(origin), { readOnly: true })
    expect(md5(await img.read(0, ORIGIN))).toBe(viewBefore)
    expect((await img.info()).formatSpecific!.data['next-free-chunk']).toBe(7)
  })

  it('does not re-validate an invalidated store unless forced, and then only when every record checks out', async () => {
    const inval = setHeader(cow, 'valid', 0)
    const dev = new MemoryDevice(inval)
    expect((await repairStore(dev, { repair: 'all' })).after.findings.map((f) => f.kind)).toEqual(['invalidated'])
    const forced = await repairStore(dev, { repair: 'all', flags: { forceValid: true } })
    expect(forced.after.findings).toEqual([])
    const bad = new MemoryDevice(setRecord(inval, 2, 3, 40))
    const refused = await repairStore(bad, { repair: 'all', flags: { forceValid: true } })
    expect(refused.actions).toEqual([])
    expect(refused.after.findings.map((f) => f.kind)).toContain('invalidated')
  })

  it('plans without writing on --dry-run', async () => {
    const damaged = setRecord(cow, 4, 16, 6)
    const dev = new MemoryDevice(damaged)
    const res = await repairStore(dev, { repair: 'all', dryRun: true })
    expect(res.dryRun).toBe(true)
    expect(res.actions.map((a) => a.kind)).toContain('drop-record')
    expect(md5(dev.snapshot())).toBe(md5(damaged))
  })

  it('writes an undo journal that puts the store back', async () => {
    const damaged = setRecord(setRecord(cow, 4, 16, 6), 9, 500, 19)
    const dev = new MemoryDevice(damaged)
    const journal = new MemoryDevice(0, { name: 'journal' })
    await repairStore(dev, { repair: 'all', journal })
    expect(md5(dev.snapshot())).not.toBe(md5(damaged))
    expect(await applyUndoJournal(journal, dev)).toBeGreaterThan(0)
    expect(md5(dev.snapshot())).toBe(md5(damaged))
  })

  describe('undo restores the exact bytes and size of the COW before the repair', () => {
    const full = loadFixture('c1-fullarea').cow
    const undoCases: { name: string; cow: () => Uint8Array; mode: 'leaks' | 'all'; flags?: Record<string, boolean> }[] = [
      ...CASES.map((c) => ({ name: `${c.kind} (${c.name})`, cow: c.cow, mode: 'all' as const })),
      { name: 'leaks reclaimed with -r leaks', cow: () => removeRecord(removeRecord(cow, 1, 7), 3, 6), mode: 'leaks' },
      { name: 'truncated COW, extended', cow: () => truncateTo(full, 34 * 512), mode: 'all' },
      { name: 'truncated COW not a whole chunk, extended', cow: () => truncateTo(full, 34 * 512 + 100), mode: 'all' },
      { name: 'shared chunk split at the next free chunk', cow: () => setRecord(cow, 7, 70, 5), mode: 'all' },
      { name: 'invalidated store, forced valid', cow: () => setHeader(cow, 'valid', 0), mode: 'all', flags: { forceValid: true } },
      { name: 'valid=2 and header tail garbage, normalised', cow: () => pokeBytes(setHeader(cow, 'valid', 2), 100, [1]), mode: 'all' },
      { name: 'several faults at once', cow: () => setRecord(setRecord(setRecord(setRecord(cow, 1, 2, 40), 4, 16, 6), 6, 66, 5), 9, 500, 19), mode: 'all' },
    ]
    for (const c of undoCases) {
      it(c.name, async () => {
        const damaged = c.cow()
        const dev = new MemoryDevice(damaged, { name: 'cow' })
        const journal = new MemoryDevice(0, { name: 'journal' })
        const res = await repairStore(dev, { repair: c.mode, originSize: ORIGIN, journal, flags: c.flags ?? {} })
        const changed = md5(dev.snapshot()) !== md5(damaged) || dev.size !== damaged.byteLength
        expect(changed).toBe(res.actions.length > 0)
        expect(journal.size > 0).toBe(changed)
        const applied = await applyUndoJournal(journal, dev)
        expect(applied > 0).toBe(changed)
        expect(dev.size).toBe(damaged.byteLength)
        expect(md5(dev.snapshot())).toBe(md5(damaged))
      })
    }
  })

  it('zeroes a terminator with an old_chunk before dropping records, so it never ends up as garbage after the new terminator', async () => {
    const damaged = setRecord(setRecord(cow, 7, 91, 0), 4, 16, 6) // terminator 91→0; record 4 duplicates origin chunk 16
    expect((await check(damaged)).notices!.map((n) => n.kind)).toContain('terminator-old-chunk')
    const dev = new MemoryDevice(damaged)
    const res = await repairStore(dev, { repair: 'all', originSize: ORIGIN })
    expect(res.actions.map((a) => a.kind)).toContain('zero-terminator')
    expect(res.after.findings).toEqual([])
    expect(res.after.notices!.map((n) => n.kind)).not.toContain('terminator-old-chunk')
  })

  it('extends a truncated COW and zeroes the missing area', async () => {
    const full = loadFixture('c1-fullarea')
    const dev = new MemoryDevice(truncateTo(full.cow, 34 * 512))
    const res = await repairStore(dev, { repair: 'all' })
    expect(res.after.findings).toEqual([])
    expect(dev.size).toBe(35 * 512)
    const img = await openStore(dev, rawImage(full.origin), { readOnly: true })
    expect(md5(await img.read(0, img.virtualSize))).toBe(full.manifest.observed.snapshot_md5_after_reload)
  })
})
