/**
 * Crash sweeps of rebase (safe mode) and commit over the image and its
 * backing files as one CrashGroup: every crash state the power cut could
 * leave (prefixes, subsets, torn writes) is opened again and judged.
 * - rebase: the image reads the same guest bytes as before (whichever
 *   backing file its header names: the old one, or the new one once the
 *   copied data was flushed), and our check finds no corruption;
 * - commit: the overlay reads as before, the base holds per sector its old
 *   bytes or the committed ones (per sector, not per cluster: a torn
 *   in-place overwrite of an allocated base cluster lands sector by sector),
 *   and neither file has a corruption.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, expect, it } from 'vitest'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { PassThroughDevice } from '../../src/io/pass-through-device.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { makeContext, openImageOnDevice } from '../../src/open.js'
import { commitQcow2, rebaseQcow2, type Qcow2Image } from '../../src/formats/qcow2/index.js'
import { CrashGroup } from '../support/crash-group.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { checkCounts, Unclosable } from '../writer/helpers.js'

useTempDirs()

const OPTIONS = { subsets: true, torn: true, exhaustiveLimit: 8, randomSubsets: 8, maxTornPerWrite: 2, tornTail: true }
const SECTOR = 512
const SIZE = 256 * 1024
const totals: string[] = []
afterAll(() => console.log(`[rebase/commit crash sweep] ${totals.join('; ')}`))

/** A read-only view that closing leaves open (the base under the overlay being committed). */
class ReadView extends PassThroughDevice {
  override get readOnly(): boolean {
    return true
  }
  override async close(): Promise<void> {}
}

/** An opener over named devices: backing names resolve to the device of that name. */
function contextOf(files: Record<string, BlockDevice>, views: string[] = []) {
  return makeContext(async (path) => {
    const d = files[path]
    if (!d) throw new Error(`no file ${path}`)
    return views.includes(path) ? new ReadView(d) : new Unclosable(d)
  })
}

async function open(files: Record<string, BlockDevice>, name: string, readOnly: boolean, views: string[] = []): Promise<DiskImage> {
  return openImageOnDevice(new Unclosable(files[name]!), { format: 'qcow2', readOnly, context: contextOf(files, views) })
}

async function readAll(d: DiskImage): Promise<Uint8Array> {
  return d.read(0, d.virtualSize)
}

async function makeFiles(setup: (dir: string) => Promise<void>, names: string[]): Promise<Record<string, Uint8Array>> {
  const dir = makeTempDir('imgtool-rc-crash-')
  await setup(dir)
  return Object.fromEntries(names.map((n) => [n, new Uint8Array(readFileSync(join(dir, n)))]))
}

const q = (dir: string, name: string, backing?: string) =>
  qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), join(dir, name), String(SIZE)])

