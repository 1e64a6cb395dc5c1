/**
 * Internal snapshots: create (copy the L1 table, raise the refcount of
 * everything it reaches, clear COPIED), list, apply (goto) and delete (free
 * what only the snapshot held). Refcounts and COPIED flags change together,
 * so each operation runs as a writer transaction: the dirty bit is set and
 * flushed first and cleared after, and a crash in between leaves an image that
 * the next read-write open repairs. A new snapshot table is written and flushed
 * before the header points at it (one 12-byte write), the old one freed after.
 * v2 images have no dirty bit: there each operation is a shadow commit
 * (snapshot-v2.ts), switched by one header write.
 */
import { NotFoundError, UnsupportedFeatureError, UsageError } from '../../errors.js'
import type { SnapshotInfo } from '../../image/disk-image.js'
import { putU16be, putU32be, putU64be } from '../../util/bytes.js'
import { decodeL1, decodeL2 } from './entries.js'
import { fixCopiedFlags } from './dirty.js'
import { hasDataFile, l1EntriesNeeded, l2EntrySize } from './header.js'
import type { Qcow2Image } from './image.js'
import { SNAPSHOT_FIXED_BYTES, snapshotInfo, snapshotTableBytes, type Qcow2Snapshot } from './snapshot-table.js'
import type { Qcow2Writer } from './write.js'
import { commitV2 } from './snapshot-v2.js'

function writerOf(img: Qcow2Image): Qcow2Writer {
  if (!img.writer) throw img.writerRefusal ?? new UnsupportedFeatureError(`qcow2: ${img.filename}: image is not open for writing`)
  return img.writer
}

export function listSnapshots(img: Qcow2Image): SnapshotInfo[] {
  return img.snapshots.map(snapshotInfo)
}

/** Run `body` as a writer transaction; a failure part way leaves the writer refusing until reopen. */
async function transaction<T>(w: Qcow2Writer, body: () => Promise<T>): Promise<T> {
  await w.beginTransaction()
  let result: T
  try {
    result = await body()
  } catch (e) {
    w.abortTransaction()
    throw e
  }
  await w.endTransaction()
  return result
}

/** Refuse before changing anything if adding `delta` would overflow a refcount (small refcount_bits). */
async function checkOverflow(img: Qcow2Image, w: Qcow2Writer, l1: Uint8Array, l1Size: number): Promise<void> {
  const h = img.header
  if (h.refcountOrder >= 6) return
  const max = 2 ** (2 ** h.refcountOrder) - 1
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = img.mapper.decodeContext
  const add = new Map<number, number>()
  const bump = (off: number, len: number) => {
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) add.set(c, (add.get(c) ?? 0) + 1)
  }
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  for (let i = 0; i < l1Size; i++) {
    const e = decodeL1(dv, i * 8)
    if (e.l2Offset === 0) continue
    bump(e.l2Offset, cs)
    const t = await img.device.read(e.l2Offset, cs, 'l2')
    const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(tdv, j * es, ctx)
      if (le.type === 'compressed') bump(le.hostOffset - (le.hostOffset % 512), le.sectors * 512)
      else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0 && !hasDataFile(h)) bump(le.hostOffset, cs)
    }
  }
  for (const [c, n] of add) {
    if ((await w.rc.get(c)) + n > max) {
      throw new UnsupportedFeatureError(`qcow2: ${img.filename}: refcount of cluster 0x${(c * cs).toString(16)} would exceed ${max} (refcount_bits ${2 ** h.refcountOrder}); nothing was changed`)
    }
  }
}

/** A new snapshot entry for the active image, its L1 table at `l1Offset`. */
function newSnapshot(img: Qcow2Image, name: string, now: number, l1Offset: number): Qcow2Snapshot {
  const h = img.header
  const maxId = img.snapshots.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0)
  const extra = new Uint8Array(24)
  putU64be(extra, 0, 0)
  putU64be(extra, 8, h.size)
  putU64be(extra, 16, 0xffffffffffffffffn)
  return {
    entryOffset: 0,
    l1TableOffset: l1Offset,
    l1Size: h.l1Size,
    id: String(maxId + 1),
    name,
    dateSec: Math.floor(now / 1000),
    dateNsec: (now % 1000) * 1_000_000,
    vmClockNsec: 0,
    vmStateSize: 0,
    extraData: extra,
    vmStateSizeLarge: 0,
    diskSize: h.size,
    icount: -1,
  }
}

