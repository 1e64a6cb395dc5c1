/**
 * convert -O vmdk, judged by qemu-img: for every subformat over seeded random
 * sources (sizes that are not whole grains; sparse, dense and compressible
 * data; raw and qcow2), the output passes qemu-img check, compares identical
 * to the source, and qemu-img info gives the source's virtual size (whole
 * sectors) and the create type asked for; imgtool's own check finds nothing.
 * A streamOptimized output is the layout ESXi and the cloud importers take
 * (version 3, GD_AT_END, footer, end-of-stream marker), and goes to stdout too.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { checkExitCode } from '../../src/check/types.js'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgJson, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { FIXTURE_DIR, cli } from './support.js'

useTempDirs()

const GRAIN = 65536

/** seeded sources: runs of random bytes, patterned (compressible) bytes and zeros */
function source(kind: 'sparse' | 'dense' | 'compressible', size: number, seed: number): Buffer {
  const r = new Prng(seed)
  const b = Buffer.alloc(size)
  if (kind === 'dense') {
    b.set(r.bytes(size))
    return b
  }
  for (let at = 0; at < size;) {
    const n = Math.min(size - at, 512 * (1 + r.int(300)))
    const k = r.int(10)
    if (kind === 'sparse' && k < 7) {
      at += n * 8 // a long hole
      continue
    }
    if (kind === 'compressible' || k < 8) {
      const line = Buffer.from(`sector ${at} of a compressible disk, seed ${seed}\n`)
      for (let i = 0; i < n; i += line.length) line.copy(b, at + i, 0, Math.min(line.length, n - i))
    } else b.set(r.bytes(n), at)
    at += n
  }
  return b
}

const SOURCES = [
  { name: 'sparse-70M', kind: 'sparse' as const, size: 70 * 1024 * 1024 + 4321, seed: 11 },
  { name: 'dense-odd', kind: 'dense' as const, size: 3 * GRAIN + 777, seed: 12 },
  { name: 'compressible', kind: 'compressible' as const, size: 5 * 1024 * 1024 + 512 * 3, seed: 13 },
]
const SUBFORMATS = ['monolithicSparse', 'monolithicFlat', 'streamOptimized'] as const

