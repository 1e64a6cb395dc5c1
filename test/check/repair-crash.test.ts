/**
 * Crash and fault sweeps of repair itself. After a power cut at any point of a
 * repair (every prefix, subsets of unflushed writes, torn writes), the image
 * is no worse than the damaged one (no more corruptions, check errors or
 * leaks) and the journal, as it was durable at that moment, restores the
 * damaged bytes exactly. The same after EIO/ENOSPC on every write.
 */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { analyzeQcow2, CheckFailedError } from '../../src/formats/qcow2/check/check.js'
import { repairQcow2Device } from '../../src/formats/qcow2/repair/repair.js'
import { applyQcow2Undo } from '../../src/formats/qcow2/repair/journal.js'
import { CrashDevice } from '../support/crash-device.js'
import { sweepFaults } from '../support/faulty-device.js'
import { Qcow2Bytes } from '../support/damage.js'
import { fixture, fixtureBytes } from './fixtures.js'
import { inflateL1, inflateReftable } from './damages.js'

interface Case {
  fx: string
  name: string
  mode: 'leaks' | 'all'
  damage: (i: Qcow2Bytes) => unknown
}

const CASES: Case[] = [
  { fx: 'v3-c4k', name: 'leaks freed', mode: 'leaks', damage: (i) => i.leak(3) },
  { fx: 'v3-rc2', name: '40 leaks (2-bit refcounts)', mode: 'leaks', damage: (i) => i.leak(40) },
  { fx: 'v3-rc1', name: 'refcount 0 raised in place (1-bit refcounts)', mode: 'all', damage: (i) => i.setRefcount(i.firstData().cluster, 0) },
  { fx: 'v3-c4k', name: 'refcount structure rebuilt', mode: 'all', damage: (i) => i.breakReftableEntry('unaligned') },
  { fx: 'v3-c512', name: 'entry past EOF cleared, then refcounts', mode: 'all', damage: (i) => (i.dataPastEof(), i.leak(1)) },
  { fx: 'v3-snapshot', name: 'snapshot table rewritten (extra data too big)', mode: 'all', damage: (i) => i.snapshotExtraTooBig() },
  { fx: 'v2-c4k', name: 'OFLAG_COPIED fixed after a leak', mode: 'all', damage: (i) => i.setRefcount(i.firstData().cluster, 2) },
  { fx: 'v3-c4k', name: 'inflated refcount table trimmed', mode: 'all', damage: (i) => inflateReftable(i) },
  { fx: 'v3-c4k', name: 'inflated L1 table trimmed', mode: 'all', damage: (i) => inflateL1(i) },
  { fx: 'v3-c4k', name: 'data cluster on the refcount table copied', mode: 'all', damage: (i) => i.dataIntoReftable() },
  {
    fx: 'v3-c4k',
    name: 'unknown autoclear bit cleared first, then leaks freed',
    mode: 'leaks',
    damage: (i) => (i.putU64(88, BigInt(i.u64(88)) | (1n << 40n)), i.leak(2)),
  },
  {
    fx: 'v3-snapshot',
    name: 'snapshot table rewritten past a guest cluster mapped at the end of the file',
    mode: 'all',
    damage: (i) => (i.dataPastEof(0), i.snapshotExtraTooBig()),
  },
  {
    fx: 'v3-snapshot',
    name: 'dirty lazy-refcount image with -r leaks',
    mode: 'leaks',
    damage: (i) => {
      i.setDirty()
      i.setLazyRefcounts()
      for (const e of i.dataEntries().slice(0, 2)) i.setRefcount(e.cluster, 0)
    },
  },
]

async function verdict(bytes: Uint8Array): Promise<{ corruptions: number; leaks: number; checkErrors: number }> {
  try {
    return (await analyzeQcow2(new MemoryDevice(bytes))).report
  } catch (e) {
    if (e instanceof CheckFailedError) return { corruptions: Infinity, leaks: Infinity, checkErrors: Infinity }
    throw e
  }
}

/**
 * No new check errors where there were none. Where refcounts were unreadable
 * already (an unaligned refblock), a rebuild cut short may have appended
 * clusters past the old end, whose refcounts are unreadable the same way.
 */
