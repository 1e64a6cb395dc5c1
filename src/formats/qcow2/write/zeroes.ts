/**
 * Zero writes: whole granules (clusters, or subclusters with extended L2)
 * change entries only (v3 zero flag, keeping or discarding the host cluster;
 * v2 unallocated); partial granules are written as data unless they already
 * read as zeros. Runs under the writer's mutex, through its commit protocol.
 */
import { dataFileRaw, hasDataFile } from '../spec/header.js'
import { isAllZero } from '../../../util/bytes.js'
import { ALL_SUBCLUSTERS, getBitmap, setBitmap, setStandard, subclusterMask } from '../spec/l2-meta.js'
import type { WriterCore } from './core.js'
import { commit, prepareTable, undo, type Range, type TableWork } from './commit.js'
import { writeLocked } from './plan.js'

export async function writeZeroesLocked(wr: WriterCore, offset: number, length: number, discard: boolean): Promise<void> {
  wr.assertUsable()
  if (length === 0) return
  const g = wr.subclusterSize
  const end = offset + length
  const a = Math.ceil(offset / g) * g
  const b = Math.floor(end / g) * g
  const partial: Range[] = []
  if (a >= b) {
    partial.push({ offset, length })
  } else {
    if (offset < a) partial.push({ offset, length: a - offset })
    if (b < end) partial.push({ offset: b, length: end - b })
  }
  const raw = hasDataFile(wr.header) && dataFileRaw(wr.header)
  const v2WithBacking = wr.header.version < 3 && wr.state.backing !== undefined
  const fallback = raw || v2WithBacking
  for (const p of partial) {
    const cur = await wr.oldGuest(p.offset, p.length)
    if (!isAllZero(cur)) await writeLocked(wr, p.offset, new Uint8Array(p.length))
  }
  const whole = a < b ? { offset: a, length: b - a } : undefined
  if (!whole) return
  if (fallback) {
    const chunk = 4 * 1024 * 1024
    for (let p = whole.offset; p < whole.offset + whole.length; p += chunk) {
      const n = Math.min(chunk, whole.offset + whole.length - p)
      const cur = await wr.oldGuest(p, n)
      if (!isAllZero(cur)) await writeLocked(wr, p, new Uint8Array(n))
    }
    return
  }
  await zeroAligned(wr, whole.offset, whole.length, discard)
}

/** Zero whole granules (clusters, or subclusters with extended L2) through entries. */
async function zeroAligned(wr: WriterCore, offset: number, length: number, discard: boolean): Promise<void> {
  const works: TableWork[] = []
  const coverage = wr.l2Entries * wr.clusterSize
  const backing = wr.state.backing !== undefined
  const compressedPartial: Range[] = []
  let needFlush = false
  try {
    let pos = offset
    const end = offset + length
    while (pos < end) {
      const l1Index = Math.floor(pos / coverage)
      const tEnd = Math.min(end, (l1Index + 1) * coverage)
      const w = await prepareTable(wr, l1Index, backing)
      if (!w) {
        pos = tEnd
        continue
      }
      works.push(w)
      if (w.mode !== 'inplace') needFlush = true
      for (let p = pos; p < tEnd;) {
        const guest = Math.floor(p / wr.clusterSize) * wr.clusterSize
        const to = Math.min(tEnd, guest + wr.clusterSize)
        const idx = (guest / wr.clusterSize) % wr.l2Entries
        const r = await zeroCluster(wr, w, idx, guest, p - guest, to - guest, discard)
        if (r) compressedPartial.push(r)
        p = to
      }
      pos = tEnd
    }
    await commit(wr, works, [], needFlush)
  } catch (e) {
    await undo(wr, works)
    throw e
  }
  for (const r of compressedPartial) await writeLocked(wr, r.offset, new Uint8Array(r.length))
}

/** Zero [a, b) of one cluster in table copy `w`; returns a range to write as data instead. */
async function zeroCluster(wr: WriterCore, w: TableWork, idx: number, guest: number, a: number, b: number, discard: boolean): Promise<Range | undefined> {
  const e = wr.entry(w.table, idx)
  const backing = wr.state.backing !== undefined
  const dataFile = hasDataFile(wr.header)
  const wholeCluster = a === 0 && (b === wr.clusterSize || guest + b >= wr.header.size)
  const owned =
    e.type === 'normal' || (e.type === 'zero' && e.hostOffset !== 0) ? dataFile || (await wr.refcount((e as { hostOffset: number }).hostOffset)) === 1 : false
  if (!wr.entryWriter.extended) {
    if (wr.header.version < 3) {
      if (e.type === 'unallocated') return undefined
      const d = wr.dropRef(e)
      if (d) w.frees.push(d)
      setStandard(w.table, wr.entryWriter, idx, { hostOffset: 0, copied: false })
      wr.touch(w, idx)
      return undefined
    }
    if (e.type === 'zero' && (e.hostOffset === 0 || !discard)) return undefined
    if (e.type === 'unallocated' && !backing) return undefined
    if (owned && !discard) {
      setStandard(w.table, wr.entryWriter, idx, { hostOffset: (e as { hostOffset: number }).hostOffset, copied: true, zero: true })
    } else {
      const d = wr.dropRef(e)
      if (d) w.frees.push(d)
      setStandard(w.table, wr.entryWriter, idx, { hostOffset: 0, copied: false, zero: true })
    }
    wr.touch(w, idx)
    return undefined
  }
  // extended L2
  const s0 = Math.floor(a / wr.subclusterSize)
  const s1 = Math.floor((b - 1) / wr.subclusterSize)
  const mask = wholeCluster ? ALL_SUBCLUSTERS : subclusterMask(s0, s1)
  if (e.type === 'compressed') {
    if (!wholeCluster) return { offset: guest + a, length: b - a }
    w.frees.push(wr.dropRef(e)!)
    setStandard(w.table, wr.entryWriter, idx, { hostOffset: 0, copied: false })
    setBitmap(w.table, idx, { alloc: 0, zero: ALL_SUBCLUSTERS })
    wr.touch(w, idx)
    return undefined
  }
  const bm = getBitmap(w.table, idx)
  if (e.type === 'normal' && mask === ALL_SUBCLUSTERS && (discard || !owned)) {
    const d = wr.dropRef(e)
    if (d) w.frees.push(d)
    setStandard(w.table, wr.entryWriter, idx, { hostOffset: 0, copied: false })
    setBitmap(w.table, idx, { alloc: 0, zero: ALL_SUBCLUSTERS })
    wr.touch(w, idx)
    return undefined
  }
  const next = { alloc: (bm.alloc & ~mask) >>> 0, zero: (bm.zero | mask) >>> 0 }
  if (next.alloc === bm.alloc && next.zero === bm.zero) return undefined
  setBitmap(w.table, idx, next)
  wr.touch(w, idx)
  return undefined
}
