/**
 * Interop with live QEMU: images we create and write (random option
 * combinations) pass qemu-img check with no leaks or corruptions, qemu-img
 * compare against the expected raw bytes says identical, qemu-io can keep
 * writing to them; and we can keep writing to images qemu made and wrote.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { openFileDevice } from '../../src/io/file-device.js'
import { makeContext, openImage } from '../../src/open.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import { compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, mapLimit, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

export interface Combo {
  id: number
  options: Record<string, string>
  size: number
  backing?: 'raw' | 'qcow2'
  creator: 'imgtool' | 'qemu'
}

export function randomCombo(rng: Prng, id: number): Combo {
  const v3 = rng.chance(0.8)
  const clusterSizes = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
  const cs = clusterSizes[rng.int(clusterSizes.length)]!
  const o: Record<string, string> = { compat: v3 ? '1.1' : '0.10', cluster_size: String(cs) }
  if (v3) {
    o['refcount_bits'] = String(2 ** rng.int(7))
    if (rng.chance(0.3)) o['lazy_refcounts'] = 'on'
    if (cs >= 16384 && rng.chance(0.4)) o['extended_l2'] = 'on'
    if (rng.chance(0.3)) o['compression_type'] = 'zstd'
  }
  const size = (64 * 1024 + rng.int(4 * 1024 * 1024)) & ~511
  let backing: Combo['backing']
  const r = rng.next()
  if (r < 0.2) backing = 'raw'
  else if (r < 0.35) backing = 'qcow2'
  else if (rng.chance(0.25)) o['preallocation'] = ['metadata', 'falloc', 'full'][rng.int(3)]!
  if (v3 && rng.chance(0.15) && o['compression_type'] === undefined) {
    o['data_file'] = `data-${id}.raw`
    if (!backing && rng.chance(0.5)) o['data_file_raw'] = 'on'
  }
  const combo: Combo = { id, options: o, size, creator: rng.chance(0.25) ? 'qemu' : 'imgtool' }
  if (backing) combo.backing = backing
  return combo
}

function optString(o: Record<string, string>): string {
  return Object.entries(o)
    .map(([k, v]) => `${k}=${v}`)
    .join(',')
}

/** Random writes through our writer, mirrored into `expected`. */
async function ourWrites(img: Qcow2Image, expected: Uint8Array, rng: Prng, n: number, compressed: boolean): Promise<void> {
  const size = expected.byteLength
  const cs = img.clusterSize
  for (let i = 0; i < n; i++) {
    const kind = rng.next()
    const off = rng.int(size - 1)
    const len = Math.max(1, Math.min(size - off, 1 + rng.int(rng.chance(0.3) ? 3 * cs + 70_000 : 3000)))
    if (kind < 0.15) {
      await img.writeZeroes(off, len, { discard: rng.chance(0.5) })
      expected.fill(0, off, off + len)
    } else if (kind < 0.25 && compressed) {
      const c = Math.floor(off / cs) * cs
      if (c + cs > size) continue
      const data = rng.bytes(cs)
      data.fill(rng.int(256), 0, Math.floor(cs * 0.7))
      const z = await compressCluster(data, cs, img.header.compressionType)
      if (z) await img.writeCompressed(c, z)
      else await img.write(c, data)
      expected.set(data, c)
    } else {
      const data = rng.bytes(len)
      await img.write(off, data)
      expected.set(data, off)
    }
  }
}

async function qemuCheckClean(path: string, cwd?: string): Promise<void> {
  const r = await qemuImg(['check', '--output=json', '-f', 'qcow2', path], cwd ? { cwd } : {})
  const j = JSON.parse(r.stdout || '{}') as Record<string, number>
  expect(
    { code: r.code, corruptions: j['corruptions'] ?? 0, leaks: j['leaks'] ?? 0, errors: j['check-errors'] ?? 0 },
    `${path}: ${r.stdout} ${r.stderr}`,
  ).toEqual({
    code: 0,
    corruptions: 0,
    leaks: 0,
    errors: 0,
  })
}

async function qemuCompare(path: string, expected: Uint8Array, dir: string, tag: string): Promise<void> {
  const raw = join(dir, `expected-${tag}.raw`)
  writeFileSync(raw, expected)
  const r = await qemuImg(['compare', '-f', 'qcow2', '-F', 'raw', path, raw], { cwd: dir })
  expect(r.code, `${path} vs expected: ${r.stdout} ${r.stderr}`).toBe(0)
}

