/**
 * Snapshot operations on v2 (compat=0.10) images, which have no dirty bit.
 *
 * Why not just an ordering: an active L2 entry's COPIED flag must say
 * "refcount is 1" (qemu-img check counts both a set flag on a refcount of 2
 * and a clear flag on a refcount of 1 as corruptions), and the flag (in an L2
 * table) and the refcount (in a refcount block) live in different clusters. A
 * snapshot create moves a shared data cluster from (1, COPIED) to (2, clear),
 * delete and apply the other way; whichever write lands first, a crash in
 * between leaves a corruption. No order of in-place writes avoids it.
 *
 * So a v2 snapshot operation is a shadow commit. Everything that changes is
 * written to clusters past the end of everything in use (free in the current
 * refcounts, referenced by nothing): copies of the active L2 tables whose
 * COPIED flags change, the new active L1 table, the new snapshot table, and a
 * complete new refcount table and blocks counted from the new metadata. One
 * flush, then one 36-byte header write in the first sector switches l1_size,
 * l1_table_offset, refcount_table_offset, refcount_table_clusters,
 * nb_snapshots and snapshots_offset together; a crash leaves the old image or
 * the new one, each with exact refcounts (not even a leak). The old
 * structures become free space. Nothing in the image is written in place.
 */
import { CorruptImageError, ImgtoolError, hex } from '../../errors.js'
import { putU32be, putU64be } from '../../util/bytes.js'
import { MAX_REFTABLE_BYTES } from './constants.js'
import { decodeL1, decodeL2, encodeL1 } from './entries.js'
import { l2EntrySize } from './header.js'
import type { Qcow2Image } from './image.js'
import { maxRefcount, refcountsPerBlock, setRefcountEntry } from './refcount-codec.js'
import { RefcountWriter } from './refcount-writer.js'
import { SNAPSHOT_FIXED_BYTES, snapshotTableBytes, type Qcow2Snapshot } from './snapshot-table.js'
import type { Qcow2Writer } from './write.js'

/** The metadata tree after the operation. */
export interface V2Tree {
  /** active L1 entries (`l1Size * 8` bytes); COPIED flags are recomputed */
  l1: Uint8Array
  l1Size: number
  /** the snapshot list (l1TableOffset / l1Size of each; entry offsets are laid out here) */
  snapshots: Qcow2Snapshot[]
  /** the encoded snapshot table for `snapshots` */
  table: Uint8Array
}

const enc = new TextEncoder()

function entryBytes(s: Qcow2Snapshot): number {
  return Math.ceil((SNAPSHOT_FIXED_BYTES + s.extraData.byteLength + enc.encode(s.id).byteLength + enc.encode(s.name).byteLength) / 8) * 8
}

