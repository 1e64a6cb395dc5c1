/**
 * Crash and fault sweeps of every dm-snapshot writer path: view writes, merge and
 * repair. At every crash point (prefixes, subsets and torn versions of the unflushed
 * writes): 0 corruptions, 0 leaked chunks (in-order commit), flushed data intact.
 */
import { describe, expect, it } from 'vitest'
import { ImgtoolError } from '../../src/errors.js'
import type { BlockDevice, IoTag } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { RawImage } from '../../src/formats/raw/image.js'
import { checkStore, createStore, mergeStore, repairStore } from '../../src/formats/dmsnap/index.js'
import { CrashDevice, sweepCrashes } from '../support/crash-device.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { Prng } from '../support/prng.js'
import { loadFixture, md5, openStore, rawImage } from './helpers.js'
import { removeRecord, setRecord } from './damage.js'

/** A window [base, base+size) of another device: origin and COW share one crash timeline. */
class WindowDevice implements BlockDevice {
  readonly readOnly = false
  constructor(readonly inner: BlockDevice, readonly base: number, readonly size: number, readonly name: string) {}
  read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    return this.inner.read(this.base + offset, length, tag)
  }
  write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    if (offset + data.byteLength > this.size) throw new Error(`${this.name}: write beyond the window`)
    return this.inner.write(this.base + offset, data, tag)
  }
  flush(): Promise<void> {
    return this.inner.flush()
  }
  truncate(): Promise<void> {
    throw new Error('window devices do not truncate')
  }
  async close(): Promise<void> {}
}

const SECTOR = 512
const ORIGIN = new Prng(11).bytes(48 * 1024)
const CRASH = { subsets: true, torn: true } as const

/** a fresh 512-byte-chunk store (E=32) already holding 28 records, so the workload crosses into area 1 */
async function baseStore(): Promise<Uint8Array> {
  const dev = new MemoryDevice(0, { name: 'cow' })
  await createStore(dev, { chunkSectors: 1, cowSize: 48 * 512 })
  const img = await openStore(dev, rawImage(ORIGIN))
  for (let i = 0; i < 28; i++) await img.write(i * 1024, new Uint8Array(512).fill(i + 1))
  await img.flush()
  return dev.snapshot()
}

interface Plan {
  views: Uint8Array[] // views[k] = the view after k writes
  durable: { flushes: number; writes: number }[] // device flush count after each user flush
}

async function writerWorkload(dev: BlockDevice, plan?: Plan): Promise<void> {
  const img = await openStore(dev, rawImage(ORIGIN), { onFull: 'refuse' })
  const rng = new Prng(3)
  if (plan) plan.views.push(await img.read(0, ORIGIN.byteLength))
  for (let k = 1; k <= 9; k++) {
    const len = SECTOR * (1 + rng.int(3))
    const off = SECTOR * rng.int((ORIGIN.byteLength - len) / SECTOR)
    await img.write(off, rng.bytes(len))
    if (plan) plan.views.push(await img.read(0, ORIGIN.byteLength))
    if (k % 3 === 0) {
      await img.flush()
      if (plan && dev instanceof CrashDevice) plan.durable.push({ flushes: dev.flushCount, writes: k })
    }
  }
}

/** every sector of `view` equals that sector in one of views[from..] */
function assertSectorsFrom(view: Uint8Array, views: Uint8Array[], from: number): void {
  for (let s = 0; s < view.byteLength; s += SECTOR) {
    const got = md5(view.subarray(s, s + SECTOR))
    const ok = views.slice(from).some((v) => md5(v.subarray(s, s + SECTOR)) === got)
    expect(ok, `sector at ${s} matches no view from write ${from} on`).toBe(true)
  }
}

