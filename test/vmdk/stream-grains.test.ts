/**
 * streamOptimized grains deflated through util/deflate.ts: with the deflate
 * addon (the system zlib, as qemu-img links) every whole grain's compressed bytes are
 * qemu-img's for the same source, grain by grain; without it, qemu-img reads the
 * output back equal to the source (convert.test.ts covers that for all sizes).
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { deflateAddon } from '../../src/util/deflate.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, qemuImgOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

const GRAIN = 65536

/** grain number -> its compressed bytes (marker walk from the first grain at sector 128) */
function grains(file: Buffer): Map<number, Buffer> {
  const out = new Map<number, Buffer>()
  let at = 128 * 512
  while (at + 12 <= file.byteLength) {
    const lba = Number(file.readBigUInt64LE(at))
    const size = file.readUInt32LE(at + 8)
    if (size === 0) {
      // a metadata marker: its sector count, then the type; the footer ends the grains
      const type = file.readUInt32LE(at + 12)
      if (type !== 1) break // GT (1) is followed by more grains; GD, footer, EOS end them
      at += 512 + lba * 512
      continue
    }
    out.set(lba / 128, file.subarray(at + 12, at + 12 + size))
    at += Math.ceil((12 + size) / 512) * 512
  }
  return out
}

describeQemu(
  'vmdk streamOptimized grains',
  () => {
    it("every whole grain deflated to qemu-img's bytes (system zlib through the addon)", async () => {
      if (!deflateAddon()) return
      const dir = makeTempDir()
      const r = new Prng(13)
      const size = 40 * GRAIN + 4096 // the last grain cut short: deflated zero-padded
      const b = Buffer.alloc(size)
      for (let at = 0; at < size; at += 512) {
        const k = r.int(4)
        if (k === 0) continue // zeros
        if (k === 1)
          b.set(r.bytes(512), at) // incompressible
        else b.fill(r.int(256), at, at + 512)
      }
      b.fill(0, 5 * GRAIN, 9 * GRAIN) // whole zero grains: not stored
      const src = join(dir, 'src.raw')
      writeFileSync(src, b)
      await qemuImgOk(['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, join(dir, 'q.vmdk')])
      const res = await cli('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, join(dir, 'i.vmdk'))
      expect(res.code).toBe(0)
      const q = grains(readFileSync(join(dir, 'q.vmdk')))
      const i = grains(readFileSync(join(dir, 'i.vmdk')))
      expect(q.size).toBe(37)
      expect([...i.keys()]).toEqual([...q.keys()])
      // the short last grain: qemu-img deflates the 4096 bytes it was given, imgtool the grain zero-padded
      for (const [g, z] of q) if (g !== 40) expect(i.get(g)!.equals(z), `grain ${g}`).toBe(true)
      await qemuImgOk(['compare', '-f', 'raw', '-F', 'vmdk', src, join(dir, 'i.vmdk')])
    })
  },
  ['qemu-img'],
)
