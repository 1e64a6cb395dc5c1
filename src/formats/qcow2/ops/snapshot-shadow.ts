/**
 * Snapshot operations (create, delete, apply) as shadow commits, on v2 and v3
 * images alike.
 *
 * Why not just an ordering: an active L2 entry's COPIED flag must say
 * "refcount is 1" (qemu-img check counts both a set flag on a refcount of 2
 * and a clear flag on a refcount of 1 as corruptions), and the flag (in an L2
 * table) and the refcount (in a refcount block) live in different clusters. A
 * snapshot create moves a shared data cluster from (1, COPIED) to (2, clear),
 * delete and apply the other way; whichever write lands first, a crash in
 * between leaves a corruption. No order of in-place writes avoids it. v3's
 * dirty bit does not help: qemu-img check without -r reports the mismatches
 * of a dirty image as corruptions (D22), it only lets the next read-write
 * open repair them.
 *
 * So a snapshot operation is a shadow commit. Everything that changes is
 * written to clusters that nothing references and no refcount structure uses
 * (free space inside the file first, then past its end): copies of the active
 * L2 tables whose COPIED flags change, the new active L1 table, the new
 * snapshot table, and a complete new refcount table and blocks counted from
 * the new metadata (persistent bitmaps included). One flush, then one header
 * write in the first sector (36 bytes; 48 when the virtual size changes too)
 * switches size, l1_size, l1_table_offset, refcount_table_offset,
 * refcount_table_clusters, nb_snapshots and snapshots_offset together. A
 * crash leaves the old image or the new one, each with exact refcounts (not
 * even a leak); nothing the old image uses is written, and the dirty bit is
 * not needed (nor set). Afterwards the old structures are free space.
 *
 * Cost: every L2 table of every snapshot is read (QEMU's update walks only the
 * snapshot's), and the refcount blocks are all written anew (about 2 bytes per
 * cluster of the file). Memory: 5 bytes per host cluster.
 */
