/**
 * qcow2 repair, the table phases (-r all):
 *
 *   T. a table declared larger than the image needs whose extra part runs
 *      over clusters other structures reference (an inflated
 *      refcount_table_clusters or l1_size) is the suspect: it is trimmed to
 *      end before the first such cluster, and the data behind it is kept.
 *   A. entries: L2 entries pointing one cluster or more past EOF become zero
 *      clusters; L1 entries pointing at L2 tables past EOF, or non-zero
 *      without an L2 offset, are cleared; preallocated zero clusters with
 *      unaligned offsets become plain zero clusters; a guest cluster that
 *      really is metadata (the metadata is where the header and the tables
 *      say) gets a copy of the bytes it read, placed past the end of the
 *      file, and the metadata keeps its cluster.
 *
 * An L1 entry whose L2 table is another structure (the header, an L1 table,
 * the refcount table, the snapshot table) has two readings and no way to
 * tell which is right: repair refuses and names both. No edit ever lands in
 * the header cluster or in a cluster that is not the table it edits.
 */
import { CorruptImageError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { RepairAction } from '../../../check/types.js'
import type { EntryRef, Qcow2Analysis } from '../check/check.js'
import { MAX_L1_BYTES } from '../spec/constants.js'
import { hasDataFile, hasExtendedL2 } from '../spec/header.js'
import { refcountsPerBlock } from '../spec/refcount-codec.js'
import type { Phase, Write } from './phase.js'

const TWO32 = 0x1_0000_0000
const L2 = 'L2 table'

/** an offset from an entry (hi word masked), or -1 when it is unaligned or not inside the file */
function entryTarget(hi: number, lo: number, hiMask: number, cs: number, fileSize: number): number {
  if ((lo & 0xfffffe00 & (cs - 1)) !== 0) return -1
  const off = (hi & hiMask) * TWO32 + ((lo & 0xfffffe00) >>> 0)
  return off < fileSize ? off : -1
}

// ---------------------------------------------------------------------------
// T. oversized tables

/** clusters of [off, off+len) that something besides the table itself references, first one (relative) from `from` */
function firstShared(a: Qcow2Analysis, off: number, len: number, from: number): number {
  const cs = a.header.clusterSize
  const nb = Math.ceil(a.fileSize / cs)
  // the table itself was counted only when it ends less than a cluster past EOF (qemu's inc_refcounts rule)
  const self = off + len - a.fileSize < cs ? 1 : 0
  const start = off / cs
  const n = Math.min(Math.ceil(len / cs), nb - start)
  // (with narrow refcounts the counter stops at its maximum: a cluster that overflowed is shared too)
  for (let j = from; j < n; j++) if (a.imrt.get(start + j) > self || a.overflowed.has(start + j)) return j
  return -1
}

export async function planTrim(dev: BlockDevice, a: Qcow2Analysis): Promise<Phase | undefined> {
  const h = a.header
  const cs = h.clusterSize
  const nb = Math.ceil(a.fileSize / cs)
  const actions: RepairAction[] = []
  let reftableClusters: number | undefined
  let l1Size: number | undefined
  // the refcount table needs one entry per refcount block covering the file
  if (h.refcountTableOffset % cs === 0 && h.refcountTableOffset < a.fileSize) {
    const needed = Math.max(1, Math.ceil((Math.ceil(nb / refcountsPerBlock(cs, h.refcountOrder)) * 8) / cs))
    const j = firstShared(a, h.refcountTableOffset, h.refcountTableClusters * cs, needed)
    if (j > 0 && j < h.refcountTableClusters) {
      reftableClusters = j
      actions.push({
        kind: 'trim-table',
        structure: 'reftable',
        hostOffset: 56,
        message: `the refcount table is declared ${h.refcountTableClusters} clusters long (the file needs ${needed}) and its cluster ${j} at ${hex(h.refcountTableOffset + j * cs)} is referenced by other structures: refcount_table_clusters ${h.refcountTableClusters} -> ${j}, the data there is kept`,
      })
    }
  }
  // the active L1 table needs one entry per L2 table of the virtual size
  if (h.l1TableOffset % cs === 0 && h.l1TableOffset >= cs && h.l1TableOffset < a.fileSize && h.l1Size > 0) {
    const perL2 = cs / (hasExtendedL2(h) ? 16 : 8)
    const neededEntries = Math.ceil(h.size / (cs * perL2))
    const needed = Math.ceil((neededEntries * 8) / cs)
    const j = firstShared(a, h.l1TableOffset, h.l1Size * 8, Math.max(needed, 1))
    if (j > 0 && (j * cs) / 8 < h.l1Size) {
      l1Size = (j * cs) / 8
      actions.push({
        kind: 'trim-table',
        structure: 'l1',
        hostOffset: 36,
        message: `the active L1 table is declared ${h.l1Size} entries long (the virtual size needs ${neededEntries}) and its cluster ${j} at ${hex(h.l1TableOffset + j * cs)} is referenced by other structures: l1_size ${h.l1Size} -> ${l1Size}, the data there is kept`,
      })
    }
  }
  if (!actions.length) return undefined
  const sector = new Uint8Array(await dev.read(0, 512, 'header'))
  const dv = new DataView(sector.buffer)
  if (reftableClusters !== undefined) dv.setUint32(56, reftableClusters)
  if (l1Size !== undefined) dv.setUint32(36, l1Size)
  return { writes: [{ offset: 0, data: sector, tag: 'header' }], actions, leaksFixed: 0, corruptionsFixed: 0 }
}

// ---------------------------------------------------------------------------
// metadata clusters

interface L1Info {
  off: number
  size: number
  active: boolean
  what: string
}

function l1Tables(a: Qcow2Analysis): L1Info[] {
  const h = a.header
  const out: L1Info[] = [{ off: h.l1TableOffset, size: h.l1Size, active: true, what: 'active' }]
  for (const s of a.snapshots.snapshots) {
    if (!s.l1Unaligned && s.l1Size <= MAX_L1_BYTES / 8) out.push({ off: s.l1TableOffset, size: s.l1Size, active: false, what: `snapshot ${s.id}` })
  }
  return out
}

/** the entries of an L1 table that lie inside the file (the rest reads as zeros) */
async function readL1(dev: BlockDevice, l: L1Info, fileSize: number): Promise<DataView | undefined> {
  const n = Math.min(l.size, Math.max(0, Math.floor((fileSize - l.off) / 8)))
  if (n <= 0) return undefined
  const t = await dev.read(l.off, n * 8, 'l1')
  return new DataView(t.buffer, t.byteOffset, t.byteLength)
}

interface TableConflict {
  l1: L1Info
  index: number
  l2Offset: number
  what: string
}

interface Metadata {
  /** what each cluster of the file holds (the first structure found there) */
  kinds: Map<number, string>
  /** L1 entries whose L2 table is another structure */
  conflicts: TableConflict[]
  /** L1 entries whose L2 table is where the header puts the refcount table */
  onReftable: TableConflict[]
}

/** clusters holding metadata (only clusters inside the file: every loop is bounded by it) */
async function metadataClusters(dev: BlockDevice, a: Qcow2Analysis): Promise<Metadata> {
  const h = a.header
  const cs = h.clusterSize
  const nb = Math.ceil(a.fileSize / cs)
  const kinds = new Map<number, string>()
  const add = (off: number, len: number, what: string) => {
    if (len <= 0 || off >= a.fileSize) return
    const last = Math.min(Math.floor((off + len - 1) / cs), nb - 1)
    for (let k = Math.floor(off / cs); k <= last; k++) if (!kinds.has(k)) kinds.set(k, what)
  }
  add(0, cs, 'header')
  add(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table')
  const rdv = new DataView(a.reftable.buffer, a.reftable.byteOffset, a.reftable.byteLength)
  for (let i = 0; i < a.reftable.byteLength / 8; i++) {
    const hi = rdv.getUint32(i * 8)
    const lo = rdv.getUint32(i * 8 + 4)
    if ((lo & 0x1ff) !== 0) continue
    const off = entryTarget(hi, lo, 0xffffffff, cs, a.fileSize)
    if (off > 0) add(off, cs, `refcount block ${i}`)
  }
  add(a.snapshots.offset, a.snapshots.size, 'snapshot table')
  const l1s = l1Tables(a)
  for (const l of l1s) add(l.off, l.size * 8, `${l.what} L1 table`)
  const conflicts: TableConflict[] = []
  const onReftable: TableConflict[] = []
  for (const l of l1s) {
    const dv = await readL1(dev, l, a.fileSize)
    if (!dv) continue
    for (let i = 0; i < dv.byteLength / 8; i++) {
      const off = entryTarget(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), 0x00ffffff, cs, a.fileSize)
      if (off <= 0) continue
      const k = off / cs
      const was = kinds.get(k)
      if (was === 'refcount table') {
        // the refcount structure is derived (a rebuild recomputes it from the tables), the mapping is not:
        // the cluster is taken as the L2 table, and the refcount structure is rebuilt elsewhere
        onReftable.push({ l1: l, index: i, l2Offset: off, what: was })
        kinds.set(k, L2)
      } else if (was !== undefined && was !== L2 && !was.startsWith('refcount block')) conflicts.push({ l1: l, index: i, l2Offset: off, what: was })
      else if (was === undefined) kinds.set(k, L2)
    }
  }
  return { kinds, conflicts, onReftable }
}

// ---------------------------------------------------------------------------
// A. entries

function guestOf(a: Qcow2Analysis, ref: EntryRef): string {
  if (!ref.active) return `snapshot L2 table at ${hex(ref.tableOffset)} index ${ref.index}`
  const per = a.header.clusterSize / ref.entrySize
  const g = (ref.l1Index * per + ref.index) * a.header.clusterSize
  return `guest ${hex(g)}-${hex(g + a.header.clusterSize - 1)}`
}

function l1Range(a: Qcow2Analysis, index: number): string {
  const cs = a.header.clusterSize
  const span = cs * (cs / (hasExtendedL2(a.header) ? 16 : 8))
  return `guest ${hex(index * span)}-${hex((index + 1) * span - 1)}`
}

export class TableEdits {
  private readonly tables = new Map<number, Uint8Array>()
  constructor(
    private readonly dev: BlockDevice,
    private readonly cs: number,
  ) {}
  async table(offset: number): Promise<Uint8Array> {
    let t = this.tables.get(offset)
    if (!t) {
      t = new Uint8Array(await this.dev.read(offset, this.cs, 'l2'))
      this.tables.set(offset, t)
    }
    return t
  }
  writes(tag: string): Write[] {
    return [...this.tables].map(([offset, data]) => ({ offset, data, tag }))
  }
}

/** how far past the end of the file a new structure may be placed to step over a reference there */
export const PLACEMENT_REACH = 1 << 30

/**
 * The first cluster a repair may place new bytes in: past the end of the file, past every cluster the check
 * counted (qemu accepts a reference ending less than a cluster past the end: that guest range reads as
 * zeros), and past every reference it did not count that starts within PLACEMENT_REACH of the end (a guest
 * range mapped there reads as zeros until something is written there, and would then show it).
 */
export function firstClearCluster(a: Qcow2Analysis): number {
  const cs = a.header.clusterSize
  let end = Math.max(Math.ceil(a.fileSize / cs), a.imrt.size)
  for (const r of a.uncounted) if (r.offset - a.fileSize <= PLACEMENT_REACH) end = Math.max(end, Math.ceil((r.offset + r.size) / cs))
  return end
}

export async function planEntries(dev: BlockDevice, a: Qcow2Analysis, file: string): Promise<Phase> {
  const cs = a.header.clusterSize
  const ext = hasExtendedL2(a.header)
  const meta = await metadataClusters(dev, a)
  if (meta.conflicts.length > 0) {
    const c = meta.conflicts[0]!
    throw new CorruptImageError(
      `qcow2: ${file}: repair refuses to choose: ${c.l1.what} L1 entry ${c.index} points its L2 table at ${hex(c.l2Offset)}, which is the ${c.what}; ` +
        `either the L1 entry is wrong (clearing it makes ${c.l1.active ? l1Range(a, c.index) : 'that snapshot range'} read as unallocated) ` +
        `or that cluster is an L2 table and the ${c.what}'s offset is wrong; nothing written` +
        (meta.conflicts.length > 1 ? ` (${meta.conflicts.length - 1} more such entries)` : ''),
      { file, structure: 'l1', offset: c.l1.off + c.index * 8 },
    )
  }
  /** an edit may only land in a cluster that is the kind of table it edits, never in the header */
  const editable = (tableOffset: number, kind: 'l1' | 'l2'): boolean => {
    const k = Math.floor(tableOffset / cs)
    if (k === 0) return false
    const was = meta.kinds.get(k)
    return kind === 'l2' ? was === L2 : was !== undefined && was.endsWith('L1 table')
  }
  const edits = new TableEdits(dev, cs)
  const l1Edits = new Map<number, Uint8Array>()
  const actions: RepairAction[] = []
  let fixed = 0
  let kept = 0
  const zeroEntry = async (ref: EntryRef, why: string) => {
    if (!editable(ref.tableOffset, 'l2')) {
      kept++
      return
    }
    const t = await edits.table(ref.tableOffset)
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    const o = ref.index * ref.entrySize
    if (ext) {
      // no host cluster; every subcluster reads as zero
      dv.setUint32(o, 0)
      dv.setUint32(o + 4, 0)
      dv.setUint32(o + 8, 0xffffffff)
      dv.setUint32(o + 12, 0)
    } else {
      dv.setUint32(o, 0)
      dv.setUint32(o + 4, a.header.version >= 3 ? 1 : 0)
    }
    actions.push({
      kind: 'clear-l2-entry',
      structure: 'l2',
      hostOffset: ref.tableOffset + o,
      message: `${why}: the entry of ${guestOf(a, ref)} becomes a zero cluster`,
    })
    fixed++
  }
  const clearL1 = (ref: EntryRef, message: string) => {
    const at = ref.tableOffset + ref.index * 8
    if (!editable(at, 'l1')) {
      kept++
      return
    }
    l1Edits.set(at, new Uint8Array(8))
    actions.push({ kind: 'clear-l1-entry', structure: 'l1', hostOffset: at, message })
    fixed++
  }
  // a v2 image has no zero flag: a cleared entry would read the backing file where the guest read zeros
  const noZeroCluster = a.header.version < 3 && a.header.backingFileOffset !== 0
  let keptPastEof = 0
  for (const p of a.pastEof) {
    if (p.kind === 'data' && noZeroCluster) keptPastEof++
    else if (p.kind === 'data') {
      await zeroEntry(p.ref, `data cluster ${hex(p.hostOffset)} is past the end of the file (reads as zeros)`)
    } else {
      clearL1(
        p.ref,
        `L2 table ${hex(p.hostOffset)} is past the end of the file: ${p.ref.active ? 'active' : 'snapshot'} L1 entry ${p.ref.index} cleared (its guest range read as zeros)`,
      )
    }
  }
  for (const ref of a.l1ZeroOffset) {
    clearL1(
      ref,
      `${ref.active ? 'active' : 'snapshot'} L1 entry ${ref.index} is not zero but holds no L2 table offset: cleared (${ref.active ? l1Range(a, ref.index) : 'its range'} reads as unallocated, as before)`,
    )
  }
  for (const ref of a.zeroAllocUnaligned) await zeroEntry(ref, 'preallocated zero cluster with an unaligned offset')

  // data entries pointing into metadata (counted twice: the metadata and the entry): the guest gets a copy.
  // With an external data file a data entry's offset is in that file, never in this one: no data entry can
  // be this file's metadata, so nothing is copied (qemu-img reads guest cluster N at data-file offset N).
  const suspects = hasDataFile(a.header)
    ? new Set<number>()
    : new Set(a.mismatches.filter((m) => m.expected > m.onDisk && meta.kinds.has(m.cluster)).map((m) => m.cluster))
  for (const c of a.overflowed) if (meta.kinds.has(c)) suspects.add(c)
  const copies: Write[] = []
  if (suspects.size > 0) {
    const refs = (await entriesPointingAt(dev, a, suspects)).filter((r) => {
      if (editable(r.tableOffset, 'l2')) return true
      kept++
      return false
    })
    const byTarget = new Map<number, PointingRef[]>()
    for (const r of refs) byTarget.set(r.l2Target, [...(byTarget.get(r.l2Target) ?? []), r])
    let next = firstClearCluster(a)
    for (const [target, rs] of byTarget) {
      const copy = next++
      copies.push({ offset: copy * cs, data: new Uint8Array(await dev.read(target * cs, cs, 'data')), tag: 'data' })
      for (const r of rs) {
        const t = await edits.table(r.tableOffset)
        const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
        const o = r.index * r.entrySize
        // COPIED stays clear until the refcount phase has counted the copy (the OFLAG_COPIED phase then
        // sets it): a crash in between leaves a refcount to raise, never a COPIED flag that lies
        const off = copy * cs
        dv.setUint32(o, ((dv.getUint32(o) & 0x7f000000) | Math.floor(off / TWO32)) >>> 0)
        dv.setUint32(o + 4, ((dv.getUint32(o + 4) & 0x1ff) | (off % TWO32)) >>> 0)
        actions.push({
          kind: 'copy-data-cluster',
          structure: 'l2',
          hostOffset: r.tableOffset + o,
          message: `data cluster ${hex(target * cs)} of ${guestOf(a, r)} is also the ${meta.kinds.get(target)}: the guest gets a copy of the bytes it read, at ${hex(off)}; the ${meta.kinds.get(target)} keeps its cluster`,
        })
        fixed++
      }
    }
  }
  if (kept)
    actions.push({
      kind: 'keep-entries',
      structure: 'l1',
      message: `${kept} entries left as they are: their table is not where an edit may safely land (the header, or a cluster that is also another structure)`,
    })
  if (keptPastEof)
    actions.push({
      kind: 'keep-entries',
      structure: 'l2',
      message: `${keptPastEof} data entries past the end of the file left as they are (as qemu-img does): a v2 image has no zero clusters, and a cleared entry would read the backing file where the guest reads zeros`,
    })
  const rebuildRefcounts = meta.onReftable.length > 0
  if (rebuildRefcounts) {
    const c = meta.onReftable[0]!
    actions.push({
      kind: 'keep-entries',
      structure: 'reftable',
      hostOffset: c.l1.off + c.index * 8,
      message:
        `${c.l1.what} L1 entry ${c.index} points its L2 table at ${hex(c.l2Offset)}, where the header puts the refcount table: ` +
        `the cluster is kept as the L2 table (the mapping cannot be recomputed, the refcounts can) and the refcount structure is rebuilt elsewhere` +
        (meta.onReftable.length > 1 ? ` (${meta.onReftable.length - 1} more such entries)` : ''),
    })
  }
  const tables = [...edits.writes('l2'), ...[...l1Edits].map(([offset, data]) => ({ offset, data, tag: 'l1' }))]
  // the copies are durable before any entry points at them
  if (copies.length) return { writes: copies, then: tables, actions, leaksFixed: 0, corruptionsFixed: fixed, rebuildRefcounts }
  return { writes: tables, actions, leaksFixed: 0, corruptionsFixed: fixed, rebuildRefcounts }
}

type PointingRef = EntryRef & { l2Target: number }

/** active and snapshot L2 entries (normal / preallocated) whose host cluster is in `targets` */
async function entriesPointingAt(dev: BlockDevice, a: Qcow2Analysis, targets: Set<number>): Promise<PointingRef[]> {
  const h = a.header
  const cs = h.clusterSize
  const es = hasExtendedL2(h) ? 16 : 8
  const out: PointingRef[] = []
  const seen = new Set<string>()
  for (const l of l1Tables(a)) {
    const dv = await readL1(dev, l, a.fileSize)
    if (!dv) continue
    for (let i = 0; i < dv.byteLength / 8; i++) {
      const l2 = entryTarget(dv.getUint32(i * 8), dv.getUint32(i * 8 + 4), 0x00ffffff, cs, a.fileSize)
      if (l2 <= 0) continue
      const tb = await dev.read(l2, cs, 'l2')
      const tv = new DataView(tb.buffer, tb.byteOffset, tb.byteLength)
      for (let j = 0; j < cs / es; j++) {
        const hi = tv.getUint32(j * es)
        if (hi & 0x40000000) continue
        const off = entryTarget(hi, tv.getUint32(j * es + 4), 0x00ffffff, cs, a.fileSize)
        if (off <= 0 || !targets.has(off / cs)) continue
        const key = `${l2}:${j}`
        if (seen.has(key)) continue
        seen.add(key)
        out.push({ tableOffset: l2, index: j, active: l.active, l1Index: i, entrySize: es, l2Target: off / cs })
      }
    }
  }
  return out
}
