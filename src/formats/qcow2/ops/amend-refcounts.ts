/**
 * amend refcount_bits=N: the refcount structure rewritten at a new width.
 *
 * Every refcount of the current structure (leaks included, as qemu keeps
 * them) is carried over, except those of the old table and blocks, which the
 * new structure does not use. The new table and blocks go past the end of the
 * file, where nothing lives and the old structure counts nothing, and are
 * flushed; then one write of 52 bytes in the first sector (refcount table
 * offset and clusters at 48..60, refcount_order at 96, the fields between
 * rewritten as they are) switches the image over. A crash before that write
 * leaves the old image with unreferenced clusters past its end (nothing to
 * report); after it, the new structure is exact and the old clusters are
 * free, counted 0, so not even a leak is left.
 */
import { ImgtoolError, UnsupportedFeatureError } from '../../../errors.js'
import { putU32be, putU64be } from '../../../util/bytes.js'
import { MAX_REFTABLE_BYTES } from '../spec/constants.js'
import { maxRefcount, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { reloadWriter } from './snapshot-shadow.js'

/** Read every refcount and refuse (qemu's words) when one does not fit in `order`; nothing is written. */
export async function carriedRefcounts(state: Qcow2State, w: Qcow2Writer, order: number): Promise<{ counts: Map<number, number>; old: number[] }> {
  const h = state.header
  const cs = h.clusterSize
  const old = (await w.refcounts.metadataClusters()).map(([c]) => c)
  const skip = new Set(old)
  const counts = new Map<number, number>()
  const max = maxRefcount(order)
  const clusters = Math.ceil(state.device.size / cs)
  for (let c = 0; c < clusters; c++) {
    const n = await w.refcounts.get(c)
    if (n === 0 || skip.has(c)) continue
    if (n > max) {
      throw new UnsupportedFeatureError(
        `Cannot decrease refcount entry width to ${2 ** order} bits: Cluster at offset 0x${(c * cs).toString(16)} has a refcount of ${n}`,
      )
    }
    counts.set(c, n)
  }
  return { counts, old }
}

/** Switch the image to refcount_order `order` (inside the writer's mutex, refcounts persisted and flushed). */
export async function changeRefcountOrder(state: Qcow2State, w: Qcow2Writer, order: number): Promise<void> {
  const h = state.header
  const dev = state.device
  const cs = h.clusterSize
  await w.refcounts.persist()
  await w.flushNow()
  const { counts, old } = await carriedRefcounts(state, w, order)
  const pb = refcountsPerBlock(cs, order)
  const top = Math.ceil(dev.size / cs)
  const usedTis = new Set<number>()
  for (const c of counts.keys()) usedTis.add(Math.floor(c / pb))
  // the new table, then its blocks, from `top` on; grown until they describe themselves too
  let tableClusters = 1
  let blockTis: number[] = []
  for (let iter = 0; ; iter++) {
    if (iter > 64) throw new ImgtoolError('INTERNAL', `qcow2: ${state.filename}: refcount structure layout did not settle`)
    const end = top + tableClusters + blockTis.length
    const tis = new Set(usedTis)
    for (let ti = Math.floor(top / pb); ti <= Math.floor((end - 1) / pb); ti++) tis.add(ti)
    const sorted = [...tis].sort((a, b) => a - b)
    const t = Math.max(1, Math.ceil((((sorted[sorted.length - 1] ?? 0) + 1) * 8) / cs))
    if (t === tableClusters && sorted.length === blockTis.length) break
    tableClusters = t
    blockTis = sorted
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new ImgtoolError('NO_SPACE', `qcow2: ${state.filename}: refcount table would exceed 8 MiB`)
  const tableOffset = top * cs
  const table = new Uint8Array(tableClusters * cs)
  const blocks = new Map<number, Uint8Array>()
  blockTis.forEach((ti, i) => {
    putU64be(table, ti * 8, (top + tableClusters + i) * cs)
    blocks.set(ti, new Uint8Array(cs))
  })
  for (let c = top; c < top + tableClusters + blockTis.length; c++) counts.set(c, 1)
  for (const [c, n] of counts) setRefcountEntry(blocks.get(Math.floor(c / pb))!, c % pb, order, n)
  let i = 0
  for (const ti of blockTis) await dev.write((top + tableClusters + i++) * cs, blocks.get(ti)!, 'refblock')
  await dev.write(tableOffset, table, 'reftable')
  await w.flushNow()
  // the switch: refcount_table_offset .. refcount_order, one write in the first sector
  const sw = new Uint8Array(52)
  putU64be(sw, 0, tableOffset)
  putU32be(sw, 8, tableClusters)
  putU32be(sw, 12, h.nbSnapshots)
  putU64be(sw, 16, h.snapshotsOffset)
  putU64be(sw, 24, h.incompatibleFeatures)
  putU64be(sw, 32, h.compatibleFeatures)
  putU64be(sw, 40, h.autoclearFeatures)
  putU32be(sw, 48, order)
  try {
    await w.writeMetadata(48, sw, 'header')
    await w.flushNow()
    h.refcountTableOffset = tableOffset
    h.refcountTableClusters = tableClusters
    h.refcountOrder = order
    state.refcounts.invalidate()
    await reloadWriter(state, w, old)
  } catch (e) {
    // the switch may or may not be on disk: the writer refuses until the image is reopened
    w.abortTransaction()
    throw e
  }
}