import { CorruptImageError, ImgtoolError, UnsupportedFeatureError, hex } from '../../../errors.js'
import { putU32be, putU64be, u64be } from '../../../util/bytes.js'
import { MAX_REFTABLE_BYTES } from '../spec/constants.js'
import { decodeL1, decodeL2, encodeL1 } from '../spec/entries.js'
import { decodeBitmapTableEntry, readBitmapDirectory } from '../spec/bitmap-directory.js'
import { bitmapsValid, l2EntrySize } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import { maxRefcount, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import { RefcountWriter } from '../write/refcount-writer.js'
import { SNAPSHOT_FIXED_BYTES, snapshotTableBytes, type Qcow2Snapshot } from '../spec/snapshot-table.js'
import type { Qcow2Writer } from '../write/write.js'

/** The metadata tree after the operation. */
export interface ShadowTree {
  /** active L1 entries (`l1Size * 8` bytes); COPIED flags are recomputed */
  l1: Uint8Array
  l1Size: number
  /** the snapshot list (l1TableOffset / l1Size of each; entry offsets are laid out here) */
  snapshots: Qcow2Snapshot[]
  /** the encoded snapshot table for `snapshots` */
  table: Uint8Array
  /** the new virtual size (v3 apply of a snapshot of another size); unchanged when absent */
  size?: number
}

const enc = new TextEncoder()

function entryBytes(s: Qcow2Snapshot): number {
  return Math.ceil((SNAPSHOT_FIXED_BYTES + s.extraData.byteLength + enc.encode(s.id).byteLength + enc.encode(s.name).byteLength) / 8) * 8
}

/** A growable per-cluster array (refcounts of the new tree; use marks of the old one). */
class PerCluster<T extends Uint32Array | Uint8Array> {
  constructor(
    public a: T,
    private readonly make: (n: number) => T,
  ) {}
  get(c: number): number {
    return c < this.a.length ? this.a[c]! : 0
  }
  add(c: number, n = 1): void {
    this.set(c, this.get(c) + n)
  }
  set(c: number, v: number): void {
    if (c >= this.a.length) {
      const next = this.make(Math.max(c + 1, this.a.length * 2))
      next.set(this.a)
      this.a = next
    }
    this.a[c] = v
  }
}

/** Run the shadow commit for `next` (inside the writer's mutex, writer usable). */
export async function commitShadow(state: Qcow2State, w: Qcow2Writer, next: ShadowTree): Promise<void> {
  const h = state.header
  const dev = state.device
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = state.decodeContext
  const clusters = (off: number, len: number): number[] => {
    const out: number[] = []
    if (len <= 0) return out
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) out.push(c)
    return out
  }
  const l2Offsets = (l1: Uint8Array, size: number): number[] => {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
    const out: number[] = []
    for (let i = 0; i < size; i++) out.push(decodeL1(dv, i * 8).l2Offset)
    return out
  }
  const readL1 = (off: number, size: number): Promise<Uint8Array> => (size > 0 ? dev.read(off, size * 8, 'l1') : Promise.resolve(new Uint8Array(0)))
  /** host clusters an L2 table's entries reference, once per entry */
  const dataOf = (t: Uint8Array, visit: (c: number) => void): void => {
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(dv, j * es, ctx)
      if (le.type === 'compressed') for (const c of clusters(le.hostOffset - (le.hostOffset % 512), le.sectors * 512)) visit(c)
      else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0) visit(le.hostOffset / cs)
    }
  }

  if (h.bitmaps !== undefined && h.version < 3) {
    // (QEMU writes bitmaps only to v3 images) their clusters are not in the walk below
    throw new UnsupportedFeatureError(`qcow2: ${state.filename}: snapshot operations on a v2 image with a bitmaps extension are not supported`)
  }
  if (next.size !== undefined && next.size !== h.size && h.version < 3) {
    throw new UnsupportedFeatureError(`qcow2: ${state.filename}: Can't resize a v2 image which has snapshots`)
  }
  // everything on disk now (refcounts, deferred frees), so the old structures are exact while the new ones are built;
  // no dirty bit: a crash leaves the old image or the new one, both exact
  w.assertUsable()
  await w.refcounts.persist()
  await w.flushNow()
  if (w.refcounts.dirty) {
    await w.refcounts.persist()
    await w.flushNow()
  }

  const start = Math.ceil(dev.size / cs) + 1
  /** what the old image uses (nothing of it is written before the switch) */
  const used = new PerCluster(new Uint8Array(start), (n) => new Uint8Array(n))
  /** references in the new image: its refcounts */
  const counts = new PerCluster(new Uint32Array(start), (n) => new Uint32Array(n))
  const count = (off: number, len: number, n = 1): void => clusters(off, len).forEach((c) => counts.add(c, n))

  // the old image: header, refcount structures, L1 tables, snapshot table
  const oldMeta: number[] = [0]
  for (const [c] of await w.refcounts.metadataClusters()) oldMeta.push(c)
  oldMeta.push(...clusters(h.l1TableOffset, h.l1Size * 8))
  if (h.nbSnapshots > 0) oldMeta.push(...clusters(h.snapshotsOffset, snapshotTableBytes(state.snapshots, h.snapshotsOffset)))
  const oldL1s: Array<[Uint8Array, number]> = [[state.l1, h.l1Size]]
  for (const s of state.snapshots) {
    oldMeta.push(...clusters(s.l1TableOffset, s.l1Size * 8))
    oldL1s.push([await readL1(s.l1TableOffset, s.l1Size), s.l1Size])
  }
  // persistent bitmaps (v3): directory, tables and data clusters stay as they are, counted once each
  const bitmapRanges: Array<[number, number]> = []
  if (h.bitmaps && bitmapsValid(h) && h.bitmaps.nbBitmaps > 0) {
    bitmapRanges.push([h.bitmaps.directoryOffset, h.bitmaps.directorySize])
    for (const bm of await readBitmapDirectory(dev, state.filename, h.bitmaps)) {
      if (bm.tableSize === 0) continue
      bitmapRanges.push([bm.tableOffset, bm.tableSize * 8])
      const t = await dev.read(bm.tableOffset, bm.tableSize * 8, 'bitmap')
      for (let i = 0; i < bm.tableSize; i++) {
        const e = decodeBitmapTableEntry(t, i, cs)
        const off = e ? e.offset : Number(u64be(t, i * 8) & 0x00fffffffffffe00n)
        if (off !== 0) bitmapRanges.push([off, cs])
      }
    }
  }
  for (const [off, len] of bitmapRanges) {
    for (const c of clusters(off, len)) used.set(c, 1)
    count(off, len)
  }
  for (const c of oldMeta) used.set(c, 1)
  // the new image's L1 tables; how often each L2 table is reached from them
  const snapL1s = await Promise.all(next.snapshots.map((s) => readL1(s.l1TableOffset, s.l1Size)))
  const newL1s: Array<[Uint8Array, number]> = [[next.l1, next.l1Size], ...next.snapshots.map((s, i): [Uint8Array, number] => [snapL1s[i]!, s.l1Size])]
  const reach = new Map<number, number>()
  for (const [l1, size] of oldL1s) for (const off of l2Offsets(l1, size)) if (off !== 0) reach.set(off, reach.get(off) ?? 0)
  for (const [l1, size] of newL1s) for (const off of l2Offsets(l1, size)) if (off !== 0) reach.set(off, (reach.get(off) ?? 0) + 1)
  // every L2 table once: its data is used by the old image and counted once per new reference
  for (const [off, n] of reach) {
    used.set(off / cs, 1)
    const t = await dev.read(off, cs, 'l2')
    dataOf(t, (c) => {
      used.set(c, 1)
      if (n > 0) counts.add(c, n)
    })
  }

  // active L2 tables whose COPIED flags change get a copy (the old table stays as it is)
  const active = next.l1.slice()
  const activeDv = new DataView(active.buffer, active.byteOffset, active.byteLength)
  const copies: Array<{ index: number; table: Uint8Array; offset: number }> = []
  for (let i = 0; i < next.l1Size; i++) {
    const e = decodeL1(activeDv, i * 8)
    if (e.l2Offset === 0) continue
    const t = await dev.read(e.l2Offset, cs, 'l2')
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

  // new clusters: free in the old image and unused by the new one (first fit), counted as taken
  let hint = 1
  const isFree = (c: number): boolean => used.get(c) === 0 && counts.get(c) === 0 && w.guard.kindAt(c) === undefined
  const take = (n: number): number => {
    for (let c = hint; ; c++) {
      let k = 0
      while (k < n && isFree(c + k)) k++
      if (k === n) {
        for (let i = 0; i < n; i++) counts.add(c + i)
        if (n === 1 || c === hint) hint = c + n
        return c * cs
      }
      c += k
    }
  }
  for (const c of copies) {
    c.offset = take(1)
    putU64be(active, c.index * 8, encodeL1({ l2Offset: c.offset, copied: true }))
  }
  const l1Offset = next.l1Size > 0 ? take(Math.ceil((next.l1Size * 8) / cs)) : 0
  const tableOffset = next.snapshots.length > 0 ? take(Math.ceil(next.table.byteLength / cs)) : 0

  // the other references: header, snapshot L1 tables, L2 tables (once per L1 reaching them; the copies are counted by take)
  count(0, cs)
  for (const s of next.snapshots) count(s.l1TableOffset, s.l1Size * 8)
  const copied = new Set(copies.map((c) => c.index))
  l2Offsets(active, next.l1Size).forEach((off, i) => {
    if (off !== 0 && !copied.has(i)) count(off, cs)
  })
  for (const [l1, size] of newL1s.slice(1)) for (const off of l2Offsets(l1, size)) if (off !== 0) count(off, cs)
  for (let i = 0; i < next.l1Size; i++) {
    const e = decodeL1(activeDv, i * 8)
    if (e.l2Offset === 0) continue
    const want = counts.get(e.l2Offset / cs) === 1
    if (want !== e.copied) putU64be(active, i * 8, encodeL1({ l2Offset: e.l2Offset, copied: want }))
  }

  // a new refcount structure, counting itself
  const rt = layoutRefcounts(counts, take, cs, h.refcountOrder, state.filename)

  // writes: all to clusters nothing uses yet
  for (const c of copies) await w.writeMetadata(c.offset, c.table, 'l2')
  if (next.l1Size > 0) await w.writeMetadata(l1Offset, active.slice(), 'l1')
  if (next.snapshots.length > 0) await w.writeMetadata(tableOffset, next.table, 'snapshot')
  for (const [off, b] of rt.blocks) await dev.write(off, b, 'refblock')
  await dev.write(rt.tableOffset, rt.table, 'reftable')
  await w.flushNow()

  // the switch: one write in the first sector
  const resize = next.size !== undefined && next.size !== h.size
  const sw = new Uint8Array(48) // size (24), crypt_method (32), l1_size (36), l1_table_offset (40), refcount_table_offset (48), refcount_table_clusters (56), nb_snapshots (60), snapshots_offset (64)
  putU64be(sw, 0, next.size ?? h.size)
  putU32be(sw, 8, h.cryptMethod)
  putU32be(sw, 12, next.l1Size)
  putU64be(sw, 16, l1Offset)
  putU64be(sw, 24, rt.tableOffset)
  putU32be(sw, 32, rt.tableClusters)
  putU32be(sw, 36, next.snapshots.length)
  putU64be(sw, 40, tableOffset)
  try {
    await w.writeMetadata(resize ? 24 : 36, resize ? sw : sw.subarray(12), 'header')
    await w.flushNow()
    await follow(state, w, next, { l1Offset, tableOffset, active, rt, oldGuard: [...oldMeta, ...[...reach.keys()].map((off) => off / cs)] })
  } catch (e) {
    // the switch may or may not be on disk, or memory is half way: the writer refuses until the image is reopened
    w.abortTransaction()
    throw e
  }
  await w.endTransaction()
}

