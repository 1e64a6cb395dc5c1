/**
 * Damaged VMDKs and malformed descriptors: one line naming the file, the
 * structure and its offset or descriptor line, exit 1, no stack trace, and
 * the file unchanged. Extent names that leave the descriptor's directory are
 * refused unless the caller allows them (-o extent-paths=any).
 */
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { makeTempDir, md5, useTempDirs } from '../support/qemu.js'
import { FIXTURE_DIR, cli } from './support.js'

useTempDirs()

const DESC = readFileSync(join(FIXTURE_DIR, 'split-flat.vmdk'), 'utf8')
const SPARSE = readFileSync(join(FIXTURE_DIR, 'sparse-data.vmdk'))

describe('vmdk: bad input', () => {
  const dir = makeTempDir('imgtool-vmdk-bad-')
  copyFileSync(join(FIXTURE_DIR, 'split-flat-f001.vmdk'), join(dir, 'split-flat-f001.vmdk'))

  async function expectRefused(path: string, text: RegExp, extra: string[] = []): Promise<void> {
    const before = md5(readFileSync(path))
    for (const cmd of ['info', 'cat', 'map']) {
      const r = await cli(cmd, ...extra, path)
      expect(r.code, `${cmd}: ${r.err}`).toBe(1)
      expect(r.err.trim().split('\n')).toHaveLength(1)
      expect(r.err).toMatch(text)
      expect(r.err).toContain(path)
      expect(r.err).not.toMatch(/\n\s+at /)
    }
    expect(md5(readFileSync(path))).toBe(before)
  }

  const descriptors: Array<{ name: string; edit: (d: string) => string; text: RegExp }> = [
    { name: 'no createType line', edit: (d) => d.replace(/^createType=.*\n/m, ''), text: /descriptor line \d+: no 'createType' line/ },
    {
      name: 'a line that is no grammar',
      edit: (d) => d.replace('# Extent description\n', '# Extent description\nRW 2048 FLAT\n'),
      text: /descriptor line 8: not a comment/,
    },
    { name: 'a FLAT extent without its offset', edit: (d) => d.replace(/ 0\n/, '\n'), text: /descriptor line 8: a FLAT extent needs its offset/ },
    { name: 'a CID given twice', edit: (d) => d.replace(/^CID=.*\n/m, (m) => m + m), text: /descriptor line 4: 'CID' given a second time/ },
    { name: 'a CID that is not hex', edit: (d) => d.replace(/^CID=.*$/m, 'CID=xyz'), text: /descriptor line 3: CID is not 1 to 8 hex digits/ },
    { name: 'an unknown extent type', edit: (d) => d.replace(' FLAT ', ' FLUT '), text: /descriptor line 8: extent type 'FLUT'/ },
    { name: 'an extent of 0 sectors', edit: (d) => d.replace(/RW \d+ FLAT/, 'RW 0 FLAT'), text: /descriptor line 8: extent size '0'/ },
    {
      name: 'an unquoted value with a space',
      edit: (d) => d.replace('createType="twoGbMaxExtentFlat"', 'createType=two words'),
      text: /descriptor line 5: value of 'createType'/,
    },
    { name: 'an unsupported create type', edit: (d) => d.replace('twoGbMaxExtentFlat"', 'fancySparse"'), text: /unsupported image type 'fancySparse'/ },
    {
      name: 'a missing extent file',
      edit: (d) => d.replace('split-flat-f001.vmdk', 'nothere.vmdk'),
      text: /descriptor line 8: extent file '.*nothere.vmdk' does not exist/,
    },
    {
      name: 'an absolute extent name',
      edit: (d) => d.replace('"split-flat-f001.vmdk"', `"${dir}/split-flat-f001.vmdk"`),
      text: /descriptor line 8: .* is an absolute path outside/,
    },
    {
      name: "an extent name through '..'",
      edit: (d) => d.replace('"split-flat-f001.vmdk"', '"../x/split-flat-f001.vmdk"'),
      text: /descriptor line 8: .* leaves the descriptor's directory through '\.\.'/,
    },
    { name: 'a protocol prefix', edit: (d) => d.replace('"split-flat-f001.vmdk"', '"nbd:localhost:10809"'), text: /descriptor line 8: .* names a protocol/ },
  ]
  for (const c of descriptors) {
    it(`descriptor with ${c.name}: refused with the line`, async () => {
      const path = join(dir, `d-${c.name.replace(/\W+/g, '-')}.vmdk`)
      writeFileSync(path, c.edit(DESC))
      await expectRefused(path, c.text)
    })
  }

  it("extents outside the descriptor's directory open when the caller allows them", async () => {
    const sub = join(dir, 'inner')
    mkdirSync(sub, { recursive: true })
    const rel = join(sub, 'rel.vmdk')
    writeFileSync(rel, DESC.replace('"split-flat-f001.vmdk"', '"../split-flat-f001.vmdk"'))
    const abs = join(sub, 'abs.vmdk')
    writeFileSync(abs, DESC.replace('"split-flat-f001.vmdk"', `"${dir}/split-flat-f001.vmdk"`))
    const want = readFileSync(join(FIXTURE_DIR, 'split-flat.vmdk.md5'), 'utf8').trim()
    for (const p of [rel, abs]) {
      const refused = await cli('cat', p)
      expect(refused.code).toBe(1)
      const r = await cli('cat', '-o', 'extent-paths=any', p)
      expect(r.code, r.err).toBe(0)
      expect(md5(r.bytes)).toBe(want)
    }
  })

  const sparse: Array<{ name: string; damage: (b: Buffer) => Buffer; text: RegExp }> = [
    { name: 'a file of 300 bytes', damage: (b) => b.subarray(0, 300), text: /header at 0x0: the file \(300 bytes\) is too small/ },
    { name: 'version 4', damage: (b) => (b.writeUInt32LE(4, 4), b), text: /header at 0x0: unsupported VMDK version 4/ },
    {
      name: '4096 entries per grain table',
      damage: (b) => (b.writeUInt32LE(4096, 44), b),
      text: /header at 0x2c: 4096 entries per grain table \(at most 512\)/,
    },
    { name: 'a grain size of 0', damage: (b) => (b.writeBigUInt64LE(0n, 20), b), text: /header at 0x14: grain size or grain table size is 0/ },
    { name: 'a 2 GiB grain', damage: (b) => (b.writeBigUInt64LE(0x400000n, 20), b), text: /header at 0x14: grain size of 4194304 sectors/ },
    {
      name: 'an absurd capacity (a grain directory of 2^40 entries)',
      damage: (b) => (b.writeBigUInt64LE(2n ** 56n, 12), b),
      text: /header at 0xc: capacity \d+ sectors needs \d+ grain directory entries \(at most 33554432\)/,
    },
    { name: 'the grains starting past the end', damage: (b) => (b.writeBigUInt64LE(0x100000n, 64), b), text: /header at 0x40: file truncated/ },
    {
      name: 'GD_AT_END without a footer',
      damage: (b) => (b.writeBigUInt64LE(0xffffffffffffffffn, 56), b),
      text: /footer at 0x5fa00: invalid footer/,
    },
    {
      name: 'a bad CID in the embedded descriptor',
      damage: (b) => (b.write('CID=xyzzy', 0x200 + b.subarray(0x200).indexOf('CID=')), b),
      text: /embedded descriptor line 3: CID is not 1 to 8 hex digits/,
    },
  ]
  for (const c of sparse) {
    it(`sparse extent with ${c.name}: refused with the structure and offset`, async () => {
      const path = join(dir, `s-${c.name.replace(/\W+/g, '-')}.vmdk`)
      writeFileSync(path, c.damage(Buffer.from(SPARSE)))
      await expectRefused(path, c.text)
    })
  }

  it('a grain table past the end of the file: a writable open refuses to write through it, with the table offset', async () => {
    const b = Buffer.from(SPARSE)
    b.writeUInt32LE(0x7fff0000, 0x1a * 512)
    const path = join(dir, 'gt-eof.vmdk')
    writeFileSync(path, b)
    const before = md5(readFileSync(path))
    const img = await openImage(path, { format: 'vmdk', readOnly: false })
    try {
      await expect(img.write!(0, new Uint8Array(512).fill(7))).rejects.toThrow(
        /grain table at 0xfffe000000: grain directory entry 0 \(at 0x3400\) names a table that extends past the end/,
      )
    } finally {
      await img.close()
    }
    expect(md5(readFileSync(path))).toBe(before)
  })

  it('a grain directory offset of 0: a writable open refuses it (the header would be written as the directory)', async () => {
    const b = Buffer.from(SPARSE)
    b.writeBigUInt64LE(0n, 56)
    const path = join(dir, 'gd-zero.vmdk')
    writeFileSync(path, b)
    await expect(openImage(path, { format: 'vmdk', readOnly: false })).rejects.toThrow(/header at 0x38: the grain directory offset is 0/)
  })

  it('a grain directory past the end of the file: a writable open refuses it with the offset', async () => {
    const b = Buffer.from(SPARSE)
    b.writeBigUInt64LE(0x10000n, 56)
    const path = join(dir, 'gd-eof.vmdk')
    writeFileSync(path, b)
    await expect(openImage(path, { format: 'vmdk', readOnly: false })).rejects.toThrow(
      /grain directory at 0x2000000: 1 entries \(4 bytes\) extend past the end of the file/,
    )
  })
})
