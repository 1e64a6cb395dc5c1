/**
 * Kernel-made fixtures (images/dmsnap, made by make-fixtures.sh with the dmsnap
 * oracle): our view equals the kernel's, our status numbers equal dmsetup status,
 * our check finds nothing wrong in what the kernel wrote, and our merge equals the
 * kernel's snapshot-merge.
 */
import { describe, expect, it } from 'vitest'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { mergeStore } from '../../src/formats/dmsnap/index.js'
import { FIXTURES, fixtureNames, loadFixture, md5, openStore, rawImage, readAll, statusTail } from './helpers.js'

describe('kernel-made dm-snapshot fixtures', () => {
  const names = fixtureNames('create')
  it('has the fixtures make-fixtures.sh makes', () => {
    expect(names.length).toBeGreaterThanOrEqual(8)
  })

  for (const name of names) {
    describe(name, () => {
      const { origin, cow, manifest } = loadFixture(name)
      const ref = manifest.cow.reference_parse
      const invalid = ref.state === 'invalid'

      it('loads the same exception table as the kernel', async () => {
        const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true })
        if (!invalid) expect(img.records.map((r) => [r.old, r.new])).toEqual(ref.exceptions)
        expect(img.layout!.chunkSectors).toBe(manifest.params.chunk_sectors)
      })

      it("reports the kernel's status numbers in info", async () => {
        const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true })
        const info = await img.info()
        expect(info.format).toBe('dmsnap')
        expect(info.formatSpecific?.type).toBe('dmsnap')
        expect(info.formatSpecific!.data.status).toBe(statusTail(manifest.observed.status_after_reload))
        expect(info.virtualSize).toBe(manifest.params.origin_bytes)
      })

      it(invalid ? 'refuses to read an invalidated store, like the kernel' : "serves the kernel's snapshot view", async () => {
        const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true })
        if (invalid) {
          await expect(img.read(0, 512)).rejects.toThrow(/invalidated/)
          return
        }
        expect(md5(await readAll(img))).toBe(manifest.observed.snapshot_md5_after_reload)
      })

      it('maps exactly the recorded chunks to the COW', async () => {
        if (invalid) return
        const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true })
        const cb = img.chunkBytes
        let fromCow = 0
        for await (const e of img.extents()) if (e.depth === 0) fromCow += e.length
        const expected = invalid ? 0 : new Set(ref.exceptions.map(([o]) => o)).size
        const partial = ref.exceptions.some(([o]) => (o + 1) * cb > manifest.params.origin_bytes) ? cb - (manifest.params.origin_bytes % cb) : 0
        if (!invalid) expect(fromCow).toBe(expected * cb - partial)
      })

      it('checks clean, apart from what the kernel itself reports', async () => {
        const img = await openStore(new MemoryDevice(cow), rawImage(origin), { readOnly: true, forCheck: true })
        const r = await img.check()
        if (invalid) {
          expect(r.findings.map((f) => f.kind)).toEqual(['invalidated'])
          expect(r.corruptions).toBe(1)
        } else {
          expect(r.findings).toEqual([])
          expect(r.leaks + r.corruptions + r.checkErrors).toBe(0)
        }
        const full = manifest.observed.status.includes('Overflow') || manifest.params.store === 'PO'
        if (full) expect(r.notices?.map((n) => n.kind)).toContain('store-full')
      })
    })
  }

  for (const name of fixtureNames('merge')) {
    it(`${name}: our merge equals the kernel's snapshot-merge`, async () => {
      const src = name.replace(/^merged-/, '')
      const { origin, cow } = loadFixture(src)
      const merge = JSON.parse(readFileSync(join(FIXTURES, name, 'merge.json'), 'utf8')) as { origin_file_md5_after: string }
      const kernelCow = new Uint8Array(readFileSync(join(FIXTURES, name, 'cow.img')))
      const odev = new MemoryDevice(origin)
      const cdev = new MemoryDevice(cow)
      const r = await mergeStore(cdev, rawImage(odev))
      expect(r.merged).toBe(loadFixture(src).manifest.cow.reference_parse.exceptions.length)
      expect(md5(odev.snapshot())).toBe(merge.origin_file_md5_after)
      // every area zero, header unchanged: the kernel's COW, except data chunks it may leave stale either way
      expect(md5(cdev.snapshot())).toBe(md5(kernelCow))
    })
  }
})
