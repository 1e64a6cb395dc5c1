/** The API calls under imgtool convert -, resize, snapshot and compare -U: streams, checks in the CLI's order, lock sharing. */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { compare, convert, createImage, openImage, resize, snapshot } from '../../src/index.js'
import { cleanupTempDirs, collector, makeTempDir } from '../support/qemu.js'

const M = 1024 * 1024

describe('convert to a stream, resize, snapshot, compare', () => {
  let dir: string
  let q: string
  let raw: string
  const guest = Buffer.alloc(2 * M)

  beforeAll(async () => {
    dir = makeTempDir('imgtool-ops-')
    q = join(dir, 'a.qcow2')
    raw = join(dir, 'a.raw')
    await createImage(q, { format: 'qcow2', size: 2 * M })
    const img = await openImage(q, { readOnly: false })
    const data = new Uint8Array(300_000).map((_, i) => (i * 7) & 0xff)
    await img.write!(M - 1000, data)
    guest.set(data, M - 1000)
    await img.close()
    writeFileSync(raw, guest)
  })
  afterAll(() => cleanupTempDirs(dir))

  it('convert to a stream writes the guest bytes as raw, with progress up to the size', async () => {
    const out = collector()
    let last: [number, number] = [0, 0]
    const r = await convert(q, out, { onProgress: (d, t) => (last = [d, t]) })
    expect(out.bytes().equals(guest)).toBe(true)
    expect(last).toEqual([2 * M, 2 * M])
    expect(r).toMatchObject({ bytesWritten: 2 * M, created: false })
  })

  it('convert to a stream: raw only; a reader that goes away ends it quietly', async () => {
    await expect(convert(q, collector(), { targetFormat: 'qcow2' })).rejects.toMatchObject({ code: 'USAGE' })
    const gone = new Writable({ write: (_c, _e, cb) => cb(Object.assign(new Error('EPIPE'), { code: 'EPIPE' })) })
    gone.on('error', () => undefined)
    await expect(convert(q, gone)).resolves.toMatchObject({ bytesWritten: 0 })
  })

  it('resize checks the size before the format, as qemu-img resize does', async () => {
    await expect(resize(raw, '-1M')).rejects.toThrow('Use the --shrink option to perform a shrink operation.')
    // raw images resize now (flags-resize.test.ts); metadata preallocation is theirs to refuse
    await expect(resize(raw, '+1M', { preallocation: 'metadata' })).rejects.toThrow('Unsupported preallocation mode: metadata')
    expect((await resize(q, '+1M')).size).toBe(3 * M)
    await expect(resize(q, '-4M', { shrink: true })).rejects.toThrow('New image size must be positive')
  })

  it('snapshots need a qcow2 image', async () => {
    await expect(snapshot.create(raw, 's')).rejects.toThrow('raw: internal snapshots need a qcow2 image')
    await snapshot.create(q, 's1', { onNotice: () => undefined })
    expect((await snapshot.list(q)).map((s) => s.name)).toEqual(['s1'])
  })

  it('compare opens both images without locks when asked (forceShare)', async () => {
    const writer = await openImage(q, { readOnly: false })
    try {
      await expect(compare(q, raw)).rejects.toMatchObject({ code: 'LOCKED' })
      const r = await compare(q, raw, { forceShare: true })
      expect(r.sizeMismatch).toBe(true)
    } finally {
      await writer.close()
    }
  })
})
