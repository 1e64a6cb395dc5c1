/**
 * qemu-img amend for qcow2: change the options of an existing image in place
 * (compat, lazy_refcounts, refcount_bits, size, data_file, data_file_raw), in
 * qemu's order (upgrade, refcount width, data file, lazy refcounts, size,
 * downgrade last) with qemu's refusals and words.
 *
 * Unlike qemu, everything that can be refused is checked before anything is
 * written: a refused amend leaves the image as it was.
 *
 * Crash safety, step by step (every state between two steps is a valid image
 * with the same guest contents, so no undo journal is needed):
 * - a header field change (lazy_refcounts, data_file_raw=off) is one write of
 *   the field in the first sector;
 * - a header rewrite (compat, data_file) lays the header cluster out as
 *   qemu's qcow2_update_header does and writes it so that the switch is one
 *   512-byte sector write (amend-header.ts);
 * - a downgrade first turns unallocated zero clusters into unallocated ones
 *   (L2 entries rewritten in place; both read as zeroes when no backing file
 *   is there), flushed before the header says v2;
 * - refcount_bits: amend-refcounts.ts;
 * - size: resize.ts.
 */
import { UnsupportedFeatureError, UsageError, hex } from '../../../errors.js'
import { putU64be, u64be } from '../../../util/bytes.js'
import * as C from '../spec/constants.js'
import { decodeL1, decodeL2 } from '../spec/entries.js'
import { dataFileRaw, hasDataFile, hasLazyRefcounts, l2EntrySize } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { changeRefcountOrder, carriedRefcounts } from './amend-refcounts.js'
import { rewriteHeader } from './amend-header.js'
import { encodeSnapshotTable } from './snapshot-ops.js'
import { SNAPSHOT_FIXED_BYTES, snapshotTableBytes, type Qcow2Snapshot } from '../spec/snapshot-table.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'
import { resizeQcow2 } from './resize.js'

export { parseAmendOptions, QCOW2_AMEND_OPTIONS, type AmendOptionHelp, type Qcow2AmendOptions } from './amend-options.js'
import type { Qcow2AmendOptions } from './amend-options.js'

/** What the amend will do, every refusal checked first. */
interface AmendPlan {
  version: 2 | 3
  order: number
  lazy: boolean
  dataFile: string | undefined
  dataFileRaw: boolean
  size: number
  /** active and snapshot L2 tables holding plain zero clusters to clear before a downgrade */
  zeroTables: number[]
}

async function planAmend(state: Qcow2State, w: Qcow2Writer, o: Qcow2AmendOptions): Promise<AmendPlan> {
  const h = state.header
  const file = state.filename
  if (o.encryption) {
    if (h.cryptMethod === C.CRYPT_NONE) throw new UsageError("Can't amend encryption options - encryption not present")
    if (h.cryptMethod !== C.CRYPT_LUKS) throw new UnsupportedFeatureError('Only LUKS encryption options can be amended')
    throw new UnsupportedFeatureError(`qcow2: ${file}: imgtool does not amend LUKS key slots`)
  }
  if (o.dataFile !== undefined && !hasDataFile(h)) throw new UsageError('data-file can only be set for images that use an external data file')
  if (o.dataFileRaw === true && !dataFileRaw(h)) throw new UsageError('data-file-raw cannot be set on existing images')
  if (o.dataFile === '') {
    throw new UnsupportedFeatureError(`qcow2: ${file}: imgtool does not remove the data file name (the image would need -o data-file to open)`)
  }
  const oldVersion = h.version
  const version = o.version ?? oldVersion
  const bits = o.refcountBits ?? 2 ** h.refcountOrder
  const order = Math.log2(bits)
  if (order !== h.refcountOrder) {
    if (version < 3 && bits !== 16) {
      throw new UsageError('Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)')
    }
    await carriedRefcounts(state, w, order)
  }
  if (o.backingFile !== undefined || o.backingFormat !== undefined) {
    if (o.backingFile !== h.backingFile || o.backingFormat !== h.backingFormat) {
      throw new UsageError("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.")
    }
  }
  const lazy = o.lazyRefcounts ?? hasLazyRefcounts(h)
  if (lazy && !hasLazyRefcounts(h) && version < 3) {
    throw new UsageError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)')
  }
  const size = o.size !== undefined && o.size !== 0 ? o.size : h.size
  const plan: AmendPlan = {
    version,
    order,
    lazy,
    dataFile: o.dataFile ?? h.dataFile,
    dataFileRaw: o.dataFileRaw ?? dataFileRaw(h),
    size,
    zeroTables: [],
  }
  if (version < oldVersion) plan.zeroTables = await checkDowngrade(state, w, plan)
  return plan
}

