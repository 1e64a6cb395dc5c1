/**
 * The commit protocol of a write request (under the image's mutex):
 *   A. allocate (memory), persist refcount blocks           rule 1
 *   B. write guest data and new L2 tables, flush             rule 2
 *   C. link: L2 entries of existing tables, L1 entries of new/COWed tables,
 *      in allocation order (seed: complete in allocation order)
 *   D. flush, then drop the references that were replaced
 * If anything fails before an allocation is linked, every such allocation
 * is freed again, across all L2 tables the request touched; a cluster whose
 * link may have reached the disk is never freed (seed: qcow2 L2Meta undo).
 * Also here: getting an L2 table ready for changes (in place, new, or COW).
 */
import { ImgtoolError } from '../../../errors.js'
import { putU64be } from '../../../util/bytes.js'
import { decodeL1, encodeL1 } from '../spec/entries.js'
import type { DataWrite, Range, TableWork, WriterCore } from './core.js'

export type { Range, TableWork } from './core.js'

/** The bytes of a queued data write as one buffer (its parts joined once). */
export function joined(d: DataWrite): Uint8Array {
  if (d.parts.length === 1) return d.parts[0]!
  const out = new Uint8Array(d.length)
  let o = 0
  for (const p of d.parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

/** Get the table for L1 index `i` ready for changes: in place, new, or COW of a shared table. */
export async function prepareTable(wr: WriterCore, i: number, create: boolean): Promise<TableWork | undefined> {
  if (i >= wr.header.l1Size) throw new ImgtoolError('INTERNAL', `qcow2: L1 index ${i} beyond l1_size ${wr.header.l1Size}`)
  const l1e = wr.state.l1Entry(i)
  const base = { l1Index: i, lo: Infinity, hi: -1, allocated: [] as Range[], frees: [] as Range[], linked: false, attempted: false }
  if (l1e.l2Offset === 0) {
    if (!create) return undefined
    const l2 = await wr.alloc(1, undefined)
    wr.guard.set(l2 / wr.clusterSize, 'l2')
    return { ...base, oldL2: 0, l2, mode: 'new', table: new Uint8Array(wr.clusterSize), allocated: [{ offset: l2, length: wr.clusterSize }] }
  }
  const old = await wr.state.loadL2(i, l1e.l2Offset)
  if ((await wr.refcount(l1e.l2Offset)) === 1) {
    return { ...base, oldL2: l1e.l2Offset, l2: l1e.l2Offset, mode: 'inplace', table: old.slice() }
  }
  const l2 = await wr.alloc(1, undefined)
  wr.guard.set(l2 / wr.clusterSize, 'l2')
  return {
    ...base,
    oldL2: l1e.l2Offset,
    l2,
    mode: 'cow',
    table: old.slice(),
    allocated: [{ offset: l2, length: wr.clusterSize }],
    frees: [{ offset: l1e.l2Offset, length: wr.clusterSize }],
  }
}

export async function commit(wr: WriterCore, works: TableWork[], writes: DataWrite[], needFlush: boolean): Promise<void> {
  const dev = wr.state.device
  // A. refcounts (lazy: kept in memory; the dirty bit is durable before anything depends on it)
  // lazy refcounts: any refcount change (allocation or free) may reach the disk out of order
  const changing = works.some((w) => w.allocated.length > 0 || w.frees.length > 0)
  if (changing && wr.refcounts.lazy) await wr.ensureDirty()
  if (!wr.refcounts.lazy) await wr.refcounts.persist()
  // B. guest data, durable before anything maps it
  for (const d of writes) await wr.guardedWrite(d.device, d.offset, joined(d), 'data')
  if (needFlush) await wr.flushDevices()
  // C. new tables' contents and links in existing tables, in allocation order; then L1 links
  const es = wr.entryWriter.entrySize
  for (const w of works) {
    if (w.mode !== 'inplace') {
      await wr.guardedWrite(dev, w.l2, w.table.slice(), 'l2', 'l2')
    } else if (w.hi < 0) {
      w.linked = true
    } else {
      w.attempted = true
      await wr.guardedWrite(dev, w.l2 + w.lo * es, w.table.slice(w.lo * es, (w.hi + 1) * es), 'l2', 'l2')
      w.linked = true
      wr.state.cacheL2(w.l2, w.table)
    }
  }
  if (works.some((w) => w.mode !== 'inplace')) {
    await wr.flushDevices()
    for (const w of works) {
      if (w.mode === 'inplace') continue
      const b = new Uint8Array(8)
      putU64be(b, 0, encodeL1({ l2Offset: w.l2, copied: true }))
      w.attempted = true
      await wr.guardedWrite(dev, wr.header.l1TableOffset + w.l1Index * 8, b, 'l1', 'l1')
      w.linked = true
      wr.state.setL1Entry(w.l1Index, b)
      wr.state.cacheL2(w.l2, w.table)
    }
  }
  // D. drop replaced references once the new links are durable
  await applyFrees(wr, works)
}

export async function applyFrees(wr: WriterCore, works: TableWork[]): Promise<void> {
  const frees = works.filter((w) => w.linked).flatMap((w) => w.frees)
  if (frees.length === 0) return
  if (!wr.refcounts.lazy) await wr.flushDevices()
  for (const w of works) if (w.linked) w.frees = []
  for (const f of frees) await free(wr, f)
  if (!wr.refcounts.lazy) await wr.refcounts.persist()
}

export async function free(wr: WriterCore, f: Range): Promise<void> {
  await wr.refcounts.update(f.offset, f.length, -1)
  wr.compressedCursor = 0
  wr.state.dropCompressedCache()
  const first = Math.floor(f.offset / wr.clusterSize)
  const last = Math.floor((f.offset + f.length - 1) / wr.clusterSize)
  for (let c = first; c <= last; c++) {
    if (wr.guard.kindAt(c) === 'l2' && (await wr.refcounts.get(c)) === 0) {
      wr.guard.set(c, undefined)
      wr.state.forgetL2(c * wr.clusterSize)
    }
  }
}

/**
 * After a failure: free what was allocated and never linked; for a link
 * write that failed, read back what reached the disk and keep anything it
 * references. Linked tables still get their replaced references dropped.
 */
export async function undo(wr: WriterCore, works: TableWork[]): Promise<void> {
  const toFree: Range[] = []
  for (const w of works) {
    if (w.linked) continue
    let linkedOnDisk: Set<number> = new Set()
    try {
      if (w.attempted) linkedOnDisk = await referencedOnDisk(wr, w)
    } catch {
      continue // cannot tell: leak rather than risk freeing a linked cluster
    }
    for (const r of w.allocated) {
      for (let c = r.offset; c < r.offset + r.length; c += wr.clusterSize) {
        if (!linkedOnDisk.has(c)) toFree.push({ offset: c, length: Math.min(wr.clusterSize, r.offset + r.length - c) })
      }
    }
  }
  try {
    for (const f of toFree) {
      await wr.refcounts.update(f.offset, f.length, -1)
      const c = Math.floor(f.offset / wr.clusterSize)
      if (wr.guard.kindAt(c) === 'l2' && (await wr.refcounts.get(c)) === 0) wr.guard.set(c, undefined)
    }
    wr.compressedCursor = 0
    await applyFrees(wr, works)
    if (!wr.refcounts.lazy) await wr.refcounts.persist()
  } catch {
    // the refcount changes stay dirty in memory and are written by the next flush or close
  }
}

/** Host clusters of `w.allocated` that the on-disk metadata references right now. */
export async function referencedOnDisk(wr: WriterCore, w: TableWork): Promise<Set<number>> {
  const dev = wr.state.device
  const out = new Set<number>()
  if (w.mode === 'inplace') {
    if (w.hi < 0) return out
    const disk = await dev.read(w.l2, wr.clusterSize, 'l2')
    wr.state.cacheL2(w.l2, disk)
    for (let i = w.lo; i <= w.hi; i++) {
      const e = wr.entry(disk, i)
      if (e.type === 'normal' || e.type === 'zero') out.add(e.hostOffset)
      if (e.type === 'compressed') {
        // compressed bytes may run into the next host cluster: every cluster they touch is referenced
        const start = e.hostOffset - (e.hostOffset % 512)
        const last = start + e.sectors * 512 - 1
        for (let c = start - (start % wr.clusterSize); c <= last; c += wr.clusterSize) out.add(c)
      }
    }
    return out
  }
  const b = await dev.read(wr.header.l1TableOffset + w.l1Index * 8, 8, 'l1')
  const l1e = decodeL1(new DataView(b.buffer, b.byteOffset, 8), 0)
  if (l1e.l2Offset === w.l2) {
    // the new table is linked after all: it and everything it references stay
    wr.state.setL1Entry(w.l1Index, b)
    wr.state.cacheL2(w.l2, w.table)
    w.linked = true
    for (const r of w.allocated) for (let c = r.offset; c < r.offset + r.length; c += wr.clusterSize) out.add(c)
  }
  return out
}