function find(img: Qcow2Image, nameOrId: string): Qcow2Snapshot {
  const s = img.snapshots.find((x) => x.id === nameOrId) ?? img.snapshots.find((x) => x.name === nameOrId)
  if (!s) throw new NotFoundError(`qcow2: ${img.filename}: Can't find the snapshot '${nameOrId}'`)
  return s
}

/** Serialise the snapshot table (entries padded to 8 bytes). */
export function encodeSnapshotTable(snaps: Qcow2Snapshot[]): Uint8Array {
  const enc = new TextEncoder()
  const parts = snaps.map((s) => {
    const id = enc.encode(s.id)
    const name = enc.encode(s.name)
    const len = Math.ceil((SNAPSHOT_FIXED_BYTES + s.extraData.byteLength + id.byteLength + name.byteLength) / 8) * 8
    const b = new Uint8Array(len)
    putU64be(b, 0, s.l1TableOffset)
    putU32be(b, 8, s.l1Size)
    putU16be(b, 12, id.byteLength)
    putU16be(b, 14, name.byteLength)
    putU32be(b, 16, s.dateSec)
    putU32be(b, 20, s.dateNsec)
    putU64be(b, 24, s.vmClockNsec)
    putU32be(b, 32, s.vmStateSize)
    putU32be(b, 36, s.extraData.byteLength)
    b.set(s.extraData, 40)
    b.set(id, 40 + s.extraData.byteLength)
    b.set(name, 40 + s.extraData.byteLength + id.byteLength)
    return b
  })
  const out = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0))
  let o = 0
  for (const p of parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

/**
 * Add `delta` to the refcount of every cluster reachable from an L1 table
 * (its L2 tables and their data), as qcow2_update_snapshot_refcount does.
 */
async function updateReachable(img: Qcow2Image, w: Qcow2Writer, l1: Uint8Array, l1Size: number, delta: number): Promise<void> {
  const h = img.header
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = img.mapper.decodeContext
  const dataFile = hasDataFile(h)
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  for (let i = 0; i < l1Size; i++) {
    const e = decodeL1(dv, i * 8)
    if (e.l2Offset === 0) continue
    const t = await img.device.read(e.l2Offset, cs, 'l2')
    const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(tdv, j * es, ctx)
      if (le.type === 'compressed') await w.rc.update(le.hostOffset - (le.hostOffset % 512), le.sectors * 512, delta)
      else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0 && !dataFile) await w.rc.update(le.hostOffset, cs, delta)
    }
    await w.rc.update(e.l2Offset, cs, delta)
    if (delta < 0 && (await w.rc.get(e.l2Offset / cs)) === 0) {
      w.guard.set(e.l2Offset / cs, undefined)
      img.mapper.l2cache.delete(e.l2Offset)
    }
  }
}

/** Write a new snapshot table and point the header at it; frees the old table. */
async function installTable(img: Qcow2Image, w: Qcow2Writer, snaps: Qcow2Snapshot[]): Promise<void> {
  const h = img.header
  const cs = h.clusterSize
  const bytes = encodeSnapshotTable(snaps)
  let offset = 0
  if (snaps.length > 0) {
    offset = await w.allocClusters(Math.ceil(bytes.byteLength / cs))
    await w.writeMetadata(offset, bytes, 'snapshot')
  }
  await w.rc.persist()
  await w.flushNow()
  const hdr = new Uint8Array(12)
  putU32be(hdr, 0, snaps.length)
  putU64be(hdr, 4, offset)
  await w.writeMetadata(60, hdr, 'header')
  await w.flushNow()
  const oldOffset = h.snapshotsOffset
  const oldBytes = h.nbSnapshots > 0 ? snapshotTableBytes(img.snapshots, oldOffset) : 0
  h.nbSnapshots = snaps.length
  h.snapshotsOffset = offset
  if (oldBytes > 0) {
    w.guard.setRange(oldOffset, oldBytes, undefined)
    await w.rc.update(oldOffset, oldBytes, -1)
  }
  if (snaps.length > 0) w.guard.setRange(offset, bytes.byteLength, 'snapshot')
  // entry offsets as laid out in the new table
  let pos = offset
  for (const s of snaps) {
    s.entryOffset = pos
    pos += Math.ceil((SNAPSHOT_FIXED_BYTES + s.extraData.byteLength + new TextEncoder().encode(s.id).byteLength + new TextEncoder().encode(s.name).byteLength) / 8) * 8
  }
  img.snapshots.length = 0
  img.snapshots.push(...snaps)
}

