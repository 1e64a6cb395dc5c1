/**
 * The monolithicSparse writer under crashes and failed writes (write.ts:
 * grains at the end of the file, flushed, then the primary grain table
 * sectors, flushed, then the redundant ones, flushed), and the
 * streamOptimized writer under crashes (stream.ts).
 *
 * Sparse: at every crash state of guest writes, of create + convert, our
 * check reports no corruption (leaked grains and a redundant table behind its
 * primary are notices), and every write that returned reads back; every
 * other sector reads as before or after. A failed grain write is undone (no
 * leaked grain); a failed table write leaves at most leaked grains.
 * Stream: every crash state is refused by open or reads as the source.
 */
import { describe, expect, it } from 'vitest'
import { isImgtoolError } from '../../src/errors.js'
import { convert } from '../../src/convert/convert.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { makeContext, openImageOnDevice } from '../../src/open.js'
import { openFileDevice } from '../../src/io/file-device.js'
import { createVmdk, parseVmdkCreateOptions, writeStreamOptimized } from '../../src/formats/vmdk/index.js'
import { sweepCrashes } from '../support/crash-device.js'
import { sweepFaults } from '../support/faulty-device.js'
import { Prng } from '../support/prng.js'

const MiB = 1024 * 1024
const GRAIN = 65536
/** two grain tables (one covers 32 MiB) */
const SIZE = 40 * MiB

async function fresh(size = SIZE, options: Record<string, string> = {}): Promise<Uint8Array> {
  const dev = new MemoryDevice(0, { name: 'disk.vmdk' })
  await createVmdk(dev, makeContext(openFileDevice), { size, options })
  return dev.snapshot()
}

function open(dev: BlockDevice, writable: boolean): Promise<DiskImage> {
  return openImageOnDevice(dev, { format: 'vmdk', readOnly: !writable })
}

function fill(n: number, seed: number): Uint8Array {
  return new Prng(seed).bytes(n)
}

/** guest writes: new grains in both tables, partial grains, in place, across the table boundary, two at once */
const OPS: Array<Array<{ offset: number; data: Uint8Array }>> = [
  [{ offset: 100, data: fill(2 * GRAIN + 5000, 1) }],
  [{ offset: 33 * MiB + 5000, data: fill(70000, 2) }],
  [{ offset: GRAIN + 512, data: fill(1024, 3) }],
  [{ offset: 32 * MiB - 1000, data: fill(3000, 4) }],
  [
    { offset: 10 * GRAIN, data: fill(GRAIN, 5) },
    { offset: 12 * GRAIN + 77, data: fill(300, 6) },
  ],
]

/** the guest ranges the ops touch, sector-aligned, for comparing */
const RANGES = OPS.flat().map((w) => {
  const a = Math.floor(w.offset / 512) * 512
  return { offset: a, length: Math.ceil((w.offset + w.data.byteLength) / 512) * 512 - a }
})

async function readRanges(img: DiskImage): Promise<Uint8Array[]> {
  return Promise.all(RANGES.map((r) => img.read(r.offset, r.length)))
}

async function noCorruption(bytes: Uint8Array): Promise<{ notices: string[] }> {
  const img = await open(new MemoryDevice(bytes), false)
  try {
    const rep = await img.check!()
    expect(rep.findings.filter((f) => f.severity !== 'leak')).toEqual([])
    return { notices: (rep.notices ?? []).map((n) => n.kind) }
  } finally {
    await img.close()
  }
}

/** every sector of `got` equals the one of `a` or of `b` */
function sectorsFrom(got: Uint8Array[], a: Uint8Array[], b: Uint8Array[]): void {
  for (const [i, g] of got.entries()) {
    for (let o = 0; o < g.byteLength; o += 512) {
      const s = Buffer.from(g.subarray(o, o + 512))
      const ok = s.equals(Buffer.from(a[i]!.subarray(o, o + 512))) || s.equals(Buffer.from(b[i]!.subarray(o, o + 512)))
      expect(ok, `range ${i} (guest ${RANGES[i]!.offset + o})`).toBe(true)
    }
  }
}

