/**
 * Snapshot table repair (-r all): the table is rewritten, past the end of the
 * file, without what qemu-img check refuses — entries beyond 65536 or beyond
 * 64 MiB of table, extra data beyond 1 KiB (truncated), v3 entries without the
 * 16 bytes of extra data (completed: vm_state_size_large, disk_size, icount
 * -1) — and without entries that are all zero (what an entry count reaching
 * past the real table reads). The new table and its refcounts are durable
 * before one sector write points the header at it; the old table's clusters
 * are then leaks, freed by the refcount phase.
 */
import { hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { RepairAction } from '../../../check/types.js'
import { u16be, u32be } from '../../../util/bytes.js'
import { readSnapshotsForCheck, type SnapshotTableCheck } from '../check/snapshots.js'
import { readHeader } from '../spec/header.js'
import { getRefcountEntry, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'

const TWO32 = 0x1_0000_0000

export interface SnapshotPlan {
  writes: Array<{ offset: number; data: Uint8Array; tag: string }>
  then: Array<{ offset: number; data: Uint8Array; tag: string }>
  actions: RepairAction[]
  /** corruptions, counted as qemu-img counts them (dropped + truncated + incomplete) */
  fixed: number
}

/**
 * `clearFrom`: the first cluster the new table may use (entries.ts firstClearCluster), when the check
 * completed: past the file and past every cluster a reference reaches near its end, so the table never lands
 * where a guest range already maps (that range reads as zeros, and would show the table). When the check
 * could not complete, the first whole cluster past the end of the file is skipped, where an entry mapped
 * "at the end of the file" lands.
 */
export async function planSnapshotTable(dev: BlockDevice, file: string, clearFrom?: number): Promise<SnapshotPlan | undefined> {
  const h = await readHeader(dev, { file, readOnly: true, forCheck: true })
  const cs = h.clusterSize
  const t: SnapshotTableCheck = await readSnapshotsForCheck(dev, cs, h.version, true)
  if (t.failure) return undefined // e.g. an unaligned table offset: nothing safe to do
  const entries: Uint8Array[] = []
  let garbage = 0
  let completed = 0
  for (const s of t.snapshots) {
    const fixed = await dev.read(s.entryOffset, 40, 'snapshot')
    const idSize = u16be(fixed, 12)
    const nameSize = u16be(fixed, 14)
    const origExtra = u32be(fixed, 36)
    if (s.l1TableOffset === 0 && s.l1Size === 0 && idSize === 0 && nameSize === 0) {
      garbage++
      continue
    }
    const keepExtra = Math.min(origExtra, 1024)
    const extra = new Uint8Array(Math.max(keepExtra, h.version >= 3 ? 24 : keepExtra))
    extra.set(await dev.read(s.entryOffset + 40, keepExtra, 'snapshot'))
    if (h.version >= 3 && keepExtra < 16) {
      const dv = new DataView(extra.buffer)
      if (keepExtra < 8) dv.setBigUint64(0, BigInt(u32be(fixed, 32))) // vm_state_size_large
      dv.setBigUint64(8, BigInt(h.size)) // disk_size
      if (keepExtra < 24) dv.setBigInt64(16, -1n) // icount unknown
      completed++
    }
    const names = await dev.read(s.entryOffset + 40 + origExtra, idSize + nameSize, 'snapshot')
    const len = Math.ceil((40 + extra.byteLength + idSize + nameSize) / 8) * 8
    const e = new Uint8Array(len)
    e.set(fixed, 0)
    new DataView(e.buffer).setUint32(36, extra.byteLength)
    e.set(extra, 40)
    e.set(names, 40 + extra.byteLength)
    entries.push(e)
  }
  const fixedCount = t.reduced + t.extraDropped + t.incomplete.length
  if (fixedCount === 0 && garbage === 0) return undefined
  // the new table, past the end of the file
  const size = entries.reduce((n, e) => n + e.byteLength, 0)
  const table = new Uint8Array(Math.ceil(Math.max(size, 1) / cs) * cs)
  let pos = 0
  for (const e of entries) {
    table.set(e, pos)
    pos += e.byteLength
  }
  const start = clearFrom === undefined ? Math.ceil(dev.size / cs) + 1 : Math.max(Math.ceil(dev.size / cs), clearFrom)
  const n = entries.length ? table.byteLength / cs : 0
  const writes: SnapshotPlan['writes'] = []
  if (n > 0) {
    writes.push({ offset: start * cs, data: table, tag: 'snapshot' })
    // refcount 1 for the new clusters, in the blocks that cover them (a new block if none does)
    const perBlock = refcountsPerBlock(cs, h.refcountOrder)
    const reftable = await dev.read(h.refcountTableOffset, h.refcountTableClusters * cs, 'reftable')
    const rdv = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength)
    const blocks = new Map<number, Uint8Array>()
    let next = start + n
    for (let k = start; k < start + n; k++) {
      const ti = Math.floor(k / perBlock)
      // a refcount structure that cannot take the new refcounts (no table entry, or an entry with reserved
      // bits, unaligned, past the end of the file) is rebuilt by the refcount phase that follows, which
      // counts the new table then: nothing is written through a broken entry
      if (ti >= reftable.byteLength / 8 || h.refcountTableOffset + ti * 8 + 8 > dev.size) continue
      const lo = rdv.getUint32(ti * 8 + 4)
      let off = rdv.getUint32(ti * 8) * TWO32 + ((lo & 0xfffffe00) >>> 0)
      if (!blocks.has(off) && ((lo & 0x1ff) !== 0 || (lo & 0xfffffe00 & (cs - 1)) !== 0 || off >= dev.size)) continue
      if (off === 0) {
        off = next++ * cs
        const nb = new Uint8Array(cs)
        blocks.set(off, nb)
        rdv.setUint32(ti * 8, Math.floor(off / TWO32))
        rdv.setUint32(ti * 8 + 4, off % TWO32)
        // the new block counts itself when it lies in its own range
        const self = off / cs
        if (Math.floor(self / perBlock) === ti) setRefcountEntry(nb, self % perBlock, h.refcountOrder, 1)
        writes.push({ offset: h.refcountTableOffset + ti * 8, data: reftable.slice(ti * 8, ti * 8 + 8), tag: 'reftable' })
      }
      let b = blocks.get(off)
      if (!b) {
        b = new Uint8Array(await dev.read(off, cs, 'refblock'))
        blocks.set(off, b)
      }
      if (getRefcountEntry(b, k % perBlock, h.refcountOrder) === 0) setRefcountEntry(b, k % perBlock, h.refcountOrder, 1)
    }
    for (const [off, data] of blocks) writes.unshift({ offset: off, data, tag: 'refblock' })
  }
  const sector = new Uint8Array(await dev.read(0, 512, 'header'))
  const sdv = new DataView(sector.buffer)
  sdv.setUint32(60, entries.length)
  const newOff = n > 0 ? start * cs : 0
  sdv.setUint32(64, Math.floor(newOff / TWO32))
  sdv.setUint32(68, newOff % TWO32)
  const parts = [
    t.reduced && `${t.reduced} overhanging snapshots dropped`,
    t.extraDropped && `extra data of ${t.extraDropped} entries truncated to 1 KiB`,
    completed && `${completed} v3 entries completed`,
    garbage && `${garbage} all-zero entries dropped`,
  ].filter(Boolean)
  return {
    writes,
    then: [{ offset: 0, data: sector, tag: 'header' }],
    actions: [
      {
        kind: 'rewrite-snapshot-table',
        structure: 'snapshot',
        hostOffset: newOff,
        message: `rewrite the snapshot table (${entries.length} entries) at ${hex(newOff)} past the end of the file: ${parts.join(', ')}`,
      },
    ],
    fixed: fixedCount,
  }
}
