/**
 * convert --salvage: read errors of the source become zeros, each failed sector reported as qemu-img reports
 * it (one warning line each, the same set of lines), exit 0; without --salvage the error fails the convert.
 * Against qemu-img 7.2 on the same broken images: a qcow2 whose compressed cluster does not inflate (data
 * reads fail), one whose L2 table offset is unaligned (block status and reads fail), and one whose data
 * cluster offset is unaligned; the qcow2 driver's one "qcow2: Image is corrupt: ..." line as qemu-img's (-q too).
 */
import { existsSync, openSync, readSync, writeSync, closeSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it, vi } from 'vitest'
import { main } from '../../src/cli/main.js'
import { convert, type SalvageEvent } from '../../src/convert/convert.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { openImageOnDevice } from '../../src/open.js'
import { FaultyDevice } from '../support/faulty-device.js'
import { collector, describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = collector()
  const err = collector()
  const code = await main(['node', 'imgtool', ...args], { stdout: out, stderr: err, isTTY: false })
  return { code, stdout: out.text(), stderr: err.text() }
}

/** the warning lines, tool name dropped, sorted (qemu-img's coroutines print them in no fixed order) */
const warnings = (stderr: string) =>
  stderr
    .split('\n')
    .filter((l) => l.includes('warning:'))
    .map((l) => l.replace(/^(qemu-img|imgtool): /, ''))
    .sort()

function u64(path: string, at: number): bigint {
  const fd = openSync(path, 'r')
  const b = Buffer.alloc(8)
  readSync(fd, b, 0, 8, at)
  closeSync(fd)
  return b.readBigUInt64BE()
}
function put(path: string, at: number, bytes: Buffer): void {
  const fd = openSync(path, 'r+')
  writeSync(fd, bytes, 0, bytes.length, at)
  closeSync(fd)
}

/** a compressed qcow2 whose second cluster's deflate stream is overwritten: reading it fails */
async function brokenCompressed(dir: string): Promise<string> {
  const raw = join(dir, 's.raw')
  await qemuImgOk(['create', '-q', '-f', 'raw', raw, '1M'])
  await qemuIoOk(raw, ['write -P 7 0 256k', 'write -P 9 512k 64k'], { format: 'raw' })
  const img = join(dir, 'c.qcow2')
  await qemuImgOk(['convert', '-c', '-O', 'qcow2', raw, img])
  const l1 = Number(u64(img, 40))
  const l2 = Number(u64(img, l1) & 0x00fffffffffffe00n)
  const entry = u64(img, l2 + 8) // guest cluster 1
  expect(entry >> 62n).toBe(1n) // compressed
  const host = Number(entry & ((1n << 54n) - 1n)) // 64 KiB clusters: 62 - (16 - 8) offset bits
  put(img, host, Buffer.alloc(64, 0xff))
  return img
}

/** the lines that are not warnings (the qcow2 driver's corruption event), tool name dropped */
const others = (stderr: string) =>
  stderr
    .split('\n')
    .filter((l) => l !== '' && !l.includes('warning:'))
    .map((l) => l.replace(/^(qemu-img|imgtool): /, ''))

/** a qcow2 whose L2 entry 1 points 512 bytes into its data cluster: status and reads of that cluster fail */
async function brokenDataCluster(dir: string): Promise<string> {
  const img = join(dir, 'd.qcow2')
  await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '1M'])
  await qemuIoOk(img, ['write -P 5 0 128k'])
  const l2 = Number(u64(img, Number(u64(img, 40))) & 0x00fffffffffffe00n)
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(u64(img, l2 + 8) + 0x200n)
  put(img, l2 + 8, b)
  return img
}

/** a qcow2 whose L1 entry 0 points at an unaligned L2 table: status and reads of its range fail */
async function brokenL2(dir: string): Promise<string> {
  const img = join(dir, 'b.qcow2')
  await qemuImgOk(['create', '-q', '-f', 'qcow2', img, '1M'])
  await qemuIoOk(img, ['write -P 5 0 128k'])
  const l1 = Number(u64(img, 40))
  const e = u64(img, l1)
  const b = Buffer.alloc(8)
  b.writeBigUInt64BE(e + 0x200n)
  put(img, l1, b)
  return img
}