/** Memory follows the disk after the switch: header fields, tables, snapshot list, the writer's refcounts. */
async function follow(
  state: Qcow2State,
  w: Qcow2Writer,
  next: ShadowTree,
  o: { l1Offset: number; tableOffset: number; active: Uint8Array; rt: { tableOffset: number; tableClusters: number }; oldGuard: number[] },
): Promise<void> {
  const h = state.header
  const { l1Offset, tableOffset, active, rt } = o
  if (next.size !== undefined) h.size = next.size
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
  state.snapshots.length = 0
  state.snapshots.push(...next.snapshots)
  state.clearL2Cache()
  state.replaceL1(active)
  state.dropCompressedCache()
  state.refcounts.invalidate()
  await reloadWriter(state, w, o.oldGuard)
}

/**
 * The writer's refcount state and overlap guard after the switch. The writer
 * keeps its identity (and mutex); its RefcountWriter is replaced by one loaded
 * from the new table.
 */
export async function reloadWriter(state: Qcow2State, w: Qcow2Writer, oldMeta: number[]): Promise<void> {
  const h = state.header
  const cs = h.clusterSize
  const g = w.guard
  const rc = await RefcountWriter.load(state.device, h, state.filename, { onMetadata: (c, k) => g.set(c, k) })
  w.replaceRefcounts(rc)
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
  l2s(state.l1, h.l1Size)
  if (h.nbSnapshots > 0) g.setRange(h.snapshotsOffset, snapshotTableBytes(state.snapshots, h.snapshotsOffset), 'snapshot')
  for (const s of state.snapshots) {
    if (s.l1Size === 0) continue
    g.setRange(s.l1TableOffset, s.l1Size * 8, 'snapshot-l1')
    l2s(await state.device.read(s.l1TableOffset, s.l1Size * 8, 'l1'), s.l1Size)
  }
}

