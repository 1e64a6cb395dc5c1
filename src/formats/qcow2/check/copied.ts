/**
 * qcow2 check, OFLAG_COPIED (qemu's check_oflag_copied): the COPIED flag of
 * every active L1 and L2 entry against the on-disk refcount of what it points
 * at. The walk's pre-check (CheckState.copiedOdd, Imrt.shared) and the comparison decide
 * whether the active L2 tables need to be read a second time at all.
 */
import { hex } from '../../../errors.js'
import type { Finding } from '../../../check/types.js'
import { getRefcountEntry, refcountsPerBlock } from '../spec/refcount-codec.js'
import { CheckFailedError, TWO32, entryHex, type CheckState, type CopiedError, type EntryRef, type Mismatch } from './state.js'

/** check_oflag_copied: active L1/L2 tables against on-disk refcounts */
export async function checkCopied(st: CheckState, reftable: Uint8Array, cmp: { mismatches: Mismatch[]; unreadable: Set<number> }): Promise<CopiedError[]> {
  const h = st.header
  const cs = st.clusterSize
  const out: CopiedError[] = []
  const perBlock = refcountsPerBlock(cs, h.refcountOrder)
  const tableEntries = reftable.byteLength / 8
  const rdv = new DataView(reftable.buffer, reftable.byteOffset, reftable.byteLength)
  const onDiskMap = new Map<number, number>()
  for (const m of cmp.mismatches) onDiskMap.set(m.cluster, m.onDisk)
  const byCluster = new Map<number, Finding>()
  for (const f of st.report.findings) if (f.structure === 'refcount' && f.cluster !== undefined) byCluster.set(f.cluster, f)
  const nb = st.imrt.size
  const imrt = st.imrt
  let cachedBlock: { off: number; data: Uint8Array } | undefined
  const noMismatch = onDiskMap.size === 0
  /** refcount block offset for cluster c: 0 = none, -1 = unreadable (unaligned) */
  const blockFor = (c: number): number => {
    const ti = Math.floor(c / perBlock)
    if (ti >= tableEntries) return 0
    const lo = rdv.getUint32(ti * 8 + 4, false)
    const off = rdv.getUint32(ti * 8, false) * TWO32 + ((lo & 0xfffffe00) >>> 0)
    // alignment from the low word: above 2^53 the double has lost those bits
    return (lo & 0xfffffe00 & (cs - 1)) !== 0 ? -1 : off
  }
  /** the on-disk refcount: from the comparison where it ran (equal to the IMRT unless a mismatch was seen) */
  const onDiskSync = (c: number): number | undefined | null => {
    const off = blockFor(c)
    if (off === 0) return 0
    if (off < 0) return undefined
    if (c < nb) {
      if (noMismatch) return imrt.get(c)
      const m = onDiskMap.get(c)
      return m !== undefined ? m : imrt.get(c)
    }
    return null // past the compared range: read the block
  }
  const onDisk = async (c: number): Promise<number | undefined> => {
    const v = onDiskSync(c)
    if (v !== null) return v
    const off = blockFor(c)
    if (!cachedBlock || cachedBlock.off !== off) cachedBlock = { off, data: await st.dev.read(off, cs, 'refblock') }
    return getRefcountEntry(cachedBlock.data, c % perBlock, h.refcountOrder)
  }
  if (h.l1Size === 0) return out
  // the L2 pass is needed only if some active entry may disagree with its refcount: an entry with COPIED
  // set on a cluster of the file may only where the cluster was counted twice or more (imrt.shared) or its
  // on-disk refcount differs from the count (a mismatch); the other entries are listed in copiedOdd
  let needL2Pass = st.copiedFullPass || byCluster.size > 0 || cmp.mismatches.length > 0 || imrt.shared
  for (let n = 0; !needL2Pass && n < st.copiedOdd.length; n++) {
    const k = st.copiedOdd[n]!
    if (!Number.isInteger(k) || k >= nb || onDiskMap.size > 0) needL2Pass = true
    else {
      const r = onDiskSync(k)
      if (r === undefined) continue
      // listed entries are mostly COPIED-clear ones: wrong only when the refcount is 1
      if (r === null || r === 1) needL2Pass = true
    }
  }
  const l1 = await st.dev.read(h.l1TableOffset, h.l1Size * 8, 'l1')
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  const es = st.entrySize
  for (let i = 0; i < h.l1Size; i++) {
    const hi = dv.getUint32(i * 8, false)
    const lo = dv.getUint32(i * 8 + 4, false)
    const l2Offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
    if (l2Offset === 0) continue
    // the refcount from memory where the comparison knows it (no promise per L1 entry), else read
    let rc = onDiskSync(Math.floor(l2Offset / cs))
    if (rc === null) rc = await onDisk(Math.floor(l2Offset / cs))
    if (rc !== undefined && (rc === 1) !== ((hi & 0x80000000) !== 0)) {
      const l1Ref: EntryRef = { tableOffset: h.l1TableOffset, index: i, active: true, l1Index: i, entrySize: 8 }
      out.push({ where: 'l1', ref: l1Ref, refcount: rc, set: rc === 1 })
      st.finding(
        'corruption',
        {
          kind: 'copied-l1',
          structure: 'l1',
          l1Index: i,
          hostOffset: l2Offset,
          cluster: Math.floor(l2Offset / cs),
          message: `qcow2: active L1 entry ${i}: COPIED is ${rc === 1 ? 'clear' : 'set'} but the L2 table at ${hex(l2Offset)} has refcount ${rc}`,
        },
        `ERROR OFLAG_COPIED L2 cluster: l1_index=${i} l1_entry=${entryHex(hi, lo).slice(2)} refcount=${rc}`,
      )
    }
    let t: Uint8Array = new Uint8Array(0)
    if (needL2Pass)
      try {
        t = await st.dev.read(l2Offset, cs, 'l2')
      } catch (e) {
        st.report.checkErrors++
        st.diagnostics.push(`ERROR: Could not read L2 table: ${(e as Error).message}`)
        throw new CheckFailedError('EIO', `qcow2: ${st.file}: cannot read L2 table at ${hex(l2Offset)}`, st.diagnostics)
      }
    if (!needL2Pass) continue
    const tv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < st.l2Count; j++) {
      const ehi = tv.getUint32(j * es, false)
      const elo = tv.getUint32(j * es + 4, false)
      if (ehi & 0x40000000) continue
      const off = (ehi & 0x00ffffff) * TWO32 + ((elo & 0xfffffe00) >>> 0)
      const copiedFlag = (ehi & 0x80000000) !== 0
      if (off === 0 && !(st.dataFile && copiedFlag)) continue
      const cl = Math.floor(off / cs)
      if (!st.dataFile && copiedFlag && off % cs === 0 && cl < nb && noMismatch && imrt.get(cl) === 1 && blockFor(cl) > 0) continue // the common case
      // an external data file's offsets are not this file's clusters: they name no finding here
      const mf = byCluster.size && !st.dataFile ? byCluster.get(cl) : undefined
      if (mf && !mf.guestRanges) {
        mf.l1Index = i
        mf.l2Index = j
        mf.guestRanges = [{ offset: (i * st.l2Count + j) * cs, length: cs }]
        mf.message += ` (data of guest ${hex((i * st.l2Count + j) * cs)}, L1 index ${i}, L2 index ${j})`
      }
      let r: number | undefined | null = st.dataFile ? 1 : onDiskSync(cl)
      if (r === null) r = await onDisk(cl)
      if (r === undefined) continue
      if ((r === 1) !== copiedFlag) {
        const ref: EntryRef = { tableOffset: l2Offset, index: j, active: true, l1Index: i, entrySize: es }
        out.push({ where: 'l2', ref, refcount: r, set: r === 1 })
        st.finding(
          'corruption',
          st.entryFinding('copied-l2', ref, off, `COPIED is ${r === 1 ? 'clear' : 'set'} but the data cluster at ${hex(off)} has refcount ${r}`),
          `ERROR OFLAG_COPIED data cluster: l2_entry=${entryHex(ehi, elo).slice(2)} refcount=${r}`,
        )
      }
    }
  }
  return out
}
