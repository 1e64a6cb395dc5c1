/**
 * vpc check (qemu-img has none: it exits 63). Each damage, applied in the test
 * to a disk qemu-img made, gives its finding with the offset of the damaged
 * structure; a clean disk gives none; a leak is a leak, not a corruption.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { checkExitCode } from '../../src/check/types.js'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

function fixChecksum(b: Buffer, start: number, length: number, at: number): void {
  b.writeUInt32BE(0, start + at)
  let sum = 0
  for (let i = start; i < start + length; i++) sum += b[i]!
  b.writeUInt32BE(~sum >>> 0, start + at)
}

async function checkFile(path: string) {
  const img = await openImage(path, { format: 'vpc', forCheck: true })
  try {
    return await img.check!()
  } finally {
    await img.close()
  }
}

describeQemu('vpc check', () => {
  const dir = makeTempDir('imgtool-vhd-check-')
  const base = join(dir, 'base.vhd')
  const fixed = join(dir, 'fixed.vhd')
  const BAT = 1536

  it('a disk qemu-img made is clean (qemu-img itself has no check: exit 63)', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', base, '12M'])
    await qemuIoOk(base, ['write -P 0x61 0 64k', 'write -P 0x62 4M 64k', 'write -P 0x63 9M 4k'], { format: 'vpc' })
    await qemuImgOk(['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', fixed, '3M'])
    expect((await qemuImg(['check', base])).code).toBe(63)
    for (const p of [base, fixed]) {
      const r = await checkFile(p)
      expect(r.findings).toEqual([])
      expect(checkExitCode(r)).toBe(0)
    }
    const r = await checkFile(base)
    const info = JSON.parse((await qemuImg(['info', '-f', 'vpc', '--output=json', base])).stdout) as { 'virtual-size': number }
    expect([r.allocatedClusters, r.totalClusters]).toEqual([3, Math.ceil(info['virtual-size'] / (2 * 1024 * 1024))])
  })

  const cases: Array<{ name: string; damage: (b: Buffer) => Buffer; kind: string; severity: 'corruption' | 'leak'; at: (b: Buffer) => number }> = [
    { name: 'footer checksum', damage: (b) => ((b[30] = 0x21), b), kind: 'footer-checksum', severity: 'corruption', at: () => 0 },
    {
      name: 'footer copy differs',
      damage: (b) => ((b[b.length - 512 + 40] = b[b.length - 512 + 40]! ^ 1), b),
      kind: 'footer-copy-differs',
      severity: 'corruption',
      at: (b) => b.length - 512,
    },
    { name: 'footer copy missing', damage: (b) => b.fill(0, b.length - 512), kind: 'footer-copy-missing', severity: 'corruption', at: (b) => b.length - 512 },
    { name: 'dynamic header checksum', damage: (b) => ((b[512 + 700] = 9), b), kind: 'dynamic-header-checksum', severity: 'corruption', at: () => 512 },
    {
      name: 'BAT not aligned',
      damage: (b) => {
        b.writeBigUInt64BE(BigInt(BAT + 4), 512 + 16)
        fixChecksum(b, 512, 1024, 36)
        return b
      },
      kind: 'bat-unaligned',
      severity: 'corruption',
      at: () => BAT + 4,
    },
    {
      name: 'BAT past the end of the file',
      damage: (b) => {
        b.writeBigUInt64BE(BigInt(b.length - 8), 512 + 16)
        fixChecksum(b, 512, 1024, 36)
        return b
      },
      kind: 'bat-range',
      severity: 'corruption',
      at: (b) => b.length - 8,
    },
    {
      name: 'two entries mapping one block',
      damage: (b) => (b.writeUInt32BE(b.readUInt32BE(BAT), BAT + 4), b),
      kind: 'block-overlap',
      severity: 'corruption',
      at: () => BAT + 4,
    },
    {
      name: 'a block over the BAT',
      damage: (b) => (b.writeUInt32BE(BAT / 512, BAT + 8), b),
      kind: 'block-over-metadata',
      severity: 'corruption',
      at: () => BAT + 8,
    },
    {
      name: 'a block past the end of the file',
      damage: (b) => (b.writeUInt32BE(b.length / 512 + 100, BAT + 12), b),
      kind: 'block-past-eof',
      severity: 'corruption',
      at: () => BAT + 12,
    },
    {
      name: 'a leaked block before the footer copy (an interrupted allocation)',
      damage: (b) => Buffer.concat([b.subarray(0, b.length - 512), Buffer.alloc(512 + 2 * 1024 * 1024, 0x44), b.subarray(b.length - 512)]),
      kind: 'leaked-space',
      severity: 'leak',
      at: (b) => b.length - 512 - (512 + 2 * 1024 * 1024),
    },
  ]

  for (const c of cases) {
    it(`finds ${c.name}: ${c.severity} '${c.kind}' at its offset, exit ${c.severity === 'leak' ? 3 : 2}`, async () => {
      const path = join(dir, `${c.name.replace(/\W+/g, '_')}.vhd`)
      copyFileSync(base, path)
      const damaged = c.damage(readFileSync(path))
      writeFileSync(path, damaged)
      const r = await checkFile(path)
      const f = r.findings.find((x) => x.kind === c.kind)
      expect(f, JSON.stringify(r.findings)).toBeDefined()
      expect(f!.severity).toBe(c.severity)
      expect(f!.hostOffset).toBe(c.at(damaged))
      expect(f!.message).toContain(path)
      expect(checkExitCode(r)).toBe(c.severity === 'leak' ? 3 : 2)
      if (c.severity === 'leak') expect(r.corruptions).toBe(0)
    })
  }

  it('a fixed disk whose geometry reaches into its footer is a corruption', async () => {
    const path = join(dir, 'fixed-short.vhd')
    const b = readFileSync(fixed)
    const cut = Buffer.concat([b.subarray(0, b.length - 512 - 65536), b.subarray(b.length - 512)])
    writeFileSync(path, cut)
    const r = await checkFile(path)
    expect(r.findings.map((f) => f.kind)).toEqual(['size-past-footer'])
    expect(r.findings[0]!.hostOffset).toBe(cut.length - 512)
  })
})
