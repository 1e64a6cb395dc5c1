/**
 * resize --preallocation=metadata|falloc|full: the new range [old size, new size)
 * mapped as qemu 7.2's qcow2_co_truncate maps it.
 *
 * - metadata (preallocate_co): guest order, one L2 slice at a time; an L2 table
 *   is allocated (first fit) before the data clusters it maps, the data clusters
 *   first fit and contiguous per slice; nothing is written into them; the file
 *   is extended to the end of the last one.
 * - falloc/full (no data file): a new self-covering refcount area at the end of
 *   the file (qcow2_refcount_area: refcount blocks, then a new table, switched in
 *   the header; the old table freed), the data clusters right after it, the file
 *   grown over them by fallocate or zeros; then the L2 tables first fit.
 * - with an external data file, every mode maps the guest range 1:1 into the
 *   data file (preallocate_co) and grows the data file with the mode (metadata
 *   grows it plainly).
 *
 * The crash law: refcounts and data durable before any L2 table that maps
 * them; new L2 tables durable before the L1 entries that link them; the
 * caller writes the header size last. A failure before a cluster is linked
 * gives it back.
 */
import { UnsupportedFeatureError, hex } from '../../../errors.js'
import { allocate, writeZeros } from '../../../io/prealloc.js'
import { putU32be, putU64be } from '../../../util/bytes.js'
import { decodeL1, decodeL2, encodeL1 } from '../spec/entries.js'
import { hasDataFile, hasExtendedL2, l2EntrySize } from '../spec/header.js'
import { getRefcountEntry, refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { refcountMetadataSize } from './prealloc-data.js'
import { reloadWriter } from './snapshot-shadow.js'

export type GrowPreallocation = 'metadata' | 'falloc' | 'full'

interface Table {
  index: number
  /** where the table is (new tables: allocated here) */
  offset: number
  data: Uint8Array
  fresh: boolean
  /** the shared table this one copies (COW), given back once the L1 entry is durable */
  replaces?: number
  /** allocations this table links */
  links: Array<{ offset: number; length: number }>
  /** references its new entries replace, dropped once the table is linked */
  drops: Array<{ offset: number; length: number }>
}

/**
 * Map [oldSize, newSize) with preallocated clusters. The L1 table already covers
 * `newSize` (header switched, refcounts persisted). Leaves the size to the caller.
 */
export async function preallocateGrowth(
  w: Qcow2Writer,
  state: Qcow2State,
  oldSize: number,
  newSize: number,
  mode: GrowPreallocation,
  cursor: number,
): Promise<void> {
  const h = w.header
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const perL2 = cs / es
  // qemu's L2 cache slices: min(cluster, 4 KiB)
  const slice = Math.min(cs, 4096) / es
  const dataFile = hasDataFile(h)
  const ctx = { clusterBits: h.clusterBits, extendedL2: hasExtendedL2(h), dataFile }
  const dev = state.device
  const first = Math.floor(oldSize / cs)
  const end = Math.ceil(newSize / cs)
  const headBytes = oldSize % cs
  const head = headBytes > 0 ? await state.readGuest(first * cs, headBytes) : undefined

  /**
   * qemu's alloc_clusters_noref: a contiguous run from the cursor, which only moves forward (a run that
   * does not fit skips the holes before it). When counting the run needs a new refcount block, the
   * writer's own allocator places it instead (qemu's alloc_refcount_block placement is not modelled).
   */
  const allocRun = async (n: number): Promise<number> => {
    const rc = w.refcounts
    const pb = rc.perBlock
    for (;;) {
      let start = cursor
      for (let i = 0; i < n;) {
        const c = cursor++
        if ((await rc.get(c)) !== 0) {
          start = cursor
          i = 0
        } else i++
      }
      let missing = -1
      for (let c = start; c < start + n; c = (Math.floor(c / pb) + 1) * pb) {
        if (rc.blockOffset(Math.floor(c / pb)) === 0) {
          missing = c
          break
        }
      }
      if (missing < 0) {
        await rc.update(start * cs, n * cs, 1)
        return start * cs
      }
      // alloc_refcount_block: the new block at the cursor's next free cluster, then the search restarts
      const ti = Math.floor(missing / pb)
      let b = cursor
      while ((await rc.get(b)) !== 0) b++
      if (ti >= rc.tableEntries || Math.floor(b / pb) !== ti) {
        // a table growth or a block described elsewhere: the writer's own placement
        const at = await w.allocClusters(n)
        cursor = Math.max(cursor, at / cs + n)
        return at
      }
      // (the table links it at once: it stays if the resize fails)
      await rc.createBlockAt(ti, b)
      // qemu-img 7.2 keeps the run where it was found (the block lands after it)
      cursor = start
    }
  }

  const l1 = new Uint8Array(h.l1Size * 8)
  l1.set(state.l1.subarray(0, Math.min(state.l1.byteLength, l1.byteLength)))
  const l1dv = new DataView(l1.buffer)
  const unlinked: Array<{ offset: number; length: number }> = []
  let headAt: { host: number } | undefined

  const tables: Table[] = []
  let lastEnd = 0
  let lastAllocated = false
  let dataStart = -1
  try {
    // falloc/full in the image file: the refcount area, then the data clusters after it
    if (mode !== 'metadata' && !dataFile) {
      const n = end - first
      dataStart = await refcountArea(w, state, n + Math.ceil(n / perL2) + 1)
      await w.refcounts.update(dataStart * cs, n * cs, 1)
      unlinked.push({ offset: dataStart * cs, length: n * cs })
      await w.refcounts.persist()
      await w.flushNow()
      const from = dataStart * cs
      const to = (dataStart + n) * cs
      if (dev.size < from) await dev.truncate(from)
      if (mode === 'falloc') await allocate(dev, Math.max(from, dev.size), to - Math.max(from, dev.size))
      else {
        const grow = Math.max(from, dev.size)
        await dev.truncate(Math.max(to, dev.size))
        await writeZeros(dev, grow, to - grow)
      }
    }

    for (let ti = Math.floor(first / perL2); ti * perL2 < end; ti++) {
      const e = decodeL1(l1dv, ti * 8)
      let t: Table
      if (e.l2Offset === 0 || !e.copied) {
        const data = e.l2Offset === 0 ? new Uint8Array(cs) : await dev.read(e.l2Offset, cs, 'l2')
        const offset = dataStart >= 0 ? await w.allocClusters(1) : await allocRun(1)
        unlinked.push({ offset, length: cs })
        t = { index: ti, offset, data, fresh: true, links: [{ offset, length: cs }], drops: [] }
        if (e.l2Offset !== 0) t.replaces = e.l2Offset
      } else {
        t = { index: ti, offset: e.l2Offset, data: await dev.read(e.l2Offset, cs, 'l2'), fresh: false, links: [], drops: [] }
      }
      tables.push(t)
      const dv = new DataView(t.data.buffer, t.data.byteOffset, t.data.byteLength)
      const lo = Math.max(first, ti * perL2)
      const hi = Math.min(end, (ti + 1) * perL2)
      for (let s = lo; s < hi;) {
        // one slice, in runs of clusters that keep their mapping or take a new one
        const sliceEnd = Math.min(hi, (Math.floor(s / slice) + 1) * slice)
        const keep = (c: number): boolean => {
          if (dataStart >= 0) return false
          const x = decodeL2(dv, (c - ti * perL2) * es, ctx)
          return x.type === 'normal' && x.copied
        }
        const k = keep(s)
        let r = s + 1
        while (r < sliceEnd && keep(r) === k) r++
        if (!k) {
          let host: number
          if (dataStart >= 0) host = (dataStart + s - first) * cs
          else if (dataFile) host = s * cs
          else {
            host = await allocRun(r - s)
            unlinked.push({ offset: host, length: (r - s) * cs })
          }
          if (!dataFile) t.links.push({ offset: host, length: (r - s) * cs })
          for (let c = s; c < r; c++) {
            const at = (c - ti * perL2) * es
            const old = decodeL2(dv, at, ctx)
            const drop = w.dropRef(old)
            if (drop && !dataFile) t.drops.push(drop)
            const off = host + (c - s) * cs
            // a normal entry with COPIED; extended L2 keeps its bitmap (qemu leaves it for preallocation)
            dv.setUint32(at, (0x80000000 | Math.floor(off / 0x1_0000_0000)) >>> 0, false)
            dv.setUint32(at + 4, off >>> 0, false)
            if (c === first && head) headAt = { host: off }
          }
        }
        if (r === end) {
          lastEnd = host0(dv, (r - 1 - ti * perL2) * es)
          lastAllocated = !k
        }
        s = r
      }
    }
    // the end of the last cluster's guest bytes in the file, as preallocate_co extends it
    lastEnd += newSize - (end - 1) * cs

    // data first: the head's bytes (qemu's copy on write), the refcounts, all durable
    const target = dataFile ? state.dataDevice : dev
    if (head && headAt) await target.write(headAt.host, head, 'data')
    // qemu's copy on write of the last (sub)cluster's tail past the new size: zeros written there
    const sub = ctx.extendedL2 ? cs / 32 : cs
    const tail = newSize % sub
    if ((mode === 'metadata' || dataFile) && tail !== 0 && lastAllocated) {
      await target.write(lastEnd, new Uint8Array(sub - tail), 'data')
    }
    if (mode === 'metadata' || dataFile) {
      if (target.size < lastEnd) {
        if (mode === 'metadata') await target.truncate(lastEnd)
        else if (mode === 'falloc') await allocate(target, target.size, lastEnd - target.size)
        else {
          const from = target.size
          await target.truncate(lastEnd)
          await writeZeros(target, from, lastEnd - from)
        }
      }
    }
    await w.refcounts.persist()
    await w.flushNow()
    // new L2 tables, unlinked until the L1 switch
    for (const t of tables) if (t.fresh) await w.writeMetadata(t.offset, t.data, 'l2')
    await w.flushNow()
    // existing tables: each write links its clusters
    for (const t of tables) {
      if (t.fresh) continue
      await w.writeMetadata(t.offset, t.data, 'l2')
      settle(unlinked, t.links)
      // what the table no longer references goes once the write is durable
      for (const d of t.drops) w.deferFree(d.offset, d.length)
    }
    await w.flushNow()
    const fresh = tables.filter((t) => t.fresh)
    if (fresh.length > 0) {
      for (const t of fresh) putU64be(l1, t.index * 8, encodeL1({ l2Offset: t.offset, copied: true }))
      const a = fresh[0]!.index
      const b = fresh[fresh.length - 1]!.index
      await w.writeMetadata(h.l1TableOffset + a * 8, l1.slice(a * 8, (b + 1) * 8), 'l1')
      for (const t of fresh) {
        settle(unlinked, t.links)
        // the copied (shared) tables and the references the new entries replace
        if (t.replaces !== undefined) w.deferFree(t.replaces, cs)
        for (const d of t.drops) w.deferFree(d.offset, d.length)
      }
      state.l1.set(l1.subarray(0, state.l1.byteLength))
    }
    await w.flushNow()
  } catch (e) {
    // clusters nothing links are given back; what may be linked stays (a leak at most)
    for (const u of unlinked) await w.refcounts.update(u.offset, u.length, -1).catch(() => undefined)
    try {
      await w.refcounts.persist()
      await w.flushNow() // frees waiting for a durable switch (the old refcount table)
      await w.refcounts.persist()
      await w.flushNow()
    } catch {
      // a leak at most
    }
    throw e
  }
}

function host0(dv: DataView, at: number): number {
  return (dv.getUint32(at, false) & 0x00ffffff) * 0x1_0000_0000 + ((dv.getUint32(at + 4, false) & 0xfffffe00) >>> 0)
}

/** Take the linked ranges out of the list of allocations to undo. */
function settle(unlinked: Array<{ offset: number; length: number }>, links: Array<{ offset: number; length: number }>): void {
  for (const l of links) {
    const lEnd = l.offset + l.length
    for (let i = unlinked.length - 1; i >= 0; i--) {
      const u = unlinked[i]!
      const uEnd = u.offset + u.length
      if (uEnd <= l.offset || lEnd <= u.offset) continue
      const rest: Array<{ offset: number; length: number }> = []
      if (u.offset < l.offset) rest.push({ offset: u.offset, length: l.offset - u.offset })
      if (lEnd < uEnd) rest.push({ offset: lEnd, length: uEnd - lEnd })
      unlinked.splice(i, 1, ...rest)
    }
  }
}

/**
 * qcow2_refcount_area(last cluster + 1, additional, exact): refcount blocks for
 * every table index from the one covering the area up to what the file then
 * needs, a new table after them; written and flushed before the header points
 * at the table; the old table freed after. Returns the first cluster after the area.
 */
async function refcountArea(w: Qcow2Writer, state: Qcow2State, additional: number): Promise<number> {
  const h = w.header
  const cs = h.clusterSize
  const dev = state.device
  const order = h.refcountOrder
  const perBlock = refcountsPerBlock(cs, order)
  // every count on disk (the old L1 table's free included) before the blocks are read
  await w.flushNow()
  await w.refcounts.persist()
  await w.flushNow()
  // qcow2_get_last_cluster over the file's length
  let last = Math.ceil(dev.size / cs) - 1
  while (last >= 0 && (await w.refcounts.get(last)) === 0) last--
  if (last < 0) throw new UnsupportedFeatureError(`qcow2: ${state.filename}: There are no references in the refcount table.`)
  const start = last + 1
  const { blocks: total } = refcountMetadataSize(start + additional, cs, order, false)
  const areaIndex = Math.floor(start / perBlock)
  const tableSize = Math.ceil(total / (cs / 8)) * (cs / 8)
  const tableClusters = (tableSize * 8) / cs
  const oldTable = await dev.read(h.refcountTableOffset, h.refcountTableClusters * cs, 'reftable')
  const oldDv = new DataView(oldTable.buffer, oldTable.byteOffset, oldTable.byteLength)
  const entries: number[] = new Array<number>(tableSize).fill(0)
  for (let i = 0; i < Math.min(tableSize, oldTable.byteLength / 8); i++) {
    const hi = oldDv.getUint32(i * 8, false)
    const lo = oldDv.getUint32(i * 8 + 4, false)
    entries[i] = hi * 0x1_0000_0000 + ((lo & 0xfffffe00) >>> 0)
  }
  for (let i = tableSize; i < oldTable.byteLength / 8; i++) {
    if (oldDv.getUint32(i * 8, false) !== 0 || oldDv.getUint32(i * 8 + 4, false) !== 0) {
      throw new UnsupportedFeatureError(`qcow2: ${state.filename}: refcount table entry ${i} at ${hex(h.refcountTableOffset + i * 8)} lies past the new table`)
    }
  }
  let newBlocks = 0
  for (let i = areaIndex; i < total; i++) if (entries[i] === 0) newBlocks++
  const tableStart = start + newBlocks
  const areaEnd = tableStart + tableClusters
  let next = start
  const blocks: Array<{ offset: number; data: Uint8Array }> = []
  const originals = new Map<number, Uint8Array>()
  for (let i = areaIndex; i < total; i++) {
    let data: Uint8Array
    if (entries[i] === 0) {
      entries[i] = next++ * cs
      data = new Uint8Array(cs)
    } else {
      data = await dev.read(entries[i]!, cs, 'refblock')
      originals.set(entries[i]!, data.slice())
    }
    const firstCovered = i * perBlock
    if (firstCovered < areaEnd) {
      const j0 = firstCovered < start ? start - firstCovered : 0
      const j1 = Math.min(areaEnd - firstCovered, perBlock)
      for (let j = j0; j < j1; j++) {
        if (getRefcountEntry(data, j, order) !== 0) {
          throw new UnsupportedFeatureError(`qcow2: ${state.filename}: cluster ${hex((firstCovered + j) * cs)} past the last used cluster has a refcount`)
        }
        setRefcountEntry(data, j, order, 1)
      }
    }
    blocks.push({ offset: entries[i]!, data })
  }
  // blocks, then the table, durable before the header points at the table; until the header is
  // written, the blocks both tables share are put back as they were if anything fails
  const hdr = new Uint8Array(12)
  putU64be(hdr, 0, tableStart * cs)
  putU32be(hdr, 8, tableClusters)
  try {
    for (const b of blocks) await dev.write(b.offset, b.data, 'refblock')
    const table = new Uint8Array(tableSize * 8)
    for (let i = 0; i < tableSize; i++) if (entries[i]) putU64be(table, i * 8, entries[i]!)
    await dev.write(tableStart * cs, table, 'reftable')
    await w.flushNow()
    await w.writeMetadata(48, hdr, 'header')
  } catch (e) {
    try {
      for (const [off, data] of originals) await dev.write(off, data, 'refblock')
      await dev.flush()
    } catch {
      // a leak at most: the old table does not point at the new area
    }
    throw e
  }
  const oldOffset = h.refcountTableOffset
  const oldClusters = h.refcountTableClusters
  h.refcountTableOffset = tableStart * cs
  h.refcountTableClusters = tableClusters
  const oldMeta: number[] = []
  for (let i = 0; i < oldClusters; i++) oldMeta.push(oldOffset / cs + i)
  await reloadWriter(state, w, oldMeta)
  // the old table is unreferenced once the switch is durable
  w.deferFree(oldOffset, oldClusters * cs)
  await w.flushNow()
  return areaEnd
}