/** qcow2_downgrade's refusals (and imgtool's own, for what it does not expand); the L2 tables to clear. */
async function checkDowngrade(state: Qcow2State, w: Qcow2Writer, plan: AmendPlan): Promise<number[]> {
  const h = state.header
  const file = state.filename
  if (plan.order !== 4) throw new UnsupportedFeatureError('compat=0.10 requires refcount_bits=16')
  if (hasDataFile(h)) throw new UnsupportedFeatureError('Cannot downgrade an image with a data file')
  for (const s of state.snapshots) {
    if ((s.vmStateSizeLarge ?? s.vmStateSize) > 0xffffffff || (s.diskSize ?? h.size) !== plan.size) {
      throw new UnsupportedFeatureError('Internal snapshots prevent downgrade of image')
    }
  }
  // the dirty bit is gone: a read-write open rebuilt the refcounts and cleared it
  const incompat = h.incompatibleFeatures & ~BigInt(C.INCOMPAT_DIRTY | C.INCOMPAT_COMPRESSION)
  if (incompat !== 0n) throw new UnsupportedFeatureError(`Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`)
  if (h.bitmaps !== undefined && h.bitmaps.nbBitmaps > 0) {
    // qemu 7.2 downgrades and leaves the bitmaps' clusters leaked, the bitmaps unusable
    throw new UnsupportedFeatureError(`qcow2: ${file}: Cannot downgrade an image with persistent bitmaps (remove them first: qemu-img bitmap --remove)`)
  }
  const zstd = (h.incompatibleFeatures & BigInt(C.INCOMPAT_COMPRESSION)) !== 0n
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = state.decodeContext
  const tables = new Set<number>()
  const l1s: Uint8Array[] = [state.l1.subarray(0, h.l1Size * 8)]
  for (const s of state.snapshots) if (s.l1Size > 0) l1s.push(await state.device.read(s.l1TableOffset, s.l1Size * 8, 'l1'))
  const withZeroes: number[] = []
  for (const l1 of l1s) {
    const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
    for (let i = 0; i < l1.byteLength / 8; i++) {
      const off = decodeL1(dv, i * 8).l2Offset
      if (off === 0 || tables.has(off)) continue
      tables.add(off)
      const t = await state.device.read(off, cs, 'l2')
      const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
      let zeroes = false
      for (let j = 0; j < cs / es; j++) {
        const e = decodeL2(tdv, j * es, ctx)
        if (e.type === 'compressed' && zstd) {
          throw new UnsupportedFeatureError('Cannot downgrade an image with zstd compression type and existing compressed clusters')
        }
        if (e.type !== 'zero') continue
        const refuse = (why: string): never => {
          throw new UnsupportedFeatureError(
            `qcow2: ${file}: Cannot downgrade: the zero cluster in the L2 table at ${hex(off)} (entry ${j}) is ${why}; imgtool expands unallocated zero clusters of images without a backing file and preallocated ones nothing else uses`,
          )
        }
        if (e.hostOffset === 0) {
          if (state.backing !== undefined || h.backingFile !== undefined) refuse('over a backing file')
        } else if ((await w.refcounts.get(e.hostOffset / cs)) !== 1 || (await w.refcounts.get(off / cs)) !== 1) {
          refuse('preallocated and shared with a snapshot')
        }
        zeroes = true
      }
      if (zeroes) withZeroes.push(off)
    }
  }
  return withZeroes
}

