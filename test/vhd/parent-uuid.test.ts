/**
 * A differencing disk's parent UUID, and an oversized BAT. QEMU 7.2 reads a
 * differencing disk without its parent and never compares the UUID (qemu-img
 * reads the child's blocks whole and zeros elsewhere, as shown here); imgtool
 * reads through the parent, reports a UUID that does not match the parent's
 * footer as a check finding at the header's parent UUID field, and refuses to
 * open such a child for writing. A BAT whose entry count reaches past the end
 * of the file is one line on open and a finding in check, with memory bounded
 * by the file.
 */
import { execFileSync } from 'node:child_process'
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { cli } from './support.js'

useTempDirs()

function fixHeaderChecksum(b: Buffer): void {
  b.writeUInt32BE(0, 512 + 36)
  let sum = 0
  for (let i = 512; i < 1536; i++) sum += b[i]!
  b.writeUInt32BE(~sum >>> 0, 512 + 36)
}

describeQemu('vpc: parent UUID and oversized BAT', () => {
  const dir = makeTempDir('imgtool-vhd-uuid-')
  const parent = join(dir, 'parent.vhd')
  const child = join(dir, 'child.vhd')
  const MiB = 1024 * 1024

  it('makes a parent with qemu-img and a child over it whose parent UUID matches', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', parent, '8M'])
    await qemuIoOk(parent, ['write -P 0x11 0 6M'], { format: 'vpc' })
    await qemuImgOk(['create', '-q', '-f', 'vpc', child, '8M'])
    execFileSync('python3', [resolve(__dirname, 'make-differencing.py'), parent, child, 'parent.vhd'])
    const r = await cli('check', '--output', 'json', child)
    expect(r.code, r.out).toBe(0)
    // qemu-img reads no parent: outside the child's block, zeros
    const raw = join(dir, 'q.raw')
    await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', child, raw])
    expect(
      readFileSync(raw)
        .subarray(0, MiB)
        .every((b) => b === 0),
    ).toBe(true)
  })

  it('a child whose parent UUID differs: a corruption at the UUID field; reads go on; opening for write is refused', async () => {
    const bad = join(dir, 'bad.vhd')
    const b = readFileSync(child)
    b[512 + 40] = b[512 + 40]! ^ 0xff
    fixHeaderChecksum(b)
    writeFileSync(bad, b)
    const r = await cli('check', '--output', 'json', bad)
    expect(r.code).toBe(2)
    const report = JSON.parse(r.out) as { findings: Array<{ kind: string; 'host-offset': number; message: string }> }
    expect(report.findings.map((f) => f.kind)).toEqual(['parent-uuid-mismatch'])
    expect(report.findings[0]!['host-offset']).toBe(512 + 40)
    expect(report.findings[0]!.message).toContain(parent)
    const img = await openImage(bad)
    try {
      expect((await img.read(0, 512)).every((x) => x === 0x11)).toBe(true)
    } finally {
      await img.close()
    }
    const e = await openImage(bad, { readOnly: false }).then(
      (i) => (void i.close(), undefined),
      (err: Error) => err,
    )
    expect(e?.message.split('\n')).toHaveLength(1)
    expect(e?.message).toMatch(/parent UUID [0-9a-f]{32} \(dynamic header at 0x228\) does not match .*not opened for writing/)
    expect(readFileSync(bad).equals(b)).toBe(true)
  })

  it('the parent replaced by another disk of the same name: the same finding', async () => {
    const d = join(dir, 'swap')
    execFileSync('mkdir', ['-p', d])
    copyFileSync(child, join(d, 'child.vhd'))
    await qemuImgOk(['create', '-q', '-f', 'vpc', join(d, 'parent.vhd'), '8M'])
    const r = await cli('check', '--output', 'json', join(d, 'child.vhd'))
    expect(r.code).toBe(2)
    expect(r.out).toContain('parent-uuid-mismatch')
  })

  it('a BAT of 900000 entries in a small file: open refuses in one line; check names it, reading only what the file holds', async () => {
    const big = join(dir, 'bigbat.vhd')
    const b = readFileSync(child)
    b.writeUInt32BE(900_000, 512 + 28)
    fixHeaderChecksum(b)
    writeFileSync(big, b)
    const e = await openImage(big).then(
      (i) => (void i.close(), undefined),
      (err: Error) => err,
    )
    expect(e?.message.split('\n')).toHaveLength(1)
    expect(e?.message).toMatch(/BAT at 0x600: the table of 900000 entries .* extends past the end of the file/)
    const r = await cli('check', '-f', 'vpc', '--output', 'json', big)
    expect(r.code).toBe(2)
    expect(r.out).toContain('bat-range')
  })
})
