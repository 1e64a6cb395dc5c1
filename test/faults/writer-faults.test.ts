/**
 * Fault sweep of the qcow2 writer: EIO and ENOSPC injected at every read,
 * write and flush of the crash workloads. The operation rejects with a clear
 * I/O error; after the image is closed (and, if lazy refcounts left it dirty,
 * reopened, which repairs it), check finds 0 corruptions and 0 leaks.
 * Workloads with an external data file are swept twice: faults in the image
 * file, then faults in the data file. Every run starts from fresh copies of
 * both files.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { ImageIoError } from '../../src/errors.js'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { u32be, u64be } from '../../src/util/bytes.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { sweepFaults, type FaultErrno, type FaultOp, type FaultPoint } from '../support/faulty-device.js'
import { openOn, Unclosable, type MemFiles } from '../writer/helpers.js'
import { WORKLOADS, copyFiles, dataFileOf, prepareBase, runWorkload, type Workload } from '../crash/workloads.js'

let injected = 0
const perWorkload: string[] = []
afterAll(() => console.log(`[writer fault sweep] ${injected} faults injected over ${WORKLOADS.length} workloads\n  ${perWorkload.join('\n  ')}`))

const KINDS: Array<[FaultOp, FaultErrno]> = [
  ['write', 'EIO'],
  ['write', 'ENOSPC'],
  ['read', 'EIO'],
  ['read', 'ENOSPC'],
  ['flush', 'EIO'],
  ['flush', 'ENOSPC'],
]

/** After a fault: the operation failed with the injected error, and the files left behind check clean. */
async function checkAfterFault(w: Workload, p: FaultPoint, errno: FaultErrno, image: MemoryDevice, files: MemFiles): Promise<boolean> {
  if (!p.triggered) return false
  expect(p.error, 'the operation must fail').toBeInstanceOf(ImageIoError)
  expect((p.error as ImageIoError).errno).toBe(errno)
  expect((p.error as Error).message).toMatch(/injected/)
  const head = await image.read(0, 112)
  if (u32be(head, 0) !== 0x514649fb) {
    expect(w.createInside, 'only create may leave no image').toBe(true)
    return true
  }
  if ((u64be(head, 72) & 1n) !== 0n) {
    // snapshot operations are shadow commits (never dirty): only lazy refcounts may leave a dirty image
    expect(w.options['lazy_refcounts'], 'a dirty image without lazy refcounts').toBe('on')
    const img = await openOn(image, files) // a dirty image is repaired on open
    await img.close()
  }
  const dataName = dataFileOf(w)
  const dataDevice = dataName ? files.files.get(dataName) : undefined
  const a = await analyzeQcow2(image, dataDevice ? { dataDevice } : {})
  expect({ corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors }, a.report.diagnostics.join('\n')).toEqual({
    corruptions: 0,
    leaks: 0,
    checkErrors: 0,
  })
  return true
}

describe('qcow2 writer fault sweep', () => {
  for (const w of WORKLOADS) {
    it(`${w.name}: every injected EIO/ENOSPC is reported and leaves 0 corruptions and 0 leaks`, async () => {
      const started = Date.now()
      const { base, files, expected } = await prepareBase(w)
      const bytes = base.snapshot()
      const dataName = dataFileOf(w)
      let faults = 0
      let dataFaults = 0
      // faults in the image file
      for (const [op, errno] of KINDS) {
        let runFiles = files
        await sweepFaults(
          { op, errno },
          () => {
            runFiles = copyFiles(files)
            return new MemoryDevice(bytes, { name: 'img.qcow2' })
          },
          async (dev) => {
            await runWorkload(w, new Unclosable(dev), runFiles, expected.slice(), () => 0)
          },
          async (p) => {
            if (await checkAfterFault(w, p, errno, p.device.inner as MemoryDevice, runFiles)) faults++
          },
        )
      }
      // faults in the external data file
      if (dataName) {
        const dataBytes = (files.files.get(dataName) as MemoryDevice).snapshot()
        for (const [op, errno] of KINDS) {
          let image = new MemoryDevice(bytes, { name: 'img.qcow2' })
          let runFiles = files
          await sweepFaults(
            { op, errno },
            () => new MemoryDevice(dataBytes, { name: dataName }),
            async (data) => {
              image = new MemoryDevice(bytes, { name: 'img.qcow2' })
              runFiles = copyFiles(files, { [dataName]: data as BlockDevice })
              await runWorkload(w, new Unclosable(image), runFiles, expected.slice(), () => 0)
            },
            async (p) => {
              if (await checkAfterFault(w, p, errno, image, copyFiles(files, { [dataName]: p.device.inner }))) dataFaults++
            },
          )
        }
      }
      injected += faults + dataFaults
      const split = dataName ? ` (${faults} in the image, ${dataFaults} in the data file)` : ''
      perWorkload.push(`${String(faults + dataFaults).padStart(5)} faults ${String(Date.now() - started).padStart(6)} ms  ${w.name}${split}`)
    })
  }
})
