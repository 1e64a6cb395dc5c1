/**
 * preallocation=falloc|full for qcow2 and raw, as qemu-img 7.2 makes them:
 * falloc gives the data area host blocks by fallocate(2) without writing it,
 * full writes zeros; both lay the qcow2 file out as qemu does (a new refcount
 * area after the L1 table, the data after it, L2 tables first fit).
 */
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { FileDevice } from '../../src/io/file-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { allocate, createRawFile } from '../../src/io/prealloc.js'
import { fallocateAddon } from '../../src/io/seek-hole.js'
import { refcountMetadataSize } from '../../src/formats/qcow2/ops/prealloc-data.js'
import { cli } from '../support/cli.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { checkCounts, createOn, MemFiles, openOn } from './helpers.js'

useTempDirs()

const K = 1024
const M = 1024 * 1024
const BIN = resolve(__dirname, '..', '..', 'bin', 'imgtool')
const u64 = (b: Uint8Array, o: number): number => Number(new DataView(b.buffer, b.byteOffset).getBigUint64(o) & 0x00ff_ffff_ffff_fe00n)
const flags = (b: Uint8Array, o: number): bigint => new DataView(b.buffer, b.byteOffset).getBigUint64(o) >> 62n
const u32 = (b: Uint8Array, o: number): number => new DataView(b.buffer, b.byteOffset).getUint32(o)
const isZero = (b: Uint8Array): boolean => b.every((x) => x === 0)

/** The image's guest bytes all zero, every cluster mapped to data, and check clean. */
async function expectPreallocatedZeros(dev: MemoryDevice, files: MemFiles, size: number, extendedL2: boolean): Promise<void> {
  const img = await openOn(dev, files)
  for (let o = 0; o < size; o += 4 * M) expect(isZero(await img.read(o, Math.min(4 * M, size - o)))).toBe(true)
  for await (const e of img.extents()) {
    // extended L2: the subclusters of a preallocated cluster stay unallocated (they read as zeros), as in QEMU
    if (!extendedL2) expect(e.present && e.data && !e.zero, JSON.stringify(e)).toBe(true)
    expect(e.hostOffset).toBeDefined()
  }
  await img.close()
  const c = await checkCounts(dev)
  expect({ c: c.corruptions, l: c.leaks, e: c.checkErrors }, c.diagnostics.join('\n')).toEqual({ c: 0, l: 0, e: 0 })
}

describe('qcow2 preallocation=falloc|full on memory devices', () => {
  for (const [opts, size] of [
    [{ cluster_size: '65536' }, 5 * M + 512],
    [{ cluster_size: '512' }, 300 * K],
    [{ cluster_size: '4096', compat: '0.10' }, 3 * M],
    [{ cluster_size: '32768', extended_l2: 'on' }, 4 * M],
    [{ cluster_size: '1024', refcount_bits: '64' }, 2 * M],
  ] as Array<[Record<string, string>, number]>) {
    it(`${JSON.stringify(opts)}: falloc and full lay out the same image, data after a new refcount table, reading zeros`, async () => {
      const images: Uint8Array[] = []
      for (const mode of ['falloc', 'full']) {
        const files = new MemFiles()
        const dev = new MemoryDevice(0, { name: 'x.qcow2' })
        await createOn(dev, size, { ...opts, preallocation: mode }, files)
        await expectPreallocatedZeros(dev, files, size, opts['extended_l2'] === 'on')
        images.push(dev.snapshot())
      }
      expect(Buffer.compare(images[0]!, images[1]!)).toBe(0)
      const b = images[0]!
      const cs = 2 ** u32(b, 20)
      // the refcount table left cluster 1 for the area after the L1 table; the first L2 table took its place
      expect(u64(b, 48)).toBeGreaterThan(u64(b, 40))
      expect(u64(b, u64(b, 40))).toBe(cs)
      const dataStart = u64(b, 48) + u32(b, 56) * cs
      const l2 = b.subarray(cs, 2 * cs)
      expect(u64(l2, 0)).toBe(dataStart) // the first data cluster...
      expect(flags(l2, 0)).toBe(2n) // ...with COPIED
    })
  }

  it('size 0: the refcount table still moves (qemu-img does the same)', async () => {
    const dev = new MemoryDevice(0, { name: 'x.qcow2' })
    await createOn(dev, 0, { preallocation: 'falloc' })
    const b = dev.snapshot()
    expect(u64(b, 48)).toBe(3 * 65536)
    expect(b.byteLength).toBe(4 * 65536)
  })

  it('refcount metadata size: the fixed point qemu computes', () => {
    // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters
    expect(refcountMetadataSize(1030, 65536, 4, false)).toEqual({ blocks: 1, table: 1 })
    expect(refcountMetadataSize(32767, 65536, 4, false)).toEqual({ blocks: 2, table: 1 })
    // 512 B clusters, 64-bit refcounts: 64 per block, 64 entries per table cluster
    expect(refcountMetadataSize(10_000, 512, 6, false)).toEqual({ blocks: 159, table: 3 })
  })
})

