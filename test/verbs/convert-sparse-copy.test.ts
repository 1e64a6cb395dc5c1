/**
 * convert's native data path (src/convert/sparse-copy.ts): chunks that are one host range go into a raw
 * target through the addon's copySparse. It must make the target the JavaScript path makes, byte for
 * byte and hole for hole (SEEK_DATA map, blocks), for every -S, odd sizes and unaligned runs; take the
 * chunks it can (nativeBytes) and none it must not (-S 0, -c, -n into data, --salvage, non-raw targets);
 * and turn its read and write errors into the usual one-line errors naming the right file. Against
 * qemu-img: qcow2, vpc and vmdk sources to raw give qemu-img's bytes and map.
 */
import { closeSync, openSync, readFileSync, statSync, truncateSync, writeSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { convert } from '../../src/convert/convert.js'
import { convertFile } from '../../src/convert/to-file.js'
import { ImageIoError } from '../../src/errors.js'
import { copySparseAddon, seekHoleAddon, type CopySparse } from '../../src/io/seek-hole.js'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, run, useTempDirs } from '../support/qemu.js'

const BIN = resolve(__dirname, '..', '..', 'bin', 'imgtool')

useTempDirs()
const addon = copySparseAddon()

/** the data/hole layout of a file, by SEEK_DATA/SEEK_HOLE (the addon's seek) */
function holes(path: string): Array<[number, number]> {
  const a = seekHoleAddon()!
  const fd = openSync(path, 'r')
  try {
    const size = statSync(path).size
    const out: Array<[number, number]> = []
    let at = 0
    while (at < size) {
      const d = a.seek(fd, at, 0)
      if (d < 0) break
      const h = a.seek(fd, d, 1)
      out.push([d, h])
      at = h
    }
    return out
  } finally {
    closeSync(fd)
  }
}

/** xorshift32 */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    return (x >>>= 0)
  }
}

/** a raw file of `size` bytes: random runs of data, zero-filled data and holes, at odd offsets */
function randomRaw(path: string, size: number, seed: number): void {
  const r = rng(seed)
  const fd = openSync(path, 'w')
  try {
    let at = 0
    while (at < size) {
      const len = Math.min(size - at, 1 + (r() % (300 * 1024)))
      const kind = r() % 3
      if (kind === 0) {
        const b = Buffer.alloc(len)
        for (let i = 0; i < len; i += 1 + (r() % 700)) b[i] = 1 + (r() % 255)
        writeSync(fd, b, 0, len, at)
      } else if (kind === 1) writeSync(fd, Buffer.alloc(len), 0, len, at) // zeros written as data
      at += len // kind 2: a hole
    }
    if (statSync(path).size < size) writeSync(fd, Buffer.alloc(1), 0, 1, size - 1)
  } finally {
    closeSync(fd)
  }
}

/** a fresh file of `size` bytes that is all hole (a target that reads as zeros) */
function sparseFile(path: string, size: number): void {
  closeSync(openSync(path, 'w'))
  truncateSync(path, size)
}

async function convertBoth(src: string, dir: string, name: string, minSparse?: number) {
  const opt = { targetFormat: 'raw' as const, ...(minSparse !== undefined ? { minSparse } : {}) }
  const native = join(dir, `${name}-n.raw`)
  const plain = join(dir, `${name}-p.raw`)
  const rn = await convertFile(src, native, opt)
  process.env['IMGTOOL_NO_SPARSE_COPY'] = '1'
  try {
    const rp = await convertFile(src, plain, opt)
    expect(rp.nativeBytes, 'the JavaScript path takes no native chunk').toBeUndefined()
  } finally {
    delete process.env['IMGTOOL_NO_SPARSE_COPY']
  }
  return { native, plain, rn }
}