/** Run the shadow commit for `next` (inside the writer's mutex, writer usable). */
export async function commitV2(img: Qcow2Image, w: Qcow2Writer, next: V2Tree): Promise<void> {
  const h = img.header
  const dev = img.device
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = img.mapper.decodeContext
  const clusters = (off: number, len: number): number[] => {
    const out: number[] = []
    if (len <= 0) return out
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) out.push(c)
    return out
  }

  // everything on disk now, so the old structures are exact while the new ones are built
  await w.beginTransaction()
  if (w.rc.dirty) {
    await w.rc.persist()
    await w.flushNow()
  }

  const tables = new Map<number, Uint8Array>()
  const l2 = async (off: number): Promise<Uint8Array> => {
    let t = tables.get(off)
    if (!t) {
      t = await dev.read(off, cs, 'l2')
      tables.set(off, t)
    }
    return t
  }
  const readL1 = (off: number, size: number): Promise<Uint8Array> => (size > 0 ? dev.read(off, size * 8, 'l1') : Promise.resolve(new Uint8Array(0)))
  const l2Offsets = (l1: Uint8Array, size: number): number[] => {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
    const out: number[] = []
    for (let i = 0; i < size; i++) out.push(decodeL1(dv, i * 8).l2Offset)
    return out
  }

  // what the old tree occupies: nothing of it may be overwritten before the switch
  const oldMeta = new Set<number>([0])
  for (const [c] of await w.rc.metadataClusters()) oldMeta.add(c)
  for (const c of clusters(h.l1TableOffset, h.l1Size * 8)) oldMeta.add(c)
  for (const off of l2Offsets(img.l1, h.l1Size)) if (off !== 0) oldMeta.add(off / cs)
  if (h.nbSnapshots > 0) for (const c of clusters(h.snapshotsOffset, snapshotTableBytes(img.snapshots, h.snapshotsOffset))) oldMeta.add(c)
  for (const s of img.snapshots) {
    for (const c of clusters(s.l1TableOffset, s.l1Size * 8)) oldMeta.add(c)
    for (const off of l2Offsets(await readL1(s.l1TableOffset, s.l1Size), s.l1Size)) if (off !== 0) oldMeta.add(off / cs)
  }

  // references to data (and compressed bytes) from every L1 table of the new tree
  const counts = new Map<number, number>()
  const add = (off: number, len: number): void => {
    for (const c of clusters(off, len)) counts.set(c, (counts.get(c) ?? 0) + 1)
  }
  const snapL1s = await Promise.all(next.snapshots.map((s) => readL1(s.l1TableOffset, s.l1Size)))
  const allL1s: Array<[Uint8Array, number]> = [[next.l1, next.l1Size], ...next.snapshots.map((s, i): [Uint8Array, number] => [snapL1s[i]!, s.l1Size])]
  for (const [l1, size] of allL1s) {
    for (const off of l2Offsets(l1, size)) {
      if (off === 0) continue
      const t = await l2(off)
      const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
      for (let j = 0; j < cs / es; j++) {
        const le = decodeL2(dv, j * es, ctx)
        if (le.type === 'compressed') add(le.hostOffset - (le.hostOffset % 512), le.sectors * 512)
        else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0) add(le.hostOffset, cs)
      }
    }
  }

  // active L2 tables whose COPIED flags change get a copy (the old table stays as it is)
  const active = next.l1.slice()
  const activeDv = new DataView(active.buffer, active.byteOffset, active.byteLength)
  const copies: Array<{ index: number; table: Uint8Array; offset: number }> = []
  for (let i = 0; i < next.l1Size; i++) {
    const e = decodeL1(activeDv, i * 8)
    if (e.l2Offset === 0) continue
    const t = (await l2(e.l2Offset)).slice()
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    let changed = false
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(dv, j * es, ctx)
      if (!((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0)) continue
      const want = counts.get(le.hostOffset / cs) === 1
      if (want === le.copied) continue
      const hi = dv.getUint32(j * es, false)
      dv.setUint32(j * es, want ? (hi | 0x80000000) >>> 0 : (hi & 0x7fffffff) >>> 0, false)
      changed = true
    }
    if (changed) copies.push({ index: i, table: t, offset: 0 })
  }

  // new clusters go past the end of everything, old or new
  let top = Math.ceil(dev.size / cs)
  for (const c of oldMeta) top = Math.max(top, c + 1)
  for (const c of counts.keys()) top = Math.max(top, c + 1)
  for (const [l1, size] of allL1s) for (const off of l2Offsets(l1, size)) if (off !== 0) top = Math.max(top, off / cs + 1)
  for (const s of next.snapshots) for (const c of clusters(s.l1TableOffset, s.l1Size * 8)) top = Math.max(top, c + 1)
  let cursor = top
  const take = (bytes: number): number => {
    const off = cursor * cs
    cursor += Math.ceil(bytes / cs)
    return off
  }
  for (const c of copies) {
    c.offset = take(cs)
    putU64be(active, c.index * 8, encodeL1({ l2Offset: c.offset, copied: true }))
  }
  const l1Offset = next.l1Size > 0 ? take(next.l1Size * 8) : 0
  const tableOffset = next.snapshots.length > 0 ? take(next.table.byteLength) : 0

  // the rest of the references: header, L1 tables, L2 tables (once per L1 reaching them), snapshot table
  add(0, cs)
  add(l1Offset, next.l1Size * 8)
  add(tableOffset, next.snapshots.length > 0 ? next.table.byteLength : 0)
  for (const [l1, size] of [[active, next.l1Size] as [Uint8Array, number], ...allL1s.slice(1)]) {
    for (const off of l2Offsets(l1, size)) if (off !== 0) add(off, cs)
  }
  for (const s of next.snapshots) add(s.l1TableOffset, s.l1Size * 8)
  for (let i = 0; i < next.l1Size; i++) {
    const e = decodeL1(activeDv, i * 8)
    if (e.l2Offset === 0) continue
    const want = counts.get(e.l2Offset / cs) === 1
    if (want !== e.copied) putU64be(active, i * 8, encodeL1({ l2Offset: e.l2Offset, copied: want }))
  }

  // a new refcount structure after all that, describing itself too
  const rt = layoutRefcounts(counts, cursor, cs, h.refcountOrder, img.filename)
  const max = maxRefcount(h.refcountOrder)
  for (const [c, n] of counts) {
    if (n > max) throw new CorruptImageError(`qcow2: ${img.filename}: cluster ${hex(c * cs)} would have ${n} references, more than refcount_bits allows; nothing was changed`)
  }

  // writes: all to clusters nothing references yet
  for (const c of copies) await w.writeMetadata(c.offset, c.table, 'l2')
  if (next.l1Size > 0) await w.writeMetadata(l1Offset, active.slice(), 'l1')
  if (next.snapshots.length > 0) await w.writeMetadata(tableOffset, next.table, 'snapshot')
  for (const [off, b] of rt.blocks) await dev.write(off, b, 'refblock')
  await dev.write(rt.tableOffset, rt.table, 'reftable')
  await w.flushNow()

  // the switch: one write in the first sector
  const hdr = new Uint8Array(36) // l1_size (36), l1_table_offset (40), refcount_table_offset (48), refcount_table_clusters (56), nb_snapshots (60), snapshots_offset (64)
  putU32be(hdr, 0, next.l1Size)
  putU64be(hdr, 4, l1Offset)
  putU64be(hdr, 12, rt.tableOffset)
  putU32be(hdr, 20, rt.tableClusters)
  putU32be(hdr, 24, next.snapshots.length)
  putU64be(hdr, 28, tableOffset)
  try {
    await w.writeMetadata(36, hdr, 'header')
    await w.flushNow()
  } catch (e) {
    w.abortTransaction() // the switch may or may not be on disk: memory cannot tell
    throw e
  }

  // memory follows the disk
  h.l1Size = next.l1Size
  h.l1TableOffset = l1Offset
  h.refcountTableOffset = rt.tableOffset
  h.refcountTableClusters = rt.tableClusters
  h.nbSnapshots = next.snapshots.length
  h.snapshotsOffset = tableOffset
  let pos = tableOffset
  for (const s of next.snapshots) {
    s.entryOffset = pos
    pos += entryBytes(s)
  }
  img.snapshots.length = 0
  img.snapshots.push(...next.snapshots)
  img.mapper.l2cache.clear()
  img.replaceL1(active)
  img.dropCompressedCache()
  img.refcounts.invalidate()
  await reloadWriter(img, w, oldMeta)
  await w.endTransaction()
}