/**
 * A refcount table and blocks for `counts`, placed by `take` (which counts
 * what it hands out), grown until they describe themselves too.
 */
function layoutRefcounts(
  counts: PerCluster<Uint32Array>,
  take: (n: number) => number,
  cs: number,
  order: number,
  file: string,
): { tableOffset: number; tableClusters: number; table: Uint8Array; blocks: Array<[number, Uint8Array]> } {
  const pb = refcountsPerBlock(cs, order)
  const max = maxRefcount(order)
  const tis = (): number[] => {
    const out: number[] = []
    const a = counts.a
    for (let ti = 0; ti * pb < a.length; ti++) {
      const end = Math.min(a.length, (ti + 1) * pb)
      for (let c = ti * pb; c < end; c++) {
        if (a[c] === 0) continue
        if (a[c]! > max)
          throw new CorruptImageError(
            `qcow2: ${file}: cluster ${hex(c * cs)} would have ${a[c]} references, more than refcount_bits allows; nothing was changed`,
          )
        out.push(ti)
        break
      }
    }
    return out
  }
  const tableSize = (needed: number[]): number => Math.max(1, Math.ceil((((needed[needed.length - 1] ?? 0) + 1) * 8) / cs))
  let tableClusters = tableSize(tis())
  let tableOffset = take(tableClusters)
  const blocks: number[] = []
  for (let iter = 0; ; iter++) {
    if (iter > 64) throw new ImgtoolError('INTERNAL', `qcow2: ${file}: refcount structure layout did not settle`)
    const needed = tis()
    if (tableSize(needed) > tableClusters) {
      // a larger table elsewhere; the smaller one's clusters are free again
      for (let i = 0; i < tableClusters; i++) counts.add(tableOffset / cs + i, -1)
      tableClusters = tableSize(needed)
      tableOffset = take(tableClusters)
      continue
    }
    if (blocks.length < needed.length) {
      while (blocks.length < needed.length) blocks.push(take(1))
      continue
    }
    if (blocks.length > needed.length) {
      counts.add(blocks.pop()! / cs, -1)
      continue
    }
    if (tableClusters * cs > MAX_REFTABLE_BYTES) throw new ImgtoolError('NO_SPACE', `qcow2: ${file}: refcount table would exceed 8 MiB`)
    const table = new Uint8Array(tableClusters * cs)
    const out: Array<[number, Uint8Array]> = []
    needed.forEach((ti, i) => {
      const off = blocks[i]!
      putU64be(table, ti * 8, off)
      const b = new Uint8Array(cs)
      const end = Math.min(counts.a.length, (ti + 1) * pb)
      for (let c = ti * pb; c < end; c++) if (counts.a[c] !== 0) setRefcountEntry(b, c - ti * pb, order, counts.a[c]!)
      out.push([off, b])
    })
    return { tableOffset, tableClusters, table, blocks: out }
  }
}
