/**
 * Planning a guest write request: which clusters are written in place, which
 * entries change (subclusters, preallocated zero clusters) and which need a
 * new host cluster, with copy-on-write of the untouched part of a partly
 * written cluster (from the old cluster or the backing file). The planned
 * data writes and table changes are committed by write-commit.ts.
 */
import type { BlockDevice } from '../../../io/block-device.js'
import type { L2Entry } from '../spec/entries.js'
import { hasDataFile } from '../spec/header.js'
import { ALL_SUBCLUSTERS, getBitmap, setBitmap, setStandard, subclusterMask } from '../spec/l2-meta.js'
import { commit, prepareTable, undo } from './commit.js'
import type { DataWrite, TableWork, WriterCore } from './core.js'

export type { DataWrite } from './core.js'

export async function writeLocked(wr: WriterCore, offset: number, data: Uint8Array): Promise<void> {
  wr.assertUsable()
  if (data.byteLength === 0) return
  const works: TableWork[] = []
  const writes: DataWrite[] = []
  let needFlush = false
  const coverage = wr.l2Entries * wr.clusterSize
  try {
    let pos = offset
    const end = offset + data.byteLength
    while (pos < end) {
      const l1Index = Math.floor(pos / coverage)
      const tEnd = Math.min(end, (l1Index + 1) * coverage)
      const w = (await prepareTable(wr, l1Index, true))!
      works.push(w)
      if (w.mode !== 'inplace') needFlush = true
      // clusters needing a new host cluster, allocated together in guest order
      const plans: Array<{ idx: number; guest: number; from: number; to: number; e: L2Entry }> = []
      for (let p = pos; p < tEnd;) {
        const cStart = Math.floor(p / wr.clusterSize) * wr.clusterSize
        const to = Math.min(tEnd, cStart + wr.clusterSize)
        const idx = (cStart / wr.clusterSize) % wr.l2Entries
        plans.push({ idx, guest: cStart, from: p, to, e: wr.entry(w.table, idx) })
        p = to
      }
      const alloc: typeof plans = []
      for (const pl of plans) {
        // no host cluster of its own (unallocated, compressed, plain zero): a new one, without asking
        if (pl.e.type === 'unallocated' || pl.e.type === 'compressed' || (pl.e.type === 'zero' && pl.e.hostOffset === 0)) {
          alloc.push(pl)
          continue
        }
        const piece = data.subarray(pl.from - offset, pl.to - offset)
        const r = await planClusterWrite(wr, w, pl.idx, pl.guest, pl.from, piece, writes)
        if (r === 'alloc') alloc.push(pl)
        else if (r === 'meta') needFlush = true
      }
      if (alloc.length > 0) {
        needFlush = true
        if (hasDataFile(wr.header)) {
          for (const pl of alloc)
            await fillNewCluster(wr, w, pl.idx, pl.guest, pl.guest, pl.e, pl.from, data.subarray(pl.from - offset, pl.to - offset), writes, wr.state.dataDevice)
        } else {
          const first = await wr.alloc(alloc.length, w)
          for (let k = 0; k < alloc.length; k++) {
            const pl = alloc[k]!
            const piece = data.subarray(pl.from - offset, pl.to - offset)
            if (!wr.entryWriter.extended && pl.from === pl.guest && piece.byteLength === wr.clusterSize)
              fillWholeCluster(wr, w, pl.idx, first + k * wr.clusterSize, pl.e, piece, writes, wr.state.device)
            else await fillNewCluster(wr, w, pl.idx, pl.guest, first + k * wr.clusterSize, pl.e, pl.from, piece, writes, wr.state.device)
          }
        }
      }
      pos = tEnd
    }
    await commit(wr, works, writes, needFlush)
  } catch (e) {
    await undo(wr, works)
    throw e
  }
}

/**
 * One cluster of a write: 'inplace' (data only), 'meta' (in place, but the
 * entry changes: subclusters or a preallocated zero cluster), or 'alloc'.
 */
export async function planClusterWrite(
  wr: WriterCore,
  w: TableWork,
  idx: number,
  guest: number,
  from: number,
  piece: Uint8Array,
  writes: DataWrite[],
): Promise<'inplace' | 'meta' | 'alloc'> {
  const e = wr.entry(w.table, idx)
  const dataDev = wr.state.dataDevice
  const owned = (e.type === 'normal' || (e.type === 'zero' && e.hostOffset !== 0)) && (hasDataFile(wr.header) || (await wr.refcount(e.hostOffset)) === 1)
  if (!owned) return 'alloc'
  const host = (e as { hostOffset: number }).hostOffset
  if (!wr.entryWriter.extended) {
    if (e.type === 'normal') {
      dataWrite(writes, dataDev, host + (from - guest), piece)
      return 'inplace'
    }
    // preallocated zero cluster: write the whole cluster, then drop the zero flag
    const buf = new Uint8Array(wr.clusterSize)
    buf.set(piece, from - guest)
    dataWrite(writes, dataDev, host, buf)
    setStandard(w.table, wr.entryWriter, idx, { hostOffset: host, copied: true })
    wr.touch(w, idx)
    return 'meta'
  }
  // extended L2, host cluster owned: write subclusters in place, mark them allocated
  const bm = getBitmap(w.table, idx)
  const s0 = Math.floor((from - guest) / wr.subclusterSize)
  const s1 = Math.floor((from - guest + piece.byteLength - 1) / wr.subclusterSize)
  const mask = subclusterMask(s0, s1)
  if ((bm.alloc & mask) === mask) {
    dataWrite(writes, dataDev, host + (from - guest), piece)
    return 'inplace'
  }
  const bufStart = s0 * wr.subclusterSize
  const buf = await subclusterBuffer(wr, guest, bufStart, (s1 + 1) * wr.subclusterSize, from, piece)
  dataWrite(writes, dataDev, host + bufStart, buf)
  setBitmap(w.table, idx, { alloc: (bm.alloc | mask) >>> 0, zero: (bm.zero & ~mask) >>> 0 })
  wr.touch(w, idx)
  return 'meta'
}

