/**
 * The vpc writer against qemu-img: create gives qemu-img's layout and virtual
 * size for every option set; convert -O vpc output is identical to its source
 * for qemu-img compare, as sparse as qemu-img's own conversion, and byte-equal
 * to it outside the footer's timestamp, checksum and UUID; writes through the
 * image read back through qemu-img.
 */
import { readFileSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { createImage, convert } from '../../src/api/ops.js'
import { openImage } from '../../src/open.js'
import { Prng } from '../support/prng.js'
import { describeQemu, makeTempDir, md5, qemuImg, qemuImgJson, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

/** The bytes that differ between two creations of the same disk: footer timestamp (24), checksum (64) and UUID (68..84). */
function maskFooter(b: Buffer, at: number): Buffer {
  const c = Buffer.from(b)
  c.fill(0, at + 24, at + 28)
  c.fill(0, at + 64, at + 84)
  return c
}

function masked(path: string): Buffer {
  const b = readFileSync(path)
  const footerAt = b.subarray(0, 8).toString('latin1') === 'conectix' ? 0 : -1
  let m = maskFooter(b, b.length - 512)
  if (footerAt === 0) m = maskFooter(m, 0)
  return m
}

type Info = { 'virtual-size': number; 'cluster-size'?: number; format: string }

describeQemu('vpc writer against qemu-img', () => {
  const dir = makeTempDir('imgtool-vhd-write-')

  const sizes = ['1M', '10M', '7654321', '100M', '3G']
  const optionSets = ['subformat=dynamic', 'subformat=fixed', 'subformat=dynamic,force_size=on', 'subformat=fixed,force_size=on', 'force_size=off']
  for (const size of sizes) {
    for (const opts of optionSets) {
      it(`create -o ${opts} ${size}: qemu-img's virtual size, file size and bytes (footer stamp and UUID aside)`, async () => {
        const ours = join(dir, `ours-${size}-${opts.replace(/\W+/g, '_')}.vhd`)
        const theirs = join(dir, `theirs-${size}-${opts.replace(/\W+/g, '_')}.vhd`)
        const options = Object.fromEntries(opts.split(',').map((kv) => kv.split('=') as [string, string]))
        await createImage(ours, { format: 'vpc', size, options })
        await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', opts, theirs, size])
        const a = await qemuImgJson<Info>(['info', '-f', 'vpc', '--output=json', ours])
        const b = await qemuImgJson<Info>(['info', '-f', 'vpc', '--output=json', theirs])
        expect(a['virtual-size']).toBe(b['virtual-size'])
        expect(a['cluster-size']).toBe(b['cluster-size'])
        expect(statSync(ours).size).toBe(statSync(theirs).size)
        if (statSync(ours).size <= 64 * 1024 * 1024) expect(md5(masked(ours))).toBe(md5(masked(theirs)))
        // and our reader agrees with qemu-img on what we made
        const img = await openImage(ours)
        expect([img.format, img.virtualSize]).toEqual(['vpc', b['virtual-size']])
        await img.close()
      })
    }
  }

  it('refuses an unknown option or subformat before creating anything', async () => {
    for (const options of [{ subformat: 'streamOptimized' }, { cluster_size: '64k' }, { force_size: 'maybe' }] as Array<Record<string, string>>) {
      const path = join(dir, `refused-${Object.keys(options)[0]}.vhd`)
      await expect(createImage(path, { format: 'vpc', size: '1M', options })).rejects.toThrow(/subformat|Invalid parameter|expects/)
      expect(() => statSync(path)).toThrow()
    }
  })

  const src = join(dir, 'src.qcow2')
  it('prepares a qemu-written qcow2 source: random data, zeros, holes, a partial last block', async () => {
    await qemuImgOk(['create', '-q', '-f', 'qcow2', src, '9000k'])
    await qemuIoOk(src, ['write -P 0x11 0 100k', 'write -P 0x22 3M 1M', 'write -z 5M 1M', 'write -P 0 6M 64k', 'write -P 0x33 8900k 100k'], { format: 'qcow2' })
  })

  for (const opts of ['subformat=dynamic', 'subformat=fixed', 'subformat=fixed,force_size=on', 'subformat=dynamic,force_size=on']) {
    it(`convert -O vpc -o ${opts}: qemu-img compare identical, qemu-img's size, and qemu-img's own conversion byte for byte`, async () => {
      const ours = join(dir, `conv-ours-${opts.replace(/\W+/g, '_')}.vhd`)
      const theirs = join(dir, `conv-theirs-${opts.replace(/\W+/g, '_')}.vhd`)
      const options = Object.fromEntries(opts.split(',').map((kv) => kv.split('=') as [string, string]))
      await convert(src, ours, { targetFormat: 'vpc', options })
      await qemuImgOk(['convert', '-O', 'vpc', '-o', opts, src, theirs])
      const cmp = await qemuImg(['compare', '-f', 'qcow2', '-F', 'vpc', src, ours])
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0)
      const a = await qemuImgJson<Info>(['info', '-f', 'vpc', '--output=json', ours])
      const b = await qemuImgJson<Info>(['info', '-f', 'vpc', '--output=json', theirs])
      expect(a['virtual-size']).toBe(b['virtual-size'])
      // dynamic: the same blocks allocated, in the same places (sparse as qemu-img)
      const mapA = await qemuImgJson<unknown[]>(['map', '-f', 'vpc', '--output=json', ours])
      const mapB = await qemuImgJson<unknown[]>(['map', '-f', 'vpc', '--output=json', theirs])
      if (opts.includes('dynamic')) expect(mapA).toEqual(mapB)
      expect(statSync(ours).size).toBe(statSync(theirs).size)
      expect(md5(masked(ours))).toBe(md5(masked(theirs)))
    })
  }

  it('Azure: a fixed, force_size conversion of a whole-MiB source is N MiB + 512 bytes, footer type fixed', async () => {
    const ours = join(dir, 'azure.vhd')
    const raw = join(dir, 'azure-src.raw')
    await qemuImgOk(['create', '-q', '-f', 'raw', raw, '5M'])
    await qemuIoOk(raw, ['write -P 0x7e 1M 64k'], { format: 'raw' })
    await convert(raw, ours, { targetFormat: 'vpc', options: { subformat: 'fixed', force_size: 'on' } })
    const b = readFileSync(ours)
    expect(b.length).toBe(5 * 1024 * 1024 + 512)
    const footer = b.subarray(b.length - 512)
    expect(footer.subarray(0, 8).toString('latin1')).toBe('conectix')
    expect(footer.readUInt32BE(60)).toBe(2)
    const info = await qemuImgJson<Info>(['info', '-f', 'vpc', '--output=json', ours])
    expect(info['virtual-size'] % (1024 * 1024)).toBe(0)
    expect((await qemuImg(['compare', '-f', 'raw', '-F', 'vpc', raw, ours])).code).toBe(0)
  })

  it('random writes through the image read back through qemu-img (dynamic and fixed)', async () => {
    for (const sub of ['dynamic', 'fixed']) {
      const path = join(dir, `rw-${sub}.vhd`)
      await createImage(path, { format: 'vpc', size: '12M', options: { subformat: sub } })
      const img = await openImage(path, { readOnly: false })
      const expected = new Uint8Array(img.virtualSize)
      const rng = new Prng(sub === 'fixed' ? 7 : 8)
      for (let i = 0; i < 40; i++) {
        const len = 1 + rng.int(300_000)
        const off = rng.int(img.virtualSize - len)
        const data = new Uint8Array(len)
        for (let j = 0; j < len; j += 97) data[j] = 1 + rng.int(255)
        expected.set(data, off)
        await img.write!(off, data)
      }
      await img.close()
      const raw = join(dir, `rw-${sub}.raw`)
      await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', path, raw])
      expect(md5(readFileSync(raw))).toBe(md5(expected))
    }
  })
})