describe('dmsnap crash sweeps', () => {
  it('writer: 0 corruptions, 0 leaks, flushed data intact at every crash point', async () => {
    const plan: Plan = { views: [], durable: [] }
    const { states } = await sweepCrashes(
      await baseStore(),
      (dev) => writerWorkload(dev, plan),
      async (s) => {
        const r = await checkStore(s.device)
        expect(r.findings).toEqual([])
        const img = await openStore(s.device, rawImage(ORIGIN), { readOnly: true })
        const guaranteed = plan.durable.filter((d) => d.flushes <= s.flushes).pop()?.writes ?? 0
        assertSectorsFrom(await img.read(0, ORIGIN.byteLength), plan.views, guaranteed)
      },
      CRASH,
    )
    expect(states).toBeGreaterThan(100)
    console.log(`dmsnap writer crash sweep: ${states} crash states`)
  })

  for (const name of ['c1-fullarea', 'c8-basic']) {
    it(`merge of ${name}: the view never changes, and resuming finishes the merge`, async () => {
      const fx = loadFixture(name)
      const view = md5(await (await openStore(new MemoryDevice(fx.cow), rawImage(fx.origin), { readOnly: true })).read(0, fx.origin.byteLength))
      const O = fx.origin.byteLength
      const C = fx.cow.byteLength
      const split = (d: BlockDevice) => ({ origin: new WindowDevice(d, 0, O, 'origin'), cow: new WindowDevice(d, O, C, 'cow') })
      const base = new Uint8Array(O + C)
      base.set(fx.origin)
      base.set(fx.cow, O)
      let resumed = 0
      let seen = 0
      const { states } = await sweepCrashes(
        base,
        async (dev) => void (await mergeStore(split(dev).cow, new RawImage(split(dev).origin))),
        async (s) => {
          const { origin, cow } = split(s.device)
          const r = await checkStore(cow)
          expect(r.findings).toEqual([])
          const img = await openStore(cow, new RawImage(origin), { readOnly: true })
          expect(md5(await img.read(0, O))).toBe(view)
          if (seen++ % 3 === 0) {
            await mergeStore(cow, new RawImage(origin))
            expect(md5(await origin.read(0, O))).toBe(view)
            resumed++
          }
        },
        CRASH,
      )
      expect(states).toBeGreaterThan(10)
      expect(resumed).toBeGreaterThan(0)
      console.log(`dmsnap merge crash sweep (${name}): ${states} crash states, ${resumed} resumed`)
    })
  }

  it('repair -r leaks: no corruption and the same view at every crash point', async () => {
    const fx = loadFixture('c8-basic')
    const damaged = removeRecord(removeRecord(fx.cow, 1, 7), 3, 6)
    const view = md5(await (await openStore(new MemoryDevice(damaged), rawImage(fx.origin), { readOnly: true })).read(0, fx.origin.byteLength))
    const { states } = await sweepCrashes(
      damaged,
      async (dev) => void (await repairStore(dev, { repair: 'leaks' })),
      async (s) => {
        const r = await checkStore(s.device)
        expect(r.corruptions).toBe(0)
        expect(r.leaks).toBeLessThanOrEqual(2)
        const img = await openStore(s.device, rawImage(fx.origin), { readOnly: true })
        expect(md5(await img.read(0, fx.origin.byteLength))).toBe(view)
      },
      CRASH,
    )
    console.log(`dmsnap repair -r leaks crash sweep: ${states} crash states`)
  })

  it('repair -r all: never more corruption than before, no surviving record loses its data, and a rerun finishes', async () => {
    const fx = loadFixture('c8-basic')
    let d = setRecord(fx.cow, 1, 2, 40) // beyond the end
    d = setRecord(d, 4, 16, 6) // duplicate old chunk
    d = setRecord(d, 9, 500, 19) // garbage after the terminator
    const before = await checkStore(new MemoryDevice(d), { originSize: fx.origin.byteLength })
    const kept = new Map<number, string>()
    {
      const img = await openStore(new MemoryDevice(d), rawImage(fx.origin), { readOnly: true, forCheck: true })
      for (const old of [0, 3, 16, 65, 66]) kept.set(old, md5(await img.read(old * 4096, 4096)))
    }
    let seen = 0
    const { states } = await sweepCrashes(
      d,
      async (dev) => void (await repairStore(dev, { repair: 'all', originSize: fx.origin.byteLength })),
      async (s) => {
        const r = await checkStore(s.device, { originSize: fx.origin.byteLength })
        expect(r.corruptions).toBeLessThanOrEqual(before.corruptions)
        const img = await openStore(s.device, rawImage(fx.origin), { readOnly: true, forCheck: true })
        for (const [old, sum] of kept) expect(md5(await img.read(old * 4096, 4096)), `chunk ${old}`).toBe(sum)
        if (seen++ % 2 === 0) {
          const again = await repairStore(s.device, { repair: 'all', originSize: fx.origin.byteLength })
          expect(again.after.findings).toEqual([])
        }
      },
      CRASH,
    )
    console.log(`dmsnap repair -r all crash sweep: ${states} crash states`)
  })
})