/** Bytes of [cluster+a, cluster+b): old guest content overlaid with `piece` (at guest `from`). */
export async function subclusterBuffer(wr: WriterCore, guest: number, a: number, b: number, from: number, piece: Uint8Array): Promise<Uint8Array> {
  const total = b - a
  const covered = from === guest + a && piece.byteLength >= total
  const buf = covered ? new Uint8Array(total) : await wr.oldGuest(guest + a, total)
  buf.set(piece, from - guest - a)
  return buf
}

/** Content for a newly allocated (or external) host cluster and its new entry. */
export async function fillNewCluster(
  wr: WriterCore,
  w: TableWork,
  idx: number,
  guest: number,
  host: number,
  e: L2Entry,
  from: number,
  piece: Uint8Array,
  writes: DataWrite[],
  dev: BlockDevice,
): Promise<void> {
  if (!wr.entryWriter.extended || e.type === 'compressed') {
    const full = from === guest && piece.byteLength === wr.clusterSize
    // the whole cluster is written: no copy-on-write, nothing to wait for (the common case of a large write)
    const buf = full ? piece : await wr.oldGuest(guest, wr.clusterSize)
    if (!full) buf.set(piece, from - guest)
    fillWholeCluster(wr, w, idx, host, e, buf, writes, dev)
    return
  }
  const dropped = wr.dropRef(e)
  if (dropped) w.frees.push(dropped)
  const bm = getBitmap(w.table, idx)
  const s0 = Math.floor((from - guest) / wr.subclusterSize)
  const s1 = Math.floor((from - guest + piece.byteLength - 1) / wr.subclusterSize)
  const mask = subclusterMask(s0, s1)
  if (e.type === 'normal') {
    // a shared cluster: copy its allocated subclusters, then the new ones
    const old = await wr.state.dataDevice.read(e.hostOffset, wr.clusterSize, 'data')
    const mid = await subclusterBuffer(wr, guest, s0 * wr.subclusterSize, (s1 + 1) * wr.subclusterSize, from, piece)
    old.set(mid, s0 * wr.subclusterSize)
    dataWrite(writes, dev, host, old)
  } else {
    const bufStart = s0 * wr.subclusterSize
    const mid = await subclusterBuffer(wr, guest, bufStart, (s1 + 1) * wr.subclusterSize, from, piece)
    dataWrite(writes, dev, host + bufStart, mid)
  }
  setStandard(w.table, wr.entryWriter, idx, { hostOffset: host, copied: true })
  setBitmap(w.table, idx, { alloc: (bm.alloc | mask) >>> 0, zero: (bm.zero & ~mask) >>> 0 })
  wr.touch(w, idx)
}

/** A new host cluster holding `buf` (the whole cluster) for entry `idx`, replacing entry `e`. */
function fillWholeCluster(wr: WriterCore, w: TableWork, idx: number, host: number, e: L2Entry, buf: Uint8Array, writes: DataWrite[], dev: BlockDevice): void {
  const dropped = wr.dropRef(e)
  if (dropped) w.frees.push(dropped)
  dataWrite(writes, dev, host, buf)
  setStandard(w.table, wr.entryWriter, idx, { hostOffset: host, copied: true })
  if (wr.entryWriter.extended) setBitmap(w.table, idx, { alloc: ALL_SUBCLUSTERS, zero: 0 })
  wr.touch(w, idx)
}

/**
 * Queue a data write, merging with the previous one when host-contiguous:
 * views of one buffer that are adjacent in memory too stay one view (no
 * copy); other pieces are joined once, when the request is committed.
 */
export function dataWrite(writes: DataWrite[], device: BlockDevice, offset: number, data: Uint8Array): void {
  const last = writes[writes.length - 1]
  if (last && last.device === device && last.offset + last.length === offset && last.length + data.byteLength <= 8 * 1024 * 1024) {
    const tail = last.parts[last.parts.length - 1]!
    if (tail.buffer === data.buffer && tail.byteOffset + tail.byteLength === data.byteOffset) {
      last.parts[last.parts.length - 1] = new Uint8Array(data.buffer, tail.byteOffset, tail.byteLength + data.byteLength)
    } else {
      last.parts.push(data)
    }
    last.length += data.byteLength
    return
  }
  writes.push({ device, offset, parts: [data], length: data.byteLength })
}
