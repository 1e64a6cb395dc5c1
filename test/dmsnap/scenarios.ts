/**
 * COW stores written by imgtool, built deterministically, each with the view we
 * expect the kernel to serve. The kernel-verdict test sends them all to the
 * oracle in one boot and records what the kernel said.
 */
import { MemoryDevice } from '../../src/io/memory-device.js'
import { Prng } from '../support/prng.js'
import { convertToCow, createStore, repairStore } from '../../src/formats/dmsnap/index.js'
import { md5, openStore, rawImage } from './helpers.js'
import { geometry, getRecord, removeRecord, setHeader, setRecord, truncateTo } from './damage.js'

export const ORIGIN_BYTES = 256 * 1024

export function makeOrigin(): Uint8Array {
  return new Prng(20240601).bytes(ORIGIN_BYTES)
}

export interface Scenario {
  name: string
  cow: Uint8Array
  /** md5 of the view the kernel must serve; null: the kernel must refuse I/O (Invalid) */
  viewMd5: string | null
  /** our status string, as info reports it */
  status: string
  /** the kernel must serve exactly the view it serves for this other store (a repair keeping the kernel's view) */
  sameViewAs?: string
}

async function statusOf(cow: Uint8Array, origin: Uint8Array): Promise<{ status: string; view: string | null }> {
  const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true })
  const status = String((await img.info()).formatSpecific!.data.status)
  const view = img.valid ? md5(await img.read(0, img.virtualSize)) : null
  return { status, view }
}

/** n random writes through the view (seeded), flushed every `flushEvery` writes */
export async function randomWrites(
  dev: MemoryDevice,
  origin: Uint8Array,
  seed: number,
  n: number,
  maxLen: number,
  onFull: 'invalidate' | 'refuse' = 'refuse',
): Promise<void> {
  const img = await openStore(dev, rawImage(origin), { onFull })
  const rng = new Prng(seed)
  for (let i = 0; i < n; i++) {
    const len = 512 * (1 + rng.int(maxLen / 512))
    const off = 512 * rng.int((ORIGIN_BYTES - len) / 512)
    try {
      await img.write(off, rng.bytes(len))
    } catch (e) {
      if ((e as { errno?: string }).errno !== 'ENOSPC') throw e
      if (!img.valid) return
    }
    if (i % 7 === 6) await img.flush()
  }
  await img.flush()
}

async function fresh(chunkBytes: number, cowBytes: number): Promise<MemoryDevice> {
  const dev = new MemoryDevice(0, { name: 'cow' })
  await createStore(dev, { chunkSectors: chunkBytes / 512, cowSize: cowBytes })
  return dev
}

async function written(
  chunkBytes: number,
  cowBytes: number,
  seed: number,
  n: number,
  maxLen: number,
  onFull: 'invalidate' | 'refuse' = 'refuse',
): Promise<Uint8Array> {
  const origin = makeOrigin()
  const dev = await fresh(chunkBytes, cowBytes)
  await randomWrites(dev, origin, seed, n, maxLen, onFull)
  return dev.snapshot()
}

async function repaired(cow: Uint8Array, mode: 'leaks' | 'all', flags: Record<string, boolean> = {}, mustTake?: string): Promise<Uint8Array> {
  const dev = new MemoryDevice(cow, { name: 'cow' })
  const res = await repairStore(dev, { repair: mode, originSize: ORIGIN_BYTES, flags })
  if (mustTake && !res.actions.some((a) => a.kind === mustTake))
    throw new Error(`scenario: the repair took no '${mustTake}' action: ${res.actions.map((a) => a.message).join('; ')}`)
  return dev.snapshot()
}

/** records in the table, and the first origin chunk no record maps */
function tableOf(cow: Uint8Array): { n: number; unmapped: number } {
  let n = 0
  const mapped = new Set<bigint>()
  while (getRecord(cow, n)[1] !== 0n) mapped.add(getRecord(cow, n++)[0])
  let unmapped = 0
  while (mapped.has(BigInt(unmapped))) unmapped++
  return { n, unmapped }
}

