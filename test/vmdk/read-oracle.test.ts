/**
 * Reading VMDKs against the live qemu-img: the fixtures' info and map equal
 * qemu-img's on the same paths; seeded random images converted by qemu-img to
 * every subformat read back as the source; multi-extent images (4100 MiB,
 * three extents) read and map as qemu-img across extent boundaries; a stream
 * whose grain directory is named by its footer reads as qemu-img reads it.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, md5, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { FIXTURES, FIXTURE_DIR, cli, withFooter } from './support.js'

useTempDirs()

const SUBFORMATS = ['monolithicSparse', 'streamOptimized', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'] as const

/** A seeded raw image: random runs, zero runs and holes at random 512-byte-aligned places. */
function randomRaw(seed: number, size: number): Buffer {
  const p = new Prng(seed)
  const b = Buffer.alloc(size)
  for (let i = 0; i < 24; i++) {
    const at = p.int(size / 512) * 512
    const n = Math.min(size - at, (1 + p.int(256)) * 512)
    if (p.int(3) === 0) continue
    for (let j = 0; j < n; j++) b[at + j] = p.int(4) === 0 ? 0 : p.int(256)
  }
  return b
}

async function readAll(path: string): Promise<Buffer> {
  const img = await openImage(path)
  try {
    return Buffer.from(await img.read(0, img.virtualSize))
  } finally {
    await img.close()
  }
}

describeQemu('vmdk reader against qemu-img', () => {
  const dir = makeTempDir('imgtool-vmdk-read-')

  for (const name of FIXTURES) {
    const path = join(FIXTURE_DIR, name)
    it(`${name}: info and map --output json equal qemu-img's on the same path`, async () => {
      const info = await cli('info', '--output', 'json', path)
      expect(info.code, info.err).toBe(0)
      expect(JSON.parse(info.out)).toEqual(await qemuImgJson(['info', '-f', 'vmdk', '--output=json', path]))
      const map = await cli('map', '--output', 'json', path)
      expect(map.code, map.err).toBe(0)
      expect(JSON.parse(map.out)).toEqual(await qemuImgJson(['map', '-f', 'vmdk', '--output=json', path]))
    })
  }

  for (const [i, sub] of SUBFORMATS.entries()) {
    for (const seed of [1, 2]) {
      it(`seed ${seed}: a random raw converted by qemu-img to ${sub} reads back as the source`, async () => {
        const raw = join(dir, `r${i}-${seed}.raw`)
        const img = join(dir, `r${i}-${seed}.vmdk`)
        const src = randomRaw(seed * 100 + i, 3 * 1024 * 1024 + 512 * (seed + i))
        writeFileSync(raw, src)
        await qemuImgOk(['convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${sub}`, raw, img])
        expect(md5(await readAll(img))).toBe(md5(src))
        const map = await cli('map', '--output', 'json', img)
        expect(JSON.parse(map.out)).toEqual(await qemuImgJson(['map', '-f', 'vmdk', '--output=json', img]))
      })
    }
  }

  for (const sub of ['twoGbMaxExtentSparse', 'twoGbMaxExtentFlat'] as const) {
    it(`${sub} of 4100 MiB: three extents read and map as qemu-img across the boundaries`, async () => {
      const img = join(dir, `big-${sub}.vmdk`)
      await qemuImgOk(['create', '-q', '-f', 'vmdk', '-o', `subformat=${sub}`, img, '4100M'])
      const G2 = 2048 * 1024 * 1024
      await qemuIoOk(
        img,
        ['write -P 0x31 0 4k', `write -P 0x32 ${G2 - 32768} 64k`, `write -P 0x33 ${2 * G2 - 512} 1k`, `write -P 0x34 ${4100 * 1048576 - 4096} 4k`],
        {
          format: 'vmdk',
        },
      )
      const info = await cli('info', '--output', 'json', img)
      expect(JSON.parse(info.out)).toEqual(await qemuImgJson(['info', '-f', 'vmdk', '--output=json', img]))
      const theirs = await qemuImgJson<Array<{ start: number; length: number; data: boolean }>>(['map', '-f', 'vmdk', '--output=json', img])
      const map = await cli('map', '--output', 'json', img)
      expect(JSON.parse(map.out)).toEqual(theirs)
      const ours = await openImage(img)
      try {
        for (const at of [0, G2 - 65536, G2, 2 * G2 - 65536, 2 * G2, 4100 * 1048576 - 65536]) {
          const want = join(dir, `want-${sub}-${at}.raw`)
          await qemuImgOk(['dd', '-f', 'vmdk', '-O', 'raw', `bs=65536`, `skip=${at / 65536}`, 'count=2', `if=${img}`, `of=${want}`])
          const w = readFileSync(want)
          expect(md5(await ours.read(at, w.length)), `${sub} at ${at}`).toBe(md5(w))
        }
      } finally {
        await ours.close()
      }
    })
  }

  it('a stream whose footer names the grain directory (GD_AT_END) reads as qemu-img reads it', async () => {
    const path = join(dir, 'footer.vmdk')
    writeFileSync(path, withFooter(readFileSync(join(FIXTURE_DIR, 'conv-stream.vmdk'))))
    const raw = join(dir, 'footer.raw')
    await qemuImgOk(['convert', '-f', 'vmdk', '-O', 'raw', path, raw])
    expect(md5(await readAll(path))).toBe(md5(readFileSync(raw)))
    expect(md5(readFileSync(raw))).toBe(readFileSync(join(FIXTURE_DIR, 'conv-stream.vmdk.md5'), 'utf8').trim())
    const map = await cli('map', '--output', 'json', path)
    expect(JSON.parse(map.out)).toEqual(await qemuImgJson(['map', '-f', 'vmdk', '--output=json', path]))
  })
})