describeQemu('convert --salvage against qemu-img', () => {
  useTempDirs()
  vi.setConfig({ testTimeout: 600_000 })

  for (const [name, make, lines] of [
    ['a compressed cluster that does not inflate', brokenCompressed, 128],
    ['an unaligned L2 table', brokenL2, 6144],
    ['an unaligned data cluster', brokenDataCluster, 384],
  ] as const) {
    for (const fmt of ['raw', 'qcow2'] as const) {
      it(`${name}, -O ${fmt}: exit 0, the same warnings, the same guest bytes; without --salvage both fail`, async () => {
        const dir = makeTempDir('imgtool-salvage-')
        const src = await make(dir)
        const ours = join(dir, `i.${fmt}`)
        const theirs = join(dir, `q.${fmt}`)
        const o = await cli('convert', '--salvage', '-O', fmt, src, ours)
        const q = await qemuImg(['convert', '--salvage', '-O', fmt, src, theirs])
        expect(o.code, o.stderr.slice(0, 500)).toBe(q.code)
        expect(o.code).toBe(0)
        expect(warnings(o.stderr)).toEqual(warnings(q.stderr))
        expect(warnings(o.stderr).length).toBe(lines)
        expect(others(o.stderr)).toEqual(others(q.stderr))
        expect(others(o.stderr).length).toBe(make === brokenCompressed ? 0 : 1)
        const cmp = await qemuImg(['compare', '-f', fmt, '-F', fmt, ours, theirs])
        expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
        if (fmt === 'qcow2') expect((await qemuImg(['check', ours])).code).toBe(0)
        // -q: the same zeros, no words
        const quiet = await cli('convert', '-q', '--salvage', '-O', fmt, src, join(dir, `iq.${fmt}`))
        const qquiet = await qemuImg(['convert', '-q', '--salvage', '-O', fmt, src, join(dir, `qq.${fmt}`)])
        expect(quiet.code).toBe(0)
        expect(warnings(quiet.stderr)).toEqual([])
        // only the driver's corruption event, which qemu-img prints with -q too
        expect(others(quiet.stderr)).toEqual(others(qquiet.stderr))
        // no --salvage: the read error fails both, and ours leaves no target
        const failed = join(dir, `f.${fmt}`)
        const of = await cli('convert', '-O', fmt, src, failed)
        const qf = await qemuImg(['convert', '-O', fmt, src, join(dir, `qf.${fmt}`)])
        expect(of.code).toBe(qf.code)
        expect(of.code).toBe(1)
        expect(existsSync(failed)).toBe(false)
      })
    }
  }

  it('-c with --salvage: the broken cluster becomes zeros, the rest compressed as qemu-img', async () => {
    const dir = makeTempDir('imgtool-salvage-c-')
    const src = await brokenCompressed(dir)
    const ours = join(dir, 'i.qcow2')
    const theirs = join(dir, 'q.qcow2')
    const o = await cli('convert', '--salvage', '-c', '-O', 'qcow2', src, ours)
    const q = await qemuImg(['convert', '--salvage', '-c', '-O', 'qcow2', src, theirs])
    expect(o.code).toBe(q.code)
    expect(warnings(o.stderr)).toEqual(warnings(q.stderr))
    expect((await qemuImg(['compare', ours, theirs])).code).toBe(0)
    expect((await qemuImg(['check', ours])).code).toBe(0)
  })
})

describe('convert --salvage in the library', () => {
  it('a raw source whose device fails two reads: each failed sector reported once, zeros in its place, the rest copied', async () => {
    const size = 1 << 20
    const bytes = new Uint8Array(size)
    for (let i = 0; i < size; i++) bytes[i] = (i >> 9) & 0xff || 1
    const inner = new MemoryDevice(size)
    await inner.write(0, bytes, 'data')
    const faulty = new FaultyDevice(inner)
    const src = await openImageOnDevice(faulty, { format: 'raw', readOnly: true })
    const dst = await openImageOnDevice(new MemoryDevice(size), { format: 'raw', readOnly: false })
    // the chunk read fails; of the sector reads that follow, the 3rd and the 7th fail
    faulty.failOn({ op: 'read', nth: 1 })
    faulty.failOn({ op: 'read', nth: 4 })
    faulty.failOn({ op: 'read', nth: 8 })
    const events: SalvageEvent[] = []
    const r = await convert(src, dst, { salvage: (e) => events.push(e) })
    expect(events.map((e) => [e.kind, e.offset])).toEqual([
      ['read', 2 * 512],
      ['read', 6 * 512],
    ])
    expect(r.salvagedSectors).toBe(2)
    const out = await dst.read(0, size)
    const want = bytes.slice()
    want.fill(0, 1024, 1536)
    want.fill(0, 3072, 3584)
    expect(Buffer.from(out).equals(Buffer.from(want))).toBe(true)
    // without salvage the same fault fails the copy
    faulty.failOn({ op: 'read', nth: 1 })
    await expect(convert(src, await openImageOnDevice(new MemoryDevice(size), { format: 'raw', readOnly: false }))).rejects.toThrow()
    await src.close()
  })
})
