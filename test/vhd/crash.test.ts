/**
 * The dynamic VHD writer under power cuts and I/O errors.
 *
 * Crash: at every crash point of a workload (prefixes, subsets of the
 * unflushed writes, torn writes), check finds no corruption, and every write
 * that was flushed reads back; a write that was not reads, sector by sector,
 * as before or as after (never anything else).
 * Faults: every write, flush and truncate failing in turn leaves an image
 * with no corruption and no leak, and every earlier write reads back.
 */
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { openImageOnDevice } from '../../src/open.js'
import { checkVhd, createVhd } from '../../src/formats/vhd/index.js'
import { sweepCrashes, type CrashState } from '../support/crash-device.js'
import { sweepFaults, type FaultOp } from '../support/faulty-device.js'
import { Prng } from '../support/prng.js'

const BLOCK = 4096
const SIZE = 64 * 1024

interface Op {
  offset: number
  data: Uint8Array
  /** flushes the device had completed once this write and its flush returned */
  durableAt: number
}

/** Writes over distinct ranges: new blocks, a block written twice, a write across two blocks, the last block. */
function plan(seed: number): Array<{ offset: number; data: Uint8Array }> {
  const rng = new Prng(seed)
  const fill = (n: number) => {
    const b = new Uint8Array(n)
    for (let i = 0; i < n; i++) b[i] = 1 + rng.int(255)
    return b
  }
  return [
    { offset: 0, data: fill(1024) },
    { offset: 5 * BLOCK + 512, data: fill(2048) },
    { offset: 1024, data: fill(512) }, // the same block again: in place
    { offset: 8 * BLOCK - 1024, data: fill(2048) }, // across two blocks
    { offset: SIZE - 512, data: fill(512) },
  ]
}

async function base(): Promise<Uint8Array> {
  const dev = new MemoryDevice(new Uint8Array(0), { name: 'base.vhd' })
  await createVhd(dev, { size: SIZE, options: {} }, { blockSize: BLOCK })
  return dev.snapshot()
}

async function runOps(device: BlockDevice, ops: Array<{ offset: number; data: Uint8Array }>, done: Op[], flushCount: () => number): Promise<void> {
  const img = await openImageOnDevice(device, { format: 'vpc', readOnly: false })
  for (const op of ops) {
    await img.write!(op.offset, op.data)
    await img.flush()
    done.push({ ...op, durableAt: flushCount() })
  }
}

async function verify(state: MemoryDevice, ops: Op[], flushes: number, allowLeaks: boolean): Promise<void> {
  const device = new MemoryDevice(state.snapshot(), { name: state.name })
  const report = await checkVhd(device)
  expect(report.findings.filter((f) => f.severity !== 'leak')).toEqual([])
  if (!allowLeaks) expect(report.leaks).toBe(0)
  const img = await openImageOnDevice(device, { format: 'vpc', readOnly: true })
  try {
    for (const op of ops) {
      const got = await img.read(op.offset, op.data.byteLength)
      if (op.durableAt <= flushes) {
        expect(Buffer.from(got).equals(Buffer.from(op.data)), `write at ${op.offset} (durable at flush ${op.durableAt}) reads back`).toBe(true)
        continue
      }
      for (let s = 0; s < got.byteLength; s += 512) {
        const sector = Buffer.from(got.subarray(s, s + 512))
        const ok = sector.equals(Buffer.from(op.data.subarray(s, s + 512))) || sector.every((b) => b === 0)
        expect(ok, `sector ${op.offset + s} of an unflushed write is old or new`).toBe(true)
      }
    }
  } finally {
    await img.close()
  }
}