/**
 * Amend the image's options. The image is closed afterwards, whether the
 * amend worked or not (as resize): reopen it to use it.
 */
export async function amendQcow2(img: Qcow2OpenImage, o: Qcow2AmendOptions): Promise<void> {
  const state = img.state
  let resizing = false
  try {
    const w = writerOf(img)
    let plan: AmendPlan | undefined
    await w.mutex.run(async () => {
      w.assertUsable()
      await w.refcounts.persist()
      await w.flushNow()
      plan = await planAmend(state, w, o)
      const h = state.header
      if (plan.size < h.size && state.snapshots.length > 0 && h.version < 3) {
        throw new UnsupportedFeatureError(`qcow2: ${state.filename}: Can't resize a v2 image which has snapshots`)
      }
      try {
        // upgrade first, then the refcount width, then the other header fields; downgrade last
        if (plan.version > h.version) await upgrade(state, w, plan)
        if (plan.order !== h.refcountOrder) await changeRefcountOrder(state, w, plan.order)
        if (plan.dataFile !== h.dataFile) await rewriteHeader(state, w, h, plan.dataFile)
        await setFeatureBits(state, w, plan)
        if (plan.version < h.version) {
          await clearZeroClusters(state, w, plan.zeroTables)
          await rewriteHeader(state, w, { ...h, version: 2 }, plan.dataFile)
        }
      } catch (e) {
        // a write failed half way: memory may not match the disk, so closing writes nothing more
        w.abortTransaction()
        throw e
      }
    })
    if (plan!.size !== state.header.size) {
      resizing = true
      await resizeQcow2(img, plan!.size) // closes the image
    }
  } finally {
    if (!resizing) {
      await img.close()
      img.writer?.retire()
    }
  }
}

/**
 * v2 to v3. v3 wants every snapshot's disk size in its extra data: when one
 * lacks it, the table is written anew as qcow2_upgrade has qemu write it
 * (every entry's extra data: VM state size, disk size, icount; what follows
 * the 24 bytes kept) to newly allocated clusters, flushed, and the header
 * rewrite that makes the image v3 points at it too. The old table is freed
 * once that is durable; a new table the header never pointed at is given
 * back (a crash in between leaves it leaked).
 */
async function upgrade(state: Qcow2State, w: Qcow2Writer, plan: AmendPlan): Promise<void> {
  const h = state.header
  if (!state.snapshots.some((s) => s.extraData.byteLength < 16)) return rewriteHeader(state, w, { ...h, version: 3 }, plan.dataFile)
  const snaps = state.snapshots.map((s): Qcow2Snapshot => {
    const extra = new Uint8Array(Math.max(24, s.extraData.byteLength))
    extra.set(s.extraData.subarray(24), 24)
    const vmState = s.vmStateSizeLarge ?? s.vmStateSize
    const diskSize = s.diskSize ?? h.size
    const icount = s.icount ?? -1
    putU64be(extra, 0, vmState)
    putU64be(extra, 8, diskSize)
    putU64be(extra, 16, BigInt.asUintN(64, BigInt(icount)))
    return { ...s, extraData: extra, vmStateSizeLarge: vmState, diskSize, icount }
  })
  const table = encodeSnapshotTable(snaps)
  const cs = h.clusterSize
  const old = { offset: h.snapshotsOffset, bytes: snapshotTableBytes(state.snapshots, h.snapshotsOffset) }
  const offset = await w.allocClusters(Math.ceil(table.byteLength / cs))
  try {
    await w.refcounts.persist()
    await w.writeMetadata(offset, table, 'snapshot')
    await w.flushNow()
    await rewriteHeader(state, w, { ...h, version: 3, snapshotsOffset: offset }, plan.dataFile)
  } catch (e) {
    // as the file reads now: a header that never pointed at the new table gives it back; one that
    // does (a later step failed) has left the old table unreferenced, which goes
    const head = await state.device.read(0, 72, 'header').catch(() => undefined)
    if (head) {
      const linked = Number(u64be(head, 64)) === offset
      await w.refcounts.update(linked ? old.offset : offset, linked ? old.bytes : table.byteLength, -1)
      await w.refcounts.persist()
      await w.flushNow()
    }
    throw e
  }
  let pos = offset
  for (const s of snaps) {
    s.entryOffset = pos
    pos += Math.ceil((SNAPSHOT_FIXED_BYTES + s.extraData.byteLength + enc.encode(s.id).byteLength + enc.encode(s.name).byteLength) / 8) * 8
  }
  state.snapshots.length = 0
  state.snapshots.push(...snaps)
  h.snapshotsOffset = offset
  w.guard.setRange(old.offset, old.bytes, undefined)
  w.guard.setRange(offset, table.byteLength, 'snapshot')
  // the upgrade is done; if freeing the old table fails here, closing the image writes it (or reports why not)
  w.deferFree(old.offset, old.bytes)
  await w
    .flushNow()
    .then(() => w.refcounts.persist())
    .then(() => w.flushNow())
    .catch(() => undefined)
}

