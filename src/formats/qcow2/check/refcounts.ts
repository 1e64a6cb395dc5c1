/**
 * qcow2 check, the refcount side: the refcount blocks counted and checked
 * (qemu's check_refblocks), the clusters of structures that cannot be walked
 * kept from being freed, and the comparison of the in-memory refcount array
 * with the on-disk refcounts, one refcount block at a time (compare_refcounts
 * without its fixes).
 */
import { hex } from '../../../errors.js'
import { MAX_L1_BYTES } from '../spec/constants.js'
import type { CheckSnapshot } from './snapshots.js'
import { getRefcountEntry, refcountsPerBlock } from '../spec/refcount-codec.js'
import { Prefetcher } from './prefetch.js'
import { TWO32, cHex, entryHex, type CheckState, type Mismatch } from './state.js'

/** check_refblocks */
export function checkRefblocks(st: CheckState, reftable: Uint8Array): void {
  const dv = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength)
  const n = reftable.byteLength / 8
  for (let i = 0; i < n; i++) {
    const hi = dv.getUint32(i * 8, false)
    const lo = dv.getUint32(i * 8 + 4, false)
    if (hi === 0 && lo === 0) continue
    const offset = hi * TWO32 + ((lo & 0xfffffe00) >>> 0)
    const base = { structure: 'reftable', hostOffset: st.header.refcountTableOffset + i * 8 }
    if ((lo & 0x1ff) !== 0) {
      st.finding(
        'corruption',
        { ...base, kind: 'reftable-reserved-bits', message: `qcow2: refcount table entry ${i} (${entryHex(hi, lo)}) has reserved bits set` },
        `ERROR refcount table entry ${i} has reserved bits set`,
      )
      st.rebuild = true
      st.reftableBroken = true
      continue
    }
    if ((lo & 0xfffffe00 & (st.clusterSize - 1)) !== 0) {
      st.finding(
        'corruption',
        {
          ...base,
          kind: 'refblock-unaligned',
          message: `qcow2: refcount block ${i} offset ${entryHex(hi, lo & 0xfffffe00)} is not aligned to cluster size ${hex(st.clusterSize)}`,
        },
        `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`,
      )
      st.rebuild = true
      st.reftableBroken = true
      continue
    }
    const cluster = offset / st.clusterSize
    if (cluster >= st.imrt.size) {
      st.refblocksOutside.push(i)
      st.finding(
        'corruption',
        {
          ...base,
          kind: 'refblock-outside',
          cluster,
          message: `qcow2: refcount block ${i} at ${hex(offset)} is beyond the end of the file (size ${hex(st.fileSize)})`,
        },
        `ERROR refcount block ${i} is outside image`,
      )
      continue
    }
    if (offset !== 0) {
      st.inc(offset, st.clusterSize, 'refcount block')
      const c = st.imrt.get(cluster)
      if (c !== 1) {
        st.finding(
          'corruption',
          {
            ...base,
            kind: 'refblock-shared',
            cluster,
            message: `qcow2: refcount block ${i} at ${hex(offset)} is also used by ${c - 1} other reference(s)`,
          },
          `ERROR refcount block ${i} refcount=${c}`,
        )
        st.rebuild = true
        st.reftableBroken = true
      }
    }
  }
}

/** skipped snapshots: walk what can be walked, only to keep its clusters from being freed */
export async function protectSnapshot(st: CheckState, s: CheckSnapshot): Promise<void> {
  const cs = st.clusterSize
  const n = Math.min(s.l1Size, Math.max(0, Math.floor((st.fileSize - s.l1TableOffset) / 8)), MAX_L1_BYTES / 8)
  protectRange(st, s.l1TableOffset, n * 8)
  if (n === 0) return
  const l1 = await st.dev.read(s.l1TableOffset, n * 8, 'l1')
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  for (let i = 0; i < n; i++) {
    const l2 = (dv.getUint32(i * 8, false) & 0x00ffffff) * TWO32 + ((dv.getUint32(i * 8 + 4, false) & 0xfffffe00) >>> 0)
    if (l2 !== 0) await protectL2(st, l2 - (l2 % cs))
  }
}

export function protectRange(st: CheckState, off: number, len: number): void {
  if (off >= st.fileSize || len <= 0) return
  const cs = st.clusterSize
  for (let k = Math.floor(off / cs); k <= Math.floor((Math.min(off + len, st.fileSize) - 1) / cs); k++) st.protectedClusters.add(k)
}

/** keep an L2 table we cannot trust, and everything it points at, from being freed */
export async function protectL2(st: CheckState, l2: number): Promise<void> {
  const cs = st.clusterSize
  if (l2 === 0 || l2 >= st.fileSize) return
  protectRange(st, l2, cs)
  const t = await st.dev.read(l2, cs, 'l2')
  const tv = new DataView(t.buffer, t.byteOffset, t.byteLength)
  for (let j = 0; j < st.l2Count; j++) {
    const hi = tv.getUint32(j * st.entrySize, false)
    const lo = tv.getUint32(j * st.entrySize + 4, false)
    if (hi & 0x40000000) {
      const x = 70 - st.cb
      const coff = (hi & (2 ** (x - 32) - 1)) * TWO32 + lo
      protectRange(st, coff, (((hi >>> (x - 32)) & ((1 << (st.cb - 8)) - 1)) + 1) * 512 - (lo % 512))
    } else {
      const off = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
      if (off !== 0) protectRange(st, off, cs)
    }
  }
}