describe('BlockDevice.allocate', () => {
  const dir = makeTempDir('imgtool-alloc-')

  it('file device: blocks without data written, earlier bytes kept, the rest zeros, the size grown', async () => {
    const path = join(dir, 'a.bin')
    const dev = await FileDevice.open(path, { readOnly: false, create: true })
    await dev.write(0, new Uint8Array([1, 2, 3]))
    await dev.allocate(0, 8 * M)
    expect(dev.size).toBe(8 * M)
    await dev.flush()
    const got = await dev.read(0, 8 * M)
    expect([...got.subarray(0, 4)]).toEqual([1, 2, 3, 0])
    expect(isZero(got.subarray(3))).toBe(true)
    await dev.close()
    expect(statSync(path).size).toBe(8 * M)
    expect(statSync(path).blocks * 512).toBeGreaterThanOrEqual(8 * M)
  })

  it('memory device grows; devices without allocate() get the range written', async () => {
    const mem = new MemoryDevice(new Uint8Array([9, 9]))
    await mem.allocate(0, 1000)
    expect(mem.size).toBe(1000)
    expect([...(await mem.read(0, 3))]).toEqual([9, 9, 0])
    const writes: Array<[number, number]> = []
    const inner = new MemoryDevice(new Uint8Array([7, 7, 7]))
    const plain = {
      get size() {
        return inner.size
      },
      readOnly: false,
      name: 'plain',
      read: (o: number, l: number) => inner.read(o, l),
      write: (o: number, d: Uint8Array) => {
        writes.push([o, d.byteLength])
        return inner.write(o, d)
      },
      flush: () => inner.flush(),
      truncate: (s: number) => inner.truncate(s),
      close: () => inner.close(),
    }
    await allocate(plain, 1, 5 * M)
    expect(inner.size).toBe(5 * M + 1)
    expect([...(await inner.read(0, 4))]).toEqual([7, 7, 7, 0])
    expect(writes.reduce((n, [, l]) => n + l, 0)).toBe(5 * M) // every byte of the range written once
  })

  it('raw files as qemu makes them: off and falloc write the first block, full writes everything', async () => {
    for (const [mode, size, firstBlock] of [
      ['off', 1 * M, 4096],
      ['falloc', 1 * M, 4096],
      ['off', 2048, 512],
      ['full', 64 * K, 0],
    ] as const) {
      const writes: number[] = []
      const mem = new MemoryDevice(0)
      const spy = {
        get size() {
          return mem.size
        },
        readOnly: false,
        name: 'spy',
        read: (o: number, l: number) => mem.read(o, l),
        write: (o: number, d: Uint8Array) => {
          writes.push(d.byteLength)
          return mem.write(o, d)
        },
        flush: () => mem.flush(),
        truncate: (n: number) => mem.truncate(n),
        allocate: (o: number, l: number) => mem.allocate(o, l),
        close: () => mem.close(),
      }
      await createRawFile(spy, size, mode)
      expect(mem.size).toBe(size)
      expect(
        writes.reduce((a, b) => a + b, 0),
        mode,
      ).toBe(mode === 'full' ? size : firstBlock)
    }
  })
})

