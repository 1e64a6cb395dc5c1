/**
 * Issue rule 4 for reads: guest reads on an image open for writing share the
 * writer's mutex, so a read running alongside writes, discards and snapshot
 * deletes never returns bytes of a cluster that was freed and reused under
 * it. Every read returns either the region's old or its new content.
 */
import { describe, expect, it } from 'vitest'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { Prng } from '../support/prng.js'
import { MemFiles, Unclosable, checkCounts, createOn, openOn, pattern } from './helpers.js'

/** A device whose reads and writes finish after a random number of event-loop turns. */
class JitterDevice implements BlockDevice {
  /** called at every read and write, while it waits (tests observe the lock from inside the I/O) */
  onIo: () => void = () => undefined
  constructor(
    readonly inner: BlockDevice,
    private readonly rng: Prng,
  ) {}
  get size() {
    return this.inner.size
  }
  get readOnly() {
    return this.inner.readOnly
  }
  get name() {
    return this.inner.name
  }
  private async jitter(max: number): Promise<void> {
    for (let n = this.rng.int(max); n > 0; n--) {
      this.onIo()
      await new Promise((r) => setImmediate(r))
    }
  }
  async read(o: number, l: number, t?: string) {
    await this.jitter(t === 'data' ? 60 : 3)
    return this.inner.read(o, l, t)
  }
  async write(o: number, d: Uint8Array, t?: string) {
    await this.jitter(3)
    return this.inner.write(o, d, t)
  }
  flush() {
    return this.inner.flush()
  }
  truncate(s: number) {
    return this.inner.truncate(s)
  }
  async close() {}
}

const CS = 4096
const REGIONS = 64

function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))
}