describeQemu('crash sweeps of rebase and commit', () => {
  for (const compress of [false, true]) {
    it(`rebase${compress ? ' -c' : ''}: every crash state reads as before and has no corruption`, async () => {
      const bytes = await makeFiles(
        async (d) => {
          await q(d, 'base1.qcow2')
          await qemuIoOk(join(d, 'base1.qcow2'), ['write -P 1 0 64k', 'write -P 5 200k 8k'])
          await q(d, 'base2.qcow2')
          await qemuIoOk(join(d, 'base2.qcow2'), ['write -P 2 32k 64k'])
          await q(d, 'img.qcow2', 'base1.qcow2')
          await qemuIoOk(join(d, 'img.qcow2'), ['write -P 3 128k 32k', 'write -P 4 40k 2k'])
        },
        ['base1.qcow2', 'base2.qcow2', 'img.qcow2'],
      )
      const mem = Object.fromEntries(Object.entries(bytes).map(([n, b]) => [n, new MemoryDevice(b, { name: n })]))
      const before = await (async () => {
        const d = await open(mem, 'img.qcow2', true)
        const r = await readAll(d)
        await d.close()
        return r
      })()
      const group = new CrashGroup()
      const files: Record<string, BlockDevice> = {
        'img.qcow2': group.add('img.qcow2', bytes['img.qcow2']!),
        'base1.qcow2': group.add('base1.qcow2', bytes['base1.qcow2']!),
        'base2.qcow2': group.add('base2.qcow2', bytes['base2.qcow2']!),
      }
      const img = (await open(files, 'img.qcow2', false)) as Qcow2Image
      const newBacking = await openImageOnDevice(new Unclosable(files['base2.qcow2']!), { format: 'qcow2', readOnly: true, context: contextOf(files) })
      const r = await rebaseQcow2(img, { backingFile: 'base2.qcow2', backingFormat: 'qcow2', newBacking, unsafe: false, compress })
      expect(r.bytesCopied).toBeGreaterThan(0)
      await newBacking.close()
      await img.close()
      let states = 0
      const named = new Set<string>()
      for (const s of group.allCrashStates(OPTIONS)) {
        states++
        const [dImg, d1, d2] = s.devices
        const f = { 'img.qcow2': dImg!, 'base1.qcow2': d1!, 'base2.qcow2': d2! }
        const c = await checkCounts(dImg!)
        expect(c.corruptions, s.description).toBe(0)
        const d = (await open(f, 'img.qcow2', true)) as Qcow2Image
        named.add(String(d.header.backingFile))
        expect(Buffer.compare(Buffer.from(await readAll(d)), Buffer.from(before)), s.description).toBe(0)
        await d.close()
      }
      expect([...named].sort()).toEqual(['base1.qcow2', 'base2.qcow2'])
      totals.push(`rebase${compress ? ' -c' : ''}: ${states} states`)
    }, 600_000)
  }

  it('commit: the overlay reads as before, the base holds old or committed bytes per sector', async () => {
    const bytes = await makeFiles(
      async (d) => {
        await q(d, 'base.qcow2')
        await qemuIoOk(join(d, 'base.qcow2'), ['write -P 1 0 64k', 'write -P 5 200k 8k'])
        await q(d, 'top.qcow2', 'base.qcow2')
        await qemuIoOk(join(d, 'top.qcow2'), ['write -P 3 32k 64k', 'write -z 200k 4k', 'write -P 4 140k 2k'])
      },
      ['base.qcow2', 'top.qcow2'],
    )
    const mem = Object.fromEntries(Object.entries(bytes).map(([n, b]) => [n, new MemoryDevice(b, { name: n })]))
    const view = async (f: Record<string, BlockDevice>, name: string) => {
      const d = await open(f, name, true)
      const r = await readAll(d)
      await d.close()
      return r
    }
    const topBefore = await view(mem, 'top.qcow2')
    const baseBefore = await view(mem, 'base.qcow2')
    const group = new CrashGroup()
    const files: Record<string, BlockDevice> = {
      'top.qcow2': group.add('top.qcow2', bytes['top.qcow2']!),
      'base.qcow2': group.add('base.qcow2', bytes['base.qcow2']!),
    }
    const base = await open(files, 'base.qcow2', false)
    const top = (await open(files, 'top.qcow2', false, ['base.qcow2'])) as Qcow2Image
    await commitQcow2(top, base, 1, { keepOverlay: false })
    await top.close()
    await base.close()
    let states = 0
    for (const s of group.allCrashStates(OPTIONS)) {
      states++
      const [dTop, dBase] = s.devices
      const f = { 'top.qcow2': dTop!, 'base.qcow2': dBase! }
      expect((await checkCounts(dTop!)).corruptions, `top: ${s.description}`).toBe(0)
      expect((await checkCounts(dBase!)).corruptions, `base: ${s.description}`).toBe(0)
      expect(Buffer.compare(Buffer.from(await view(f, 'top.qcow2')), Buffer.from(topBefore)), s.description).toBe(0)
      const b = await view(f, 'base.qcow2')
      // per sector: a torn in-place overwrite of a base cluster lands sector by sector (the device's atomic unit)
      for (let c = 0; c < SIZE; c += SECTOR) {
        const got = Buffer.from(b.subarray(c, c + SECTOR))
        const ok = got.equals(Buffer.from(baseBefore.subarray(c, c + SECTOR))) || got.equals(Buffer.from(topBefore.subarray(c, c + SECTOR)))
        expect(ok, `base sector at ${c}: ${s.description}`).toBe(true)
      }
    }
    totals.push(`commit: ${states} states`)
  }, 600_000)
})
