/**
 * RefcountReader.countReferenced (the metadata-preallocation detection's count, one await per refcount
 * block) against the per-cluster get() loop it replaced: the same count and the same error, for every
 * refcount width, limits that stop inside a block, blocks that are absent, and a misaligned block offset.
 */
import { describe, expect, it } from 'vitest'
import type { Qcow2Header } from '../../../src/formats/qcow2/spec/header.js'
import { RefcountReader } from '../../../src/formats/qcow2/read/refcount.js'
import { refcountsPerBlock, setRefcountEntry, maxRefcount } from '../../../src/formats/qcow2/spec/refcount-codec.js'
import { MemoryDevice } from '../../../src/io/memory-device.js'
import { Prng } from '../../support/prng.js'

const CS = 512

/** An image of just a refcount table (cluster 1) and `blocks` refcount blocks, some absent (0) or misaligned. */
function image(order: number, prng: Prng, blocks: number, misaligned: number | undefined) {
  const per = refcountsPerBlock(CS, order)
  const table = new Uint8Array(CS)
  const dv = new DataView(table.buffer)
  const bytes = new Uint8Array(CS * (2 + blocks))
  for (let b = 0; b < blocks; b++) {
    if (prng.chance(0.25)) continue // no refcount block: every count 0
    const at = (2 + b) * CS
    dv.setUint32(b * 8 + 4, b === misaligned ? at + 8 : at)
    const block = bytes.subarray(at, at + CS)
    const density = prng.int(4) // all zero, sparse, dense, full
    for (let i = 0; i < per; i++) {
      const v = density === 0 ? 0 : density === 3 || prng.chance(density === 1 ? 0.1 : 0.8) ? 1 + prng.int(Math.min(maxRefcount(order), 1000)) : 0
      setRefcountEntry(block, i, order, v)
    }
  }
  bytes.set(table, CS)
  const header = { clusterSize: CS, refcountOrder: order, refcountTableOffset: CS, refcountTableClusters: 1 } as unknown as Qcow2Header
  return { bytes, header, per }
}

async function loopCount(r: RefcountReader, end: number, limit: number): Promise<number> {
  let count = 0
  for (let i = 0; i < end && count < limit; i++) if ((await r.get(i)) !== 0) count++
  return count
}

async function outcome(f: () => Promise<number>): Promise<string> {
  try {
    return `count ${await f()}`
  } catch (e) {
    return `error ${(e as Error).message}`
  }
}

describe('RefcountReader.countReferenced', () => {
  for (const order of [0, 1, 2, 3, 4, 5, 6]) {
    it(`counts as get() does, refcount order ${order}`, async () => {
      const prng = new Prng(0xc0_0000 + order)
      for (let round = 0; round < 12; round++) {
        const blocks = 1 + prng.int(6)
        const misaligned = prng.chance(0.3) ? prng.int(blocks) : undefined
        const { bytes, header, per } = image(order, prng, blocks, misaligned)
        const end = prng.int(per * (blocks + 1)) + 1
        const limit = prng.chance(0.5) ? end + 1 : prng.int(end) + 1
        const a = new RefcountReader(new MemoryDevice(bytes.slice()), header, 'x.qcow2')
        const b = new RefcountReader(new MemoryDevice(bytes.slice()), header, 'x.qcow2')
        expect(await outcome(() => a.countReferenced(end, limit)), `round ${round}: end ${end} limit ${limit}`).toBe(
          await outcome(() => loopCount(b, end, limit)),
        )
      }
    })
  }
})
