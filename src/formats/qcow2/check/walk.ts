/**
 * qcow2 check, the walk (qemu's check_refcounts_l1 / check_refcounts_l2 and
 * the bitmap part of check_refcounts): every L1 and L2 entry and every bitmap
 * table entry, counted into the in-memory refcount array, with findings for
 * entries that are malformed. Streams one L2 table at a time through the
 * read-ahead.
 */
import { hex } from '../../../errors.js'
import { BME_FLAG_IN_USE, readBitmapDirectory, validateBitmapDirectory } from '../spec/bitmap-directory.js'
import { bitmapsValid } from '../spec/header.js'
import { Prefetcher } from './prefetch.js'
import { CheckFailedError, TWO32, entryHex, type CheckState, type EntryRef, type WalkStats } from './state.js'

/** QEMU's BDRV_MAX_LENGTH: no read may end past it */
const BLOCK_LAYER_MAX_LENGTH = 0x7fffffffc0000000n

/** check_refcounts_l1 */
export async function walkL1(
  st: CheckState,
  l1Offset: number,
  l1Size: number,
  active: boolean,
  stats: WalkStats | undefined,
  exactOffset?: bigint,
): Promise<void> {
  if (l1Size === 0) return
  st.inc(
    l1Offset,
    l1Size * 8,
    active ? 'active L1 table' : 'snapshot L1 table',
    undefined,
    exactOffset === undefined ? undefined : `0x${exactOffset.toString(16)}`,
  )
  // a table that ends past the block layer's limit (2^63 - 2^30) cannot be read at all: qemu's read fails
  // with EIO and the whole check fails (exit 1), after the reference count above
  const end = (exactOffset ?? BigInt(l1Offset)) + BigInt(l1Size * 8)
  if (end > BLOCK_LAYER_MAX_LENGTH) {
    st.report.checkErrors++
    st.diagnostics.push('ERROR: I/O error in check_refcounts_l1')
    throw new CheckFailedError(
      'EIO',
      `qcow2: ${st.file}: ${active ? 'active' : 'snapshot'} L1 table at 0x${(exactOffset ?? BigInt(l1Offset)).toString(16)} cannot be read: it ends past the largest offset a file can have`,
      st.diagnostics,
    )
  }
  // entries past the end of the file read as zeros: only the part inside the file is read (a declared
  // 4 Mi-entry table on a small image costs what the file holds, not 32 MiB)
  const inFile = Math.min(l1Size, Math.max(0, Math.ceil((st.fileSize - l1Offset) / 8)))
  if (inFile === 0) return
  l1Size = inFile
  const l1 = await st.readTable(l1Offset, l1Size * 8, 'l1', 'check_refcounts_l1')
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  // qemu walks every non-zero entry, offset 0 too (it then reads the header
  // cluster as an L2 table); a table wholly past the end of the file reads as
  // zeros and counts nothing, so it is not read at all
  let count = 0
  const tables = new Float64Array(l1Size)
  for (let i = 0; i < l1Size; i++) {
    if (dv.getUint32(i * 8, false) === 0 && dv.getUint32(i * 8 + 4, false) === 0) continue
    const off = (dv.getUint32(i * 8, false) & 0x00ffffff) * TWO32 + ((dv.getUint32(i * 8 + 4, false) & 0xfffffe00) >>> 0)
    if (off < st.fileSize) tables[count++] = off
  }
  const prefetch = new Prefetcher(st.dev, tables.subarray(0, count), st.clusterSize, 'l2')
  for (let i = 0; i < l1Size; i++) {
    const hi = dv.getUint32(i * 8, false)
    const lo = dv.getUint32(i * 8 + 4, false)
    if (hi === 0 && lo === 0) continue
    const l2Offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
    // the entry's reference is made only where something may name it (no table, or one past the end of the
    // file): an object per L1 entry was most of the walk's allocations on a large image
    const ref: EntryRef | undefined =
      l2Offset === 0 || l2Offset + st.clusterSize - st.fileSize >= st.clusterSize
        ? { tableOffset: l1Offset, index: i, active, l1Index: i, entrySize: 8 }
        : undefined
    // non-zero but no L2 table: a guest read sees unallocated clusters; qemu's check counts the header again
    if (l2Offset === 0) st.l1ZeroOffset.push(ref!)
    if ((lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            {
              kind: 'l1-reserved-bits',
              structure: 'l1',
              l1Index: i,
              hostOffset: l1Offset + i * 8,
              message: `qcow2: ${active ? 'active' : 'snapshot'} L1 entry ${i} (${entryHex(hi, lo)}) has reserved bits set`,
            },
            `ERROR found L1 entry with reserved bits set: ${entryHex(hi, lo).slice(2)}`,
          )
    }
    if (!st.inc(l2Offset, st.clusterSize, 'L2 table', ref)) st.addPastEof({ ref: ref!, kind: 'l2-table', hostOffset: l2Offset })
    if (l2Offset % st.clusterSize !== 0) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            {
              kind: 'l2-table-unaligned',
              structure: 'l1',
              l1Index: i,
              hostOffset: l2Offset,
              message: `qcow2: L2 table offset ${hex(l2Offset)} is not aligned to cluster size ${hex(st.clusterSize)} (${active ? 'active' : 'snapshot'} L1 index ${i})`,
            },
            `ERROR l2_offset=${l2Offset.toString(16)}: Table is not cluster aligned; L1 entry corrupted`,
          )
    }
    if (l2Offset % st.clusterSize !== 0) st.unalignedL2.push(l2Offset - (l2Offset % st.clusterSize))
    if (l2Offset < st.fileSize) {
      // the table from the read-ahead: without awaiting when its read has finished (most tables)
      const ready = st.readyTable(l2Offset, 'l2', prefetch)
      if (ready === undefined) await walkL2(st, l2Offset, i, active, stats, prefetch, true)
      else {
        scanL2(st, ready, l2Offset, i, active, stats) // keeps nothing of it
        prefetch.release(ready)
      }
    }
  }
}