export async function createSnapshot(img: Qcow2Image, name: string, now = Date.now()): Promise<SnapshotInfo> {
  const w = writerOf(img)
  if (hasDataFile(img.header)) {
    throw new UnsupportedFeatureError(`qcow2: ${img.filename}: internal snapshots are not supported with an external data file (as in QEMU)`)
  }
  if (name === '') throw new UsageError('qcow2: a snapshot needs a name')
  return w.mutex.run(async () => {
    if (img.snapshots.some((s) => s.name === name || s.id === name)) {
      throw new UsageError(`qcow2: ${img.filename}: a snapshot named '${name}' already exists`)
    }
    const h = img.header
    const cs = h.clusterSize
    w.assertUsable()
    await checkOverflow(img, w, img.l1, h.l1Size)
    if (h.version < 3) {
      // the snapshot takes the active L1 table as it is; the active image gets a copy
      const snap = newSnapshot(img, name, now, h.l1Size > 0 ? h.l1TableOffset : 0)
      const snaps = [...img.snapshots, snap]
      await commitV2(img, w, { l1: img.l1.slice(), l1Size: h.l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps) })
      return listSnapshots(img).find((s) => s.id === snap.id)!
    }
    return transaction(w, async () => {
    const l1 = img.l1.slice()
    let l1Offset = 0
    if (h.l1Size > 0) {
      l1Offset = await w.allocClusters(Math.ceil((h.l1Size * 8) / cs))
      await w.writeMetadata(l1Offset, l1, 'l1')
      w.guard.setRange(l1Offset, h.l1Size * 8, 'snapshot-l1')
    }
    await updateReachable(img, w, img.l1, h.l1Size, +1)
    await w.rc.persist()
    await w.flushNow()
    // the active tables are shared now: COPIED goes
    await fixCopiedFlags(img, () => 2)
    img.mapper.l2cache.clear()
    const snap = newSnapshot(img, name, now, l1Offset)
    await installTable(img, w, [...img.snapshots, snap])
    return listSnapshots(img).find((s) => s.id === snap.id)!
    })
  })
}

export async function deleteSnapshot(img: Qcow2Image, nameOrId: string): Promise<void> {
  const w = writerOf(img)
  return w.mutex.run(async () => {
    const s = find(img, nameOrId)
    w.assertUsable()
    if (img.header.version < 3) {
      const snaps = img.snapshots.filter((x) => x !== s)
      await commitV2(img, w, { l1: img.l1.slice(), l1Size: img.header.l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps) })
      return
    }
    return transaction(w, async () => {
    await installTable(img, w, img.snapshots.filter((x) => x !== s))
    const l1 = s.l1Size > 0 ? await img.device.read(s.l1TableOffset, s.l1Size * 8, 'l1') : new Uint8Array(0)
    await updateReachable(img, w, l1, s.l1Size, -1)
    if (s.l1Size > 0) {
      w.guard.setRange(s.l1TableOffset, s.l1Size * 8, undefined)
      await w.rc.update(s.l1TableOffset, s.l1Size * 8, -1)
    }
    await w.rc.persist()
    await w.flushNow()
    await fixActiveCopied(img, w)
    img.dropCompressedCache()
    })
  })
}

async function fixActiveCopied(img: Qcow2Image, w: Qcow2Writer): Promise<void> {
  const cs = img.header.clusterSize
  // refcounts are in the writer; gather the ones the active tables reach
  const need = new Set<number>()
  const h = img.header
  const dv = new DataView(img.l1.buffer, img.l1.byteOffset, img.l1.byteLength)
  const es = l2EntrySize(h)
  const ctx = img.mapper.decodeContext
  for (let i = 0; i < h.l1Size; i++) {
    const e = decodeL1(dv, i * 8)
    if (e.l2Offset === 0) continue
    need.add(e.l2Offset / cs)
    const t = await img.device.read(e.l2Offset, cs, 'l2')
    const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(tdv, j * es, ctx)
      if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0) need.add(Math.floor(le.hostOffset / cs))
    }
  }
  const counts = new Map<number, number>()
  for (const c of need) counts.set(c, await w.rc.get(c))
  img.mapper.l2cache.clear()
  await fixCopiedFlags(img, (c) => counts.get(c) ?? 0)
}

