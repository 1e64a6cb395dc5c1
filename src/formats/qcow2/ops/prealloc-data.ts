/**
 * preallocation=falloc|full at create time, laid out as qemu-img 7.2 lays it
 * out (qcow2_co_truncate's FALLOC/FULL branch, without an external data file):
 *
 * 1. new self-covering refcount structures at the end of the file
 *    (qcow2_refcount_area, exact size): refcount blocks for every reftable
 *    index from the one covering the end of the file up to what the whole
 *    image needs, then a new refcount table after them; the old table is freed;
 * 2. the data clusters right after the new table, all at once, and the file
 *    grown over them by fallocate (falloc) or by writing zeros (full); the
 *    metadata is written, never the data area, for falloc;
 * 3. the L2 tables, first fit one cluster at a time in guest order: the first
 *    goes where the old refcount table was, the rest after the data area;
 *    every entry points at its data cluster with COPIED set (extended L2: the
 *    subcluster bitmap stays 0, as QEMU leaves it for preallocation).
 *
 * The header is written by the caller, last.
 */
import type { BlockDevice } from '../../../io/block-device.js'
import { allocate, writeZeros } from '../../../io/prealloc.js'
import { putU64be } from '../../../util/bytes.js'
import { encodeL1 } from '../spec/entries.js'
import type { Qcow2Header } from '../spec/header.js'
import type { RefcountWriter } from '../write/refcount-writer.js'
import { getRefcountEntry, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import { decodeReftableEntry } from '../read/refcount.js'
import { refcountMetadataSize } from './refcount-size.js'

export { refcountMetadataSize }

/**
 * Lay out the whole virtual size as preallocated data clusters in the image
 * file. `rc` holds the state after the L1 table was allocated; it is persisted
 * here and not used afterwards (its table is replaced). Fills `l1`, updates the
 * header's refcount table fields, and returns the file's end.
 */
export async function preallocateData(
  device: BlockDevice,
  h: Qcow2Header,
  extendedL2: boolean,
  mode: 'falloc' | 'full',
  rc: RefcountWriter,
  l1: Uint8Array,
): Promise<number> {
  const cs = h.clusterSize
  const order = h.refcountOrder
  const perBlock = refcountsPerBlock(cs, order)
  const es = extendedL2 ? 16 : 8
  const perL2 = cs / es
  const dataClusters = Math.ceil(h.size / cs)
  const l2Count = Math.ceil(dataClusters / perL2)

  await rc.persist()
  // the end of the file: qcow2_get_last_cluster (nothing is freed at create time, so the first free cluster)
  let start = 0
  while ((await rc.get(start)) !== 0) start++

  // 1. qcow2_refcount_area(start, data + L2 tables + 1, exact)
  const { blocks: total } = refcountMetadataSize(start + dataClusters + l2Count + 1, cs, order, false)
  const areaIndex = Math.floor(start / perBlock)
  const tableSize = Math.ceil(total / (cs / 8)) * (cs / 8)
  const tableClusters = (tableSize * 8) / cs
  const oldTable = await device.read(h.refcountTableOffset, h.refcountTableClusters * cs, 'reftable')
  const oldDv = new DataView(oldTable.buffer, oldTable.byteOffset, oldTable.byteLength)
  const entries: number[] = new Array<number>(tableSize).fill(0)
  for (let i = 0; i < Math.min(tableSize, oldTable.byteLength / 8); i++) entries[i] = decodeReftableEntry(oldDv, i * 8).offset
  let newBlocks = 0
  for (let i = areaIndex; i < total; i++) if (entries[i] === 0) newBlocks++
  const tableStart = start + newBlocks
  const areaEnd = tableStart + tableClusters

  const blocks = new Map<number, Uint8Array>()
  let next = start
  for (let i = areaIndex; i < total; i++) {
    if (entries[i] === 0) {
      entries[i] = next++ * cs
      blocks.set(i, new Uint8Array(cs))
    } else {
      blocks.set(i, await device.read(entries[i]!, cs, 'refblock'))
    }
  }
  const block = async (c: number): Promise<Uint8Array> => {
    const i = Math.floor(c / perBlock)
    let b = blocks.get(i)
    if (!b) {
      b = await device.read(entries[i]!, cs, 'refblock')
      blocks.set(i, b)
    }
    return b
  }
  const setRange = async (first: number, n: number, v: number): Promise<void> => {
    for (let c = first; c < first + n;) {
      const b = await block(c)
      const stop = Math.min(first + n, (Math.floor(c / perBlock) + 1) * perBlock)
      for (; c < stop; c++) setRefcountEntry(b, c % perBlock, order, v)
    }
  }
  await setRange(start, areaEnd - start, 1)
  const oldTableCluster = h.refcountTableOffset / cs
  const oldTableClusters = h.refcountTableClusters
  await setRange(oldTableCluster, oldTableClusters, 0) // the old table is freed

  // 2. the data area
  const dataStart = areaEnd
  const dataEnd = dataStart + dataClusters
  await setRange(dataStart, dataClusters, 1)

  // 3. L2 tables, first fit: the old table's clusters, then after the data
  const free: number[] = []
  for (let c = oldTableCluster; c < oldTableCluster + oldTableClusters; c++) {
    if (getRefcountEntry(await block(c), c % perBlock, order) === 0) free.push(c)
  }
  let top = dataEnd
  const l2At: number[] = []
  for (let i = 0; i < l2Count; i++) l2At.push(free.length > 0 ? free.shift()! : top++)
  for (const c of l2At) await setRange(c, 1, 1)

  // the refcount structures, then the table, as qcow2_refcount_area writes them
  for (const i of [...blocks.keys()].sort((a, b) => a - b)) await device.write(entries[i]!, blocks.get(i)!, 'refblock')
  const table = new Uint8Array(tableSize * 8)
  for (let i = 0; i < tableSize; i++) if (entries[i]) putU64be(table, i * 8, entries[i]!)
  await device.write(tableStart * cs, table, 'reftable')
  h.refcountTableOffset = tableStart * cs
  h.refcountTableClusters = tableClusters

  // the data area: fallocate (falloc) or zeros (full) over the new range, as file-posix grows the file
  if (device.size < dataStart * cs) await device.truncate(dataStart * cs)
  if (mode === 'falloc') {
    await allocate(device, dataStart * cs, dataClusters * cs)
  } else {
    await device.truncate(dataEnd * cs)
    await writeZeros(device, dataStart * cs, dataClusters * cs)
  }

  for (let i = 0; i < l2Count; i++) {
    const n = Math.min(perL2, dataClusters - i * perL2)
    const t = new Uint8Array(cs)
    const dv = new DataView(t.buffer)
    for (let j = 0; j < n; j++) {
      const off = (dataStart + i * perL2 + j) * cs
      // normal entry with COPIED: bit 63 | offset (no BigInt in this hot loop)
      dv.setUint32(j * es, (0x80000000 | Math.floor(off / 0x1_0000_0000)) >>> 0, false)
      dv.setUint32(j * es + 4, off >>> 0, false)
    }
    await device.write(l2At[i]! * cs, t, 'l2')
    putU64be(l1, i * 8, encodeL1({ l2Offset: l2At[i]! * cs, copied: true }))
  }
  return top * cs
}