/** Every store the kernel is asked about, in a fixed order. */
export async function buildScenarios(): Promise<Scenario[]> {
  const origin = makeOrigin()
  const out: { name: string; cow: Uint8Array; sameViewAs?: string }[] = []
  const add = (name: string, cow: Uint8Array, sameViewAs?: string): void => void out.push(sameViewAs ? { name, cow, sameViewAs } : { name, cow })

  add('create-c8', (await fresh(4096, 64 * 1024)).snapshot())
  add('create-c32', (await fresh(16384, 256 * 1024)).snapshot())
  add('writes-c8', await written(4096, 192 * 1024, 1, 40, 8192))
  add('writes-c1-areas', await written(512, 160 * 1024, 2, 60, 2048))
  add('writes-c16', await written(8192, 256 * 1024, 3, 20, 16384))
  {
    // exactly one full area of 32 one-sector chunks
    const dev = await fresh(512, 20 * 1024)
    const img = await openStore(dev, rawImage(origin))
    for (let i = 0; i < 32; i++) await img.write(i * 2048, new Uint8Array(512).fill(i + 1))
    await img.flush()
    add('fullarea-c1', dev.snapshot())
  }
  add('full-c8-refused', await written(4096, 48 * 1024, 4, 40, 8192, 'refuse'))
  add('full-c8-invalidated', await written(4096, 48 * 1024, 4, 40, 8192, 'invalidate'))
  {
    const dev = new MemoryDevice(0, { name: 'cow' })
    const target = origin.slice()
    const rng = new Prng(5)
    for (let i = 0; i < 12; i++) target.set(rng.bytes(700), rng.int(ORIGIN_BYTES - 700))
    await convertToCow(rawImage(target, 'target'), rawImage(origin), dev, { chunkSize: 4096 })
    add('convert-c8', dev.snapshot())
  }
  {
    // origin writes (rewriting the origin's own bytes, so the origin stays the shared one) mixed with snapshot writes
    const dev = await fresh(4096, 96 * 1024)
    const odev = new MemoryDevice(origin, { name: 'origin' })
    const img = await openStore(dev, rawImage(odev))
    const rng = new Prng(8)
    for (let i = 0; i < 10; i++) {
      const off = 512 * rng.int((ORIGIN_BYTES - 6000) / 512)
      if (i % 2 === 0) await img.writeOrigin(off, origin.slice(off, off + 6000))
      else await img.write(off, rng.bytes(3000))
    }
    await img.flush()
    add('origin-writes-c8', dev.snapshot())
  }
  // damaged, then repaired
  const base = await written(4096, 192 * 1024, 6, 30, 8192)
  const n = (await openStore(new MemoryDevice(base), rawImage(origin), { readOnly: true })).records.length
  add('repair-leaks-c8', await repaired(removeRecord(removeRecord(base, 3, n), 10, n - 1), 'leaks'))
  {
    let d = setRecord(base, 2, 0, 1) // new chunk in area 0
    d = setRecord(d, 5, 9999, 5000) // new chunk beyond the end
    const [o4] = getRecord(d, 4)
    d = setRecord(d, 8, o4, getRecord(d, 8)[1]) // duplicate old chunk
    d = setRecord(d, n + 2, 7, 20) // garbage after the terminator
    add('repair-all-c8', await repaired(d, 'all'))
  }
  {
    let d = setRecord(base, 6, getRecord(base, 6)[0], getRecord(base, 3)[1]) // duplicate new chunk
    d = setRecord(d, 7, 100000, getRecord(d, 7)[1]) // old chunk beyond the origin
    d = setRecord(d, n, getRecord(d, 9)[0], getRecord(d, 9)[1]) // exact duplicate appended
    // the shared chunk is split, not dropped: the repaired store serves the damaged store's view, as the kernel reads it
    add('repair-all-dups-c8', await repaired(d, 'all', {}, 'split-shared-chunk'), 'damaged-all-dups-c8')
    add('damaged-all-dups-c8', d)
  }
  add('repair-forcevalid-c8', await repaired(setHeader(base, 'valid', 0), 'all', { forceValid: true }))
  {
    const full = out.find((s) => s.name === 'fullarea-c1')!.cow
    const g = geometry(full)
    add('repair-truncated-c1', await repaired(truncateTo(full, (1 + (g.perArea + 1)) * g.chunkBytes), 'all'))
  }
  // shared data chunks (duplicate new_chunk): split like the writer allocates, the kernel's view kept
  {
    // nothing leaks: the copy goes to the next free chunk
    const t = tableOf(base)
    const d = setRecord(base, t.n, t.unmapped, getRecord(base, 3)[1])
    add('damaged-split-end-c8', d)
    add('repair-split-end-c8', await repaired(d, 'all', {}, 'split-shared-chunk'), 'damaged-split-end-c8')
  }
  {
    // several areas: a record in area 3 shares a chunk of area 0 (its own chunk leaks), and an appended one too
    const w = out.find((s) => s.name === 'writes-c1-areas')!.cow
    let d = setRecord(w, 100, getRecord(w, 100)[0], getRecord(w, 5)[1])
    const t = tableOf(d)
    if (t.n % 32 === 31) throw new Error('scenario: the appended record would fill an area')
    d = setRecord(d, t.n, t.unmapped, getRecord(d, 40)[1])
    add('damaged-split-c1-areas', d)
    add('repair-split-c1-areas', await repaired(d, 'all', {}, 'split-shared-chunk'), 'damaged-split-c1-areas')
  }
  {
    // area 0 full: the next free chunk lies past area 1, which the allocation skips
    const full = out.find((s) => s.name === 'fullarea-c1')!.cow
    const t = tableOf(full)
    const d = setRecord(full, t.n, t.unmapped, getRecord(full, 3)[1])
    add('damaged-split-fullarea-c1', d)
    add('repair-split-fullarea-c1', await repaired(d, 'all', {}, 'split-shared-chunk'), 'damaged-split-fullarea-c1')
  }
  {
    // a full store: no chunk for a copy, so the later record is dropped (its origin chunk falls back to the origin)
    const full = out.find((s) => s.name === 'full-c8-refused')!.cow
    const t = tableOf(full)
    add('repair-split-full-c8', await repaired(setRecord(full, t.n, t.unmapped, getRecord(full, 0)[1]), 'all', {}, 'drop-record'))
  }
  const scenarios: Scenario[] = []
  for (const s of out) {
    const st = await statusOf(s.cow, origin)
    const sc: Scenario = { name: s.name, cow: s.cow, viewMd5: st.view, status: st.status }
    if (s.sameViewAs) sc.sameViewAs = s.sameViewAs
    scenarios.push(sc)
  }
  return scenarios
}
