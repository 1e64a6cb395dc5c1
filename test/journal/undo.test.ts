/**
 * repair --undo checks that the image is the one the journal's repair left (D7):
 * the seal records the image's identity and, per region, what the repair left.
 */
import { appendFileSync, copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { applyUndoJournal } from '../../src/formats/dmsnap/journal.js'
import { repairStore } from '../../src/formats/dmsnap/index.js'
import { makeTempDir, useTempDirs } from '../support/qemu.js'
import { loadFixture } from '../dmsnap/helpers.js'
import { setRecord } from '../dmsnap/damage.js'
import { cli, damaged } from './helpers.js'

/** an image whose repair (-r all) rewrites a refcount block, repaired, with its journal */
async function repaired(dir: string, file = 'x.qcow2'): Promise<{ img: string; journal: string; before: Buffer; after: Buffer }> {
  const img = damaged(dir, 'v3-c4k', (i) => i.setRefcount(i.firstData().cluster, 0), file)
  const before = readFileSync(img)
  const journal = join(dir, file + '.j')
  const r = await cli('repair', '--journal', journal, img)
  expect(r.code).toBe(0)
  return { img, journal, before, after: readFileSync(img) }
}

describe('repair --undo refuses a journal that is not for this image (D7)', () => {
  useTempDirs()

  it('another image: refused in one line naming both files, nothing written', async () => {
    const dir = makeTempDir()
    const { journal } = await repaired(dir)
    const other = damaged(dir, 'v3-c4k', (i) => i.leak(1), 'other.qcow2')
    const otherBytes = readFileSync(other)
    const r = await cli('repair', '--undo', journal, other)
    expect(r.code).toBe(1)
    expect(r.err).toMatch(
      new RegExp(
        `^imgtool: qcow2: ${journal}: undo refused: the journal belongs to ${dir}/x\\.qcow2 \\(device \\d+, inode \\d+\\), not to ${other} \\(device \\d+, inode \\d+\\); --force applies it anyway\\n$`,
      ),
    )
    expect(readFileSync(other).equals(otherBytes)).toBe(true)
  })

  it('another image, even with --force: its bytes are not what the repair left, refused', async () => {
    const dir = makeTempDir()
    const { journal } = await repaired(dir)
    const other = damaged(dir, 'v3-c64k', () => undefined, 'other.qcow2')
    const otherBytes = readFileSync(other)
    const r = await cli('repair', '--undo', journal, '--force', other)
    expect(r.code).toBe(1)
    expect(r.err).toMatch(/^imgtool: qcow2: .*: undo refused: .* the image changed since the repair, or it is another image\n$/)
    expect(readFileSync(other).equals(otherBytes)).toBe(true)
  })

  it('a copy of the repaired image: refused as another file, applied with --force (its bytes check out)', async () => {
    const dir = makeTempDir()
    const { img, journal, before } = await repaired(dir)
    const copy = join(dir, 'copy.qcow2')
    copyFileSync(img, copy)
    expect((await cli('repair', '--undo', journal, copy)).code).toBe(1)
    const r = await cli('repair', '--undo', journal, '--force', copy)
    expect(r.code).toBe(0)
    expect(readFileSync(copy).equals(before)).toBe(true)
  })

  it('the image changed in a repaired region since: refused, naming the region', async () => {
    const dir = makeTempDir()
    const { img, journal, before, after } = await repaired(dir)
    // the byte that differs between before and after lies in a region the repair wrote
    let at = 0
    while (before[at] === after[at]) at++
    const changed = Buffer.from(after)
    changed[at + 1] = (changed[at + 1]! + 1) & 0xff
    writeFileSync(img, changed)
    const r = await cli('repair', '--undo', journal, img)
    expect(r.code).toBe(1)
    expect(r.err).toMatch(
      /^imgtool: qcow2: .*: undo refused: the \d+ bytes at 0x[0-9a-f]+ of .*x\.qcow2 are not what the repair left there: the image changed since the repair, or it is another image\n$/,
    )
    expect(readFileSync(img).equals(changed)).toBe(true)
  })

  it('the image grew since (a VM allocated clusters): refused, naming both sizes', async () => {
    const dir = makeTempDir()
    const { img, journal, after } = await repaired(dir)
    appendFileSync(img, Buffer.alloc(4096, 7))
    const r = await cli('repair', '--undo', journal, img)
    expect(r.code).toBe(1)
    expect(r.err).toContain(`undo refused: ${img} is ${after.byteLength + 4096} bytes, the repair left it ${after.byteLength}:`)
  })

  it('the header changed since (outside the regions the repair wrote): refused', async () => {
    const dir = makeTempDir()
    const { img, journal } = await repaired(dir)
    const b = readFileSync(img)
    b[0x70] = b[0x70]! ^ 1
    writeFileSync(img, b)
    const r = await cli('repair', '--undo', journal, img)
    expect(r.code).toBe(1)
    expect(r.err).toContain(`undo refused: the header (bytes 0..0xfff) of ${img} is not what the repair left:`)
  })

  it('the right image, unchanged: restored; a second undo (as after one cut short) finds it already restored', async () => {
    const dir = makeTempDir()
    const { img, journal, before } = await repaired(dir)
    expect((await cli('repair', '--undo', journal, img)).code).toBe(0)
    expect(readFileSync(img).equals(before)).toBe(true)
    expect((await cli('repair', '--undo', journal, img)).code).toBe(0)
    expect(readFileSync(img).equals(before)).toBe(true)
  })

  it('a journal without its seal (the repair did not finish): refused unless --force', async () => {
    const dir = makeTempDir()
    const { img, journal, before } = await repaired(dir)
    const j = readFileSync(journal)
    const sealAt = j.indexOf('IMGTOOL-UNDOSEAL')
    expect(sealAt).toBeGreaterThan(0)
    truncateSync(journal, sealAt + 20) // a torn seal
    const r = await cli('repair', '--undo', journal, img)
    expect(r.code).toBe(1)
    expect(r.err).toBe(
      `imgtool: qcow2: ${journal}: undo refused: the journal has no seal (incomplete from 0x${sealAt.toString(16)}): the repair that wrote it did not finish, so ${img} cannot be checked against it; --force applies it anyway\n`,
    )
    expect((await cli('repair', '--undo', journal, '--force', img)).code).toBe(0)
    expect(readFileSync(img).equals(before)).toBe(true)
  })

  it('a journal of format 1 (no identity, no seal): refused with the reason, applied with --force', async () => {
    const dir = makeTempDir()
    const { img, before, after } = await repaired(dir)
    // what an older imgtool wrote for this repair: one segment saving the bytes that differ
    let at = 0
    while (before[at] === after[at]) at++
    const off = at - (at % 4096)
    const seg = Buffer.alloc(32 + 16 + 4096)
    seg.write('IMGTOOL-QC2UNDO1', 0, 'latin1')
    seg.writeBigUInt64LE(BigInt(before.byteLength), 16)
    seg.writeUInt32LE(1, 24)
    seg.writeBigUInt64LE(BigInt(off), 32)
    seg.writeUInt32LE(4096, 40)
    before.copy(seg, 48, off, off + 4096)
    const tail = Buffer.alloc(20)
    tail.writeUInt32LE(crc32(seg), 0)
    tail.write('IMGTOOL-QC2DONE!', 4, 'latin1')
    const v1 = join(dir, 'old.j')
    writeFileSync(v1, Buffer.concat([seg, tail]))
    const r = await cli('repair', '--undo', v1, img)
    expect(r.code).toBe(1)
    expect(r.err).toBe(
      `imgtool: qcow2: ${v1}: undo refused: written by an older imgtool (journal format 1), it records neither its image nor the state the repair left, so ${img} cannot be checked against it; --force applies it anyway\n`,
    )
    expect(readFileSync(img).equals(after)).toBe(true)
    expect((await cli('repair', '--undo', v1, '--force', img)).code).toBe(0)
    expect(readFileSync(img).equals(before)).toBe(true)
  })
})

describe('dm-snapshot undo journals are sealed too (D7)', () => {
  const { cow } = loadFixture('c8-basic')
  const ORIGIN = loadFixture('c8-basic').origin.byteLength

  it("refuses to put one store's journal onto another store", async () => {
    const dev = new MemoryDevice(setRecord(setRecord(cow, 4, 16, 6), 9, 500, 19), { name: 'cow' })
    const journal = new MemoryDevice(0, { name: 'journal' })
    await repairStore(dev, { repair: 'all', originSize: ORIGIN, journal })
    const other = new MemoryDevice(setRecord(cow, 7, 70, 5), { name: 'other' })
    const otherBytes = other.snapshot()
    await expect(applyUndoJournal(journal, other)).rejects.toThrow(/^dmsnap: journal: undo refused: .*(not what the repair left|the repair left it)/)
    await expect(applyUndoJournal(journal, other, { force: true })).rejects.toThrow(/undo refused/)
    expect(Buffer.from(other.snapshot()).equals(Buffer.from(otherBytes))).toBe(true)
  })

  it('refuses a store written since the repair, restores the untouched one', async () => {
    const damagedCow = setRecord(setRecord(cow, 4, 16, 6), 9, 500, 19)
    const dev = new MemoryDevice(damagedCow, { name: 'cow' })
    const journal = new MemoryDevice(0, { name: 'journal' })
    await repairStore(dev, { repair: 'all', originSize: ORIGIN, journal })
    const repairedBytes = dev.snapshot()
    const area0 = 4096 // chunk 1: area 0
    await dev.write(area0 + 7 * 16, new Uint8Array([1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0])) // the kernel appended a record
    await expect(applyUndoJournal(journal, dev)).rejects.toThrow(/undo refused: the \d+ bytes at 0x[0-9a-f]+ of cow are not what the repair left there/)
    await dev.write(0, repairedBytes)
    expect(await applyUndoJournal(journal, dev)).toBeGreaterThan(0)
    expect(Buffer.from(dev.snapshot()).equals(Buffer.from(damagedCow))).toBe(true)
  })
})

describe('a repair that stops part way says where its journal is', () => {
  useTempDirs()

  it("D11's trigger: the repair no longer stops part way; its verdict stands and its sealed journal undoes it", async () => {
    // a refcount table entry of all ones and 20 snapshots at offset 0: the repair used to rewrite the snapshot
    // table and then fail in the re-analysis (the failure-after-writing message is tested at the device level
    // in test/check/edge-repair.test.ts, with a failure injected after the first write)
    const dir = makeTempDir()
    const img = damaged(dir, 'v3-c4k', (i) => {
      i.poke(i.reftableOffset, new Array(8).fill(0xff))
      i.poke(60, [0, 0, 0, 20])
    })
    const before = readFileSync(img)
    const r = await cli('repair', img)
    expect(r.err).not.toMatch(/internal error|stopped part way/)
    expect([0, 2, 3]).toContain(r.code)
    expect(readFileSync(img).equals(before)).toBe(false)
    const j = img + '.imgtool-undo'
    expect((await cli('repair', '--undo', j, img)).code).toBe(0)
    expect(readFileSync(img).equals(before)).toBe(true)
  })
})