describe.skipIf(!addon)('convert into raw: the native data path makes what the JavaScript path makes', () => {
  afterEach(() => {
    delete process.env['IMGTOOL_NO_SPARSE_COPY']
  })

  it('random raw sources, odd sizes, every -S: the same bytes, the same holes, the same bytes written', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-')
    let n = 0
    for (const [size, seed] of [
      [5 * 1024 * 1024 + 777, 1],
      [8 * 1024 * 1024, 2],
      [3 * 1024 * 1024 + 4096 * 3 + 1, 3],
    ] as const) {
      const src = join(dir, `s${seed}.raw`)
      randomRaw(src, size, seed)
      for (const s of [undefined, 512, 4096, 65536, 1 << 20]) {
        const { native, plain, rn } = await convertBoth(src, dir, `c${n++}`, s)
        const what = `size ${size}, -S ${s ?? 'default'}`
        expect(rn.nativeBytes, what).toBeGreaterThan(0)
        expect(readFileSync(native).equals(readFileSync(plain)), what).toBe(true)
        // a raw target is the source's size rounded up to a sector, as qemu-img creates it
        expect(readFileSync(native).subarray(0, size).equals(readFileSync(src)), what).toBe(true)
        expect(holes(native), what).toEqual(holes(plain))
        expect(statSync(native).blocks, what).toBe(statSync(plain).blocks)
      }
    }
  })

  it('takes no chunk where the JavaScript path must run: -S 0, -c (qcow2 target), a target that holds data', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-off-')
    const src = join(dir, 's.raw')
    randomRaw(src, 4 << 20, 7)
    const full = await convertFile(src, join(dir, 'full.raw'), { targetFormat: 'raw', minSparse: 0 })
    expect(full.nativeBytes).toBeUndefined()
    expect(readFileSync(join(dir, 'full.raw')).equals(readFileSync(src))).toBe(true)
    const q = await convertFile(src, join(dir, 'q.qcow2'), { targetFormat: 'qcow2' })
    expect(q.nativeBytes).toBeUndefined()
    // -n without --target-is-zero: the gaps must be written as zeros, which only the JavaScript path does
    const dirty = join(dir, 'dirty.raw')
    writeSync(openSync(dirty, 'w'), Buffer.alloc(4 << 20, 0xaa))
    const d = await convertFile(src, dirty, { targetFormat: 'raw', skipCreate: true })
    expect(d.nativeBytes).toBeUndefined()
    expect(readFileSync(dirty).equals(readFileSync(src))).toBe(true)
    // -n --target-is-zero into a fresh file: the native path again
    const zero = join(dir, 'zero.raw')
    sparseFile(zero, 4 << 20)
    const z = await convertFile(src, zero, { targetFormat: 'raw', skipCreate: true, targetIsZero: true })
    expect(z.nativeBytes).toBeGreaterThan(0)
    expect(readFileSync(zero).equals(readFileSync(src))).toBe(true)
  })

  it('a failed write names the target, a failed read the source; one line, an ImageIoError', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-err-')
    const src = join(dir, 's.raw')
    randomRaw(src, 4 << 20, 9)
    const target = join(dir, 't.raw')
    /** convert src into a fresh sparse t.raw with `copy` standing in for the addon's copySparse */
    const run = async (copy: CopySparse): Promise<unknown> => {
      sparseFile(target, 4 << 20)
      const s = await openImage(src, { format: 'raw', readOnly: true })
      const d = await openImage(target, { format: 'raw', readOnly: false })
      return convert(s, d, { hostFiles: true, sparseCopy: copy })
        .catch((e: unknown) => e)
        .finally(async () => {
          await d.close()
          await s.close()
        })
    }
    let total = 0
    const ok = await run(async (...a) => (total++, addon!(...a)))
    expect((ok as { nativeBytes?: number }).nativeBytes).toBeGreaterThan(0)
    expect(total).toBeGreaterThan(1)
    // every call failed in turn, as a write error and as a read error
    for (let k = 1; k <= total; k++) {
      for (const [ret, file, code, kind] of [
        [-(4096 + 28), 't.raw', 'ENOSPC', 'NO_SPACE'],
        [-5, 's.raw', 'EIO', 'IO'],
      ] as const) {
        let calls = 0
        const err = await run(async (...a) => (++calls === k ? ret : addon!(...a)))
        const what = `call ${k} of ${total}: ${code}`
        expect(err, what).toBeInstanceOf(ImageIoError)
        const msg = (err as Error).message
        expect(msg.split('\n'), what).toHaveLength(1)
        expect(msg, what).toContain(join(dir, file))
        expect(msg, what).toContain(code)
        expect((err as ImageIoError).code, what).toBe(kind) // as the JavaScript path's fs errors map it
      }
    }
  })

  it('a real write failure (EFBIG under ulimit -f) on the native path: the exit code of the JavaScript path and a one-line error', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-efbig-')
    const src = join(dir, 's.raw')
    randomRaw(src, 8 << 20, 13)
    const codes: number[] = []
    for (const env of [{}, { IMGTOOL_NO_SPARSE_COPY: '1' }]) {
      const target = join(dir, 't.raw')
      sparseFile(target, 8 << 20) // -n --target-is-zero: no ftruncate, so the first data write past 1 MiB fails
      const script = `trap '' XFSZ; ulimit -f 2048; exec "$0" "$@"`
      const r = await run('bash', ['-c', script, process.execPath, BIN, 'convert', '-n', '--target-is-zero', '-f', 'raw', '-O', 'raw', src, target], {
        env: { ...process.env, ...env },
        timeout: 120_000,
      })
      const what = JSON.stringify(env)
      expect(r.code, `${what}: ${r.stderr}`).not.toBe(0)
      const lines = r.stderr.trim().split('\n')
      expect(lines, what).toHaveLength(1)
      expect(lines[0], what).toContain(target)
      expect(lines[0], what).toContain('EFBIG')
      codes.push(r.code ?? -1)
    }
    expect(codes[0]).toBe(codes[1])
  })
})

