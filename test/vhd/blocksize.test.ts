/**
 * Dynamic disks with block sizes other than qemu-img's 2 MiB. qemu-img cannot
 * make them, so make-blocksize.py builds them from a raw file by the
 * specification; qemu-img reads each (convert -O raw equal to the source),
 * and so do we: read, map, info, check, and writes qemu-img reads back.
 * Below 4 KiB QEMU gives a block no sector bitmap (the specification gives
 * it one sector): qemu-img reads other bytes, and imgtool refuses the disk in
 * one line rather than pick one reading (check: exit 1, cannot complete).
 */
import { execFileSync } from 'node:child_process'
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, md5, qemuImgJson, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

const MiB = 1024 * 1024
const SIZES = [4096, 8192, 65536, 512 * 1024, MiB, 4 * MiB, 16 * MiB]

describeQemu('vpc: block sizes other than 2 MiB', () => {
  const dir = makeTempDir('imgtool-vhd-bs-')
  const src = join(dir, 'src.raw')
  const raw = new Uint8Array(5 * MiB)

  // a 5 MiB raw source with data in five places
  const rng = new Prng(5)
  for (const off of [0, 70000, MiB, 3 * MiB + 4096, 5 * MiB - 512]) {
    for (let i = off; i < Math.min(raw.length, off + 3000); i++) raw[i] = 1 + rng.int(255)
  }

  const make = (bs: number) => {
    if (!existsSync(src)) writeFileSync(src, raw)
    const p = join(dir, `bs${bs}.vhd`)
    execFileSync('python3', [resolve(__dirname, 'make-blocksize.py'), src, p, String(bs)])
    return p
  }

  for (const bs of SIZES) {
    it(`${bs}-byte blocks: qemu-img and imgtool read the source; info, map and check agree; our writes read back in qemu-img`, async () => {
      const p = make(bs)
      const q = join(dir, `q${bs}.raw`)
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', p, q])
      expect(md5(readFileSync(q))).toBe(md5(raw))
      const img = await openImage(p)
      try {
        expect(md5(await img.read(0, img.virtualSize))).toBe(md5(raw))
        const info = await qemuImgJson<{ 'cluster-size': number; 'virtual-size': number }>(['info', '-f', 'vpc', '--output=json', p])
        expect((await img.info()).clusterSize).toBe(info['cluster-size'])
        expect(img.virtualSize).toBe(info['virtual-size'])
        let data = 0
        for await (const e of img.extents()) if (e.data) data += e.length
        const blocks = new Set<number>()
        for (let i = 0; i < raw.length; i++) if (raw[i] !== 0) blocks.add(Math.floor(i / bs))
        expect(data).toBe([...blocks].reduce((n, b) => n + Math.min(bs, raw.length - b * bs), 0))
        const r = await img.check!()
        expect(r.findings).toEqual([])
        expect(r.allocatedClusters).toBe(blocks.size)
      } finally {
        await img.close()
      }
      // our writer: a new block, one in place, one across a block boundary
      const w = join(dir, `w${bs}.vhd`)
      copyFileSync(p, w)
      const expected = raw.slice()
      const img2 = await openImage(w, { readOnly: false })
      try {
        for (const [off, len, v] of [
          [2 * MiB + 512, 1024, 0x71],
          [0, 512, 0x72],
          [4 * MiB - 512, 1024, 0x73],
        ] as const) {
          const d = new Uint8Array(len).fill(v)
          await img2.write!(off, d)
          expected.set(d, off)
        }
        await img2.flush()
      } finally {
        await img2.close()
      }
      const q2 = join(dir, `q2-${bs}.raw`)
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', w, q2])
      expect(md5(readFileSync(q2))).toBe(md5(expected))
      expect((await cli('check', '-f', 'vpc', w)).code).toBe(0)
    })
  }

  for (const bs of [512, 2048]) {
    it(`${bs}-byte blocks: qemu-img reads other bytes (no bitmap below 4 KiB); imgtool refuses in one line, check names it`, async () => {
      const p = make(bs)
      const q = join(dir, `q${bs}.raw`)
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', p, q])
      expect(md5(readFileSync(q))).not.toBe(md5(raw))
      const r = await cli('info', p)
      expect(r.code).not.toBe(0)
      expect(r.err.trim().split('\n')).toHaveLength(1)
      expect(r.err).toContain(`block size ${bs}`)
      expect(r.err).toContain('0x220') // the block size field of the header at 0x200
      // not damage but a layout imgtool does not read: the check cannot complete (exit 1), in one line
      const c = await cli('check', '-f', 'vpc', p)
      expect(c.code).toBe(1)
      expect(c.err).toContain(`block size ${bs}`)
    })
  }
})
