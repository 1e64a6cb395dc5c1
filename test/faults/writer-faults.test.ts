/**
 * Fault sweep of the qcow2 writer: EIO and ENOSPC injected at every read,
 * write and flush of the crash workloads. The operation rejects with a clear
 * I/O error; after the image is closed (and, if a transaction left it dirty,
 * reopened, which repairs it), check finds 0 corruptions and 0 leaks.
 */
import { afterAll, describe, expect, it } from 'vitest'
import { ImageIoError } from '../../src/errors.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { u32be, u64be } from '../../src/util/bytes.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check.js'
import { sweepFaults, type FaultErrno, type FaultOp } from '../support/faulty-device.js'
import { openOn, Unclosable } from '../writer/helpers.js'
import { WORKLOADS, prepareBase } from '../crash/workloads.js'
import { runWorkload } from '../crash/workloads.js'

let injected = 0
afterAll(() => console.log(`[writer fault sweep] ${injected} faults injected over ${WORKLOADS.length} workloads`))

const KINDS: Array<[FaultOp, FaultErrno]> = [
  ['write', 'EIO'],
  ['write', 'ENOSPC'],
  ['read', 'EIO'],
  ['read', 'ENOSPC'],
  ['flush', 'EIO'],
  ['flush', 'ENOSPC'],
]

describe('qcow2 writer fault sweep', () => {
  for (const w of WORKLOADS) {
    it(`${w.name}: every injected EIO/ENOSPC is reported and leaves 0 corruptions and 0 leaks`, async () => {
      const { base, files, expected } = await prepareBase(w)
      const bytes = base.snapshot()
      for (const [op, errno] of KINDS) {
        const n = await sweepFaults(
          { op, errno },
          () => new MemoryDevice(bytes, { name: 'img.qcow2' }),
          async (dev) => {
            await runWorkload(w, new Unclosable(dev), files, expected.slice(), () => 0)
          },
          async (p) => {
            if (!p.triggered) return
            injected++
            expect(p.error, 'the operation must fail').toBeInstanceOf(ImageIoError)
            expect((p.error as ImageIoError).errno).toBe(errno)
            expect((p.error as Error).message).toMatch(/injected/)
            const dev = p.device.inner as MemoryDevice
            const head = await dev.read(0, 112)
            if (u32be(head, 0) !== 0x514649fb) {
              expect(w.createInside, 'only create may leave no image').toBe(true)
              return
            }
            if ((u64be(head, 72) & 1n) !== 0n) {
              const img = await openOn(dev, files) // a dirty image is repaired on open
              await img.close()
            }
            const a = await analyzeQcow2(dev)
            expect({ corruptions: a.report.corruptions, leaks: a.report.leaks, checkErrors: a.report.checkErrors }, a.report.diagnostics.join('\n')).toEqual({
              corruptions: 0,
              leaks: 0,
              checkErrors: 0,
            })
          },
        )
        expect(n).toBeGreaterThanOrEqual(0)
      }
    })
  }
})
