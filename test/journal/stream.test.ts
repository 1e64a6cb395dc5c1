/**
 * Undo streams a journal with bounded memory and bounds every length it reads
 * from it by the journal's size (D12): a 3 GiB journal used to abort Node.
 */
import { closeSync, existsSync, openSync, ftruncateSync, writeSync } from 'node:fs'
import { join } from 'node:path'
import { crc32 } from 'node:zlib'
import { beforeAll, describe, expect, it } from 'vitest'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { Qcow2Journal, applyQcow2Undo } from '../../src/formats/qcow2/repair/journal.js'
import { UndoJournal, applyUndoJournal } from '../../src/formats/dmsnap/journal.js'
import { makeTempDir, useTempDirs } from '../support/qemu.js'
import { clean, imgtoolChild } from './helpers.js'

/** a sparse file of `size` bytes starting with `head` */
function sparse(path: string, head: Uint8Array, size: number): void {
  const fd = openSync(path, 'w')
  writeSync(fd, head)
  ftruncateSync(fd, size)
  closeSync(fd)
}

/** a device that remembers the longest read and write made through it */
function traced(inner: BlockDevice): BlockDevice & { maxRead: number; maxWrite: number } {
  const t = {
    maxRead: 0,
    maxWrite: 0,
    get size() {
      return inner.size
    },
    get readOnly() {
      return inner.readOnly
    },
    get name() {
      return inner.name
    },
    async read(o: number, n: number) {
      t.maxRead = Math.max(t.maxRead, n)
      return inner.read(o, n)
    },
    async write(o: number, d: Uint8Array) {
      t.maxWrite = Math.max(t.maxWrite, d.byteLength)
      return inner.write(o, d)
    },
    flush: () => inner.flush(),
    truncate: (s: number) => inner.truncate(s),
    close: () => inner.close(),
  }
  return t
}

describe('repair --undo with a 3 GiB journal (D12): one line, exit 1, no abort', () => {
  useTempDirs()
  let dir = ''
  let img = ''
  beforeAll(() => {
    if (!existsSync(join(import.meta.dirname, '..', '..', 'dist', 'cli', 'main.js'))) throw new Error('dist/ is missing: run npm run build')
    dir = makeTempDir()
    img = clean(dir, 'u.qcow2')
  })

  it('a format-1 journal of 3 GiB (one segment, then zeros): refused with the reason', async () => {
    const big = join(dir, 'big1.undo')
    const seg = new Uint8Array(32 + 20)
    seg.set(new TextEncoder().encode('IMGTOOL-QC2UNDO1'))
    new DataView(seg.buffer).setBigUint64(16, 1n << 20n, true)
    new DataView(seg.buffer).setUint32(32, crc32(seg.subarray(0, 32)), true)
    seg.set(new TextEncoder().encode('IMGTOOL-QC2DONE!'), 36)
    sparse(big, seg, 3 * 2 ** 30)
    const r = await imgtoolChild(['repair', '--undo', big, img])
    expect(r.signal).toBe(null)
    expect(r.code).toBe(1)
    expect(r.stderr).toMatch(/^imgtool: qcow2: .*big1\.undo: undo refused: written by an older imgtool \(journal format 1\)[^\n]*\n$/)
  })

  it('3 GiB of zeros after the format-1 magic, with --force: streamed, and refused as garbage in one line', async () => {
    const big = join(dir, 'big.undo')
    sparse(big, new TextEncoder().encode('IMGTOOL-QC2UNDO1'), 3 * 2 ** 30)
    const r = await imgtoolChild(['repair', '--undo', big, '--force', img])
    expect(r.signal).toBe(null)
    expect(r.code).toBe(1)
    expect(r.stderr).toBe(
      `imgtool: qcow2: ${big}: not a usable undo journal: no complete segment (the journal was not completely written, so the image was not changed)\n`,
    )
  })

  it('a 5 GiB journal of the current format whose region length runs past its end: one line', async () => {
    const big = join(dir, 'big2.undo')
    const head = new Uint8Array(48)
    head.set(new TextEncoder().encode('IMGTOOL-QC2UNDO2'))
    new DataView(head.buffer).setUint32(24, 0xffffffff, true) // region count
    sparse(big, head, 5 * 2 ** 30)
    const r = await imgtoolChild(['repair', '--undo', big, '--force', img])
    expect(r.signal).toBe(null)
    expect(r.code).toBe(1)
    expect(r.stderr).toBe(
      `imgtool: qcow2: ${big}: not a usable undo journal: no complete segment (the journal was not completely written, so the image was not changed)\n`,
    )
  })
})