describe('dmsnap fault sweep', () => {
  it('writer: after any failed read, write or flush, 0 corruptions and 0 leaks, and the store still opens', async () => {
    const base = await baseStore()
    const probe = new FaultyDevice(new MemoryDevice(base))
    await writerWorkload(probe)
    const counts = { ...probe.counts }
    let failures = 0
    for (const op of ['write', 'flush', 'read'] as const) {
      for (const errno of ['EIO', 'ENOSPC'] as const) {
        if (op !== 'write' && errno === 'ENOSPC') continue
        for (let nth = 1; nth <= counts[op]; nth++) {
          const inner = new MemoryDevice(base, { name: 'cow' })
          const dev = new FaultyDevice(inner, { rules: [{ op, nth, errno }] })
          try {
            await writerWorkload(dev)
          } catch (e) {
            expect(e).toBeInstanceOf(ImgtoolError)
            failures++
          }
          const r = await checkStore(inner)
          expect(r.findings, `${op} #${nth} ${errno}`).toEqual([])
          await openStore(inner, rawImage(ORIGIN), { readOnly: true })
        }
      }
    }
    expect(failures).toBeGreaterThan(20)
    console.log(`dmsnap writer fault sweep: ${counts.write} writes, ${counts.flush} flushes, ${counts.read} reads; ${failures} runs failed cleanly`)
  })

  it('merge and repair: after any failed write or flush, no corruption, the view kept, and a rerun finishes', async () => {
    const fx = loadFixture('c8-basic')
    const O = fx.origin.byteLength
    const view = md5(await (await openStore(new MemoryDevice(fx.cow), rawImage(fx.origin), { readOnly: true })).read(0, O))
    let runs = 0
    for (const op of ['write', 'flush'] as const) {
      for (let nth = 1; nth <= 12; nth++) {
        // merge: the fault hits the COW or the origin
        for (const side of ['cow', 'origin'] as const) {
          const cowDev = new MemoryDevice(fx.cow, { name: 'cow' })
          const oDev = new MemoryDevice(fx.origin, { name: 'origin' })
          const rule = [{ op, nth }]
          const cow = side === 'cow' ? new FaultyDevice(cowDev, { rules: rule }) : cowDev
          const origin = new RawImage(side === 'origin' ? new FaultyDevice(oDev, { rules: rule }) : oDev)
          await mergeStore(cow, origin).catch((e: unknown) => expect(e).toBeInstanceOf(ImgtoolError))
          expect((await checkStore(cowDev)).findings).toEqual([])
          const img = await openStore(cowDev, rawImage(oDev), { readOnly: true })
          expect(md5(await img.read(0, O)), `merge, ${side} ${op} #${nth}`).toBe(view)
          await mergeStore(cowDev, rawImage(oDev))
          expect(md5(oDev.snapshot())).toBe(view)
          runs++
        }
        // repair -r leaks
        const damaged = removeRecord(removeRecord(fx.cow, 1, 7), 3, 6)
        const inner = new MemoryDevice(damaged)
        await repairStore(new FaultyDevice(inner, { rules: [{ op, nth }] }), { repair: 'leaks' }).catch((e: unknown) => expect(e).toBeInstanceOf(ImgtoolError))
        expect((await checkStore(inner)).corruptions).toBe(0)
        expect((await repairStore(inner, { repair: 'leaks' })).after.findings).toEqual([])
        runs++
      }
    }
    console.log(`dmsnap merge/repair fault sweep: ${runs} runs`)
  })
})
