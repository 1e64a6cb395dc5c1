/**
 * Persistent dirty bitmaps on images written by imgtool, against QEMU 7.2:
 * images made by qemu-img create + qemu-img bitmap --add; the same guest
 * writes through imgtool and through qemu-io; the bits must be equal, the
 * flags QEMU's, qemu-img check clean, and qemu-img convert --bitmaps must
 * carry imgtool's bitmaps over (QEMU reading them with its own reader).
 * Then a crash sweep of open + writes + flush + writes + close.
 */
import { readFileSync, writeFileSync, copyFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { readHeader } from '../../src/formats/qcow2/spec/header.js'
import { BME_FLAG_IN_USE, decodeBitmapTableEntry, readBitmapDirectory } from '../../src/formats/qcow2/spec/bitmap-directory.js'
import { setBits } from '../../src/formats/qcow2/ops/bitmap-write.js'
import { CrashDevice } from '../support/crash-device.js'
import { FaultyDevice, type FaultOp } from '../support/faulty-device.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { checkCounts, openOn, pattern, Unclosable } from './helpers.js'

useTempDirs()

interface DumpedBitmap {
  name: string
  flags: number
  granularity: number
  tableOffset: number
  /** indices of the set bits */
  bits: number[]
}

/** The bitmaps of a qcow2 file as stored: directory, tables, data (all-ones entries included). */
async function dumpBitmaps(bytes: Uint8Array): Promise<DumpedBitmap[]> {
  const dev = new MemoryDevice(bytes, { name: 'dump.qcow2', readOnly: true })
  const h = await readHeader(dev, { file: 'dump.qcow2', readOnly: true, forCheck: true })
  if (!h.bitmaps || (h.autoclearFeatures & 1n) === 0n) return []
  const cs = h.clusterSize
  const out: DumpedBitmap[] = []
  for (const bm of await readBitmapDirectory(dev, 'dump.qcow2', h.bitmaps)) {
    const g = 2 ** bm.granularityBits
    const nbits = Math.ceil(h.size / g)
    const table = await dev.read(bm.tableOffset, bm.tableSize * 8)
    const bits: number[] = []
    for (let i = 0; i < bm.tableSize; i++) {
      const e = decodeBitmapTableEntry(table, i, cs)
      if (!e) throw new Error(`bitmap ${bm.name}: invalid table entry ${i}`)
      const data = e.offset !== 0 ? await dev.read(e.offset, cs) : new Uint8Array(cs).fill(e.allOnes ? 0xff : 0)
      for (let k = 0; k < cs; k++) {
        const byte = data[k]!
        if (byte === 0) continue
        for (let b = 0; b < 8; b++) {
          const n = (i * cs + k) * 8 + b
          if ((byte >> b) & 1 && n < nbits) bits.push(n)
        }
      }
    }
    out.push({ name: bm.name, flags: bm.flags, granularity: g, tableOffset: bm.tableOffset, bits })
  }
  return out
}

const withoutOffsets = (l: DumpedBitmap[]) => l.map(({ tableOffset: _t, ...rest }) => rest)

type Op = { kind: 'write' | 'zero' | 'discard'; offset: number; length: number; seed: number }

function randomOps(rng: Prng, size: number, n: number): Op[] {
  const ops: Op[] = []
  for (let i = 0; i < n; i++) {
    const r = rng.int(10)
    const kind = r < 6 ? 'write' : r < 8 ? 'zero' : 'discard'
    // byte-granular writes, some crossing many chunks, some one byte
    const length = rng.int(4) === 0 ? 1 + rng.int(16) : 1 + rng.int(rng.int(2) === 0 ? 9000 : 300_000)
    const offset = rng.int(size - length)
    ops.push({ kind, offset, length, seed: i + 1 })
  }
  return ops
}

/** qemu-io spelling of the same ops (write -z -u: zero writes that may unmap, as imgtool's discard option). */
function qemuIoCommands(ops: Op[]): string[] {
  return ops.map((o) =>
    o.kind === 'write'
      ? `write -P 0x5a ${o.offset} ${o.length}`
      : o.kind === 'zero'
        ? `write -z ${o.offset} ${o.length}`
        : `write -z -u ${o.offset} ${o.length}`,
  )
}

async function imgtoolOps(path: string, ops: Op[]): Promise<Uint8Array> {
  const dev = new MemoryDevice(readFileSync(path), { name: path })
  const img = await openOn(dev)
  expect(img.writerRefusal).toBeUndefined()
  for (const o of ops) {
    if (o.kind === 'write') await img.write(o.offset, new Uint8Array(o.length).fill(0x5a))
    else await img.writeZeroes(o.offset, o.length, { discard: o.kind === 'discard' })
  }
  await img.close()
  const out = dev.snapshot()
  writeFileSync(path, out)
  return out
}

async function makeBase(
  dir: string,
  name: string,
  clusterSize: number,
  size: number,
  bitmaps: Array<{ name: string; g?: number; disabled?: boolean }>,
): Promise<string> {
  const path = join(dir, name)
  await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, path, String(size)])
  for (const b of bitmaps) {
    await qemuImgOk(['bitmap', '--add', ...(b.g ? ['-g', String(b.g)] : []), ...(b.disabled ? ['--disable'] : []), path, b.name])
  }
  return path
}

