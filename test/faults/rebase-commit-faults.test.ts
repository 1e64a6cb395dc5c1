/**
 * Fault sweeps of rebase (safe mode) and commit: EIO and ENOSPC injected at every read, write and flush of
 * each file the operation touches (the image rebased and the backing files it reads; the overlay and the
 * base of a commit), each run from fresh copies of the qemu-made files. The operation rejects with the
 * injected I/O error; afterwards every file checks with 0 corruptions and 0 leaks, the rebased image reads
 * the guest bytes it read before (through whichever backing file its header names), and a commit leaves
 * the overlay reading as before and the base holding, per sector, its old bytes or the committed ones.
 */
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { afterAll, expect, it } from 'vitest'
import { ImageIoError } from '../../src/errors.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { PassThroughDevice } from '../../src/io/pass-through-device.js'
import type { DiskImage } from '../../src/image/disk-image.js'
import { makeContext, openImageOnDevice } from '../../src/open.js'
import { u32be, u64be } from '../../src/util/bytes.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { commitQcow2, rebaseQcow2, type Qcow2Image } from '../../src/formats/qcow2/index.js'
import { sweepFaults, type FaultErrno, type FaultOp, type FaultPoint } from '../support/faulty-device.js'
import { describeQemu, makeTempDir, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { Unclosable } from '../writer/helpers.js'

useTempDirs()

const SECTOR = 512
const SIZE = 256 * 1024
const KINDS: Array<[FaultOp, FaultErrno]> = [
  ['write', 'EIO'],
  ['write', 'ENOSPC'],
  ['read', 'EIO'],
  ['read', 'ENOSPC'],
  ['flush', 'EIO'],
  ['flush', 'ENOSPC'],
]
const totals: string[] = []
afterAll(() => console.log(`[rebase/commit fault sweep] ${totals.join('; ')}`))

/** A read-only view that closing leaves open (the base under the overlay being committed). */
class ReadView extends PassThroughDevice {
  override get readOnly(): boolean {
    return true
  }
  override async close(): Promise<void> {}
}

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

async function guest(files: Record<string, BlockDevice>, name: string): Promise<Buffer> {
  const d = await open(files, name, true)
  try {
    return Buffer.from(await d.read(0, d.virtualSize))
  } finally {
    await d.close()
  }
}

async function makeFiles(setup: (dir: string) => Promise<void>, names: string[]): Promise<Record<string, Uint8Array>> {
  const dir = makeTempDir('imgtool-rc-faults-')
  await setup(dir)
  return Object.fromEntries(names.map((n) => [n, new Uint8Array(readFileSync(join(dir, n)))]))
}

const q = (dir: string, name: string, backing?: string) =>
  qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', ...(backing ? ['-b', backing, '-F', 'qcow2'] : []), join(dir, name), String(SIZE)])

/** Run `work`, then close `images`: a close that fails (its flush) fails the operation, unless `work` failed first. */
async function closing(images: DiskImage[], work: () => Promise<unknown>): Promise<void> {
  try {
    await work()
  } catch (e) {
    for (const d of images) await d.close().catch(() => undefined)
    throw e
  }
  for (const d of images) await d.close()
}

/** The operation failed with the injected error; the file checks clean (a dirty one is repaired on open first). */
async function checkClean(p: FaultPoint, errno: FaultErrno, dev: MemoryDevice, files: Record<string, BlockDevice>, name: string): Promise<void> {
  expect(p.error, `${p.description}: the operation must fail`).toBeInstanceOf(ImageIoError)
  expect((p.error as ImageIoError).errno).toBe(errno)
  const head = await dev.read(0, 112)
  expect(u32be(head, 0)).toBe(0x514649fb)
  if ((u64be(head, 72) & 1n) !== 0n) await (await open(files, name, false)).close()
  const a = await analyzeQcow2(dev)
  expect(
    { corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors },
    `${name}: ${p.description}: ${a.report.diagnostics.join('\n')}`,
  ).toEqual({
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
  })
}

describeQemu('fault sweeps of rebase and commit', () => {
  for (const compress of [false, true]) {
    it(`rebase${compress ? ' -c' : ''}: every EIO/ENOSPC in the image or a backing file fails it cleanly, the image reads as before`, async () => {
      const names = ['img.qcow2', 'base1.qcow2', 'base2.qcow2']
      const bytes = await makeFiles(async (d) => {
        await q(d, 'base1.qcow2')
        await qemuIoOk(join(d, 'base1.qcow2'), ['write -P 1 0 64k', 'write -P 5 200k 8k'])
        await q(d, 'base2.qcow2')
        await qemuIoOk(join(d, 'base2.qcow2'), ['write -P 2 32k 64k'])
        await q(d, 'img.qcow2', 'base1.qcow2')
        await qemuIoOk(join(d, 'img.qcow2'), ['write -P 3 128k 32k', 'write -P 4 40k 2k'])
      }, names)
      const fresh = () => Object.fromEntries(names.map((n) => [n, new MemoryDevice(bytes[n]!, { name: n })])) as Record<string, MemoryDevice>
      const before = await guest(fresh(), 'img.qcow2')
      let faults = 0
      for (const target of names) {
        for (const [op, errno] of KINDS) {
          let files = fresh()
          await sweepFaults(
            { op, errno },
            () => {
              files = fresh()
              return files[target]!
            },
            async (dev) => {
              const f: Record<string, BlockDevice> = { ...files, [target]: dev }
              const img = (await open(f, 'img.qcow2', false)) as Qcow2Image
              await closing([img], async () => {
                const newBacking = await open(f, 'base2.qcow2', true)
                await closing([newBacking], () => rebaseQcow2(img, { backingFile: 'base2.qcow2', backingFormat: 'qcow2', newBacking, unsafe: false, compress }))
              })
            },
            async (p) => {
              if (!p.triggered) return
              faults++
              await checkClean(p, errno, files['img.qcow2']!, files, 'img.qcow2')
              expect((await guest(files, 'img.qcow2')).equals(before), `${target}: ${p.description}: guest bytes`).toBe(true)
            },
          )
        }
      }
      expect(faults).toBeGreaterThan(0)
      totals.push(`rebase${compress ? ' -c' : ''}: ${faults} faults`)
    }, 600_000)
  }

  it('commit: every EIO/ENOSPC in the overlay or the base fails it cleanly; overlay as before, base old or new per sector', async () => {
    const names = ['top.qcow2', 'base.qcow2']
    const bytes = await makeFiles(async (d) => {
      await q(d, 'base.qcow2')
      await qemuIoOk(join(d, 'base.qcow2'), ['write -P 1 0 64k', 'write -P 5 200k 8k'])
      await q(d, 'top.qcow2', 'base.qcow2')
      await qemuIoOk(join(d, 'top.qcow2'), ['write -P 3 32k 64k', 'write -z 200k 4k', 'write -P 4 140k 2k'])
    }, names)
    const fresh = () => Object.fromEntries(names.map((n) => [n, new MemoryDevice(bytes[n]!, { name: n })])) as Record<string, MemoryDevice>
    const topBefore = await guest(fresh(), 'top.qcow2')
    const baseBefore = await guest(fresh(), 'base.qcow2')
    let faults = 0
    for (const target of names) {
      for (const [op, errno] of KINDS) {
        let files = fresh()
        await sweepFaults(
          { op, errno },
          () => {
            files = fresh()
            return files[target]!
          },
          async (dev) => {
            const f: Record<string, BlockDevice> = { ...files, [target]: dev }
            const base = await open(f, 'base.qcow2', false)
            await closing([base], async () => {
              const top = (await open(f, 'top.qcow2', false, ['base.qcow2'])) as Qcow2Image
              await closing([top], () => commitQcow2(top, base, 1, { keepOverlay: false }))
            })
          },
          async (p) => {
            if (!p.triggered) return
            faults++
            for (const n of names) await checkClean(p, errno, files[n]!, files, n)
            expect((await guest(files, 'top.qcow2')).equals(topBefore), `${target}: ${p.description}: overlay`).toBe(true)
            const b = await guest(files, 'base.qcow2')
            for (let c = 0; c < SIZE; c += SECTOR) {
              const got = b.subarray(c, c + SECTOR)
              const ok = got.equals(baseBefore.subarray(c, c + SECTOR)) || got.equals(topBefore.subarray(c, c + SECTOR))
              expect(ok, `${target}: ${p.description}: base sector at ${c}`).toBe(true)
            }
          },
        )
      }
    }
    expect(faults).toBeGreaterThan(0)
    totals.push(`commit: ${faults} faults`)
  }, 600_000)
})
