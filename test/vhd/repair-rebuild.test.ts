/**
 * The VHD repairs of damage with no whole copy to restore from, on disks qemu-img made and qemu-io wrote:
 *  - both footers fail their checksum: the footer is rebuilt from the two copies only when they leave
 *    no doubt (FORMAT.md, "Repair"), else nothing is written and a note says why;
 *  - BAT entries that map a block over metadata are cleared; entries that only overlap each other are
 *    named by check and left alone.
 * After each repair qemu-img reads the guest bytes the disk held before the damage (qemu-img compare),
 * imgtool's check is clean, and `repair --undo` puts the damaged bytes back exactly.
 */
import { readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

const tail = (b: Buffer) => b.length - 512
const flip =
  (at: (b: Buffer) => number, bit = 0x40) =>
  (b: Buffer) => ((b[at(b)] = b[at(b)]! ^ bit), b)
const both =
  (...fs: Array<(b: Buffer) => Buffer>) =>
  (b: Buffer) =>
    fs.reduce((x, f) => f(x), b)
/** BAT entry `i` (qemu-img's layout: the BAT at 1536) set to sector `v` */
const bat = (i: number, v: number) => (b: Buffer) => (b.writeUInt32BE(v, 1536 + 4 * i), b)
const entry = (b: Buffer, i: number) => b.readUInt32BE(1536 + 4 * i)

describeQemu('vpc repair without a whole copy, judged by qemu-img', () => {
  const dir = makeTempDir('imgtool-vhd-rebuild-')
  const base = join(dir, 'base.vhd')

  it('qemu-img makes a dynamic disk (2 MiB blocks) and qemu-io writes three of its six blocks', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', base, '12M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 4M 64k', 'write -P 0x63 9M 4k'], { format: 'vpc' })
    const b = readFileSync(base)
    expect([0, 1, 2, 3, 4, 5].map((i) => entry(b, i) !== 0xffffffff)).toEqual([true, false, true, false, true, false])
  })

  const fixed: Array<{ name: string; damage: (b: Buffer) => Buffer; kinds: string[]; guestChanged?: boolean; footerAsIs?: boolean }> = [
    {
      name: 'both footers bad in different fields (creator version at 0, original size in the copy)',
      damage: both(
        flip(() => 33),
        flip((b) => tail(b) + 45),
      ),
      kinds: ['footer-rebuilt', 'footer-copy-rewritten'],
    },
    {
      name: 'both footers bad: the checksum field of each',
      damage: both(
        flip(() => 66),
        flip((b) => tail(b) + 67),
      ),
      kinds: ['footer-rebuilt', 'footer-copy-rewritten'],
    },
    {
      name: 'both footers bad alike (the same timestamp bit in both)',
      damage: both(
        flip(() => 27, 1),
        flip((b) => tail(b) + 27, 1),
      ),
      kinds: ['footer-rebuilt', 'footer-copy-rewritten'],
      footerAsIs: true, // (the timestamp both copies hold is kept: nothing says it was another)
    },
    {
      name: 'both footers bad, the geometry at 0 and the timestamp in the copy',
      damage: both(
        flip(() => 57, 0x10),
        flip((b) => tail(b) + 25),
      ),
      kinds: ['footer-rebuilt', 'footer-copy-rewritten'],
    },
    { name: 'a BAT entry mapping a block over the dynamic header', damage: bat(1, 1), kinds: ['bat-entry-cleared'], guestChanged: true },
    {
      name: 'BAT entries over the footer at 0 and over the BAT',
      damage: both(bat(3, 0), bat(5, 3)),
      kinds: ['bat-entry-cleared'],
      guestChanged: true,
    },
  ]

  for (const c of fixed) {
    it(`${c.name}: repaired; qemu-img reads the undamaged guest bytes; undo exact`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      const damaged = c.damage(readFileSync(base))
      writeFileSync(path, damaged)
      expect((await cli('check', '-f', 'vpc', path)).code).toBe(2)
      if (c.guestChanged) expect((await qemuImg(['compare', '-f', 'vpc', '-F', 'vpc', base, path])).code).toBe(1)
      const dry = await cli('repair', '-f', 'vpc', '--dry-run', '--output', 'json', path)
      expect((JSON.parse(dry.out) as { plan: Array<{ kind: string }> }).plan.map((a) => a.kind)).toEqual(c.kinds)
      expect(readFileSync(path).equals(damaged)).toBe(true)
      const journal = `${path}.undo`
      const r = await cli('repair', '-f', 'vpc', '--journal', journal, path)
      expect(r.code, r.err + r.out).toBe(0)
      expect((await cli('check', '-f', 'vpc', path)).code).toBe(0)
      const cmp = await qemuImg(['compare', '-f', 'vpc', '-F', 'vpc', base, path])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      // the footer qemu-img reads now is the one qemu-img wrote
      if (!c.footerAsIs) expect(readFileSync(path).subarray(0, 512).equals(readFileSync(base).subarray(0, 512))).toBe(true)
      const u = await cli('repair', '--undo', journal, path)
      expect(u.code, u.err).toBe(0)
      expect(readFileSync(path).equals(damaged)).toBe(true)
    })
  }

  const refused: Array<{ name: string; damage: (b: Buffer) => Buffer; note: RegExp }> = [
    {
      name: 'both footers bad in the geometry, differently (neither checksum says which size is right)',
      damage: both(
        flip(() => 57, 0x01),
        flip((b) => tail(b) + 57, 0x02),
      ),
      note: /differ in disk geometry, and neither checksum/,
    },
    {
      name: 'the footer at 0 zeroed and its copy damaged',
      damage: both(
        (b) => b.fill(0, 0, 512),
        flip((b) => tail(b) + 40),
      ),
      note: /only one copy/,
    },
    {
      name: 'both footers bad, with different unique ids',
      damage: both(
        flip(() => 70),
        flip((b) => tail(b) + 75),
      ),
      note: /different unique ids/,
    },
  ]

  for (const c of refused) {
    it(`${c.name}: not rebuilt, a note says why, nothing written`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      const damaged = c.damage(readFileSync(base))
      writeFileSync(path, damaged)
      const r = await cli('repair', '-f', 'vpc', '--output', 'json', path)
      expect(r.code, r.err + r.out).toBe(2)
      const rep = JSON.parse(r.out) as { notices?: Array<{ kind: string; message: string }> }
      const note = rep.notices?.find((n) => n.kind === 'footer-not-rebuilt')
      expect(note?.message, r.out).toMatch(c.note)
      expect(readFileSync(path).equals(damaged)).toBe(true)
    })
  }

  it('a BAT grown over block 0 by a bent entry count (header checksum wrong): the block is kept', async () => {
    // fuzz seed 31 case 178: the entry count bent upwards puts the table over the first block
    const path = join(dir, 'bent-count.vhd')
    const b = readFileSync(base)
    const damaged = Buffer.from(b)
    damaged.writeUInt32BE(256, 512 + 28) // the table now ends at 2560, over block 0's bitmap (all ones: unused entries)
    writeFileSync(path, damaged)
    expect(entry(damaged, 0) * 512).toBeLessThan(1536 + 256 * 4)
    const r = await cli('repair', '-f', 'vpc', '--output', 'json', path)
    expect(r.code).toBe(2) // (check still names block 0 under the longer table)
    expect(readFileSync(path).readUInt32BE(1536)).toBe(entry(b, 0))
    const cmp = await qemuImg(['compare', '-f', 'vpc', '-F', 'vpc', base, path])
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
  })

  it('two BAT entries mapping the same block: named by check, left alone (which guest block owns it cannot be told)', async () => {
    const path = join(dir, 'dup.vhd')
    const b = readFileSync(base)
    const damaged = bat(1, entry(b, 2))(Buffer.from(b))
    writeFileSync(path, damaged)
    const check = await cli('check', '-f', 'vpc', '--output', 'json', path)
    expect(check.code).toBe(2)
    expect((JSON.parse(check.out) as { findings: Array<{ kind: string }> }).findings.map((f) => f.kind)).toContain('block-overlap')
    const r = await cli('repair', '-f', 'vpc', path)
    expect(r.code).toBe(2)
    expect(readFileSync(path).equals(damaged)).toBe(true)
    // qemu-img reads the shared block at both guest offsets
    const q = join(dir, 'dup.raw')
    await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path, q])
    const raw = readFileSync(q)
    expect(raw.subarray(2 << 20, (2 << 20) + 4096).equals(raw.subarray(4 << 20, (4 << 20) + 4096))).toBe(true)
  })
})
