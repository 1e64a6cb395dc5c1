/**
 * Dirty bit and lazy refcounts. With lazy_refcounts the writer keeps
 * refcount changes in memory and sets the dirty bit (flushed) before the first
 * write that depends on them; a clean close writes them and clears the bit.
 * Opening a dirty image read-write rebuilds the refcounts from the metadata
 * first, as QEMU does (qcow2_check with fix, on open).
 *
 * The rebuild writes a fresh refcount table and fresh blocks past the end of
 * everything in use (blocks that describe themselves and the table), flushes,
 * and only then points the header at the new table: a crash in between leaves
 * the old (dirty) structures in charge and the next open rebuilds again.
 */
import { CorruptImageError, ImgtoolError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { putU32be, putU64be } from '../../../util/bytes.js'
import { AUTOCLEAR_KNOWN, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES } from '../spec/constants.js'
import { decodeL1, decodeL2, setCopiedFlag } from '../spec/entries.js'
import { readBitmapDirectory } from '../spec/bitmap-directory.js'
import { bitmapsValid, hasDataFile, l2EntrySize, type Qcow2Header } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import { maxRefcount, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import { snapshotTableBytes } from '../spec/snapshot-table.js'

export type WalkKind = 'header' | 'l1' | 'l2' | 'data' | 'compressed' | 'snapshot' | 'snapshot-l1' | 'bitmap'

/** Write the dirty bit (incompatible feature bit 0) as one 8-byte write in the first sector. */
export async function markDirtyBit(dev: BlockDevice, header: Qcow2Header, on: boolean): Promise<void> {
  if (header.version < 3) return
  const next = on ? header.incompatibleFeatures | BigInt(INCOMPAT_DIRTY) : header.incompatibleFeatures & ~BigInt(INCOMPAT_DIRTY)
  const b = new Uint8Array(8)
  putU64be(b, 0, next)
  await dev.write(72, b, 'header')
  header.incompatibleFeatures = next
}

/**
 * The qcow2 spec: a program may write to an image with autoclear feature bits
 * it does not know only after clearing them. QEMU clears them when it opens an
 * image read/write (qemu-img check -r, snapshot -c, resize...), before anything
 * else is written; so does imgtool. One 8-byte write in the first sector, flushed.
 * Returns whether anything was cleared.
 */
export async function clearUnknownAutoclear(dev: BlockDevice, header: Qcow2Header): Promise<boolean> {
  if (header.version < 3) return false
  const known = BigInt(AUTOCLEAR_KNOWN)
  if ((header.autoclearFeatures & ~known) === 0n) return false
  const next = header.autoclearFeatures & known
  const b = new Uint8Array(8)
  putU64be(b, 0, next)
  await dev.write(88, b, 'header')
  await dev.flush()
  header.autoclearFeatures = next
  return true
}

/**
 * Every host range the metadata references, once per reference (what
 * refcounts must count), except the refcount structures themselves.
 */
export async function walkMetadata(
  state: Qcow2State,
  visit: (offset: number, length: number, kind: WalkKind) => void,
  options: { data: boolean },
): Promise<void> {
  const header = state.header
  const dev = state.device
  const clusterSize = header.clusterSize
  const es = l2EntrySize(header)
  const ctx = state.decodeContext
  const dataFile = hasDataFile(header)
  visit(0, clusterSize, 'header')
  const walkL1 = async (l1: Uint8Array, l1Kind: 'l1' | 'snapshot-l1', l1Offset: number, l1Size: number) => {
    visit(l1Offset, l1Size * 8, l1Kind)
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
    for (let i = 0; i < l1Size; i++) {
      const e = decodeL1(dv, i * 8)
      if (e.l2Offset === 0) continue
      visit(e.l2Offset, clusterSize, 'l2')
      if (!options.data) continue
      const t = l1Kind === 'l1' ? await state.loadL2(i, e.l2Offset) : await dev.read(e.l2Offset, clusterSize, 'l2')
      const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
      for (let j = 0; j < clusterSize / es; j++) {
        const le = decodeL2(tdv, j * es, ctx)
        if (le.type === 'compressed') {
          visit(le.hostOffset - (le.hostOffset % 512), le.sectors * 512, 'compressed')
        } else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0 && !dataFile) {
          visit(le.hostOffset, clusterSize, 'data')
        }
      }
    }
  }
  if (header.l1Size > 0) await walkL1(state.l1, 'l1', header.l1TableOffset, header.l1Size)
  // persistent bitmaps: directory, tables and data clusters (as qemu-img check counts them)
  if (header.bitmaps && bitmapsValid(header) && header.bitmaps.nbBitmaps > 0) {
    visit(header.bitmaps.directoryOffset, header.bitmaps.directorySize, 'bitmap')
    for (const bm of await readBitmapDirectory(dev, state.filename, header.bitmaps)) {
      if (bm.tableSize === 0) continue
      visit(bm.tableOffset, bm.tableSize * 8, 'bitmap')
      if (!options.data) continue
      const t = await dev.read(bm.tableOffset, bm.tableSize * 8, 'bitmap')
      const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
      for (let i = 0; i < bm.tableSize; i++) {
        const off = Number(tdv.getBigUint64(i * 8) & 0x00fffffffffffe00n)
        if (off !== 0) visit(off, clusterSize, 'bitmap')
      }
    }
  }
  if (header.nbSnapshots > 0) {
    const snaps = state.snapshots
    visit(header.snapshotsOffset, snapshotTableBytes(snaps, header.snapshotsOffset), 'snapshot')
    for (const s of snaps) {
      if (s.l1Size === 0) continue
      const l1 = await dev.read(s.l1TableOffset, s.l1Size * 8, 'l1')
      await walkL1(l1, 'snapshot-l1', s.l1TableOffset, s.l1Size)
    }
  }
}

/**
 * Make COPIED (bit 63) in the active L1 and L2 tables say "refcount is 1",
 * as qemu-img check -r all does. Writes only the entries that change.
 */
export async function fixCopiedFlags(state: Qcow2State, refcountOf: (cluster: number) => number): Promise<number> {
  const header = state.header
  const dev = state.device
  const clusterSize = header.clusterSize
  const es = l2EntrySize(header)
  const ctx = state.decodeContext
  const dataFile = hasDataFile(header)
  let fixed = 0
  for (let i = 0; i < header.l1Size; i++) {
    const e = state.l1Entry(i)
    if (e.l2Offset === 0) continue
    const t = (await state.loadL2(i, e.l2Offset)).slice()
    const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    let changed = false
    for (let j = 0; j < clusterSize / es; j++) {
      const le = decodeL2(tdv, j * es, ctx)
      if (!((le.type === 'normal' || le.type === 'zero') && (le.hostOffset !== 0 || (dataFile && le.type === 'normal')))) continue
      const want = dataFile || refcountOf(Math.floor(le.hostOffset / clusterSize)) === 1
      if (want !== le.copied) {
        setCopiedFlag(tdv, j * es, want)
        changed = true
        fixed++
      }
    }
    if (changed) {
      await dev.write(e.l2Offset, t, 'l2')
      state.cacheL2(e.l2Offset, t)
    }
    const want = refcountOf(Math.floor(e.l2Offset / clusterSize)) === 1
    if (want !== e.copied) {
      const entry = state.l1.slice(i * 8, i * 8 + 8)
      setCopiedFlag(new DataView(entry.buffer), 0, want)
      state.setL1Entry(i, entry)
      await dev.write(header.l1TableOffset + i * 8, entry, 'l1')
      fixed++
    }
  }
  return fixed
}

/** Recompute every refcount from the metadata and install fresh refcount structures. */
export async function rebuildRefcounts(state: Qcow2State): Promise<{ clusters: number }> {
  const header = state.header
  const dev = state.device
  const clusterSize = header.clusterSize
  const pb = refcountsPerBlock(clusterSize, header.refcountOrder)
  const counts = new Map<number, number>()
  let maxUsed = 0
  await walkMetadata(
    state,
    (offset, length) => {
      if (length <= 0) return
      const first = Math.floor(offset / clusterSize)
      const last = Math.floor((offset + length - 1) / clusterSize)
      for (let c = first; c <= last; c++) {
        counts.set(c, (counts.get(c) ?? 0) + 1)
        maxUsed = Math.max(maxUsed, c + 1)
      }
    },
    { data: true },
  )
  const top = Math.max(Math.ceil(dev.size / clusterSize), maxUsed)
  const usedTis = new Set<number>()
  for (const c of counts.keys()) usedTis.add(Math.floor(c / pb))
  let tableClusters = 1
  let blockTis: number[] = []
  for (let iter = 0; iter < 64; iter++) {
    const end = top + tableClusters + blockTis.length
    const tis = new Set(usedTis)
    for (let ti = Math.floor(top / pb); ti <= Math.floor((end - 1) / pb); ti++) tis.add(ti)
    const sorted = [...tis].sort((a, b) => a - b)
    const t = Math.max(1, Math.ceil((((sorted[sorted.length - 1] ?? 0) + 1) * 8) / clusterSize))
    if (t === tableClusters && sorted.length === blockTis.length) break
    tableClusters = t
    blockTis = sorted
  }
  if (tableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw new ImgtoolError('NO_SPACE', `qcow2: ${state.filename}: rebuilt refcount table would exceed 8 MiB`)
  }
  const tableOffset = top * clusterSize
  const table = new Uint8Array(tableClusters * clusterSize)
  const blocks = new Map<number, Uint8Array>()
  blockTis.forEach((ti, i) => {
    const off = (top + tableClusters + i) * clusterSize
    putU64be(table, ti * 8, off)
    blocks.set(ti, new Uint8Array(clusterSize))
  })
  for (let c = top; c < top + tableClusters + blockTis.length; c++) counts.set(c, (counts.get(c) ?? 0) + 1)
  const max = maxRefcount(header.refcountOrder)
  for (const [c, n] of counts) {
    if (n > max) {
      throw new CorruptImageError(`qcow2: ${state.filename}: cluster ${hex(c * clusterSize)} has ${n} references, more than refcount_bits allows`)
    }
    setRefcountEntry(blocks.get(Math.floor(c / pb))!, c % pb, header.refcountOrder, n)
  }
  let i = 0
  for (const ti of blockTis) {
    await dev.write((top + tableClusters + i) * clusterSize, blocks.get(ti)!, 'refblock')
    i++
  }
  await dev.write(tableOffset, table, 'reftable')
  await fixCopiedFlags(state, (c) => counts.get(c) ?? 0)
  await dev.flush()
  const hdr = new Uint8Array(12)
  putU64be(hdr, 0, tableOffset)
  putU32be(hdr, 8, tableClusters)
  await dev.write(48, hdr, 'header')
  await dev.flush()
  header.refcountTableOffset = tableOffset
  header.refcountTableClusters = tableClusters
  await markDirtyBit(dev, header, false)
  await dev.flush()
  state.refcounts.invalidate()
  return { clusters: counts.size }
}
