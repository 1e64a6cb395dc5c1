/** The damage kinds the check/repair oracle tests sweep, and the fixtures they run on. */
import { Qcow2Bytes } from '../support/damage.js'

export interface DamageKind {
  name: string
  /** applies the damage, returns a description; undefined = not applicable to this image */
  apply(img: Qcow2Bytes): string | undefined
  /** -r all is expected to leave an image qemu-img check calls clean */
  repairable: boolean
  /** guest data may legitimately change (the damage itself destroyed it) */
  losesData?: boolean
}

const hasData = (img: Qcow2Bytes) => img.dataEntries().length > 0

/** refcount_table_clusters inflated to run to the end of the file, over whatever follows the table (D2) */
export function inflateReftable(i: Qcow2Bytes): string | undefined {
  const n = Math.min(i.clusters - i.reftableOffset / i.cs, (8 * 1024 * 1024) / i.cs)
  const old = i.reftableClusters
  if (n <= old + 1) return undefined
  i.putU32(56, n)
  return `refcount_table_clusters ${old} -> ${n}`
}

/** l1_size inflated to run to the end of the file, over whatever follows the L1 table (D3) */
export function inflateL1(i: Qcow2Bytes): string | undefined {
  const n = Math.min(Math.floor((i.clusters * i.cs - i.l1Offset) / 8), (32 * 1024 * 1024) / 8)
  const old = i.l1Size
  if (n <= old || (n * 8) / i.cs <= Math.ceil((old * 8) / i.cs)) return undefined
  i.putU32(36, n)
  return `l1_size ${old} -> ${n}`
}
const hasSnap = (img: Qcow2Bytes) => img.nbSnapshots > 0

export const DAMAGES: DamageKind[] = [
  { name: 'leak-1', repairable: true, apply: (i) => i.leak(1) },
  { name: 'leak-3', repairable: true, apply: (i) => i.leak(3) },
  {
    name: 'refcount-too-high',
    repairable: true,
    apply: (i) => {
      if (!hasData(i)) return undefined
      const c = i.firstData().cluster
      const v = i.getRefcount(c) + 1
      return v < 2 ** (2 ** i.refcountOrder) ? i.setRefcount(c, v) : undefined
    },
  },
  { name: 'refcount-zero-data', repairable: true, apply: (i) => (hasData(i) ? i.setRefcount(i.firstData().cluster, 0) : undefined) },
  { name: 'refcount-zero-l2', repairable: true, apply: (i) => (i.l2Tables().length ? i.setRefcount(i.l2Tables()[0]!.offset / i.cs, 0) : undefined) },
  {
    name: 'refcount-too-low-shared',
    repairable: true,
    apply: (i) => {
      if (!hasSnap(i)) return undefined
      const shared = i.dataEntries().find((e) => i.getRefcount(e.cluster) >= 2)
      return shared ? i.setRefcount(shared.cluster, 1) : undefined
    },
  },
  { name: 'copied-l2-cleared', repairable: true, apply: (i) => (hasData(i) && !hasSnap(i) ? i.clearCopiedL2() : undefined) },
  { name: 'copied-l1-cleared', repairable: true, apply: (i) => (i.l2Tables().length && !hasSnap(i) ? i.clearCopiedL1() : undefined) },
  { name: 'data-past-eof', repairable: true, losesData: true, apply: (i) => (hasData(i) ? i.dataPastEof() : undefined) },
  { name: 'data-into-reftable', repairable: true, losesData: true, apply: (i) => (hasData(i) ? i.dataIntoReftable() : undefined) },
  { name: 'reftable-clusters-inflated', repairable: true, apply: (i) => (hasData(i) ? inflateReftable(i) : undefined) },
  { name: 'l1-size-inflated', repairable: true, apply: (i) => (hasData(i) ? inflateL1(i) : undefined) },
  // with 512-byte clusters every offset an entry can hold is aligned
  { name: 'data-misaligned', repairable: false, apply: (i) => (hasData(i) && i.cs > 512 ? i.misalignData() : undefined) },
  { name: 'l2-table-misaligned', repairable: false, apply: (i) => (i.l2Tables().length && i.cs > 512 ? i.misalignL2Table() : undefined) },
  { name: 'l1-reserved-bits', repairable: false, apply: (i) => (i.l2Tables().length ? i.l1ReservedBits() : undefined) },
  { name: 'l2-reserved-bits', repairable: false, apply: (i) => (hasData(i) ? i.l2ReservedBits() : undefined) },
  { name: 'reftable-reserved-bits', repairable: true, apply: (i) => i.breakReftableEntry('reserved') },
  { name: 'reftable-unaligned', repairable: true, apply: (i) => i.breakReftableEntry('unaligned') },
  { name: 'reftable-outside', repairable: true, apply: (i) => i.breakReftableEntry('outside') },
  { name: 'reftable-entry-zero', repairable: true, apply: (i) => i.breakReftableEntry('zero') },
  { name: 'dirty-bit', repairable: true, apply: (i) => (i.version === 3 ? i.setDirty() : undefined) },
  { name: 'corrupt-bit', repairable: true, apply: (i) => (i.version === 3 ? i.setCorrupt() : undefined) },
  {
    name: 'dirty-lazy-zero-refcounts',
    repairable: true,
    apply: (i) => {
      if (i.version !== 3 || !hasData(i)) return undefined
      i.setDirty()
      i.setLazyRefcounts()
      for (const e of i.dataEntries().slice(0, 3)) i.setRefcount(e.cluster, 0)
      return 'dirty + lazy refcounts, 3 data clusters with refcount 0'
    },
  },
  { name: 'snapshot-extra-too-big', repairable: true, apply: (i) => (hasSnap(i) ? i.snapshotExtraTooBig() : undefined) },
  { name: 'snapshot-l1-unaligned', repairable: false, apply: (i) => (hasSnap(i) ? i.snapshotL1Unaligned() : undefined) },
  { name: 'snapshot-incomplete', repairable: true, apply: (i) => (hasSnap(i) && i.version === 3 ? i.snapshotIncomplete() : undefined) },
  { name: 'snapshot-too-many', repairable: true, apply: (i) => (hasSnap(i) ? i.snapshotTooMany() : undefined) },
  { name: 'snapshot-table-unaligned', repairable: false, apply: (i) => i.snapshotTableUnaligned() },
]

/** fixtures with no external files (backing, data file) */
export const DAMAGE_FIXTURES = [
  'v2-c64k',
  'v3-c64k',
  'v3-c512',
  'v2-c4k',
  'v3-rc1',
  'v3-rc2',
  'v3-rc8',
  'v3-rc32',
  'v3-rc64',
  'v3-snapshot',
  'v2-snapshot',
  'v3-compressed-zlib',
  'v3-extl2-c64k',
  'v3-zero',
  'v3-prealloc-metadata',
  'v3-bitmap',
]
