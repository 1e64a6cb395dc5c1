/**
 * Differencing disks: the parent found through the W2ru locator, sectors
 * the child's bitmap does not mark read from the parent, info-only opens that
 * never touch the parent, and a missing parent as one line. The child is made
 * by make-differencing.py from disks qemu-img made (qemu-img cannot make one).
 */
import { execFileSync } from 'node:child_process'
import { readFileSync, renameSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { expect, it } from 'vitest'
import { openImage } from '../../src/open.js'
import { describeQemu, makeTempDir, md5, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

useTempDirs()

describeQemu('vpc: differencing disks', () => {
  const dir = makeTempDir('imgtool-vhd-diff-')
  const parent = join(dir, 'parent.vhd')
  const child = join(dir, 'child.vhd')
  const MiB = 1024 * 1024

  it('makes a parent with qemu-img and a child over it', async () => {
    await qemuImgOk(['create', '-q', '-f', 'vpc', parent, '8M'])
    await qemuIoOk(parent, ['write -P 0x11 0 6M'], { format: 'vpc' })
    await qemuImgOk(['create', '-q', '-f', 'vpc', child, '8M'])
    execFileSync('python3', [resolve(__dirname, 'make-differencing.py'), parent, child, 'parent.vhd'])
  })

  it("reads the child's 4 marked sectors from the child and everything else from the parent", async () => {
    const raw = join(dir, 'parent.raw')
    await qemuImgOk(['convert', '-f', 'vpc', '-O', 'raw', parent, raw])
    const expected = new Uint8Array(readFileSync(raw))
    expected.fill(0x22, 2 * MiB, 2 * MiB + 2048)
    const img = await openImage(child)
    try {
      expect(img.format).toBe('vpc')
      expect(img.backing?.filename).toBe(parent)
      const got = await img.read(0, img.virtualSize)
      expect(md5(got)).toBe(md5(expected.subarray(0, img.virtualSize)))
      const map = []
      for await (const e of img.extents(2 * MiB, 2 * MiB)) map.push([e.start, e.length, e.depth, e.data])
      expect(map).toEqual([
        [2 * MiB, 2048, 0, true],
        [2 * MiB + 2048, 2 * MiB - 2048, 1, true],
      ])
    } finally {
      await img.close()
    }
  })

  it('an info-only open does not open the parent; a missing parent is one line naming the locator', async () => {
    renameSync(parent, join(dir, 'elsewhere.vhd'))
    const info = await openImage(child, { infoOnly: true })
    expect(info.backing).toBeUndefined()
    await info.close()
    const e = await openImage(child).then(
      () => undefined,
      (err: Error) => err,
    )
    expect(e?.message.split('\n')).toHaveLength(1)
    expect(e?.message).toMatch(/parent locator 0 \(W2ru\) 'parent.vhd': no such file/)
    expect(e?.message).toContain(child)
  })
})
