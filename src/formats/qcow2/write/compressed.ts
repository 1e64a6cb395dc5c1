/**
 * Compressed cluster writes: byte-granular space packed into the current
 * compressed cluster while its refcount allows, entries without COPIED (and a
 * zero bitmap with extended L2), one commit for a batch of clusters.
 */
import { maxRefcount } from '../spec/refcount-codec.js'
import { setCompressed } from '../spec/l2-meta.js'
import type { WriterCore } from './core.js'
import { commit, prepareTable, undo, type Range, type TableWork } from './commit.js'
import { dataWrite, type DataWrite } from './plan.js'

export async function writeCompressedLocked(wr: WriterCore, items: Array<{ offset: number; data: Uint8Array }>): Promise<void> {
  wr.assertUsable()
  const coverage = wr.l2Entries * wr.clusterSize
  const works: TableWork[] = []
  const writes: DataWrite[] = []
  try {
    for (const it of [...items].sort((a, b) => a.offset - b.offset)) {
      const l1Index = Math.floor(it.offset / coverage)
      let w = works[works.length - 1]
      if (!w || w.l1Index !== l1Index) {
        w = (await prepareTable(wr, l1Index, true))!
        works.push(w)
      }
      const idx = (it.offset / wr.clusterSize) % wr.l2Entries
      const e = wr.entry(w.table, idx)
      const d = wr.dropRef(e)
      if (d) w.frees.push(d)
      const host = await allocBytes(wr, it.data.byteLength)
      w.allocated.push(host.range)
      setCompressed(w.table, wr.entryWriter, idx, host.offset, it.data.byteLength)
      wr.touch(w, idx)
      dataWrite(writes, wr.state.device, host.offset, it.data)
    }
    await commit(wr, works, writes, true)
  } catch (e) {
    await undo(wr, works)
    throw e
  }
}

/**
 * Byte-granular space for compressed data, as QEMU's qcow2_alloc_bytes: packed
 * after the previous compressed cluster's bytes; when they do not fit in the
 * rest of its host cluster, a new cluster is allocated and, if it directly
 * follows, the data spans both (every cluster the bytes touch gets a
 * reference); otherwise, or when the allocation had to add a refcount block,
 * the data starts at the new cluster.
 */
async function allocBytes(wr: WriterCore, size: number): Promise<{ offset: number; range: Range }> {
  const clusterSize = wr.clusterSize
  let cur = wr.compressedCursor
  if (cur !== 0) {
    const cluster = cur - (cur % clusterSize)
    const n = await wr.refcounts.get(cluster / clusterSize)
    // the packing cluster must still be ours to share: referenced, below the maximum, not metadata
    if (n === 0 || n >= maxRefcount(wr.header.refcountOrder) || wr.guard.kindAt(cluster / clusterSize) !== undefined) cur = 0
  }
  let offset: number
  let range: Range
  if (cur !== 0 && clusterSize - (cur % clusterSize) >= size) {
    offset = cur
    await wr.refcounts.update(cur - (cur % clusterSize), 1, +1)
    range = { offset: cur - (cur % clusterSize), length: clusterSize }
  } else {
    const changes = wr.refcounts.structureChanges
    const fresh = await wr.alloc(1, undefined)
    // QEMU retries an allocation that had to add a refcount block (-EAGAIN) from a fresh cluster:
    // no spanning then, the rest of the old cluster stays unused
    const grew = wr.refcounts.structureChanges !== changes
    if (cur !== 0 && !grew && cur - (cur % clusterSize) + clusterSize === fresh) {
      // contiguous: the bytes run from the old cluster into the new one
      offset = cur
      await wr.refcounts.update(cur - (cur % clusterSize), 1, +1)
      range = { offset: cur - (cur % clusterSize), length: 2 * clusterSize }
    } else {
      offset = fresh
      range = { offset: fresh, length: clusterSize }
    }
  }
  const next = offset + size
  wr.compressedCursor = next % clusterSize === 0 ? 0 : next
  return { offset, range }
}