describe('vmdk monolithicSparse writer: crash sweep', () => {
  it('guest writes: no corruption at any crash state; what was written reads back, the rest as before or after', async () => {
    const base = await fresh()
    const checkpoints: Array<{ flushes: number; content: Uint8Array[] }> = []
    const notices = new Set<string>()
    let states = 0
    await sweepCrashes(
      base,
      async (dev) => {
        const img = await open(dev, true)
        checkpoints.push({ flushes: dev.flushCount, content: await readRanges(img) })
        for (const op of OPS) {
          await Promise.all(op.map((w) => img.write!(w.offset, w.data)))
          // in-place writes (allocated grains) are durable at the flush, as a disk's
          await img.flush()
          checkpoints.push({ flushes: dev.flushCount, content: await readRanges(img) })
        }
        await img.close()
      },
      async (s) => {
        states++
        for (const n of (await noCorruption(s.device.snapshot())).notices) notices.add(n)
        let k = 0
        while (k + 1 < checkpoints.length && checkpoints[k + 1]!.flushes <= s.flushes) k++
        const img = await open(s.device, false)
        const got = await readRanges(img)
        await img.close()
        sectorsFrom(got, checkpoints[k]!.content, (checkpoints[k + 1] ?? checkpoints[k]!).content)
      },
      { subsets: true, torn: true, tornTail: true },
    )
    expect(states).toBeGreaterThan(60)
    // the sweep reached both kinds of crash residue
    expect([...notices].sort()).toEqual(['leaked-grain', 'rgt-behind'])
  })

  it('create + convert: before the header a state that open refuses; after, no corruption and every returned write reads back', async () => {
    const r = new Prng(7)
    const srcBytes = new Uint8Array(3 * MiB + 4096)
    for (let at = 0; at < srcBytes.byteLength; at += 16384) if (r.chance(0.5)) srcBytes.set(r.bytes(Math.min(16384, srcBytes.byteLength - at)), at)
    const source = await openImageOnDevice(new MemoryDevice(srcBytes, { readOnly: true }), { format: 'raw', readOnly: true })
    const returned: Array<{ flushes: number; offset: number; length: number }> = []
    let headerFlush = 0
    let states = 0
    let refused = 0
    await sweepCrashes(
      0,
      async (dev) => {
        await createVmdk(dev, makeContext(openFileDevice), { size: srcBytes.byteLength, options: { subformat: 'monolithicSparse' } })
        headerFlush = dev.flushCount
        const img = await open(dev, true)
        const write = img.write!.bind(img)
        img.write = async (offset, data) => {
          await write(offset, data)
          returned.push({ flushes: dev.flushCount, offset, length: data.byteLength })
        }
        await convert(source, img, { chunkSize: 256 * 1024 })
        await img.close()
      },
      async (s) => {
        states++
        let img: DiskImage
        try {
          img = await open(s.device, false)
        } catch (e) {
          // only before create's header is durable, and cleanly
          expect(isImgtoolError(e), String(e)).toBe(true)
          expect(s.flushes).toBeLessThan(headerFlush)
          refused++
          return
        }
        try {
          const rep = await img.check!()
          expect(rep.findings.filter((f) => f.severity !== 'leak')).toEqual([])
          const got = await img.read(0, srcBytes.byteLength)
          for (let o = 0; o < got.byteLength; o += 512) {
            const g = Buffer.from(got.subarray(o, o + 512))
            const want = Buffer.from(srcBytes.subarray(o, o + 512))
            const durable = returned.some((w) => w.flushes <= s.flushes && o >= w.offset && o < w.offset + w.length)
            if (durable) expect(g.equals(want), `sector at ${o}`).toBe(true)
            else expect(g.equals(want) || g.every((x) => x === 0), `sector at ${o}`).toBe(true)
          }
        } finally {
          await img.close()
        }
      },
      { subsets: true, torn: true },
    )
    expect(states).toBeGreaterThan(30)
    expect(refused).toBeGreaterThan(0)
    expect(returned.length).toBeGreaterThan(3)
  })
})

describe('vmdk monolithicSparse writer: fault sweep', () => {
  for (const tag of ['data', 'l2'] as const) {
    for (const errno of ['EIO', 'ENOSPC'] as const) {
      it(`${errno} on every ${tag} write: the error is reported, no corruption, earlier writes read back${tag === 'data' ? ', the grain undone' : ''}`, async () => {
        const base = await fresh()
        const expected: Uint8Array[][] = []
        {
          const img = await open(new MemoryDevice(base.slice()), true)
          expected.push(await readRanges(img))
          for (const op of OPS) {
            for (const w of op) await img.write!(w.offset, w.data)
            expected.push(await readRanges(img))
          }
          await img.close()
        }
        let completed = 0
        const points = await sweepFaults(
          { op: 'write', tag, errno },
          () => new MemoryDevice(base.slice(), { name: 'disk.vmdk' }),
          async (dev) => {
            completed = 0
            const img = await open(dev, true)
            try {
              for (const op of OPS) {
                for (const w of op) await img.write!(w.offset, w.data)
                completed++
              }
            } finally {
              await img.close()
            }
          },
          async (p) => {
            expect(p.triggered).toBe(true)
            expect(isImgtoolError(p.error), String(p.error)).toBe(true)
            expect((p.error as Error).message).toContain(errno)
            const bytes = (p.device.inner as MemoryDevice).snapshot()
            const { notices } = await noCorruption(bytes)
            // law 4: a grain whose write failed is cut off again
            if (tag === 'data') expect(notices).not.toContain('leaked-grain')
            const img = await open(new MemoryDevice(bytes), false)
            const got = await readRanges(img)
            await img.close()
            // every op before the failing one reads back; the failing one's sectors are old or new
            sectorsFrom(got, expected[completed]!, expected[completed + 1] ?? expected[completed]!)
            const before = expected[completed]!
            for (const [i, g] of got.entries()) {
              if (RANGES[i] && i < OPS.slice(0, completed).flat().length) expect(Buffer.from(g).equals(Buffer.from(before[i]!))).toBe(true)
            }
          },
        )
        expect(points).toBeGreaterThan(4)
      })
    }
  }
})