describe('without fallocate', () => {
  afterEach(() => {
    vi.doUnmock('../../src/io/seek-hole.js')
    vi.resetModules()
  })

  it('EOPNOTSUPP from the filesystem: the blocks are written instead (glibc posix_fallocate does that for qemu-img)', async () => {
    vi.resetModules()
    vi.doMock('../../src/io/seek-hole.js', async (orig) => ({
      ...(await orig<typeof import('../../src/io/seek-hole.js')>()),
      fallocateAddon: () => async () => -95,
    }))
    const { FileDevice: FreshFileDevice } = await import('../../src/io/file-device.js')
    const dir = makeTempDir('imgtool-noalloc-')
    const path = join(dir, 'n.bin')
    const dev = await FreshFileDevice.open(path, { readOnly: false, create: true })
    await dev.write(0, new Uint8Array([5]))
    await dev.allocate(0, 3 * M)
    await dev.close()
    const st = statSync(path)
    expect(st.size).toBe(3 * M)
    expect(st.blocks * 512).toBeGreaterThanOrEqual(3 * M)
    const bytes = readFileSync(path)
    expect(bytes[0]).toBe(5)
    expect(isZero(bytes.subarray(1))).toBe(true)
  })

  it('other fallocate errors are reported, not papered over', async () => {
    vi.resetModules()
    vi.doMock('../../src/io/seek-hole.js', async (orig) => ({
      ...(await orig<typeof import('../../src/io/seek-hole.js')>()),
      fallocateAddon: () => async () => -28,
    }))
    const { FileDevice: FreshFileDevice } = await import('../../src/io/file-device.js')
    const dev = await FreshFileDevice.open(join(makeTempDir('imgtool-nospc-'), 'f.bin'), { readOnly: false, create: true })
    await expect(dev.allocate(0, M)).rejects.toThrow(/ENOSPC/)
    await dev.close()
  })

  it('the addon is built with fallocate (so the other tests exercise fallocate itself)', () => {
    if (!existsSync(resolve(__dirname, '..', '..', 'build', 'Release', 'seekhole.node'))) {
      console.warn('[imgtool tests] native addon not built: preallocation is tested through its writing fallback only')
      return
    }
    expect(fallocateAddon()).not.toBeNull()
  })

  it('no addon (IMGTOOL_NO_SEEK_HOLE=1, the built CLI): the same qcow2 and raw files, their blocks allocated', async () => {
    const dir = makeTempDir('imgtool-noaddon-')
    const run = (args: string[], env: NodeJS.ProcessEnv) =>
      new Promise<number | null>((res, rej) => {
        const child = spawn(process.execPath, [BIN, ...args], { stdio: 'ignore', env: { ...process.env, ...env } })
        child.on('error', rej)
        child.on('close', res)
      })
    for (const [fmt, o] of [
      ['qcow2', 'preallocation=falloc,cluster_size=4096'],
      ['raw', 'preallocation=falloc'],
    ] as const) {
      const a = join(dir, `with.${fmt}`)
      const b = join(dir, `without.${fmt}`)
      expect(await run(['create', '-q', '-f', fmt, '-o', o, a, '6M'], {})).toBe(0)
      expect(await run(['create', '-q', '-f', fmt, '-o', o, b, '6M'], { IMGTOOL_NO_SEEK_HOLE: '1' })).toBe(0)
      expect(Buffer.compare(readFileSync(a), readFileSync(b)), fmt).toBe(0)
      expect(statSync(b).blocks * 512, fmt).toBeGreaterThanOrEqual(6 * M)
      expect(Math.abs(statSync(a).blocks - statSync(b).blocks), fmt).toBeLessThanOrEqual(64)
    }
  })
})

// ---------------------------------------------------------------------------
// against qemu-img

type Info = Record<string, unknown>
const strip = (j: Info): Info => ({ ...j, filename: '', 'actual-size': 0 })
/** allocated sizes agree within a little filesystem noise (seen: up to 8 blocks) */
const closeTo = (a: number, b: number): boolean => Math.abs(a - b) <= Math.max(256 * K, b / 100)

/** `create` by both tools in two sibling directories (so file names in headers match); the two directories. */
async function both(dir: string, name: string, fmt: string, o: string, size: string): Promise<{ ours: string; theirs: string }> {
  const ours = join(dir, name, 'ours')
  const theirs = join(dir, name, 'theirs')
  mkdirSync(ours, { recursive: true })
  mkdirSync(theirs, { recursive: true })
  const r = await cli('create', '-q', '-f', fmt, '-o', o, join(ours, `img.${fmt}`), size)
  expect(r.code, r.stderr).toBe(0)
  // in the image's directory: qemu-img creates (and opens) a relative data_file from its working directory
  await qemuImgOk(['create', '-q', '-f', fmt, '-o', o, `img.${fmt}`, size], { cwd: theirs })
  return { ours, theirs }
}