function expectCheckErrors(now: number, base: number, bytes: Uint8Array, damaged: Uint8Array, what: string): void {
  if (base === 0) {
    expect(now, what).toBe(0)
    return
  }
  const cs = 2 ** new DataView(damaged.buffer, damaged.byteOffset).getUint32(20)
  const grown = Math.max(0, Math.ceil(bytes.byteLength / cs) - Math.ceil(damaged.byteLength / cs))
  expect(now, what).toBeLessThanOrEqual(base + grown)
}

/** a journal device that remembers its durable content at each flush, stamped with the image's event count */
class StampedJournal extends MemoryDevice {
  stamps: { atEvent: number; bytes: Uint8Array }[] = []
  constructor(private readonly image: () => number) {
    super(0, { name: 'journal' })
  }
  override async flush(): Promise<void> {
    await super.flush()
    this.stamps.push({ atEvent: this.image(), bytes: this.snapshot() })
  }
  at(point: number): Uint8Array | undefined {
    let j: Uint8Array | undefined
    for (const s of this.stamps) if (s.atEvent <= point) j = s.bytes
    return j
  }
}

describe('repair crash sweep', () => {
  for (const c of CASES) {
    it(`${c.fx}: ${c.name}: every crash state is no worse and the journal restores it`, async () => {
      const img = new Qcow2Bytes(fixtureBytes(fixture(c.fx)))
      c.damage(img)
      const damaged = img.bytes
      const base = await verdict(damaged)
      const dev = new CrashDevice(damaged)
      const journal = new StampedJournal(() => dev.events.length)
      const r = await repairQcow2Device(dev, { repair: c.mode, journal, journalPath: 'j' })
      expect(r.after.corruptions + r.after.leaks + r.after.checkErrors).toBe(0)
      let states = 0
      for (const s of dev.allCrashStates({ subsets: true, torn: true })) {
        states++
        const bytes = s.device.snapshot()
        const v = await verdict(bytes)
        expect(v.corruptions, s.description).toBeLessThanOrEqual(base.corruptions)
        expectCheckErrors(v.checkErrors, base.checkErrors, bytes, damaged, s.description)
        expect(v.leaks, s.description).toBeLessThanOrEqual(base.leaks + base.corruptions)
        const j = journal.at(s.point)
        if (!j) {
          expect(Buffer.from(bytes).equals(Buffer.from(damaged)), s.description).toBe(true)
          continue
        }
        await applyQcow2Undo(new MemoryDevice(j), s.device, { allowUnsealed: true })
        expect(Buffer.from(s.device.snapshot()).equals(Buffer.from(damaged)), `undo after ${s.description}`).toBe(true)
      }
      expect(states).toBeGreaterThan(1)
      console.log(`[repair crash sweep] ${c.fx} ${c.name}: ${states} crash states`)
    })
  }
})

describe('repair fault sweep (EIO / ENOSPC on every write)', () => {
  for (const c of CASES) {
    for (const errno of ['EIO', 'ENOSPC'] as const) {
      it(`${c.fx}: ${c.name}, ${errno}: the image is no worse and the journal restores it`, async () => {
        const img = new Qcow2Bytes(fixtureBytes(fixture(c.fx)))
        c.damage(img)
        const damaged = img.bytes
        const base = await verdict(damaged)
        let inner: MemoryDevice
        let journal: MemoryDevice
        const n = await sweepFaults(
          { op: 'write', errno },
          () => (inner = new MemoryDevice(damaged)) as BlockDevice,
          async (d) => {
            journal = new MemoryDevice(0, { name: 'journal' })
            await repairQcow2Device(d, { repair: c.mode, journal, journalPath: 'j' })
          },
          async (p) => {
            const bytes = inner.snapshot()
            const v = await verdict(bytes)
            expect(v.corruptions).toBeLessThanOrEqual(base.corruptions)
            expectCheckErrors(v.checkErrors, base.checkErrors, bytes, damaged, p.description)
            expect(v.leaks).toBeLessThanOrEqual(base.leaks + base.corruptions)
            if (p.triggered) expect(p.error).toBeDefined()
            if (journal.size > 0) {
              await applyQcow2Undo(journal, inner, { allowUnsealed: true })
              expect(Buffer.from(inner.snapshot()).equals(Buffer.from(damaged))).toBe(true)
            } else expect(Buffer.from(bytes).equals(Buffer.from(damaged))).toBe(true)
          },
        )
        expect(n).toBeGreaterThan(0)
      })
    }
  }
})
