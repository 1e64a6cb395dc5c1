/** imageInfo and mapImage (under imgtool info and map), through the public API. */
import { join } from 'node:path'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { createImage, imageInfo, mapImage, openImage, type Extent } from '../../src/index.js'
import { cleanupTempDirs, makeTempDir } from '../support/qemu.js'

const K = 1024
const M = 1024 * K

async function all(it: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = []
  for await (const e of it) out.push(e)
  return out
}

describe('imageInfo and mapImage', () => {
  let dir: string
  let base: string
  let top: string

  beforeAll(async () => {
    dir = makeTempDir('imgtool-inspect-')
    base = join(dir, 'base.qcow2')
    top = join(dir, 'top.qcow2')
    await createImage(base, { format: 'qcow2', size: 4 * M })
    await createImage(top, { format: 'qcow2', size: 4 * M, backingFile: 'base.qcow2', backingFormat: 'qcow2' })
    const img = await openImage(top, { readOnly: false })
    await img.write!(M, new Uint8Array(128 * K).fill(7))
    await img.close()
  })
  afterAll(() => cleanupTempDirs(dir))

  it('gives info of the image alone, or of the whole chain', async () => {
    const one = await imageInfo(top)
    expect(one).toMatchObject({ format: 'qcow2', virtualSize: 4 * M })
    expect(one.backing).toBeUndefined()
    const chain = await imageInfo(top, { backingChain: true })
    expect(chain.backing).toMatchObject({ format: 'qcow2', virtualSize: 4 * M })
  })

  it('info of an image whose backing file is gone names it; the chain fails', async () => {
    const orphan = join(dir, 'orphan.qcow2')
    await createImage(orphan, { format: 'qcow2', size: M, backingFile: 'missing.qcow2', backingFormat: 'qcow2' })
    await expect(imageInfo(orphan)).resolves.toMatchObject({ format: 'qcow2' })
    await expect(imageInfo(orphan, { backingChain: true })).rejects.toThrow(/missing\.qcow2/)
  })

  it('maps the guest range in merged records without gaps, data where it was written', async () => {
    const records = await all(mapImage(top))
    expect(records[0]!.start).toBe(0)
    for (let i = 1; i < records.length; i++) expect(records[i]!.start).toBe(records[i - 1]!.start + records[i - 1]!.length)
    expect(records.reduce((n, e) => n + e.length, 0)).toBe(4 * M)
    expect(records.filter((e) => e.data && e.depth === 0)).toEqual([expect.objectContaining({ start: M, length: 128 * K })])
  })

  it('takes a range as qemu-img sizes, clamps it at the end, and gives one empty record for an empty range', async () => {
    const part = await all(mapImage(top, { offset: '1M', length: '64K' }))
    expect(part).toEqual([expect.objectContaining({ start: M, length: 64 * K, data: true })])
    expect(await all(mapImage(top, { offset: 3 * M, length: 10 * M }))).toHaveLength(1)
    expect(await all(mapImage(top, { offset: 9 * M }))).toEqual([{ start: 4 * M, length: 0, depth: 0, present: false, zero: false, data: false }])
  })

  it('closes the image when the loop is left early (a writer can open it again)', async () => {
    for await (const _ of mapImage(top)) break
    const w = await openImage(top, { readOnly: false })
    await w.close()
  })
})