describe('bitmap bits', () => {
  it('sets bit ranges LSB first, whole bytes at once, nothing outside the range', () => {
    const rng = new Prng(5)
    for (let k = 0; k < 300; k++) {
      const b = new Uint8Array(40)
      const first = rng.int(320)
      const last = first + rng.int(320 - first)
      setBits(b, first, last)
      for (let i = 0; i < 320; i++) expect(((b[i >> 3]! >> (i & 7)) & 1) === 1, `bit ${i} of [${first}, ${last}]`).toBe(i >= first && i <= last)
    }
  })
})

describeQemu('persistent bitmaps written by imgtool (vs qemu-io)', () => {
  const configs = [
    { cs: 4096, size: 40 * 1024 * 1024, seed: 1 },
    { cs: 65536, size: 24 * 1024 * 1024 + 3 * 512, seed: 2 },
    { cs: 512, size: 3 * 1024 * 1024, seed: 3 },
  ]
  for (const c of configs) {
    it(`cluster ${c.cs}, ${c.size} bytes: the same bits, flags and data as QEMU for the same writes`, async () => {
      const dir = makeTempDir('imgtool-bitmaps-')
      const base = await makeBase(dir, 'base.qcow2', c.cs, c.size, [
        { name: 'b-default' },
        { name: 'b-512', g: 512 },
        { name: 'b-1m', g: 1024 * 1024 },
        { name: 'b-off', g: 65536, disabled: true },
      ])
      // bits already set before imgtool opens it (loaded, then kept)
      await qemuIoOk(base, ['write -P 1 0 4096', `write -P 2 ${c.size - 700} 700`])
      const before = await dumpBitmaps(readFileSync(base))
      expect(before.find((b) => b.name === 'b-512')!.bits.length).toBeGreaterThan(0)
      const ours = join(dir, 'ours.qcow2')
      const theirs = join(dir, 'theirs.qcow2')
      copyFileSync(base, ours)
      copyFileSync(base, theirs)
      const ops = randomOps(new Prng(c.seed), c.size, 40)
      const bytes = await imgtoolOps(ours, ops)
      await qemuIoOk(theirs, qemuIoCommands(ops))

      const got = await dumpBitmaps(bytes)
      const want = await dumpBitmaps(readFileSync(theirs))
      expect(withoutOffsets(got)).toEqual(withoutOffsets(want))
      // the disabled bitmap did not change; the enabled ones did
      expect(got.find((b) => b.name === 'b-off')!.bits).toEqual(before.find((b) => b.name === 'b-off')!.bits)
      expect(got.find((b) => b.name === 'b-512')!.bits.length).toBeGreaterThan(before.find((b) => b.name === 'b-512')!.bits.length)
      expect(got.map((b) => b.flags)).toEqual([2, 2, 2, 0])

      // checks: ours and qemu-img's, clean
      expect(await checkCounts(new MemoryDevice(bytes))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const chk = await qemuImg(['check', '-f', 'qcow2', ours])
      expect(chk.code, chk.stdout + chk.stderr).toBe(0)
      // same guest content
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'qcow2', ours, theirs])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      // QEMU reads imgtool's bitmaps with its own reader and writes them out again
      const conv = join(dir, 'conv.qcow2')
      await qemuImgOk(['convert', '--bitmaps', '-f', 'qcow2', '-O', 'qcow2', '-o', `cluster_size=${c.cs}`, ours, conv])
      expect(withoutOffsets(await dumpBitmaps(readFileSync(conv)))).toEqual(withoutOffsets(want))
      // and merges one into another
      await qemuImgOk(['bitmap', '--merge', 'b-1m', '-b', ours, '-F', 'qcow2', theirs, 'b-off'])
      const info = JSON.parse(await qemuImgOk(['info', '--output=json', ours])) as {
        'format-specific': { data: { bitmaps: Array<{ name: string; flags: string[] }> } }
      }
      expect(info['format-specific'].data.bitmaps.map((b) => b.flags)).toEqual([['auto'], ['auto'], ['auto'], []])
    })
  }

  for (const delta of [3 * 1024 * 1024 + 512, 36 * 1024 * 1024, -1024 * 1024]) {
    it(`resize by ${delta} bytes: bitmaps resized as qemu-img resize does (new area clean, cut bits dropped)`, async () => {
      const dir = makeTempDir('imgtool-bitmaps-')
      const size = 4 * 1024 * 1024
      const base = await makeBase(dir, 'base.qcow2', 4096, size, [
        { name: 'a', g: 512 },
        { name: 'b', g: 65536, disabled: true },
      ])
      // data only in the part both sizes keep (shrinking needs the cut part unallocated); bits near the end
      await qemuIoOk(base, ['write -P 1 0 4096', 'write -P 2 2000000 3000', `write -z ${size - 600} 600`])
      const theirs = join(dir, 'theirs.qcow2')
      copyFileSync(base, theirs)
      await qemuImgOk(['resize', ...(delta < 0 ? ['--shrink'] : []), '-f', 'qcow2', theirs, String(size + delta)])
      const dev = new MemoryDevice(readFileSync(base), { name: 'x.qcow2' })
      const img = await openOn(dev)
      await img.write(100, pattern(100, 2000))
      await qemuIoOk(theirs, ['write -P 0x5a 100 2000'])
      await resizeQcow2(img, size + delta)
      const got = await dumpBitmaps(dev.snapshot())
      expect(withoutOffsets(got)).toEqual(withoutOffsets(await dumpBitmaps(readFileSync(theirs))))
      expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const p = join(dir, 'ours.qcow2')
      writeFileSync(p, dev.snapshot())
      const chk = await qemuImg(['check', '-f', 'qcow2', p])
      expect(chk.code, chk.stdout + chk.stderr).toBe(0)
    })
  }

  it('internal snapshot create and delete keep the bitmaps, as qemu-img snapshot -c/-d does', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'a' }, { name: 'off', disabled: true }])
    await qemuIoOk(base, ['write -P 1 0 4096'])
    const before = await dumpBitmaps(readFileSync(base))
    const dev = new MemoryDevice(readFileSync(base), { name: 'x.qcow2' })
    let img = await openOn(dev)
    await createSnapshot(img, 's1')
    await img.write(65536, pattern(65536, 100))
    await img.close()
    img = await openOn(dev)
    await deleteSnapshot(img, 's1')
    await img.close()
    const got = await dumpBitmaps(dev.snapshot())
    expect(got.map((b) => [b.name, b.flags, b.bits])).toEqual([
      ['a', 2, [...before[0]!.bits, 16]],
      ['off', 0, before[1]!.bits],
    ])
    expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    const p = join(dir, 'ours.qcow2')
    writeFileSync(p, dev.snapshot())
    expect((await qemuImg(['check', '-f', 'qcow2', p])).code).toBe(0)
  })

  it('lazy_refcounts image with bitmaps: written, closed clean, bits as QEMU sets them', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const path = join(dir, 'lazy.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,lazy_refcounts=on', path, '8M'])
    await qemuImgOk(['bitmap', '--add', path, 'a'])
    const theirs = join(dir, 'theirs.qcow2')
    copyFileSync(path, theirs)
    const ops = randomOps(new Prng(7), 8 * 1024 * 1024, 20)
    const bytes = await imgtoolOps(path, ops)
    await qemuIoOk(theirs, qemuIoCommands(ops))
    expect(withoutOffsets(await dumpBitmaps(bytes))).toEqual(withoutOffsets(await dumpBitmaps(readFileSync(theirs))))
    expect(await checkCounts(new MemoryDevice(bytes))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    expect((await qemuImg(['check', '-f', 'qcow2', path])).code).toBe(0)
  })

  it('marks consistent bitmaps in use on disk at open, before any write, and clears it on close', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'a' }, { name: 'd', disabled: true }])
    const dev = new MemoryDevice(readFileSync(base), { name: 'x.qcow2' })
    const img = await openOn(dev)
    const open = await dumpBitmaps(dev.snapshot())
    expect(open.map((b) => b.flags)).toEqual([3, 1])
    const p = join(dir, 'open.qcow2')
    writeFileSync(p, dev.snapshot())
    expect((await qemuImg(['check', '-f', 'qcow2', p])).code).toBe(0)
    await img.write(5000, pattern(5000, 10))
    await img.flush()
    // a plain flush does not store bitmaps (QEMU stores them on close only)
    expect((await dumpBitmaps(dev.snapshot())).map((b) => b.flags)).toEqual([3, 1])
    await img.close()
    const closed = await dumpBitmaps(dev.snapshot())
    expect(closed.map((b) => [b.flags, b.bits])).toEqual([
      [2, [1]],
      [0, []],
    ])
    expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0 })
  })

  it('leaves a bitmap that was already in use (inconsistent) alone, and stores the others', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'bad' }, { name: 'good' }])
    const bytes = readFileSync(base)
    const dump = await dumpBitmaps(bytes)
    // set IN_USE on 'bad' as a crashed QEMU leaves it
    const h = await readHeader(new MemoryDevice(bytes), { file: 'x', readOnly: true, forCheck: true })
    const entries = await readBitmapDirectory(new MemoryDevice(bytes), 'x', h.bitmaps!)
    const e = entries[0]!
    new DataView(bytes.buffer, bytes.byteOffset).setUint32(e.entryOffset + 12, e.flags | BME_FLAG_IN_USE)
    const dev = new MemoryDevice(bytes, { name: 'x.qcow2' })
    const img = await openOn(dev)
    await img.write(0, pattern(0, 100))
    await img.close()
    const after = await dumpBitmaps(dev.snapshot())
    expect(after[0]).toEqual({ ...dump[0]!, flags: 3 })
    expect(after[1]!.flags).toBe(2)
    expect(after[1]!.bits).toEqual([0])
    const p = join(dir, 'after.qcow2')
    writeFileSync(p, dev.snapshot())
    expect((await qemuImg(['check', '-f', 'qcow2', p])).code).toBe(0)
    expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0 })
  })

  it('guards bitmap clusters: a write over the directory, a table or data is refused', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'a' }])
    await qemuIoOk(base, ['write -P 1 0 4096'])
    const dev = new MemoryDevice(readFileSync(base), { name: 'x.qcow2' })
    const img = await openOn(dev)
    const w = img.writer!
    const ext = img.header.bitmaps!
    expect(w.guard.kindAt(ext.directoryOffset / 4096)).toBe('bitmap-directory')
    const bm = img.bitmaps[0]!
    expect(w.guard.kindAt(bm.tableOffset / 4096)).toBe('bitmap-table')
    expect([...Array(Math.ceil(dev.size / 4096)).keys()].some((c) => w.guard.kindAt(c) === 'bitmap-data')).toBe(true)
    await expect(w.writeMetadata(ext.directoryOffset, new Uint8Array(512), 'l2')).rejects.toThrow(/overlaps with bitmap-directory/)
  })

  it('a dirty image with bitmaps (lazy refcounts, not closed) is rebuilt on open keeping every bitmap cluster', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const path = join(dir, 'dirty.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096,lazy_refcounts=on', path, '8M'])
    await qemuImgOk(['bitmap', '--add', '-g', '4096', path, 'a'])
    // bits set by QEMU: the bitmap has data clusters of its own
    await qemuIoOk(path, ['write -P 1 0 64k', 'write -P 2 5M 8k'])
    const before = await dumpBitmaps(readFileSync(path))
    expect(before[0]!.bits.length).toBeGreaterThan(0)
    // imgtool writes with lazy refcounts and "crashes": the image is left dirty, refcounts stale
    const dev = new MemoryDevice(readFileSync(path), { name: 'dirty.qcow2' })
    const img = await openOn(dev)
    await img.write(1024 * 1024, pattern(1024 * 1024, 256 * 1024, 3))
    await img.flush()
    const crashed = dev.snapshot()
    const hd = await readHeader(new MemoryDevice(crashed), { file: 'x', readOnly: true, forCheck: true })
    expect(Number(hd.incompatibleFeatures & 1n)).toBe(1)
    // read-write open: refcounts rebuilt, counting the bitmap directory, tables and data
    const again = new MemoryDevice(crashed, { name: 'dirty.qcow2' })
    const img2 = await openOn(again)
    expect(img2.writer, String(img2.writerRefusal)).toBeDefined()
    expect(img2.writer!.notices.join('\n')).toMatch(/refcounts were rebuilt/)
    await img2.write(6 * 1024 * 1024, pattern(0, 4096, 4))
    await img2.close()
    const out = again.snapshot()
    expect(await checkCounts(new MemoryDevice(out))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    const p = join(dir, 'after.qcow2')
    writeFileSync(p, out)
    const qc = await qemuImg(['check', '-f', 'qcow2', p])
    expect(qc.code, qc.stdout + qc.stderr).toBe(0)
    // the bitmap was in use when the writer "crashed": QEMU's rule, it stays in use (inconsistent), its data intact
    const after = await dumpBitmaps(out)
    expect(after[0]!.flags & BME_FLAG_IN_USE).toBe(BME_FLAG_IN_USE)
    expect(after[0]!.bits).toEqual(before[0]!.bits)
    const ro = await openOn(new MemoryDevice(out), undefined, true)
    expect(Buffer.from(await ro.read(1024 * 1024, 256 * 1024)).equals(Buffer.from(pattern(1024 * 1024, 256 * 1024, 3)))).toBe(true)
    expect((await ro.read(0, 1))[0]).toBe(1)
  })

  it('resize with a bitmap in use (inconsistent) is refused as qemu-img resize refuses it', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'b0' }])
    const bytes = readFileSync(base)
    const h = await readHeader(new MemoryDevice(bytes), { file: 'x', readOnly: true, forCheck: true })
    const e = (await readBitmapDirectory(new MemoryDevice(bytes), 'x', h.bitmaps!))[0]!
    new DataView(bytes.buffer, bytes.byteOffset).setUint32(e.entryOffset + 12, e.flags | BME_FLAG_IN_USE)
    const theirs = join(dir, 'theirs.qcow2')
    writeFileSync(theirs, bytes)
    const q = await qemuImg(['resize', '-f', 'qcow2', theirs, '+1M'])
    expect(q.code).toBe(1)
    expect(q.stderr).toMatch(/Bitmap 'b0' is inconsistent and cannot be used/)
    const dev = new MemoryDevice(bytes, { name: 'x.qcow2' })
    const img = await openOn(dev)
    await expect(resizeQcow2(img, 5 * 1024 * 1024)).rejects.toThrow(/Bitmap 'b0' is inconsistent and cannot be used/)
    expect(img.virtualSize).toBe(4 * 1024 * 1024)
    await img.close()
    expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it('snapshot apply on an image with bitmaps is refused as qemu-img snapshot -a refuses it, nothing changed', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const base = await makeBase(dir, 'base.qcow2', 4096, 4 * 1024 * 1024, [{ name: 'a' }, { name: 'd', disabled: true }])
    await qemuIoOk(base, ['write -P 1 0 8k'])
    await qemuImgOk(['snapshot', '-c', 's', base])
    await qemuIoOk(base, ['write -P 2 0 8k'])
    const theirs = join(dir, 'theirs.qcow2')
    copyFileSync(base, theirs)
    const q = await qemuImg(['snapshot', '-a', 's', theirs])
    expect(q.code).toBe(1)
    expect(q.stderr).toMatch(/Could not apply snapshot 's': Device has active dirty bitmaps/)
    const dev = new MemoryDevice(readFileSync(base), { name: 'x.qcow2' })
    const img = await openOn(dev)
    await expect(applySnapshot(img, 's')).rejects.toThrow(/Could not apply snapshot 's': Device has active dirty bitmaps/)
    expect((await img.read(0, 1))[0]).toBe(2)
    await img.close()
    expect(await checkCounts(new MemoryDevice(dev.snapshot()))).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it('an I/O error at any write or flush of open or close: no corruption, no leak unless the header switch was under way', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const size = 4 * 1024 * 1024
    const base = await makeBase(dir, 'base.qcow2', 4096, size, [{ name: 'a' }, { name: 'fine', g: 512 }])
    await qemuIoOk(base, ['write -P 1 8192 4096'])
    const baseBytes = new Uint8Array(readFileSync(base))
    interface Run {
      dev: MemoryDevice
      failed: boolean
      headerTried: boolean
      ops: number
    }
    const run = async (phase: 'open' | 'close', op: FaultOp, nth: number): Promise<Run> => {
      const dev = new MemoryDevice(baseBytes, { name: 'x.qcow2' })
      const faulty = new FaultyDevice(dev)
      if (phase === 'open') faulty.failOn({ op, nth })
      let img
      try {
        img = await openOn(faulty)
      } catch {
        return { dev, failed: true, headerTried: faulty.count('write', 'header') > 0, ops: 0 }
      }
      const openOps = faulty.count(op)
      faulty.clearFaults()
      if (phase === 'open') return { dev, failed: false, headerTried: false, ops: openOps }
      await img.write(100_000, pattern(100_000, 20_000))
      await img.writeZeroes(0, 1000)
      const before = faulty.count('write', 'header')
      const opsBefore = faulty.count(op)
      faulty.failOn({ op, nth })
      let failed = false
      try {
        await img.close()
      } catch {
        failed = true
      }
      return { dev, failed, headerTried: faulty.count('write', 'header') > before, ops: faulty.count(op) - opsBefore }
    }
    let cases = 0
    for (const phase of ['open', 'close'] as const) {
      for (const op of ['write', 'flush'] as const) {
        const total = (await run(phase, op, 1_000_000)).ops
        expect(total).toBeGreaterThan(1)
        for (let nth = 1; nth <= total; nth++) {
          const r = await run(phase, op, nth)
          expect(r.failed, `${phase} ${op} #${nth} did not fail`).toBe(true)
          cases++
          const c = await checkCounts(new MemoryDevice(r.dev.snapshot()))
          expect(c.corruptions, `${phase} ${op} #${nth}: ${c.diagnostics.join('; ')}`).toBe(0)
          if (!r.headerTried) expect(c.leaks, `${phase} ${op} #${nth}: leaks before the header switch`).toBe(0)
          for (const b of await dumpBitmaps(r.dev.snapshot())) {
            if (phase === 'close' && !(b.flags & BME_FLAG_IN_USE))
              expect(r.headerTried, `${phase} ${op} #${nth}: bitmap ${b.name} consistent after a failed close`).toBe(true)
          }
        }
      }
    }
    console.log(`[bitmap fault sweep] ${cases} failed opens/closes checked`)
    expect(cases).toBeGreaterThan(5)
  })

  it('crash at every point of open + writes + flush + writes + close: no corruption; bitmaps in use, or consistent and covering every change', async () => {
    const dir = makeTempDir('imgtool-bitmaps-')
    const size = 4 * 1024 * 1024
    const base = await makeBase(dir, 'base.qcow2', 4096, size, [{ name: 'a' }, { name: 'fine', g: 512 }, { name: 'off', disabled: true }])
    await qemuIoOk(base, ['write -P 1 8192 4096'])
    const baseBytes = new Uint8Array(readFileSync(base))
    const original = await dumpBitmaps(baseBytes)
    const baseImg = await openOn(new MemoryDevice(baseBytes), undefined, true)
    const baseContent = await baseImg.read(0, size)
    await baseImg.close()

    const dev = new CrashDevice(baseBytes, { name: 'img.qcow2' })
    const img = await openOn(new Unclosable(dev))
    await img.write(100_000, pattern(100_000, 20_000))
    await img.writeZeroes(8192, 1000)
    await img.flush()
    const flushedAt = dev.flushCount
    const afterFlush = await img.read(0, size)
    await img.write(2_000_000, pattern(2_000_000, 70_000))
    await img.writeZeroes(1_000_000, 300_000, { discard: true })
    await img.close()
    const final = await dumpBitmaps(dev.snapshot())
    expect(final.map((b) => b.flags)).toEqual([2, 2, 0])

    let states = 0
    let inUse = 0
    let consistentOld = 0
    let consistentNew = 0
    const sample: Uint8Array[] = []
    for (const s of dev.allCrashStates({ subsets: true, torn: true, exhaustiveLimit: 8, randomSubsets: 16, maxTornPerWrite: 4, tornTail: true })) {
      states++
      try {
        const bytes = s.device.snapshot()
        const a = await analyzeQcow2(new MemoryDevice(bytes))
        expect({ c: a.report.corruptions, e: a.report.checkErrors }, a.report.diagnostics.join('\n')).toEqual({ c: 0, e: 0 })
        const r = await openOn(new MemoryDevice(bytes), undefined, true)
        const content = await r.read(0, size)
        await r.close()
        if (s.flushes >= flushedAt) {
          // what was flushed reads back (the later writes do not touch these ranges)
          expect(Buffer.from(content.subarray(8192, 120_000)).equals(Buffer.from(afterFlush.subarray(8192, 120_000))), 'flushed data lost').toBe(true)
        }
        const got = await dumpBitmaps(bytes)
        expect(got.map((b) => b.name)).toEqual(original.map((b) => b.name))
        for (let i = 0; i < got.length; i++) {
          const g = got[i]!
          if (g.flags & BME_FLAG_IN_USE) {
            inUse++
            continue
          }
          if (JSON.stringify(g.bits) === JSON.stringify(final[i]!.bits) && g.flags === final[i]!.flags) {
            consistentNew++
            continue
          }
          // consistent and old: only before any guest change could be on disk
          expect({ flags: g.flags, bits: g.bits }).toEqual({ flags: original[i]!.flags, bits: original[i]!.bits })
          expect(Buffer.compare(Buffer.from(content), Buffer.from(baseContent)), 'guest content changed under a consistent old bitmap').toBe(0)
          consistentOld++
        }
        if (states % 9 === 0 && sample.length < 40) sample.push(bytes)
      } catch (e) {
        throw new Error(`${s.description}: ${(e as Error).message}`, { cause: e })
      }
    }
    console.log(
      `[bitmap crash sweep] ${states} crash states: bitmap entries in use ${inUse}, consistent old ${consistentOld}, consistent new ${consistentNew}; ${sample.length} also checked by qemu-img`,
    )
    expect(states).toBeGreaterThan(20)
    expect(inUse).toBeGreaterThan(0)
    expect(consistentNew).toBeGreaterThan(0)
    expect(consistentOld).toBeGreaterThan(0)
    // qemu-img agrees on a sample: 0 corruptions, and it can load the bitmaps
    for (const [i, bytes] of sample.entries()) {
      const p = join(dir, `s${i}.qcow2`)
      writeFileSync(p, bytes)
      const r = await qemuImg(['check', '--output=json', '-f', 'qcow2', p])
      const j = JSON.parse(r.stdout || '{}') as Record<string, number>
      expect(j['corruptions'] ?? 0, r.stderr).toBe(0)
      expect(j['check-errors'] ?? 0, r.stderr).toBe(0)
      const io = await qemuIoOk(p, ['read 0 512'])
      expect(io).toMatch(/read 512\/512/)
    }
  })
})