/** check_refcounts_l2, on one table read whole (the read-ahead's next one; its buffer is reused once scanned) */
export async function walkL2(
  st: CheckState,
  l2Offset: number,
  l1Index: number,
  active: boolean,
  stats: WalkStats | undefined,
  prefetch: Prefetcher,
  polled = false,
): Promise<void> {
  const cs = st.clusterSize
  const t = await st.readTable(l2Offset, cs, 'l2', 'check_refcounts_l2', prefetch.take(), polled)
  scanL2(st, t, l2Offset, l1Index, active, stats) // keeps nothing of t
  prefetch.release(t)
}

/**
 * The entries of one L2 table: a synchronous loop whose common case uses
 * 32-bit integers only (cluster indices, never byte offsets), so it allocates
 * nothing per entry. The byte-offset version it replaces got its 64-bit
 * offsets boxed by V8's optimised code (a heap number per entry, ~260 MB of
 * garbage on a 1 TiB image) and ran ~1.5x slower; see bench/README-check.md.
 */
export function scanL2(st: CheckState, t: Uint8Array, l2Offset: number, l1Index: number, active: boolean, stats: WalkStats | undefined): void {
  const cs = st.clusterSize
  const cb = st.cb
  const es = st.entrySize
  const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
  const n = st.l2Count
  // Fast path, in 32-bit integers only: an aligned data cluster (any COPIED
  // flag) with no reserved bits, inside the file, whose counter has room.
  // Everything else, and every entry that reports something, takes slowL2Entry.
  const fast = !st.dataFile
  const loMask = st.extL2 ? cs - 1 : (cs - 1) & ~1 // alignment and reserved bits (bit 0: the zero flag, v3)
  const shift = 32 - cb
  const hiLimit = 2 ** (30 - shift) // keeps the cluster index below 2^30
  const kEnd = Math.min(Math.floor(st.fileSize / cs), st.imrt.size, 2 ** 30)
  const imrt = st.imrt
  const copiedLimit = active ? st.copiedLimit : 0
  const copiedOdd = st.copiedOdd
  const ext = st.extL2
  /** the next contiguous host cluster: -1 none yet, -2 a byte offset kept in nextBytes (see contiguousAfter) */
  let nextK = -1
  for (let i = 0; i < n; i++) {
    const o = i * es
    const hi = dv.getInt32(o, false)
    const lo = dv.getInt32(o + 4, false)
    if (hi === 0 && lo === 0 && (!ext || dv.getInt32(o + 12, false) === 0)) continue // unallocated
    const hiOff = hi & 0x00ffffff
    if (fast && (hi & 0x7f000000) === 0 && (lo & loMask) === 0 && hiOff < hiLimit && (!ext || (dv.getInt32(o + 8, false) & dv.getInt32(o + 12, false)) === 0)) {
      const k = (hiOff << shift) | (lo >>> cb)
      if (k !== 0 && k < kEnd) {
        if (stats) {
          stats.allocated++
          if (nextK !== -1 && (nextK === -2 ? k * cs !== st.nextBytes[0] : k !== nextK)) stats.fragmented++
          nextK = k + 1
        }
        // COPIED set (hi < 0) on a cluster of the file is the common case; the rest is listed for checkCopied
        if (copiedLimit !== 0 && (hi >= 0 || k >= copiedLimit)) {
          if (copiedOdd.length < 1_000_000) copiedOdd.push(k)
          else st.copiedFullPass = true
        }
        if (imrt.inc(k)) continue
        const r = st.l2Ref(l2Offset, i, active, l1Index)
        st.inc(k * cs, cs, 'data cluster', r) // reports the overflow
        continue
      }
    }
    nextK = slowL2Entry(st, dv, i, l2Offset, l1Index, active, stats, nextK)
  }
}