describe('rule 4: reads during writes', () => {
  for (const [name, opts] of [
    ['refcount_bits 16', { cluster_size: String(CS) }],
    ['lazy refcounts', { cluster_size: String(CS), lazy_refcounts: 'on' }],
    ['extended L2', { cluster_size: String(CS * 8), extended_l2: 'on' }],
  ] as const) {
    it(`every read returns old or new data, never a third value (${name})`, async () => {
      const cs = Number(opts.cluster_size)
      const size = REGIONS * cs
      const base = new MemoryDevice(0, { name: 'r.qcow2' })
      const files = new MemFiles()
      await createOn(base, size, opts, files)
      const rng = new Prng(11)
      const img = await openOn(new JitterDevice(new Unclosable(base), rng), files)

      // before: regions 0..15 and 48..63 written, 16..47 unallocated; a snapshot shares them all
      const allowed: Uint8Array[][] = []
      for (let r = 0; r < REGIONS; r++) {
        const v = r >= 16 && r < 48 ? new Uint8Array(cs) : pattern(r * cs, cs, 1)
        if (r < 16 || r >= 48) await img.write(r * cs, v)
        allowed.push([v])
      }
      await createSnapshot(img, 'S')

      // concurrently with three reader loops: copy-on-write of 48..63 (the old clusters stay with
      // the snapshot), the snapshot delete (which frees them), then discards of 0..15, each followed
      // by writes to 16..47 that allocate, reusing what was just freed
      for (let r = 0; r < 16; r++) allowed[r]!.push(new Uint8Array(cs))
      for (let r = 16; r < REGIONS; r++) allowed[r]!.push(pattern(r * cs, cs, 3))
      const ops: Array<() => Promise<unknown>> = []
      let target = 0 // the region changed now: readers aim at it half the time
      for (let r = 48; r < REGIONS; r++) ops.push(() => ((target = r), img.write(r * cs, allowed[r]![1]!)))
      ops.push(() => deleteSnapshot(img, 'S'))
      for (let k = 0; k < 16; k++) {
        ops.push(() => ((target = k), img.writeZeroes(k * cs, cs, { discard: true })))
        ops.push(() => img.write((16 + 2 * k) * cs, allowed[16 + 2 * k]![1]!))
        ops.push(() => img.write((17 + 2 * k) * cs, allowed[17 + 2 * k]![1]!))
        if (k % 5 === 0) ops.push(() => img.flush())
      }
      let finished = false
      const writer = async () => {
        // two operations in flight at a time, so operations also queue behind each other
        const pending = new Set<Promise<unknown>>()
        for (const op of ops) {
          const p: Promise<unknown> = op().finally(() => pending.delete(p))
          pending.add(p)
          if (pending.size >= 2) await Promise.race(pending)
        }
        await Promise.all(pending)
        finished = true
      }
      const done: Array<{ region: number; n: number; got: Uint8Array }> = []
      const reader = async () => {
        while (!finished) {
          const n = 1 + rng.int(2)
          const region = Math.min(REGIONS - n, rng.int(2) === 0 ? target : rng.int(REGIONS))
          done.push({ region, n, got: await img.read(region * cs, n * cs) })
        }
      }
      await Promise.all([writer(), reader(), reader(), reader()])
      let checked = 0
      for (const { region, n, got } of done) {
        for (let i = 0; i < n; i++) {
          const piece = got.subarray(i * cs, (i + 1) * cs)
          const ok = allowed[region + i]!.some((v) => same(piece, v))
          expect(ok, `read of region ${region + i} returned neither its old nor its new content`).toBe(true)
          checked++
        }
      }
      expect(checked).toBeGreaterThan(16)
      // and afterwards: the new content everywhere
      for (let r = 0; r < REGIONS; r++) expect(same(await img.read(r * cs, cs), allowed[r]![allowed[r]!.length - 1]!)).toBe(true)
      await img.close()
      expect(await checkCounts(base)).toMatchObject({ corruptions: 0, leaks: 0 })
    })
  }

  it('reads share the lock with each other but wait for a write in progress', async () => {
    const base = new MemoryDevice(0, { name: 'l.qcow2' })
    const files = new MemFiles()
    await createOn(base, 1024 * 1024, { cluster_size: '4096' }, files)
    const jittery = new JitterDevice(new Unclosable(base), new Prng(3))
    const img = await openOn(jittery, files)
    const w = img.writer!
    let maxReaders = 0
    let readDuringWrite = false
    const probe = () => {
      maxReaders = Math.max(maxReaders, w.mutex.readers)
      if (w.mutex.readers > 0 && w.mutex.locked) readDuringWrite = true
    }
    const timer = setInterval(probe, 0)
    // observed from inside the device too: reads can overlap for less than a timer tick
    jittery.onIo = probe
    const jobs: Array<Promise<unknown>> = []
    for (let i = 0; i < 20; i++) {
      jobs.push(img.read(i * 4096, 8192).then(probe))
      jobs.push(img.read(i * 4096, 8192).then(probe))
      jobs.push(img.write(i * 8192, pattern(i, 6000)).then(probe))
    }
    await Promise.all(jobs)
    clearInterval(timer)
    expect(readDuringWrite).toBe(false)
    expect(maxReaders).toBeGreaterThan(1)
    await img.close()
  })

  it('extents of an image open for writing are mapped under the lock, window by window, and stay consistent', async () => {
    const cs = 512
    const size = 4 * 64 * cs // four L2 tables of 64 entries
    const base = new MemoryDevice(0, { name: 'x.qcow2' })
    const files = new MemFiles()
    await createOn(base, size, { cluster_size: String(cs) }, files)
    const img = await openOn(new JitterDevice(new Unclosable(base), new Prng(5)), files)
    const w = img.writer!
    // every mapping walk runs with the writer's lock held: shared (extents, reads) or exclusive (the writer)
    const mapper = img.mapper
    const map = mapper.map.bind(mapper)
    let unlocked = 0
    mapper.map = (o: number, l: number) => {
      if (w.mutex.readers === 0 && !w.mutex.locked) unlocked++
      return map(o, l)
    }
    const state = new Array<boolean>(size / cs).fill(false) // cluster written (true) or discarded
    const ops: Array<Promise<unknown>> = []
    const walks: Array<Array<{ start: number; length: number; data: boolean }>> = []
    for (let round = 0; round < 6; round++) {
      for (let c = round; c < size / cs; c += 3) {
        if ((c + round) % 2 === 0) {
          ops.push(img.write(c * cs, pattern(c * cs, cs, round + 1)))
          state[c] = true
        } else {
          ops.push(img.writeZeroes(c * cs, cs, { discard: true }))
          state[c] = false
        }
      }
      const seen: Array<{ start: number; length: number; data: boolean }> = []
      walks.push(seen)
      ops.push(
        (async () => {
          for await (const e of img.extents()) {
            seen.push({ start: e.start, length: e.length, data: e.data })
            // a write between two extents neither deadlocks nor breaks the walk
            if (seen.length === 2) await img.write(0, pattern(0, cs, 9))
          }
        })(),
      )
    }
    await Promise.all(ops)
    for (const seen of walks) {
      // every walk covers the image exactly once, in order
      let pos = 0
      for (const e of seen) {
        expect(e.start).toBe(pos)
        pos += e.length
      }
      expect(pos).toBe(size)
    }
    // and a walk after everything settled says what the writes did
    state[0] = true
    const final: boolean[] = []
    for await (const e of img.extents()) for (let c = e.start / cs; c < (e.start + e.length) / cs; c++) final.push(e.data)
    expect(final).toEqual(state)
    expect(unlocked).toBe(0)
    await img.close()
  })
})