function sameBytes(a: string, b: string, skip: number, what: string): void {
  const x = readFileSync(a)
  const y = readFileSync(b)
  expect(x.byteLength, `${what}: file size`).toBe(y.byteLength)
  expect(Buffer.compare(x.subarray(0, 104), y.subarray(0, 104)), `${what}: header fields`).toBe(0)
  const at = x.subarray(skip).findIndex((v, i) => v !== y[skip + i])
  expect(at < 0 ? -1 : skip + at, `${what}: first differing byte`).toBe(-1)
}

describeQemu('preallocation=falloc|full against qemu-img create', () => {
  const dir = makeTempDir('imgtool-prealloc-')
  const zeros = join(dir, 'zeros.raw')

  const QCOW2: Array<[string, string]> = [
    ['cluster_size=65536', '20M'],
    ['cluster_size=512', '3M'],
    ['cluster_size=4096,compat=0.10', '5000000'],
    ['cluster_size=2M', '9M'],
    ['cluster_size=32768,extended_l2=on', '7M'],
    ['cluster_size=16384,extended_l2=on,lazy_refcounts=on', '2M'],
    ['cluster_size=1024,refcount_bits=64', '6M'],
    ['cluster_size=4096,refcount_bits=1', '6M'],
  ]
  for (const mode of ['falloc', 'full']) {
    for (const [opts, size] of QCOW2) {
      it(`qcow2 ${mode} ${opts} ${size}: same info, map, layout and bytes; blocks allocated; zeros; check clean`, async () => {
        const o = `preallocation=${mode},${opts}`
        const name = `${mode}-${opts.replace(/[,=]/g, '_')}`
        const { ours, theirs } = await both(dir, name, 'qcow2', o, size)
        const a = join(ours, 'img.qcow2')
        const b = join(theirs, 'img.qcow2')
        const ia = await qemuImgJson<Info>(['info', '--output=json', a])
        const ib = await qemuImgJson<Info>(['info', '--output=json', b])
        expect(strip(ia)).toEqual(strip(ib))
        expect(closeTo(ia['actual-size'] as number, ib['actual-size'] as number), `actual-size ${ia['actual-size']} vs ${ib['actual-size']}`).toBe(true)
        const vsize = ia['virtual-size'] as number
        expect(ia['actual-size'] as number).toBeGreaterThanOrEqual(vsize)
        expect(await qemuImgOk(['map', '--output=json', a])).toBe(await qemuImgOk(['map', '--output=json', b]))
        const ourMap = await cli('map', '--output', 'json', a)
        expect(JSON.parse(ourMap.stdout)).toEqual(JSON.parse(await qemuImgOk(['map', '--output=json', b])))
        const ourInfo = JSON.parse((await cli('info', '--output', 'json', a)).stdout) as Info
        expect(ourInfo['actual-size']).toBe(statSync(a).blocks * 512)
        const cs = ia['cluster-size'] as number
        sameBytes(a, b, cs, o) // the header cluster's extensions aside (qemu leaves the feature table out of small clusters)
        expect(closeTo(statSync(a).blocks * 512, statSync(b).blocks * 512)).toBe(true)
        const chk = await qemuImg(['check', a])
        expect(chk.code, chk.stdout + chk.stderr).toBe(0)
        writeFileSync(zeros, '')
        await qemuImgOk(['resize', '-q', '-f', 'raw', zeros, String(vsize)])
        const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', a, zeros])
        expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      })
    }
  }

  for (const mode of ['falloc', 'full']) {
    it(`qcow2 ${mode} over a backing file (extended L2): the same file; the backing file shows through`, async () => {
      const ours = join(dir, `backing-${mode}`, 'ours')
      const theirs = join(dir, `backing-${mode}`, 'theirs')
      for (const d of [ours, theirs]) {
        mkdirSync(d, { recursive: true })
        writeFileSync(join(d, 'base.raw'), Buffer.alloc(3 * M, 0x5a))
      }
      const o = `preallocation=${mode},extended_l2=on`
      const r = await cli('create', '-q', '-f', 'qcow2', '-o', o, '-b', 'base.raw', '-F', 'raw', join(ours, 'img.qcow2'), '3M')
      expect(r.code, r.stderr).toBe(0)
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', o, '-b', 'base.raw', '-F', 'raw', 'img.qcow2', '3M'], { cwd: theirs })
      sameBytes(join(ours, 'img.qcow2'), join(theirs, 'img.qcow2'), 65536, o)
      expect(await qemuImgOk(['map', '--output=json', 'img.qcow2'], { cwd: ours })).toBe(
        await qemuImgOk(['map', '--output=json', 'img.qcow2'], { cwd: theirs }),
      )
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', 'img.qcow2', 'base.raw'], { cwd: ours })
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      expect(statSync(join(ours, 'img.qcow2')).blocks * 512).toBeGreaterThanOrEqual(3 * M)
    })
  }

  for (const mode of ['off', 'metadata', 'falloc', 'full']) {
    for (const extra of ['', ',data_file_raw=on,cluster_size=4096']) {
      it(`qcow2 ${mode} with an external data file${extra}: the data file as qemu makes it`, async () => {
        const o = `preallocation=${mode},data_file=img.data${extra}`
        const { ours, theirs } = await both(dir, `data-${mode}${extra ? '-raw' : ''}`, 'qcow2', o, '9M')
        sameBytes(join(ours, 'img.qcow2'), join(theirs, 'img.qcow2'), extra ? 4096 : 65536, o)
        const da = join(ours, 'img.data')
        const db = join(theirs, 'img.data')
        expect(statSync(da).size).toBe(statSync(db).size)
        expect(Buffer.compare(readFileSync(da), readFileSync(db))).toBe(0)
        expect(closeTo(statSync(da).blocks * 512, statSync(db).blocks * 512), `${statSync(da).blocks} vs ${statSync(db).blocks} blocks`).toBe(true)
        if (mode === 'falloc' || mode === 'full') expect(statSync(da).blocks * 512).toBeGreaterThanOrEqual(9 * M)
        expect(await qemuImgOk(['map', '-f', 'raw', '--output=json', da])).toBe(await qemuImgOk(['map', '-f', 'raw', '--output=json', db]))
        // qemu-img opens a relative data_file name from its working directory (imgtool: from the image's)
        expect(await qemuImgOk(['map', '--output=json', 'img.qcow2'], { cwd: ours })).toBe(
          await qemuImgOk(['map', '--output=json', 'img.qcow2'], { cwd: theirs }),
        )
        const chk = await qemuImg(['check', 'img.qcow2'], { cwd: ours })
        expect(chk.code, chk.stdout + chk.stderr).toBe(0)
      })
    }
  }

  for (const [mode, size] of [
    ['off', '64M'],
    ['falloc', '64M'],
    ['full', '8M'],
    ['falloc', '3000'],
    ['off', '1000'],
  ] as const) {
    it(`raw ${mode} ${size}: the same file, map and allocation as qemu-img`, async () => {
      const { ours, theirs } = await both(dir, `raw-${mode}-${size}`, 'raw', `preallocation=${mode}`, size)
      const a = join(ours, 'img.raw')
      const b = join(theirs, 'img.raw')
      expect(statSync(a).size).toBe(statSync(b).size)
      expect(Buffer.compare(readFileSync(a), readFileSync(b))).toBe(0)
      expect(await qemuImgOk(['map', '-f', 'raw', '--output=json', a])).toBe(await qemuImgOk(['map', '-f', 'raw', '--output=json', b]))
      expect(closeTo(statSync(a).blocks * 512, statSync(b).blocks * 512), `${statSync(a).blocks} vs ${statSync(b).blocks} blocks`).toBe(true)
      const ia = await qemuImgJson<Info>(['info', '-f', 'raw', '--output=json', a])
      expect(strip(ia)).toEqual(strip(await qemuImgJson<Info>(['info', '-f', 'raw', '--output=json', b])))
      if (mode !== 'off') expect(statSync(a).blocks * 512).toBeGreaterThanOrEqual(statSync(a).size)
    })
  }

  it('raw metadata: refused as qemu-img refuses it, the file left empty', async () => {
    const a = join(dir, 'meta-ours.raw')
    const b = join(dir, 'meta-theirs.raw')
    const r = await cli('create', '-q', '-f', 'raw', '-o', 'preallocation=metadata', a, '1M')
    const q = await qemuImg(['create', '-q', '-f', 'raw', '-o', 'preallocation=metadata', b, '1M'])
    expect(r.code).toBe(1)
    expect(q.code).toBe(1)
    expect(r.stderr).toMatch(/Unsupported preallocation mode: metadata/)
    expect(q.stderr).toMatch(/Unsupported preallocation mode: metadata/)
    expect(statSync(a).size).toBe(statSync(b).size)
  })
})