/** the next-contiguous state for a byte offset: a cluster index when it is one, else -2 with the offset in nextBytes */
export function contiguousAfter(st: CheckState, offset: number): number {
  const cs = st.clusterSize
  if (offset % cs === 0 && offset / cs < 2 ** 30) return offset / cs
  st.nextBytes[0] = offset
  return -2
}

/** one L2 entry, every case (qemu's check_refcounts_l2); returns the next-contiguous state */
export function slowL2Entry(
  st: CheckState,
  dv: DataView,
  i: number,
  l2Offset: number,
  l1Index: number,
  active: boolean,
  stats: WalkStats | undefined,
  nextK: number,
): number {
  const cs = st.clusterSize
  const es = st.entrySize
  const ext = st.extL2
  const x = 70 - st.cb // compressed: offset bits
  const hiOffMask = 2 ** (x - 32) - 1
  const csizeMask = (1 << (st.cb - 8)) - 1
  const copiedLimit = active ? st.copiedLimit : 0
  const o = i * es
  const hi = dv.getUint32(o, false)
  const lo = dv.getUint32(o + 4, false)
  const bmZero = ext ? dv.getUint32(o + 8, false) : 0
  const bmAlloc = ext ? dv.getUint32(o + 12, false) : 0
  if (hi === 0 && lo === 0 && bmAlloc === 0) return nextK
  if (hi & 0x40000000) {
    // compressed
    const coffset = (hi & hiOffMask) * TWO32 + lo
    // above 2^53 a double loses the low bits: print such offsets from a bigint
    const cHexExact = () => entryHex(hi & hiOffMask, lo)
    if (hi & 0x80000000) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding(
              'compressed-copied',
              st.l2Ref(l2Offset, i, active, l1Index),
              coffset,
              `compressed cluster at ${cHexExact()} has the COPIED flag set`,
            ),
            `ERROR: coffset=${cHexExact()}: copied flag must never be set for compressed clusters`,
          )
    }
    if (st.dataFile) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding(
              'compressed-data-file',
              st.l2Ref(l2Offset, i, active, l1Index),
              coffset,
              'compressed cluster in an image with an external data file',
            ),
            `ERROR compressed cluster ${i} with data file, entry=${entryHex(hi & 0x7fffffff, lo)}`,
          )
      return nextK
    }
    if (ext && (bmAlloc !== 0 || bmZero !== 0)) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding(
              'compressed-bitmap',
              st.l2Ref(l2Offset, i, active, l1Index),
              coffset,
              `compressed cluster has a non-zero subcluster bitmap; its host cluster is kept, not freed`,
            ),
            `ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=${entryHex(hi & 0x7fffffff, lo)}`,
          )
      const nsec = ((hi >>> (x - 32)) & csizeMask) + 1
      const size = nsec * 512 - (lo % 512)
      // only clusters of the file (past 2^53 a double index would not even advance)
      if (coffset < st.fileSize)
        for (let k = Math.floor(coffset / cs); k <= Math.floor((Math.min(coffset + size, st.fileSize) - 1) / cs); k++) st.protectedClusters.add(k)
      return nextK
    }
    const nsec = ((hi >>> (x - 32)) & csizeMask) + 1
    const size = nsec * 512 - (lo % 512)
    st.inc(coffset, size, 'compressed cluster', st.l2Ref(l2Offset, i, active, l1Index), (hi & hiOffMask) >= 0x200000 ? cHexExact() : undefined)
    if (stats) {
      stats.allocated++
      stats.compressed++
      stats.fragmented++
    }
    return nextK
  }
  if ((lo & 0x1fe) !== 0 || (hi & 0x3f000000) !== 0) {
    st.saturated
      ? st.countOnly()
      : st.finding(
          'corruption',
          st.entryFinding('l2-reserved-bits', st.l2Ref(l2Offset, i, active, l1Index), undefined, `L2 entry ${entryHex(hi, lo)} has reserved bits set`),
          `ERROR found l2 entry with reserved bits set: ${entryHex(hi, lo).slice(2)}`,
        )
  }
  const offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
  const zeroFlag = !ext && (lo & 1) !== 0
  if (zeroFlag && offset === 0) return nextK // ZERO_PLAIN
  if (offset === 0 && !(st.dataFile && (hi & 0x80000000) !== 0)) {
    // UNALLOCATED
    if (ext && bmAlloc !== 0) {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding(
              'extl2-unallocated-bitmap',
              st.l2Ref(l2Offset, i, active, l1Index),
              undefined,
              `unallocated cluster has allocation bits set in its subcluster bitmap (${hex(bmAlloc)})`,
            ),
            'ERROR: Unallocated cluster has non-zero subcluster allocation map',
          )
    }
    return nextK
  }
  // NORMAL or ZERO_ALLOC
  if (ext && (bmZero & bmAlloc) !== 0) {
    st.saturated
      ? st.countOnly()
      : st.finding(
          'corruption',
          st.entryFinding(
            'extl2-bitmap',
            st.l2Ref(l2Offset, i, active, l1Index),
            offset,
            `subclusters both allocated and zero (bitmap alloc ${hex(bmAlloc)}, zero ${hex(bmZero)})`,
          ),
          `ERROR offset=${offset.toString(16)}: Allocated cluster has corrupted subcluster allocation bitmap`,
        )
  }
  if (offset % cs !== 0) {
    const containsData = ext ? bmAlloc !== 0 : !zeroFlag
    if (!containsData) {
      st.zeroAllocUnaligned.push(st.l2Ref(l2Offset, i, active, l1Index))
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding(
              'zero-alloc-unaligned',
              st.l2Ref(l2Offset, i, active, l1Index),
              offset,
              `preallocated zero cluster offset ${hex(offset)} is not cluster aligned`,
            ),
            `ERROR offset=${offset.toString(16)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`,
          )
    } else {
      st.saturated
        ? st.countOnly()
        : st.finding(
            'corruption',
            st.entryFinding('data-unaligned', st.l2Ref(l2Offset, i, active, l1Index), offset, `data cluster offset ${hex(offset)} is not cluster aligned`),
            `ERROR offset=${offset.toString(16)}: Data cluster is not properly aligned; L2 entry corrupted.`,
          )
    }
  }
  let next = nextK
  if (stats) {
    stats.allocated++
    const nextContiguous = nextK === -1 ? 0 : nextK === -2 ? (st.nextBytes[0] as number) : nextK * cs
    if (nextContiguous !== 0 && offset !== nextContiguous) stats.fragmented++
    next = contiguousAfter(st, offset + cs)
  }
  if (!st.dataFile) {
    const k = offset / cs
    if (copiedLimit !== 0 && !((hi & 0x80000000) !== 0 && offset % cs === 0 && k < copiedLimit)) {
      if (st.copiedOdd.length < 1_000_000) st.copiedOdd.push(k)
      else st.copiedFullPass = true
    }
    if (!(offset % cs === 0 && offset + cs <= st.fileSize && k < st.imrt.size && st.imrt.inc(k))) {
      const r = st.l2Ref(l2Offset, i, active, l1Index)
      if (!st.inc(offset, cs, 'data cluster', r)) st.addPastEof({ ref: r, kind: 'data', hostOffset: offset })
    }
  }
  return next
}