describeQemu('convert into fixed vpc and flat vmdk on the native data path', () => {
  vi.setConfig({ testTimeout: 300_000 })
  it.skipIf(!addon)('the same data and holes as the JavaScript path, qemu-img compare identical, the same virtual size', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-inplace-')
    const raw = join(dir, 'src.raw')
    randomRaw(raw, 7 << 20, 21)
    const q = join(dir, 'src.qcow2')
    await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', raw, q])
    for (const s of [raw, q]) {
      for (const [fmt, sub, data] of [
        ['vpc', 'fixed', (f: string) => f],
        ['vmdk', 'monolithicFlat', (f: string) => f.replace(/\.vmdk$/, '-flat.vmdk')],
      ] as const) {
        const base = `${s.endsWith('.raw') ? 'r' : 'q'}-${sub}`
        const native = join(dir, `${base}-n.${fmt}`)
        const plain = join(dir, `${base}-p.${fmt}`)
        const options = { subformat: sub, ...(fmt === 'vpc' ? { force_size: 'on' } : {}) }
        const rn = await convertFile(s, native, { targetFormat: fmt, options })
        process.env['IMGTOOL_NO_SPARSE_COPY'] = '1'
        try {
          expect((await convertFile(s, plain, { targetFormat: fmt, options })).nativeBytes).toBeUndefined()
        } finally {
          delete process.env['IMGTOOL_NO_SPARSE_COPY']
        }
        const what = `${s} -> ${fmt} ${sub}`
        expect(rn.nativeBytes, what).toBeGreaterThan(0)
        // the guest bytes (a fixed disk's footer holds a fresh UUID and time: left out)
        const guest = 7 << 20
        expect(
          readFileSync(data(native))
            .subarray(0, guest)
            .equals(readFileSync(data(plain)).subarray(0, guest)),
          what,
        ).toBe(true)
        expect(
          holes(data(native)).filter(([a]) => a < guest),
          what,
        ).toEqual(holes(data(plain)).filter(([a]) => a < guest))
        expect((await qemuImg(['compare', '-f', 'raw', '-F', fmt, raw, native])).code, what).toBe(0)
        const info = JSON.parse(await qemuImgOk(['info', '--output=json', '-f', fmt, native])) as { 'virtual-size': number }
        expect(info['virtual-size'], what).toBe(guest)
      }
    }
  })
})

describeQemu('convert to raw on the native data path against qemu-img', () => {
  vi.setConfig({ testTimeout: 300_000 })
  it.skipIf(!addon)('qcow2 (4k and 64k clusters, zero clusters, a backing file), vpc, vmdk: qemu-img convert -O raw bytes and map', async () => {
    const dir = makeTempDir('imgtool-sparse-copy-qemu-')
    const raw = join(dir, 'base.raw')
    randomRaw(raw, 6 << 20, 11)
    const srcs: Array<[string, string]> = []
    for (const cs of ['4096', '65536']) {
      const q = join(dir, `c${cs}.qcow2`)
      await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, q])
      await qemuIoOk(q, ['write -z 1M 64k', 'write -P 0 2M 128k', 'write -P 7 3000k 5k'])
      srcs.push([q, 'qcow2'])
    }
    const top = join(dir, 'top.qcow2')
    await qemuImgOk(['create', '-q', '-f', 'qcow2', '-b', srcs[1]![0], '-F', 'qcow2', top])
    await qemuIoOk(top, ['write -P 3 512k 300k', 'write -z 4M 1M'])
    srcs.push([top, 'qcow2'])
    for (const [fmt, o] of [
      ['vpc', 'subformat=dynamic'],
      ['vpc', 'subformat=fixed'],
      ['vmdk', 'subformat=monolithicSparse'],
      ['vmdk', 'subformat=monolithicFlat'],
    ] as const) {
      const f = join(dir, `s-${o.split('=')[1]}.${fmt}`)
      await qemuImgOk(['convert', '-f', 'raw', '-O', fmt, '-o', o, raw, f])
      srcs.push([f, fmt])
    }
    for (const [s, fmt] of srcs) {
      const ours = join(dir, `${s.split('/').pop()}.ours.raw`)
      const theirs = join(dir, `${s.split('/').pop()}.theirs.raw`)
      const r = await convertFile(s, ours, { targetFormat: 'raw', sourceFormat: fmt as 'qcow2' })
      await qemuImgOk(['convert', '-f', fmt, '-O', 'raw', s, theirs])
      expect(r.nativeBytes, s).toBeGreaterThan(0)
      expect(readFileSync(ours).equals(readFileSync(theirs)), s).toBe(true)
      expect(await qemuImgOk(['map', '--output=json', '-f', 'raw', ours]), s).toBe(await qemuImgOk(['map', '--output=json', '-f', 'raw', theirs]))
    }
  })
})