describe('vpc writer: crash sweep', () => {
  it('at every crash point of five writes: no corruption, flushed writes read back', async () => {
    const ops = plan(1)
    const done: Op[] = []
    let states = 0
    let leaky = 0
    const r = await sweepCrashes(
      await base(),
      async (dev) => runOps(dev, ops, done, () => dev.flushCount),
      async (s: CrashState) => {
        states++
        const rep = await checkVhd(s.device)
        if (rep.leaks > 0) leaky++
        await verify(s.device, done, s.flushes, true)
      },
      { subsets: true, torn: true, tornTail: true },
    )
    expect(done).toHaveLength(ops.length)
    expect(r.states).toBe(states)
    // the order itself: before each BAT entry, a flush after every write into the block it maps
    // and after the footer copy that ends the file (a fresh block reads as zeros either way, so
    // the states above cannot see this on their own)
    const ev = r.device.events
    let batWrites = 0
    for (const e of ev) {
      if (e.kind !== 'write' || e.tag !== 'bat') continue
      batWrites++
      const block = new DataView(e.data.buffer, e.data.byteOffset, 4).getUint32(0, false) * 512
      const end = block + 512 + BLOCK
      let lastFlush = -1
      let lastInto = -1
      for (const x of ev) {
        if (x.seq >= e.seq) break
        if (x.kind === 'flush') lastFlush = x.seq
        if (x.kind === 'write' && x.offset < end + 512 && x.offset + x.data.byteLength > block) lastInto = x.seq
      }
      expect(lastInto, `a write into block ${block} before its BAT entry`).toBeGreaterThanOrEqual(0)
      expect(lastFlush, `flush between the block's last write (#${lastInto}) and its BAT entry (#${e.seq})`).toBeGreaterThan(lastInto)
    }
    expect(batWrites).toBe(5)
    expect(states).toBeGreaterThan(20)
    // an interrupted allocation is a leak: some states must show one, or the sweep saw nothing
    expect(leaky).toBeGreaterThan(0)
  })

  it('a block leaked by a crash is reused and zeroed, and that reuse is crash-safe too', async () => {
    // a crash state with a leak: the first allocation's footer step landed, nothing after
    const first = plan(2)
    let leakedBase: Uint8Array | undefined
    await sweepCrashes(
      await base(),
      async (dev) => runOps(dev, first.slice(0, 1), [], () => dev.flushCount),
      async (s) => {
        if (leakedBase) return
        const rep = await checkVhd(s.device)
        if (rep.leaks > 0 && rep.corruptions === 0) {
          // dirty the leaked space, so reuse without zeroing would show
          const bytes = await s.device.read(0, s.device.size)
          const tail = bytes.byteLength - 512
          for (let i = 2048; i < tail; i++) bytes[i] = 0x5a
          leakedBase = bytes
        }
      },
      { subsets: false },
    )
    expect(leakedBase).toBeDefined()
    const ops = [{ offset: 3 * BLOCK + 512, data: new Uint8Array(512).fill(7) }]
    const done: Op[] = []
    let states = 0
    await sweepCrashes(
      leakedBase!,
      async (dev) => runOps(dev, ops, done, () => dev.flushCount),
      async (s) => {
        states++
        await verify(s.device, done, s.flushes, true)
        const img = await openImageOnDevice(new MemoryDevice(s.device.snapshot()), { format: 'vpc', readOnly: true })
        try {
          const block = await img.read(3 * BLOCK, BLOCK)
          // the rest of the block reads as zeros (or the whole block is still unmapped)
          expect(block.subarray(0, 512).every((b) => b === 0)).toBe(true)
          expect(block.subarray(1024).every((b) => b === 0)).toBe(true)
        } finally {
          await img.close()
        }
      },
      { subsets: true, torn: true },
    )
    expect(states).toBeGreaterThan(5)
    // after the run, the leak is gone
    const final = await checkVhd(new MemoryDevice(done.length ? await lastImage(leakedBase!, ops) : leakedBase!))
    expect(final.leaks).toBe(0)
    expect(final.corruptions).toBe(0)
  })
})

async function lastImage(b: Uint8Array, ops: Array<{ offset: number; data: Uint8Array }>): Promise<Uint8Array> {
  const dev = new MemoryDevice(b.slice())
  await runOps(dev, ops, [], () => 0)
  return dev.read(0, dev.size)
}

describe('vpc writer: fault sweep', () => {
  for (const op of ['write', 'flush', 'truncate'] as FaultOp[]) {
    for (const errno of ['EIO', 'ENOSPC'] as const) {
      it(`every ${op} failing with ${errno}: the write fails, no corruption, no leak, earlier writes read back`, async () => {
        const ops = plan(3)
        const b = await base()
        let inner: MemoryDevice | undefined
        let done: Op[] = []
        const points = await sweepFaults(
          { op, errno },
          () => (inner = new MemoryDevice(b.slice(), { name: 'f.vhd' })),
          async (dev) => {
            done = []
            await runOps(dev, ops, done, () => 0)
          },
          async (p) => {
            if (p.triggered) expect(p.error).toBeDefined()
            await verify(inner!, done, 0, false)
          },
        )
        if (op !== 'truncate') expect(points).toBeGreaterThan(ops.length)
      })
    }
  }
})