const enc = new TextEncoder()

/** lazy_refcounts and data_file_raw: one 8-byte field write each, in the first sector. */
async function setFeatureBits(state: Qcow2State, w: Qcow2Writer, plan: AmendPlan): Promise<void> {
  const h = state.header
  if (h.version < 3) return
  const compat = plan.lazy ? h.compatibleFeatures | BigInt(C.COMPAT_LAZY_REFCOUNTS) : h.compatibleFeatures & ~BigInt(C.COMPAT_LAZY_REFCOUNTS)
  if (compat !== h.compatibleFeatures) {
    const b = new Uint8Array(8)
    putU64be(b, 0, compat)
    await w.writeMetadata(80, b, 'header')
    await w.flushNow()
    h.compatibleFeatures = compat
  }
  const raw = BigInt(C.AUTOCLEAR_DATA_FILE_RAW)
  const autoclear = plan.dataFileRaw ? h.autoclearFeatures | raw : h.autoclearFeatures & ~raw
  if (autoclear !== h.autoclearFeatures) {
    const b = new Uint8Array(8)
    putU64be(b, 0, autoclear)
    await w.writeMetadata(88, b, 'header')
    await w.flushNow()
    h.autoclearFeatures = autoclear
  }
}

/**
 * Zero clusters expanded as qcow2_expand_zero_clusters does for an image
 * without a backing file: a plain one becomes unallocated (both read as
 * zeroes), a preallocated one (used by nothing else) gets zeroes written and
 * flushed before its entry loses the zero flag. Each table is one write; a
 * crash in between leaves entries that read as zeroes either way.
 */
async function clearZeroClusters(state: Qcow2State, w: Qcow2Writer, tables: number[]): Promise<void> {
  const h = state.header
  const cs = h.clusterSize
  const ctx = state.decodeContext
  for (const off of tables) {
    const t = await state.device.read(off, cs, 'l2')
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    let wrote = false
    for (let j = 0; j < cs / 8; j++) {
      const e = decodeL2(dv, j * 8, ctx)
      if (e.type !== 'zero') continue
      if (e.hostOffset === 0) dv.setBigUint64(j * 8, 0n, false)
      else {
        await w.guardedWrite(state.device, e.hostOffset, new Uint8Array(cs), 'data')
        dv.setBigUint64(j * 8, dv.getBigUint64(j * 8, false) & ~1n, false)
        wrote = true
      }
    }
    if (wrote) await w.flushNow()
    await w.writeMetadata(off, t, 'l2')
  }
  if (tables.length > 0) await w.flushNow()
  state.clearL2Cache()
}
