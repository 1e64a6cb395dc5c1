/**
 * Damaged VHDs get one line naming the file, the structure and its offset,
 * and nothing is written (the file is opened read/write and stays byte-equal).
 */
import { copyFileSync, readFileSync, truncateSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { isImgtoolError } from '../../src/errors.js'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, md5, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

/** one's complement byte sum with the checksum field zero, as the VHD spec defines it */
function fixChecksum(b: Buffer, start: number, length: number, at: number): void {
  b.writeUInt32BE(0, start + at)
  let sum = 0
  for (let i = start; i < start + length; i++) sum += b[i]!
  b.writeUInt32BE(~sum >>> 0, start + at)
}

describeQemu('vpc: bad input', () => {
  const dir = makeTempDir('imgtool-vhd-bad-')
  const base = join(dir, 'base.vhd')
  const fixedBase = join(dir, 'fixed.vhd')

  it('makes a dynamic and a fixed disk with qemu-img', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', base, '8M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 4M 64k'], { format: 'vpc' })
    await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixedBase, '1M'])
  })

  const cases: Array<{ name: string; from: () => string; damage: (b: Buffer) => Buffer; structure: string; offset: RegExp; text: RegExp }> = [
    {
      name: 'a footer cut short (file of 300 bytes)',
      from: () => base,
      damage: (b) => b.subarray(0, 300),
      structure: 'footer',
      offset: /0x0\b/,
      text: /too small/,
    },
    {
      name: 'a footer with a bad checksum',
      from: () => base,
      damage: (b) => {
        b[40] = b[40]! ^ 0xff
        return b
      },
      structure: 'footer',
      offset: /at 0x0\b/,
      text: /checksum/,
    },
    {
      name: 'a fixed disk whose footer checksum is wrong',
      from: () => fixedBase,
      damage: (b) => {
        b[b.length - 512 + 100] = 1
        return b
      },
      structure: 'footer',
      offset: /at 0x[0-9a-f]+/,
      text: /checksum/,
    },
    {
      name: 'a dynamic header with a bad checksum',
      from: () => base,
      damage: (b) => {
        b[512 + 600] = 7
        return b
      },
      structure: 'dynamic header',
      offset: /at 0x200\b/,
      text: /checksum/,
    },
    {
      name: 'an absurd BAT size (2^32-1 entries)',
      from: () => base,
      damage: (b) => {
        b.writeUInt32BE(0xffffffff, 512 + 28)
        fixChecksum(b, 512, 1024, 36)
        return b
      },
      structure: 'BAT',
      offset: /at 0x21c\b/,
      text: /entries/,
    },
    {
      name: 'a BAT past the end of the file',
      from: () => base,
      damage: (b) => {
        b.writeBigUInt64BE(0x10000000n, 512 + 16)
        fixChecksum(b, 512, 1024, 36)
        return b
      },
      structure: 'BAT',
      offset: /at 0x10000000\b/,
      text: /past the end of the file/,
    },
    {
      name: 'a file truncated inside its last block',
      from: () => base,
      damage: (b) => b.subarray(0, b.length - 1024 * 1024),
      structure: 'BAT',
      offset: /at 0x[0-9a-f]+/,
      text: /truncated/,
    },
  ]

  for (const c of cases) {
    it(`refuses ${c.name} in one line, naming file, structure and offset, writing nothing`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      copyFileSync(c.from(), path)
      const damaged = c.damage(readFileSync(path))
      writeFileSync(path, damaged)
      if (damaged.length < 512) truncateSync(path, damaged.length)
      const before = md5(readFileSync(path))
      let error: unknown
      try {
        const img = await openImage(path, { format: 'vpc', readOnly: false })
        await img.close()
      } catch (e) {
        error = e
      }
      expect(isImgtoolError(error), String(error)).toBe(true)
      const e = error as Error & { details: { structure?: string; file?: string } }
      expect(e.message.split('\n')).toHaveLength(1)
      expect(e.message).toContain(path)
      expect(e.details.structure).toBe(c.structure)
      expect(e.message).toMatch(c.offset)
      expect(e.message).toMatch(c.text)
      expect(md5(readFileSync(path))).toBe(before)
    })
  }
})