/**
 * Apply (goto) a snapshot. When the snapshot's disk size differs from the
 * image's, the image takes the snapshot's size, as qcow2_snapshot_goto does
 * (it truncates first); a v2 image with snapshots cannot be resized, so there
 * it is refused as in QEMU. A size change, or a snapshot L1 table larger than
 * the active one, gets a new active L1 table: written and flushed, then one
 * header write switches size, l1_size and l1_table_offset together, so a
 * crash leaves either the old image or the snapshot's, never a mix.
 */
export async function applySnapshot(img: Qcow2Image, nameOrId: string): Promise<void> {
  const w = writerOf(img)
  return w.mutex.run(async () => {
    // QEMU refuses before it looks the snapshot up (bdrv_snapshot_goto): the bitmaps would not match the data
    w.bitmaps?.checkSnapshotApply(nameOrId)
    const s = find(img, nameOrId)
    const h = img.header
    const cs = h.clusterSize
    const newSize = s.diskSize ?? h.size
    const resize = newSize !== h.size
    if (resize && h.version < 3) {
      throw new UnsupportedFeatureError(`qcow2: ${img.filename}: snapshot '${s.name}' has another disk size (${newSize}) than the image (${h.size}): Can't resize a v2 image which has snapshots`)
    }
    w.assertUsable()
    const newTable = resize || s.l1Size > h.l1Size
    const l1Size = newTable ? Math.max(s.l1Size, l1EntriesNeeded({ ...h, size: newSize })) : h.l1Size
    const snapL1 = new Uint8Array(l1Size * 8)
    if (s.l1Size > 0) snapL1.set(await img.device.read(s.l1TableOffset, s.l1Size * 8, 'l1'))
    await checkOverflow(img, w, snapL1, l1Size)
    if (h.version < 3) {
      // v2: no resize (refused above); the active L1 becomes a copy of the snapshot's
      const snaps = [...img.snapshots]
      await commitV2(img, w, { l1: snapL1, l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps) })
      return
    }
    return transaction(w, async () => {
    // new references first, so nothing reaches zero while still referenced
    await updateReachable(img, w, snapL1, l1Size, +1)
    await w.rc.persist()
    await w.flushNow()
    const old = img.l1.slice()
    const oldL1 = { offset: h.l1TableOffset, size: h.l1Size }
    if (newTable) {
      const offset = l1Size > 0 ? await w.allocClusters(Math.ceil((l1Size * 8) / cs)) : 0
      if (l1Size > 0) {
        await w.writeMetadata(offset, snapL1.slice(), 'l1')
        w.guard.setRange(offset, l1Size * 8, 'l1')
      }
      await w.rc.persist()
      await w.flushNow()
      const hdr = new Uint8Array(24) // size (24), crypt_method (32), l1_size (36), l1_table_offset (40)
      putU64be(hdr, 0, newSize)
      putU32be(hdr, 8, h.cryptMethod)
      putU32be(hdr, 12, l1Size)
      putU64be(hdr, 16, offset)
      await w.writeMetadata(24, hdr, 'header')
      await w.flushNow()
      h.size = newSize
      h.l1Size = l1Size
      h.l1TableOffset = offset
      img.replaceL1(snapL1.slice())
      if (oldL1.size > 0) {
        w.guard.setRange(oldL1.offset, oldL1.size * 8, undefined)
        await w.rc.update(oldL1.offset, oldL1.size * 8, -1)
      }
    } else {
      if (h.l1Size > 0) await w.writeMetadata(h.l1TableOffset, snapL1.slice(), 'l1')
      await w.flushNow()
      img.l1.set(snapL1)
    }
    img.mapper.l2cache.clear()
    img.dropCompressedCache()
    await updateReachable(img, w, old, oldL1.size, -1)
    // guard: the active L2 tables are the snapshot's now
    const dv = new DataView(snapL1.buffer)
    for (let i = 0; i < l1Size; i++) {
      const e = decodeL1(dv, i * 8)
      if (e.l2Offset !== 0) w.guard.set(e.l2Offset / cs, 'l2')
    }
    await w.rc.persist()
    await w.flushNow()
    await fixActiveCopied(img, w)
    })
  })
}
