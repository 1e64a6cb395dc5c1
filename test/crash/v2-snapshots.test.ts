/**
 * v2 snapshot operations are shadow commits (snapshot-shadow.ts): what they leave
 * behind after a clean run, beside the crash and fault sweeps of the same
 * operations. The space a commit frees (old refcount structures, replaced L2
 * tables and L1 tables) is reused by the next one, and qemu-img reads the
 * result as we do.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { hasQemuImg, REQUIRE_QEMU, makeTempDir, qemuImg, useTempDirs } from '../support/qemu.js'
import { MemFiles, checkCounts, createOn, openOn, pattern } from '../writer/helpers.js'

useTempDirs()
const K = 1024

async function v2Image(): Promise<{ dev: MemoryDevice; files: MemFiles }> {
  const dev = new MemoryDevice(0, { name: 'img.qcow2' })
  const files = new MemFiles()
  await createOn(dev, 256 * K, { compat: '0.10', cluster_size: '1024' }, files)
  return { dev, files }
}

describe('v2 snapshot operations (shadow commits)', () => {
  it('repeated create, write, delete reuses the space each commit frees: the file stops growing', async () => {
    const { dev, files } = await v2Image()
    const img = await openOn(dev, files)
    await img.write(0, pattern(0, 100_000))
    await createSnapshot(img, 'keep')
    const sizes: number[] = []
    for (let i = 0; i < 16; i++) {
      await createSnapshot(img, `t${i}`)
      await img.write(500, pattern(i, 700, 2)) // the same clusters each time: what t(i) held alone is freed by its delete
      await deleteSnapshot(img, `t${i}`)
      sizes.push(dev.size)
    }
    await img.close()
    expect(sizes[15]).toBeLessThanOrEqual(sizes[5]!)
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it('apply after create and writes: contents, COPIED flags and refcounts exact (0 leaks)', async () => {
    const { dev, files } = await v2Image()
    let img = await openOn(dev, files)
    const want = pattern(0, 120_000)
    await img.write(0, want)
    await createSnapshot(img, 'a')
    await img.write(1000, pattern(1, 50_000, 3))
    await createSnapshot(img, 'b')
    await img.write(200_000, pattern(2, 10_000))
    await applySnapshot(img, 'a')
    // writes after apply copy shared clusters, never change the snapshot's
    await img.write(500, pattern(3, 2000, 4))
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
    img = await openOn(dev, files)
    await applySnapshot(img, 'a')
    expect(Buffer.from(await img.read(0, 120_000)).equals(Buffer.from(want))).toBe(true)
    await deleteSnapshot(img, 'b')
    await deleteSnapshot(img, 'a')
    await img.close()
    expect(await checkCounts(dev)).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it.skipIf(!hasQemuImg && !REQUIRE_QEMU)('qemu-img check finds the image clean and reads every snapshot as we wrote it', async () => {
    const { dev, files } = await v2Image()
    const img = await openOn(dev, files)
    const contents = new Map<string, Uint8Array>()
    const cur = new Uint8Array(256 * K)
    for (let i = 0; i < 4; i++) {
      const data = pattern(i * 7, 30_000, i + 1)
      await img.write(i * 20_000, data)
      cur.set(data, i * 20_000)
      await createSnapshot(img, `s${i}`)
      contents.set(`s${i}`, cur.slice())
    }
    await deleteSnapshot(img, 's1')
    contents.delete('s1')
    await img.close()
    const dir = makeTempDir('imgtool-v2snap-')
    const path = join(dir, 'img.qcow2')
    writeFileSync(path, dev.snapshot())
    const check = await qemuImg(['check', '--output=json', '-f', 'qcow2', path])
    const j = JSON.parse(check.stdout || '{}') as Record<string, number>
    expect({ code: check.code, c: j['corruptions'] ?? 0, l: j['leaks'] ?? 0 }, check.stdout + check.stderr).toEqual({ code: 0, c: 0, l: 0 })
    for (const [name, bytes] of contents) {
      const raw = join(dir, `${name}.raw`)
      const out = await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', '-l', `snapshot.name=${name}`, path, raw])
      expect(out.code, out.stderr).toBe(0)
      writeFileSync(join(dir, 'want.raw'), bytes)
      const cmp = await qemuImg(['compare', '-f', 'raw', '-F', 'raw', raw, join(dir, 'want.raw')])
      expect(cmp.code, `${name}: ${cmp.stdout}${cmp.stderr}`).toBe(0)
    }
  })
})
