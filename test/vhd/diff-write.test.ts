/**
 * Writes into a differencing disk. A block newly allocated in the child has
 * bitmap bits only for the sectors written (a write is widened to whole
 * sectors with the bytes the guest read there, from the parent); every other
 * sector still reads from the parent. Crash sweep: at every crash state, no
 * corruption and every sector reads as before or after the one write in
 * flight. qemu-io reads our written sectors identically (it reads a child's
 * blocks whole and ignores the parent, so only written sectors compare).
 */
import { execFileSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { openImageOnDevice, openImage } from '../../src/open.js'
import { VhdImage, checkVhd, createVhd } from '../../src/formats/vhd/index.js'
import { readLayout } from '../../src/formats/vhd/open.js'
import { VhdWriter } from '../../src/formats/vhd/write.js'
import { sweepCrashes } from '../support/crash-device.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

const BLOCK = 4096
const SIZE = 64 * 1024

function setType4(b: Uint8Array, parentUuid: Uint8Array): Uint8Array {
  const buf = Buffer.from(b)
  const sum = (start: number, len: number, at: number) => {
    buf.writeUInt32BE(0, start + at)
    let s = 0
    for (let i = start; i < start + len; i++) s += buf[i]!
    buf.writeUInt32BE(~s >>> 0, start + at)
  }
  for (const at of [0, buf.length - 512]) {
    buf.writeUInt32BE(4, at + 60)
    sum(at, 512, 64)
  }
  buf.set(parentUuid, 512 + 40)
  sum(512, 1024, 36)
  return new Uint8Array(buf)
}

async function disks(): Promise<{ parent: Uint8Array; child: Uint8Array }> {
  const p = new MemoryDevice(new Uint8Array(0), { name: 'parent.vhd' })
  await createVhd(p, { size: SIZE, options: {} }, { blockSize: BLOCK })
  const img = await openImageOnDevice(p, { format: 'vpc', readOnly: false })
  const fill = new Uint8Array(SIZE)
  for (let i = 0; i < SIZE; i++) fill[i] = 1 + ((i >> 9) % 250)
  await img.write!(0, fill)
  await img.close()
  const c = new MemoryDevice(new Uint8Array(0), { name: 'child.vhd' })
  await createVhd(c, { size: SIZE, options: {} }, { blockSize: BLOCK })
  const parent = p.snapshot()
  return { parent, child: setType4(c.snapshot(), parent.slice(68, 84)) }
}

/** the child over its parent, on devices (the parent located by the test, not by name) */
async function openChild(dev: BlockDevice, parentBytes: Uint8Array, writable: boolean): Promise<VhdImage> {
  const layout = await readLayout(dev, false)
  const parent = await openImageOnDevice(new MemoryDevice(parentBytes.slice(), { name: 'parent.vhd', readOnly: true }), { format: 'vpc', readOnly: true })
  const img = new VhdImage(dev, layout, parent, false)
  if (writable) img.writer = new VhdWriter(dev, layout, { readGuest: (o, n) => img.readNow(o, n), bitmapChanged: () => img.dropBitmapCache() })
  return img
}

const OPS: Array<{ offset: number; data: Uint8Array }> = [
  { offset: 5 * BLOCK + 100, data: new Uint8Array(300).fill(0xa1) }, // inside one sector of a new block
  { offset: 2 * BLOCK - 700, data: new Uint8Array(1500).fill(0xa2) }, // across two new blocks, partial sectors
  { offset: 5 * BLOCK + 2048, data: new Uint8Array(512).fill(0xa3) }, // the mapped block again, another sector
  { offset: 9 * BLOCK, data: new Uint8Array(1024) }, // zeros: still the child's (they differ from the parent)
]

describe('vpc differencing writes', () => {
  it('bitmap bits only for the sectors written; the rest reads from the parent', async () => {
    const { parent, child } = await disks()
    const dev = new MemoryDevice(child.slice(), { name: 'child.vhd' })
    const img = await openChild(dev, parent, true)
    const expected = await img.read(0, SIZE)
    for (const op of OPS) {
      await img.write!(op.offset, op.data)
      expected.set(op.data, op.offset)
    }
    await img.flush()
    expect(Buffer.from(await img.read(0, SIZE)).equals(Buffer.from(expected))).toBe(true)
    const bitsOf = async (index: number) => img.bitmap(img.blockOffset(index)!)
    const set = (bits: Uint8Array) => [...Array(BLOCK / 512).keys()].filter((s) => (bits[s >> 3]! >> (7 - (s & 7))) & 1)
    expect(set(await bitsOf(5))).toEqual([0, 4])
    expect(set(await bitsOf(1))).toEqual([6, 7])
    expect(set(await bitsOf(2))).toEqual([0, 1])
    expect(set(await bitsOf(9))).toEqual([0, 1])
    expect(img.blockOffset(0)).toBeUndefined()
    expect((await checkVhd(dev)).findings).toEqual([])
    await img.close()
  })

  it('crash sweep: no corruption; every sector reads as before or after the write in flight', async () => {
    const { parent, child } = await disks()
    const checkpoints: Array<{ flushes: number; content: Uint8Array }> = []
    let states = 0
    await sweepCrashes(
      child,
      async (dev) => {
        const img = await openChild(dev, parent, true)
        checkpoints.push({ flushes: dev.flushCount, content: await img.read(0, SIZE) })
        for (const op of OPS) {
          await img.write!(op.offset, op.data)
          await img.flush()
          checkpoints.push({ flushes: dev.flushCount, content: await img.read(0, SIZE) })
        }
      },
      async (s) => {
        states++
        const rep = await checkVhd(new MemoryDevice(s.device.snapshot()))
        expect(rep.findings.filter((f) => f.severity !== 'leak')).toEqual([])
        let k = 0
        while (k + 1 < checkpoints.length && checkpoints[k + 1]!.flushes <= s.flushes) k++
        const img = await openChild(s.device, parent, false)
        const got = await img.read(0, SIZE)
        await img.close()
        const a = checkpoints[k]!.content
        const b = (checkpoints[k + 1] ?? checkpoints[k]!).content
        for (let o = 0; o < SIZE; o += 512) {
          const sec = Buffer.from(got.subarray(o, o + 512))
          expect(sec.equals(Buffer.from(a.subarray(o, o + 512))) || sec.equals(Buffer.from(b.subarray(o, o + 512))), `sector ${o}`).toBe(true)
        }
      },
      { subsets: true, torn: true, tornTail: true },
    )
    expect(states).toBeGreaterThan(20)
  })
})

describeQemu('vpc differencing writes, read by qemu-io', () => {
  const dir = makeTempDir('imgtool-vhd-diffw-')
  it('our writes into a child qemu-img made read back in qemu-io; the rest of the guest reads from the parent', async () => {
    const parent = join(dir, 'parent.vhd')
    const child = join(dir, 'child.vhd')
    await qemuImgOk(['create', '-q', '-f', 'vpc', parent, '8M'])
    await qemuIoOk(parent, ['write -P 0x11 0 8M'], { format: 'vpc' })
    await qemuImgOk(['create', '-q', '-f', 'vpc', child, '8M'])
    execFileSync('python3', [resolve(__dirname, 'make-differencing.py'), parent, child, 'parent.vhd'])
    const img = await openImage(child, { readOnly: false })
    try {
      await img.write!(4 * 1024 * 1024 + 1024, new Uint8Array(4096).fill(0x5c))
      await img.write!(2 * 1024 * 1024 + 8192, new Uint8Array(512).fill(0x5d)) // the mapped block
      await img.flush()
    } finally {
      await img.close()
    }
    await qemuIoOk(child, ['read -P 0x5c 4195328 4096', 'read -P 0x5d 2105344 512', 'read -P 0x22 2097152 2048'], { format: 'vpc' })
    const again = await openImage(child)
    try {
      const block = await again.read(4 * 1024 * 1024, 2 * 1024 * 1024)
      expect(block.subarray(0, 1024).every((b) => b === 0x11)).toBe(true)
      expect(block.subarray(1024, 5120).every((b) => b === 0x5c)).toBe(true)
      expect(block.subarray(5120).every((b) => b === 0x11)).toBe(true)
    } finally {
      await again.close()
    }
    // the new block's bitmap on disk: bits for sectors 2..9 only
    const b = readFileSync(child)
    const batAt = Number(b.readBigUInt64BE(512 + 16))
    const blockAt = b.readUInt32BE(batAt + 4 * 2) * 512
    expect([...b.subarray(blockAt, blockAt + 4)]).toEqual([0x3f, 0xc0, 0, 0])
  })
})