describe('vmdk create + convert: fault sweep', () => {
  for (const errno of ['EIO', 'ENOSPC'] as const) {
    it(`${errno} on every write of create + convert: an ImgtoolError; the file is refused cleanly or holds at most leaks`, async () => {
      const r = new Prng(8)
      const srcBytes = new Uint8Array(2 * MiB + 512)
      for (let at = 0; at < srcBytes.byteLength; at += 32768) if (r.chance(0.6)) srcBytes.set(r.bytes(Math.min(32768, srcBytes.byteLength - at)), at)
      const source = await openImageOnDevice(new MemoryDevice(srcBytes, { readOnly: true }), { format: 'raw', readOnly: true })
      let refused = 0
      const points = await sweepFaults(
        { op: 'write', errno },
        () => new MemoryDevice(0, { name: 'disk.vmdk' }),
        async (dev) => {
          await createVmdk(dev, makeContext(openFileDevice), { size: srcBytes.byteLength, options: {} })
          const img = await open(dev, true)
          try {
            await convert(source, img, { chunkSize: 256 * 1024 })
          } finally {
            await img.close()
          }
        },
        async (p) => {
          expect(isImgtoolError(p.error), String(p.error)).toBe(true)
          const bytes = (p.device.inner as MemoryDevice).snapshot()
          let img: DiskImage
          try {
            img = await open(new MemoryDevice(bytes), false)
          } catch (e) {
            // create failed before its header: nothing that looks like an image (the caller removes the file)
            expect(isImgtoolError(e), String(e)).toBe(true)
            refused++
            return
          }
          try {
            const rep = await img.check!()
            expect(rep.findings.filter((f) => f.severity !== 'leak')).toEqual([])
            // what is mapped is the source's; the rest reads as zeros
            const got = await img.read(0, srcBytes.byteLength)
            for (let o = 0; o < got.byteLength; o += 512) {
              const g = Buffer.from(got.subarray(o, o + 512))
              expect(g.equals(Buffer.from(srcBytes.subarray(o, o + 512))) || g.every((x) => x === 0), `sector at ${o}`).toBe(true)
            }
          } finally {
            await img.close()
          }
        },
      )
      expect(points).toBeGreaterThan(10)
      expect(refused).toBeGreaterThan(0)
    })
  }
})

describe('vmdk streamOptimized writer: crash sweep', () => {
  it('every crash state is refused by open (one ImgtoolError) or reads exactly as the source', async () => {
    const r = new Prng(9)
    const size = 2 * MiB + 1536
    const srcBytes = new Uint8Array(size)
    for (let at = 0; at < size; at += 8192) if (r.chance(0.6)) srcBytes.set(r.bytes(Math.min(8192, size - at)), at)
    const source = await openImageOnDevice(new MemoryDevice(srcBytes, { readOnly: true }), { format: 'raw', readOnly: true })
    const o = parseVmdkCreateOptions({ size, options: { subformat: 'streamOptimized' } })
    let states = 0
    let opened = 0
    await sweepCrashes(
      0,
      async (dev) => {
        let at = 0
        await writeStreamOptimized(
          source,
          {
            write: async (b) => {
              await dev.write(at, b, 'data')
              at += b.byteLength
            },
            flush: () => dev.flush(),
          },
          o,
          'disk.vmdk',
        )
        await dev.flush()
      },
      async (s) => {
        states++
        let img: DiskImage
        try {
          img = await open(s.device, false)
        } catch (e) {
          expect(isImgtoolError(e), String(e)).toBe(true)
          expect((e as Error).message.split('\n')).toHaveLength(1)
          return
        }
        opened++
        try {
          const got = await img.read(0, size)
          expect(Buffer.from(got).equals(Buffer.from(srcBytes))).toBe(true)
        } finally {
          await img.close()
        }
      },
      { subsets: true, torn: true, tornTail: true },
    )
    expect(states).toBeGreaterThan(10)
    expect(opened).toBeGreaterThan(0)
  })
})