export async function countBitmaps(st: CheckState): Promise<void> {
  const h = st.header
  const ext = h.bitmaps
  if (!ext || !bitmapsValid(h) || ext.nbBitmaps === 0) return
  st.inc(ext.directoryOffset, ext.directorySize, 'bitmap directory')
  let list
  try {
    list = await readBitmapDirectory(st.dev, st.file, ext)
  } catch (e) {
    st.report.corruptions++
    throw new CheckFailedError('EINVAL', `qcow2: ${st.file}: bitmap directory: ${(e as Error).message}`, st.diagnostics)
  }
  // what qemu checks when it loads the bitmaps at open (bitmap_list_load, check_dir_entry, load_bitmap):
  // a bitmap that fails makes qemu-img refuse to open the image, so check cannot complete (exit 1)
  try {
    validateBitmapDirectory(list, ext, h.size, st.clusterSize, st.file)
  } catch (e) {
    st.finding('check-error', {
      kind: 'bitmap-unloadable',
      structure: 'bitmap',
      hostOffset: ext.directoryOffset,
      message: `${(e as Error).message}: qemu-img refuses to open the image`,
    })
  }
  for (const bm of list) {
    st.inc(bm.tableOffset, bm.tableSize * 8, 'bitmap table')
    const t = await st.readTable(bm.tableOffset, bm.tableSize * 8, 'bitmap', 'bitmap table')
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    let unloadable = false
    // load_bitmap_data: the table of a bitmap not in use must have exactly the clusters its data needs
    // (one bit per granule of the virtual size), or qemu-img cannot load it and refuses to open the image
    const needed = Math.ceil(Math.ceil(Math.ceil(h.size / 2 ** bm.granularityBits) / 8) / st.clusterSize)
    if ((bm.flags & BME_FLAG_IN_USE) === 0 && bm.tableSize !== needed) {
      unloadable = true
      st.finding('check-error', {
        kind: 'bitmap-unloadable',
        structure: 'bitmap',
        hostOffset: bm.entryOffset,
        message: `qcow2: ${st.file}: Could not read bitmap '${bm.name}' from image: its table has ${bm.tableSize} entries, the virtual size needs ${needed}: qemu-img refuses to open the image`,
      })
    }
    for (let i = 0; i < bm.tableSize; i++) {
      const hi = dv.getUint32(i * 8, false)
      const lo = dv.getUint32(i * 8 + 4, false)
      const off = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
      const bad = (hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0 || (off !== 0 && ((lo & 1) !== 0 || off % st.clusterSize !== 0))
      if (bad && !unloadable && (bm.flags & BME_FLAG_IN_USE) === 0) {
        unloadable = true
        st.finding('check-error', {
          kind: 'bitmap-unloadable',
          structure: 'bitmap',
          hostOffset: bm.tableOffset + i * 8,
          message: `qcow2: ${st.file}: Could not read bitmap_table table from image for bitmap '${bm.name}': entry ${i} (${entryHex(hi, lo)}) is invalid: qemu-img refuses to open the image`,
        })
      }
      if (bad) {
        st.saturated
          ? st.countOnly()
          : st.finding('corruption', {
              kind: 'bitmap-table-entry',
              structure: 'bitmap',
              hostOffset: bm.tableOffset + i * 8,
              message: `qcow2: bitmap '${bm.name}' table entry ${i} (${entryHex(hi, lo)}) is invalid`,
            })
        continue
      }
      if (off === 0) continue
      st.inc(off, st.clusterSize, 'bitmap data')
    }
  }
}