/** compare_refcounts (no fix), one refcount block at a time */
export async function compareRefcounts(st: CheckState, reftable: Uint8Array): Promise<{ mismatches: Mismatch[]; unreadable: Set<number>; highest: number }> {
  const h = st.header
  const cs = st.clusterSize
  const order = h.refcountOrder
  const perBlock = refcountsPerBlock(cs, order)
  const nb = st.imrt.size
  const imrt = st.imrt
  const rdv = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength)
  const tableEntries = reftable.byteLength / 8
  const mismatches: Mismatch[] = []
  const unreadable = new Set<number>()
  let highest = 0 // qemu starts from cluster 0: the image end offset is at least one cluster
  const blockAt = (ti: number) => (ti < tableEntries ? rdv.getUint32(ti * 8, false) * TWO32 + ((rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00) >>> 0) : 0)
  /** the refblock offset is unaligned: decided on the low word (above 2^53 the double has lost those bits) */
  const unalignedAt = (ti: number) => ti < tableEntries && (rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00 & (cs - 1)) !== 0
  /** the refblock ends past the block layer's limit (2^63 - 2^30): qemu's read of it fails with EIO (exact on the two words) */
  const unreachableAt = (ti: number) => {
    if (ti >= tableEntries) return false
    const hi = rdv.getUint32(ti * 8, false)
    const lo = (rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00) >>> 0
    return hi > 0x7fffffff || (hi === 0x7fffffff && lo + cs > 0xc0000000)
  }
  const wanted: number[] = []
  for (let ti = 0; ti * perBlock < nb; ti++) {
    const off = blockAt(ti)
    if (off !== 0 && !unalignedAt(ti) && !unreachableAt(ti)) wanted.push(off)
  }
  const prefetch = new Prefetcher(st.dev, Float64Array.from(wanted), cs, 'refblock')
  for (let ti = 0, base = 0; base < nb; ti++, base += perBlock) {
    const end = Math.min(nb, base + perBlock)
    let blockOffset = 0
    if (ti < tableEntries) blockOffset = rdv.getUint32(ti * 8, false) * TWO32 + ((rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00) >>> 0)
    if (unalignedAt(ti)) {
      unreadable.add(ti)
      if (!st.corruptSignalled) {
        st.corruptSignalled = true
        st.diagnostics.push(
          `qcow2: Image is corrupt: Refblock offset ${entryHex(rdv.getUint32(ti * 8, false), rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00)} unaligned (reftable index: ${cHex(ti)}); further non-fatal corruption events will be suppressed`,
        )
      }
      for (let i = base; i < end; i++) {
        st.finding(
          'check-error',
          {
            kind: 'refcount-unreadable',
            structure: 'reftable',
            cluster: i,
            hostOffset: i * cs,
            message: `qcow2: refcount of cluster ${i} cannot be read: refcount block ${ti} offset ${hex(blockOffset)} is not cluster aligned`,
          },
          `Can't get refcount for cluster ${i}: Input/output error`,
        )
      }
      continue
    }
    if (unreachableAt(ti)) {
      unreadable.add(ti)
      for (let i = base; i < end; i++) {
        st.finding(
          'check-error',
          {
            kind: 'refcount-unreadable',
            structure: 'reftable',
            cluster: i,
            hostOffset: i * cs,
            message: `qcow2: refcount of cluster ${i} cannot be read: refcount block ${ti} offset ${entryHex(rdv.getUint32(ti * 8, false), rdv.getUint32(ti * 8 + 4, false) & 0xfffffe00)} is past the largest offset a file can have`,
          },
          `Can't get refcount for cluster ${i}: Input/output error`,
        )
      }
      continue
    }
    let block: Uint8Array | undefined
    if (blockOffset !== 0) {
      try {
        block = await prefetch.take()
      } catch {
        for (let i = base; i < end; i++) {
          st.finding(
            'check-error',
            { kind: 'refcount-unreadable', structure: 'refblock', cluster: i, message: `qcow2: refcount block ${ti} at ${hex(blockOffset)} cannot be read` },
            `Can't get refcount for cluster ${i}: Input/output error`,
          )
        }
        continue
      }
    }
    const b16 = block && order === 4 ? block : undefined
    for (let i = base; i < end; i++) {
      const r1 = b16 ? ((b16[(i - base) * 2] as number) << 8) | (b16[(i - base) * 2 + 1] as number) : block ? getRefcountEntry(block, i - base, order) : 0
      const r2 = imrt.get(i)
      if (r1 === r2) {
        if (r1 !== 0) highest = i
        continue
      }
      highest = i
      mismatches.push({ cluster: i, onDisk: r1, expected: r2 })
      if (r1 === 0) st.rebuild = true
      const f = {
        structure: 'refcount',
        cluster: i,
        hostOffset: i * cs,
      }
      if (r1 < r2) {
        st.finding(
          'corruption',
          {
            ...f,
            kind: r1 === 0 ? 'refcount-zero' : 'refcount-too-low',
            message: `qcow2: cluster ${i} (${hex(i * cs)}) has refcount ${r1} on disk but ${r2} reference(s)`,
          },
          `ERROR cluster ${i} refcount=${r1} reference=${r2}`,
        )
      } else {
        st.finding(
          'leak',
          {
            ...f,
            kind: 'leak',
            message: `qcow2: cluster ${i} (${hex(i * cs)}) has refcount ${r1} on disk but ${r2} reference(s)${st.protectedClusters.has(i) ? ' (kept: a snapshot or cluster that cannot be walked may own it)' : ''}`,
          },
          `Leaked cluster ${i} refcount=${r1} reference=${r2}`,
        )
      }
    }
    if (block) prefetch.release(block) // nothing above keeps it: its buffer is reused
  }
  return { mismatches, unreadable, highest }
}