export async function runCombo(c: Combo, dir: string): Promise<void> {
  const rng = new Prng(1000 + c.id)
  const path = join(dir, `img-${c.id}.qcow2`)
  const expected = new Uint8Array(c.size)
  const extra: { backingFile?: string; backingFormat?: string } = {}
  if (c.backing) {
    const bpath = join(dir, `base-${c.id}.${c.backing}`)
    const bsize = c.size - rng.int(3) * 4096 > 0 ? Math.max(512, (c.size - rng.int(3) * 70_000) & ~511) : c.size
    const bopts = c.backing === 'qcow2' ? ['-o', 'cluster_size=4096'] : []
    await qemuImgOk(['create', '-q', '-f', c.backing, ...bopts, bpath, String(bsize)])
    const writes = [`write -P 0x5a 0 ${Math.min(bsize, 20_000)}`, `write -P 0x3c ${Math.floor(bsize / 2) & ~511} 9000`]
    await qemuIoOk(bpath, writes, { format: c.backing, cwd: dir })
    const bytes = new Uint8Array(bsize)
    bytes.fill(0x5a, 0, Math.min(bsize, 20_000))
    const mid = Math.floor(bsize / 2) & ~511
    bytes.fill(0x3c, mid, Math.min(bsize, mid + 9000))
    expected.set(bytes.subarray(0, Math.min(bsize, c.size)))
    extra.backingFile = `base-${c.id}.${c.backing}`
    extra.backingFormat = c.backing
  }
  if (c.creator === 'qemu') {
    const args = ['create', '-q', '-f', 'qcow2', '-o', optString(c.options)]
    if (extra.backingFile) args.push('-b', extra.backingFile, '-F', extra.backingFormat!)
    await qemuImgOk([...args, path, String(c.size)], { cwd: dir })
    const cs = Number(c.options['cluster_size'])
    const cmds = [`write -P 0x11 0 ${Math.min(c.size, 5000)}`]
    // qemu-io writes compressed clusters only where nothing is allocated yet
    const cOff = Math.ceil(8192 / cs) * cs
    const compressedByQemu = c.options['data_file'] === undefined && c.options['preallocation'] === undefined && cOff + cs <= c.size
    if (compressedByQemu) cmds.push(`write -c -P 0x12 ${cOff} ${cs}`)
    await qemuIoOk(path, cmds, { format: 'qcow2', cwd: dir })
    expected.fill(0x11, 0, Math.min(c.size, 5000))
    if (compressedByQemu) expected.fill(0x12, cOff, cOff + cs)
  } else {
    const dev = await openFileDevice(path, { readOnly: false, create: true })
    await createQcow2(dev, makeContext(openFileDevice), { size: c.size, options: c.options, ...extra })
    await dev.close()
  }
  const compressed = c.options['data_file'] === undefined
  let img = (await openImage(path, { format: 'qcow2', readOnly: false })) as Qcow2Image
  await ourWrites(img, expected, rng, 25, compressed)
  await img.close()
  await qemuCheckClean(path, dir)
  await qemuCompare(path, expected, dir, `${c.id}a`)
  // qemu-io keeps writing to our image
  const qOff = rng.int(c.size - 4096) & ~511
  await qemuIoOk(path, [`write -P 0x77 ${qOff} 4096`, `write -z ${Math.floor(c.size / 3) & ~511} 2048`], { format: 'qcow2', cwd: dir })
  expected.fill(0x77, qOff, qOff + 4096)
  const z = Math.floor(c.size / 3) & ~511
  expected.fill(0, z, z + 2048)
  // and we keep writing after qemu
  img = (await openImage(path, { format: 'qcow2', readOnly: false })) as Qcow2Image
  await ourWrites(img, expected, rng, 10, compressed)
  await img.close()
  await qemuCheckClean(path, dir)
  await qemuCompare(path, expected, dir, `${c.id}b`)
}

const COMBOS = 104
const rng = new Prng(20240601)
const combos = Array.from({ length: COMBOS }, (_, i) => randomCombo(rng, i))

describeQemu('writer interop with qemu-img / qemu-io (random option combinations)', () => {
  const groups = 8
  for (let g = 0; g < groups; g++) {
    const part = combos.filter((_, i) => i % groups === g)
    it(`combinations ${part.map((c) => c.id).join(',')}`, async () => {
      const dir = makeTempDir('imgtool-writer-')
      await mapLimit(part, 2, async (c) => {
        try {
          await runCombo(c, dir)
        } catch (e) {
          throw new Error(`combo ${c.id} (${c.creator}, ${optString(c.options)}, size ${c.size}, backing ${c.backing ?? 'none'}): ${(e as Error).message}`, {
            cause: e,
          })
        }
      })
    })
  }

  it('creates images qemu-img info describes exactly as it describes its own', async () => {
    const dir = makeTempDir('imgtool-create-')
    const picks = combos.filter((c) => !c.backing).slice(0, 24)
    await mapLimit(picks, 2, async (c) => {
      const ours = join(dir, `ours-${c.id}.qcow2`)
      const theirs = join(dir, `theirs-${c.id}.qcow2`)
      const o = { ...c.options }
      if (o['data_file']) o['data_file'] = `d-ours-${c.id}.raw`
      const dev = await openFileDevice(ours, { readOnly: false, create: true })
      await createQcow2(dev, makeContext(openFileDevice), { size: c.size, options: o })
      await dev.close()
      const t = { ...c.options }
      if (t['data_file']) t['data_file'] = `d-theirs-${c.id}.raw`
      await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', optString(t), theirs, String(c.size)], { cwd: dir })
      const strip = (j: Record<string, unknown>) => {
        const { filename: _f, 'actual-size': _a, 'dirty-flag': d, ...rest } = j
        const fs = (rest['format-specific'] as { data: Record<string, unknown> }).data
        delete fs['data-file']
        return { ...rest, dirty: d }
      }
      const a = strip(await qemuImgJson(['info', '--output=json', ours], { cwd: dir }))
      const b = strip(await qemuImgJson(['info', '--output=json', theirs], { cwd: dir }))
      expect(a, `combo ${c.id} ${optString(c.options)}`).toEqual(b)
      await qemuCheckClean(ours, dir)
    })
  })
})