describe('undo holds at most 1 MiB of a journal at once (D12)', () => {
  it('qcow2: an 8 MiB region is checked and put back in reads and writes of at most 1 MiB', async () => {
    const size = 8 << 20
    const original = new Uint8Array(size)
    for (let i = 0; i < size; i += 4096) original[i] = (i >> 12) & 0xff
    const image = new MemoryDevice(original, { name: 'img' })
    const jdev = new MemoryDevice(0, { name: 'journal' })
    const j = new Qcow2Journal(jdev)
    await j.save(image, [{ offset: 0, length: size }])
    await image.write(0, new Uint8Array(size).fill(9)) // "the repair"
    await j.seal(image, 4096, undefined)
    const tj = traced(jdev)
    const ti = traced(image)
    const r = await applyQcow2Undo(tj, ti)
    expect(r.regions).toBe(1)
    expect(tj.maxRead).toBeLessThanOrEqual(1 << 20)
    expect(ti.maxRead).toBeLessThanOrEqual(1 << 20)
    expect(ti.maxWrite).toBeLessThanOrEqual(1 << 20)
    expect(Buffer.from(image.snapshot()).equals(Buffer.from(original))).toBe(true)
  })

  it('dmsnap: the same for a 6 MiB entry', async () => {
    const size = 6 << 20
    const original = new Uint8Array(size).fill(3)
    const image = new MemoryDevice(original, { name: 'cow' })
    const jdev = new MemoryDevice(0, { name: 'journal' })
    const j = new UndoJournal(jdev)
    await j.save(image, 0, size)
    await image.write(0, new Uint8Array(size).fill(4))
    await j.seal(image, 512, undefined)
    const tj = traced(jdev)
    const ti = traced(image)
    expect(await applyUndoJournal(tj, ti)).toBe(1)
    expect(tj.maxRead).toBeLessThanOrEqual(1 << 20)
    expect(ti.maxWrite).toBeLessThanOrEqual(1 << 20)
    expect(Buffer.from(image.snapshot()).equals(Buffer.from(original))).toBe(true)
  })
})

describe('garbage in a journal is refused in one line', () => {
  async function sealedQcow2(): Promise<{ journal: Uint8Array; image: MemoryDevice }> {
    const image = new MemoryDevice(new Uint8Array(8192).fill(1), { name: 'img' })
    const jdev = new MemoryDevice(0, { name: 'journal' })
    const j = new Qcow2Journal(jdev)
    await j.save(image, [{ offset: 4096, length: 512 }])
    await image.write(4096, new Uint8Array(512).fill(2))
    await j.seal(image, 4096, undefined)
    return { journal: jdev.snapshot(), image }
  }

  it('bytes after the seal', async () => {
    const { journal, image } = await sealedQcow2()
    const bad = new Uint8Array(journal.byteLength + 5)
    bad.set(journal)
    await expect(applyQcow2Undo(new MemoryDevice(bad, { name: 'j' }), image)).rejects.toThrow(
      `qcow2: j: not a usable undo journal: 5 bytes of garbage after its seal (at 0x${journal.byteLength.toString(16)})`,
    )
  })

  it('a seal whose region count exceeds the journal: no seal (then refused as unsealed)', async () => {
    const { journal, image } = await sealedQcow2()
    const bad = new Uint8Array(journal)
    const sealAt = Buffer.from(bad).indexOf('IMGTOOL-UNDOSEAL')
    new DataView(bad.buffer).setBigUint64(sealAt + 40, 1n << 60n, true)
    await expect(applyQcow2Undo(new MemoryDevice(bad, { name: 'j' }), image)).rejects.toThrow(
      /^qcow2: j: undo refused: the journal has no seal \(incomplete from 0x[0-9a-f]+\)/,
    )
  })

  it('not a journal at all', async () => {
    const image = new MemoryDevice(4096)
    await expect(applyQcow2Undo(new MemoryDevice(new Uint8Array(100).fill(0x41), { name: 'j' }), image)).rejects.toThrow(
      'qcow2: j: not a usable undo journal: it does not start with a qcow2 undo segment (IMGTOOL-QC2UNDO2)',
    )
    await expect(applyUndoJournal(new MemoryDevice(new Uint8Array(100).fill(0x41), { name: 'j' }), image)).rejects.toThrow(
      'dmsnap: j: not a usable undo journal: it does not start with IMGTOOL-DMSUNDO2',
    )
  })

  it('dmsnap: an entry whose length runs past the end, with no complete entry before it', async () => {
    const bad = new Uint8Array(64)
    bad.set(new TextEncoder().encode('IMGTOOL-DMSUNDO2'))
    new DataView(bad.buffer).setUint32(16 + 8, 0xfffffff0, true)
    await expect(applyUndoJournal(new MemoryDevice(bad, { name: 'j' }), new MemoryDevice(4096))).rejects.toThrow(
      'dmsnap: j: not a usable undo journal: no complete entry (the journal was not completely written, so the COW was not changed)',
    )
  })
})
