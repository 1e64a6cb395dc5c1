/**
 * Compressed cluster writes: byte-granular space packed into the current
 * compressed cluster while its refcount allows, entries without COPIED (and a
 * zero bitmap with extended L2), one commit for a batch of clusters.
 */
import { maxRefcount } from './refcount-codec.js'
import { setCompressed } from './l2-meta.js'
import type { Qcow2Writer } from './write.js'
import { commit, prepareTable, undo, type Range, type TableWork } from './write-commit.js'
import { dataWrite, type DataWrite } from './write-plan.js'

export async function writeCompressedLocked(wr: Qcow2Writer, items: Array<{ offset: number; data: Uint8Array }>): Promise<void> {
  wr.assertUsable()
  const coverage = wr.l2Entries * wr.cs
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
      const idx = (it.offset / wr.cs) % wr.l2Entries
      const e = wr.entry(w.table, idx)
      const d = wr.dropRef(e)
      if (d) w.frees.push(d)
      const host = await allocBytes(wr, it.data.byteLength)
      w.allocated.push(host.range)
      setCompressed(w.table, wr.ew, idx, host.offset, it.data.byteLength)
      wr.touch(w, idx)
      dataWrite(writes, wr.img.device, host.offset, it.data)
    }
    await commit(wr, works, writes, true)
  } catch (e) {
    await undo(wr, works)
    throw e
  }
}

/** Byte-granular space for compressed data, packed into the current compressed cluster when it fits. */
async function allocBytes(wr: Qcow2Writer, size: number): Promise<{ offset: number; range: Range }> {
  const cur = wr.compressedCursor
  if (cur !== 0 && cur % wr.cs !== 0 && wr.cs - (cur % wr.cs) >= size) {
    const cluster = cur - (cur % wr.cs)
    const n = await wr.rc.get(cluster / wr.cs)
    if (n > 0 && n < maxRefcount(wr.h.refcountOrder) && wr.guard.kindAt(cluster / wr.cs) === undefined) {
      await wr.rc.update(cluster, 1, +1)
      wr.compressedCursor = cur + size
      return { offset: cur, range: { offset: cluster, length: wr.cs } }
    }
  }
  const first = await wr.alloc(1, undefined)
  wr.compressedCursor = first + size
  return { offset: first, range: { offset: first, length: wr.cs } }
}