describeQemu(
  'convert -O vmdk, judged by qemu-img',
  () => {
    const dir = makeTempDir('imgtool-vmdk-convert-')

    for (const s of SOURCES) {
      for (const from of ['raw', 'qcow2'] as const) {
        for (const sub of SUBFORMATS) {
          it(`${s.name} (${from}) -> ${sub}: qemu-img check clean, compare identical, size and create type; our check clean`, async () => {
            const raw = join(dir, `${s.name}.raw`)
            if (!existsSync(raw)) writeFileSync(raw, source(s.kind, s.size, s.seed))
            let src = raw
            if (from === 'qcow2') {
              src = join(dir, `${s.name}.qcow2`)
              if (!existsSync(src)) await qemuImgOk(['convert', '-f', 'raw', '-O', 'qcow2', raw, src])
            }
            const out = join(dir, `${s.name}-${from}-${sub}.vmdk`)
            const r = await cli('convert', '-f', from, '-O', 'vmdk', '-o', `subformat=${sub},adapter_type=lsilogic`, src, out)
            expect(r.code, r.err).toBe(0)
            const check = await qemuImg(['check', '-f', 'vmdk', out])
            expect(check.code, check.stdout + check.stderr).toBe(0)
            expect(check.stdout).toContain('No errors were found')
            const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, out])
            expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
            const info = await qemuImgJson<{ 'virtual-size': number; 'format-specific': { data: { 'create-type': string } } }>([
              'info',
              '-f',
              'vmdk',
              '--output=json',
              out,
            ])
            expect(info['virtual-size']).toBe(Math.ceil(s.size / 512) * 512)
            expect(info['format-specific'].data['create-type']).toBe(sub)
            const img = await openImage(out, { readOnly: true })
            try {
              const report = await img.check!()
              expect(report.findings).toEqual([])
              expect(report.notices ?? []).toEqual([])
              expect(checkExitCode(report)).toBe(0)
            } finally {
              await img.close()
            }
            if (sub === 'monolithicSparse') {
              // grains allocated as qemu-img allocates them: the same file size as qemu-img convert's
              const theirs = join(dir, `${s.name}-${from}-qemu.vmdk`)
              await qemuImgOk(['convert', '-f', from, '-O', 'vmdk', src, theirs])
              expect(readFileSync(out).length).toBe(readFileSync(theirs).length)
            }
          })
        }
      }
    }

    for (const o of [
      'zeroed_grain=on',
      'compat6=on,adapter_type=buslogic',
      'hwversion=7,subformat=streamOptimized',
      'adapter_type=legacyESX,subformat=monolithicFlat',
    ]) {
      it(`-o ${o}: the descriptor qemu-img create writes for those options, check clean, compare identical`, async () => {
        const raw = join(dir, 'opts-src.raw')
        if (!existsSync(raw)) writeFileSync(raw, source('sparse', 3 * 1024 * 1024 + 1234, 61))
        const out = join(dir, `opts-${o.replace(/\W+/g, '-')}.vmdk`)
        const r = await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', o, raw, out)
        expect(r.code, r.err).toBe(0)
        const theirs = join(dir, `opts-${o.replace(/\W+/g, '-')}-qemu.vmdk`)
        await qemuImgOk(['convert', '-f', 'raw', '-O', 'vmdk', '-o', o, raw, theirs])
        // the descriptor lines that carry the options (CID, names and createType aside for the stream, as qemu differs there)
        const ddb = (p: string) =>
          readFileSync(p)
            .toString('latin1')
            .split('\n')
            .filter((l) => l.startsWith('ddb.'))
        expect(ddb(out)).toEqual(ddb(theirs))
        expect(readFileSync(out).readUInt32LE(4)).toBe(readFileSync(theirs).readUInt32LE(4)) // sparse: the header version (1, 2 with zeroed grains, 3)
        expect((await qemuImg(['check', '-f', 'vmdk', out])).code).toBe(0)
        expect((await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, out])).code).toBe(0)
      })
    }

    it('streamOptimized: version 3, GD_AT_END, grain markers, footer and end-of-stream marker', async () => {
      const raw = join(dir, 'stream-src.raw')
      writeFileSync(raw, source('sparse', 40 * 1024 * 1024 + 100, 21))
      const out = join(dir, 'stream-bytes.vmdk')
      expect((await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, out)).code).toBe(0)
      const b = readFileSync(out)
      expect(b.length % 512).toBe(0)
      const headerAt = (at: number) => ({
        magic: b.toString('latin1', at, at + 4),
        version: b.readUInt32LE(at + 4),
        flags: b.readUInt32LE(at + 8),
        capacity: b.readBigUInt64LE(at + 12),
        grain: b.readBigUInt64LE(at + 20),
        gd: b.readBigUInt64LE(at + 56),
        compression: b.readUInt16LE(at + 77),
      })
      const head = headerAt(0)
      expect(head).toEqual({
        magic: 'KDMV',
        version: 3,
        flags: 0x30001,
        capacity: BigInt(Math.ceil((40 * 1024 * 1024 + 100) / 512)),
        grain: 128n,
        gd: 0xffffffffffffffffn,
        compression: 1,
      })
      // the last three sectors: footer marker, footer, end-of-stream marker
      const end = b.length
      expect([b.readBigUInt64LE(end - 1536), b.readUInt32LE(end - 1528), b.readUInt32LE(end - 1524)]).toEqual([1n, 0, 3])
      const foot = headerAt(end - 1024)
      expect({ ...foot, gd: 0n }).toEqual({ ...head, gd: 0n })
      expect(b.subarray(end - 512).every((x) => x === 0)).toBe(true)
      // the directory the footer names follows a GD marker; its tables follow GT markers
      const gd = Number(foot.gd) * 512
      expect(gd).toBeLessThan(end - 1536)
      expect([b.readUInt32LE(gd - 512 + 8), b.readUInt32LE(gd - 512 + 12)]).toEqual([0, 2])
      const entries = Math.ceil(Number(head.capacity) / (512 * 128))
      let tables = 0
      for (let i = 0; i < entries; i++) {
        const t = b.readUInt32LE(gd + i * 4) * 512
        if (t === 0) continue
        tables++
        expect([b.readBigUInt64LE(t - 512), b.readUInt32LE(t - 512 + 8), b.readUInt32LE(t - 512 + 12)]).toEqual([4n, 0, 1])
        // every grain marker names its own grain's sector
        for (let j = 0; j < 512; j++) {
          const g = b.readUInt32LE(t + j * 4) * 512
          if (g === 0) continue
          expect(b.readBigUInt64LE(g)).toBe(BigInt((i * 512 + j) * 128))
          expect(b.readUInt32LE(g + 8)).toBeGreaterThan(0)
        }
      }
      expect(tables).toBeGreaterThan(1)
      const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, out])
      expect(cmp.code, cmp.stderr).toBe(0)
    })

    it('streamOptimized: a table span without data gets no table (directory entry 0); qemu-img and imgtool read it alike', async () => {
      const raw = join(dir, 'gap-src.raw')
      const b = Buffer.alloc(100 * 1024 * 1024)
      b.set(new Prng(71).bytes(200000), 1000)
      b.set(new Prng(72).bytes(70000), 99 * 1024 * 1024 + 5)
      writeFileSync(raw, b)
      const out = join(dir, 'gap.vmdk')
      expect((await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, out)).code).toBe(0)
      const v = readFileSync(out)
      const gd = Number(v.readBigUInt64LE(v.length - 1024 + 56)) * 512
      expect([0, 1, 2, 3].map((i) => v.readUInt32LE(gd + i * 4) !== 0)).toEqual([true, false, false, true])
      expect((await qemuImg(['check', '-f', 'vmdk', out])).code).toBe(0)
      expect((await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, out])).code).toBe(0)
      expect((await cli('compare', '-f', 'raw', '-F', 'vmdk', raw, out)).code).toBe(0)
    })

    it('convert -O vmdk -o subformat=streamOptimized SRC - writes the stream to stdout; qemu-img reads it', async () => {
      const raw = join(dir, 'pipe-src.raw')
      writeFileSync(raw, source('compressible', 2 * 1024 * 1024 + 1000, 31))
      const r = await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, '-')
      expect(r.code, r.err).toBe(0)
      const out = join(dir, 'piped.vmdk')
      writeFileSync(out, r.bytes)
      expect((await qemuImg(['check', '-f', 'vmdk', out])).code).toBe(0)
      const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'vmdk', raw, out])
      expect(cmp.code, cmp.stderr).toBe(0)
      // other vmdk subformats cannot go to a pipe
      const bad = await cli('convert', '-f', 'raw', '-O', 'vmdk', raw, '-')
      expect(bad.code).toBe(1)
      expect(bad.err).toContain('streamOptimized')
    })

    it('-c -O vmdk is accepted as qemu-img accepts it: a monolithicSparse target stays uncompressed', async () => {
      const raw = join(dir, 'c-src.raw')
      writeFileSync(raw, source('dense', 200000, 41))
      const ours = join(dir, 'c-ours.vmdk')
      const theirs = join(dir, 'c-qemu.vmdk')
      expect((await cli('convert', '-c', '-f', 'raw', '-O', 'vmdk', raw, ours)).code).toBe(0)
      await qemuImgOk(['convert', '-c', '-f', 'raw', '-O', 'vmdk', raw, theirs])
      type Info = { 'format-specific': { data: { extents: Array<{ compressed?: boolean }> } } }
      const a = await qemuImgJson<Info>(['info', '--output=json', ours])
      const b = await qemuImgJson<Info>(['info', '--output=json', theirs])
      expect(a['format-specific'].data.extents[0]!.compressed).toBe(b['format-specific'].data.extents[0]!.compressed)
      expect((await qemuImg(['compare', '-f', 'raw', raw, ours])).code).toBe(0)
    })

    it('a convert that fails on a bad source grain removes its target (and a flat target its -flat file)', async () => {
      const bad = join(dir, 'bad-stream.vmdk')
      const b = Buffer.from(readFileSync(join(FIXTURE_DIR, 'conv-stream.vmdk')))
      const gd = Number(b.readBigUInt64LE(56)) * 512
      const gt = b.readUInt32LE(gd) * 512
      const grain = b.readUInt32LE(gt) * 512
      b.fill(0x55, grain + 12, grain + 40)
      writeFileSync(bad, b)
      for (const sub of SUBFORMATS) {
        const out = join(dir, `failed-${sub}.vmdk`)
        const r = await cli('convert', '-O', 'vmdk', '-o', `subformat=${sub}`, bad, out)
        expect(r.code, r.err).toBe(1)
        expect(r.err).toContain('compressed grain')
        expect(r.err).toContain('was removed')
        expect(existsSync(out)).toBe(false)
        expect(existsSync(join(dir, `failed-${sub}-flat.vmdk`))).toBe(false)
      }
    })

    it("measure -O vmdk is refused in qemu-img 7.2's words (its vmdk driver does not measure)", async () => {
      const theirs = await qemuImg(['measure', '-O', 'vmdk', '--size', '1M'])
      const ours = await cli('measure', '-O', 'vmdk', '--size', '1M')
      expect(theirs.code).toBe(1)
      expect(ours.code).toBe(1)
      expect(ours.err.trim().replace(/^imgtool: /, '')).toBe(theirs.stderr.trim().replace(/^qemu-img: /, ''))
    })

    it('option mistakes and a target that is the source are refused before a file is made', async () => {
      const raw = join(dir, 'opt-src.raw')
      writeFileSync(raw, source('dense', 100000, 51))
      const out = join(dir, 'opt.vmdk')
      for (const o of ['subformat=twoGbMaxExtentSparse', 'subformat=nope', 'adapter_type=scsi', 'compat6=on,hwversion=7', 'cluster_size=4k']) {
        const r = await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', o, raw, out)
        expect(r.code, o).toBe(1)
        expect(r.err.split('\n').filter(Boolean)).toHaveLength(1)
        expect(existsSync(out)).toBe(false)
      }
      // a flat target whose extent file would be the source
      const flatSrc = join(dir, 'me-flat.raw')
      writeFileSync(flatSrc, source('dense', 100000, 52))
      const r = await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat', flatSrc, join(dir, 'me.raw'))
      expect(r.code).toBe(1)
      expect(r.err).toContain('refusing to overwrite')
      expect(existsSync(join(dir, 'me.raw'))).toBe(false)
    })
  },
  ['qemu-img'],
)