/**
 * The writer's refcount state and overlap guard after the switch. The writer
 * keeps its identity (and mutex); its RefcountWriter is replaced by one loaded
 * from the new table. (A `Qcow2Writer.reloadRefcounts()` in write.ts would be
 * the tidier home for this.)
 */
async function reloadWriter(img: Qcow2Image, w: Qcow2Writer, oldMeta: Set<number>): Promise<void> {
  const h = img.header
  const cs = h.clusterSize
  const g = w.guard
  const rc = await RefcountWriter.load(img.device, h, img.filename, { onMetadata: (c, k) => g.set(c, k) })
  rc.lazy = w.rc.lazy
  ;(w as unknown as { rc: RefcountWriter }).rc = rc
  w.compressedCursor = 0
  for (const c of oldMeta) g.set(c, undefined)
  g.set(0, 'header')
  for (const [c, k] of await rc.metadataClusters()) g.set(c, k)
  g.setRange(h.l1TableOffset, h.l1Size * 8, 'l1')
  const l2s = (l1: Uint8Array, size: number): void => {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
    for (let i = 0; i < size; i++) {
      const off = decodeL1(dv, i * 8).l2Offset
      if (off !== 0) g.set(off / cs, 'l2')
    }
  }
  l2s(img.l1, h.l1Size)
  if (h.nbSnapshots > 0) g.setRange(h.snapshotsOffset, snapshotTableBytes(img.snapshots, h.snapshotsOffset), 'snapshot')
  for (const s of img.snapshots) {
    if (s.l1Size === 0) continue
    g.setRange(s.l1TableOffset, s.l1Size * 8, 'snapshot-l1')
    l2s(await img.device.read(s.l1TableOffset, s.l1Size * 8, 'l1'), s.l1Size)
  }
}

/** Refcount table and blocks placed from cluster `start` on, counting themselves into `counts`. */
function layoutRefcounts(
  counts: Map<number, number>,
  start: number,
  cs: number,
  order: number,
  file: string,
): { tableOffset: number; tableClusters: number; table: Uint8Array; blocks: Array<[number, Uint8Array]> } {
  const pb = refcountsPerBlock(cs, order)
  const usedTis = new Set<number>()
  for (const c of counts.keys()) usedTis.add(Math.floor(c / pb))
  let tableClusters = 1
  let blockTis: number[] = []
  for (let iter = 0; ; iter++) {
    if (iter > 64) throw new ImgtoolError('INTERNAL', `qcow2: ${file}: refcount structure layout did not settle`)
    const end = start + tableClusters + blockTis.length
    const tis = new Set(usedTis)
    for (let ti = Math.floor(start / pb); ti <= Math.floor((end - 1) / pb); ti++) tis.add(ti)
    const sorted = [...tis].sort((a, b) => a - b)
    const t = Math.max(1, Math.ceil((((sorted[sorted.length - 1] ?? 0) + 1) * 8) / cs))
    if (t === tableClusters && sorted.length === blockTis.length) break
    tableClusters = t
    blockTis = sorted
  }
  if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new ImgtoolError('NO_SPACE', `qcow2: ${file}: refcount table would exceed 8 MiB`)
  const table = new Uint8Array(tableClusters * cs)
  const byTi = new Map<number, Uint8Array>()
  const blocks: Array<[number, Uint8Array]> = []
  blockTis.forEach((ti, i) => {
    const off = (start + tableClusters + i) * cs
    putU64be(table, ti * 8, off)
    const b = new Uint8Array(cs)
    byTi.set(ti, b)
    blocks.push([off, b])
  })
  for (let c = start; c < start + tableClusters + blockTis.length; c++) counts.set(c, (counts.get(c) ?? 0) + 1)
  const max = maxRefcount(order)
  for (const [c, n] of counts) setRefcountEntry(byTi.get(Math.floor(c / pb))!, c % pb, order, Math.min(n, max))
  return { tableOffset: start * cs, tableClusters, table, blocks }
}
