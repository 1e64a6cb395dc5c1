/**
 * Reading VHDs made by qemu-img: info and map as qemu-img gives them for vpc
 * (-f vpc: qemu-img probes a fixed VHD as raw), cat the same bytes as
 * qemu-img convert -O raw, and a fixed VHD found by its footer.
 */
import { closeSync, openSync, readFileSync, readSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, md5, qemuImgJson, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { FIXTURES, cli, makeFixtures } from './support.js'

useTempDirs()

describeQemu('vpc reader against qemu-img', () => {
  const dir = makeTempDir('imgtool-vhd-read-')

  it('makes the fixtures with qemu-img and qemu-io', () => {
    makeFixtures(dir)
  })

  for (const { name, fixed } of FIXTURES) {
    const path = () => join(dir, name)

    it(`${name}: probed as vpc, info --output json equals qemu-img info -f vpc`, async () => {
      const theirs = await qemuImgJson<Record<string, unknown>>(['info', '-f', 'vpc', '--output=json', path()])
      const r = await cli('info', '--output', 'json', path())
      expect(r.code, r.err).toBe(0)
      expect(JSON.parse(r.out)).toEqual(theirs)
    })

    it(`${name}: map --output json equals qemu-img map -f vpc`, async () => {
      const theirs = await qemuImgJson<unknown[]>(['map', '-f', 'vpc', '--output=json', path()])
      const r = await cli('map', '--output', 'json', path())
      expect(r.code, r.err).toBe(0)
      expect(JSON.parse(r.out)).toEqual(theirs)
    })

    it(`${name}: cat gives the bytes of qemu-img convert -O raw`, async () => {
      const raw = join(dir, `${name}.raw`)
      const img = await openImage(path())
      const size = img.virtualSize
      await img.close()
      if (size > 64 * 1024 * 1024) {
        // too big to hold: compare our reads with qemu-img's raw output around every extent qemu-img maps as data
        await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path(), raw])
        const map = await qemuImgJson<Array<{ start: number; length: number; data: boolean }>>(['map', '-f', 'vpc', '--output=json', path()])
        const ours = await openImage(path())
        const fd = openSync(raw, 'r')
        try {
          for (const m of map) {
            for (const at of [m.start, Math.max(m.start, m.start + m.length - 65536)]) {
              const n = Math.min(65536, m.start + m.length - at)
              const want = Buffer.alloc(n)
              readSync(fd, want, 0, n, at)
              expect(md5(await ours.read(at, n)), `${name} at ${at}`).toBe(md5(want))
            }
          }
        } finally {
          closeSync(fd)
          await ours.close()
        }
        return
      }
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path(), raw])
      const r = await cli('cat', path())
      expect(r.code, r.err).toBe(0)
      expect(r.bytes.byteLength).toBe(readFileSync(raw).byteLength)
      expect(md5(r.bytes)).toBe(md5(readFileSync(raw)))
    })

    if (fixed) {
      it(`${name}: -f raw still reads the file as raw (footer included)`, async () => {
        const img = await openImage(path(), { format: 'raw' })
        try {
          expect(img.format).toBe('raw')
          expect(img.virtualSize).toBe(readFileSync(path()).byteLength)
        } finally {
          await img.close()
        }
      })
    }
  }
})
