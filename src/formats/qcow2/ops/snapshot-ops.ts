/**
 * Internal snapshots: create (the snapshot takes the active L1 table, the
 * active image a copy), list, apply (goto) and delete. Refcounts and COPIED
 * flags change together, which no order of in-place writes can keep
 * consistent at every crash point, so each operation is a shadow commit
 * (snapshot-shadow.ts): the new tables and a complete new refcount structure
 * are written to free clusters, then one header write switches to them. A
 * crash leaves the old image or the new one (v2 and v3 alike).
 */
import { NotFoundError, UnsupportedFeatureError, UsageError } from '../../../errors.js'
import type { SnapshotInfo } from '../../../image/disk-image.js'
import { putU16be, putU32be, putU64be } from '../../../util/bytes.js'
import { decodeL1, decodeL2 } from '../spec/entries.js'
import { hasDataFile, l1EntriesNeeded, l2EntrySize } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import { SNAPSHOT_FIXED_BYTES, snapshotInfo, type Qcow2Snapshot } from '../spec/snapshot-table.js'
import type { Qcow2Writer } from '../write/write.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'
import { commitShadow } from './snapshot-shadow.js'

export function listSnapshots(img: Qcow2OpenImage): SnapshotInfo[] {
  return img.state.snapshots.map(snapshotInfo)
}

/** Refuse before changing anything if adding `delta` would overflow a refcount (small refcount_bits). */
async function checkOverflow(state: Qcow2State, w: Qcow2Writer, l1: Uint8Array, l1Size: number): Promise<void> {
  const h = state.header
  if (h.refcountOrder >= 6) return
  const max = 2 ** (2 ** h.refcountOrder) - 1
  const cs = h.clusterSize
  const es = l2EntrySize(h)
  const ctx = state.decodeContext
  const add = new Map<number, number>()
  const bump = (off: number, len: number) => {
    for (let c = Math.floor(off / cs); c <= Math.floor((off + len - 1) / cs); c++) add.set(c, (add.get(c) ?? 0) + 1)
  }
  const dv = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  for (let i = 0; i < l1Size; i++) {
    const e = decodeL1(dv, i * 8)
    if (e.l2Offset === 0) continue
    bump(e.l2Offset, cs)
    const t = await state.device.read(e.l2Offset, cs, 'l2')
    const tdv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < cs / es; j++) {
      const le = decodeL2(tdv, j * es, ctx)
      if (le.type === 'compressed') bump(le.hostOffset - (le.hostOffset % 512), le.sectors * 512)
      else if ((le.type === 'normal' || le.type === 'zero') && le.hostOffset !== 0 && !hasDataFile(h)) bump(le.hostOffset, cs)
    }
  }
  for (const [c, n] of add) {
    if ((await w.refcounts.get(c)) + n > max) {
      throw new UnsupportedFeatureError(
        `qcow2: ${state.filename}: refcount of cluster 0x${(c * cs).toString(16)} would exceed ${max} (refcount_bits ${2 ** h.refcountOrder}); nothing was changed`,
      )
    }
  }
}

/** A new snapshot entry for the active image, its L1 table at `l1Offset`. */
function newSnapshot(state: Qcow2State, name: string, now: number, l1Offset: number): Qcow2Snapshot {
  const h = state.header
  const maxId = state.snapshots.reduce((m, s) => Math.max(m, Number.parseInt(s.id, 10) || 0), 0)
  const extra = new Uint8Array(24)
  putU64be(extra, 0, 0)
  putU64be(extra, 8, h.size)
  putU64be(extra, 16, 0) // icount: qemu-img snapshot -c writes 0 (its record starts zeroed)
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
    icount: 0,
  }
}

function find(state: Qcow2State, nameOrId: string): Qcow2Snapshot {
  const s = state.snapshots.find((x) => x.id === nameOrId) ?? state.snapshots.find((x) => x.name === nameOrId)
  if (!s) throw new NotFoundError(`qcow2: ${state.filename}: Can't find the snapshot '${nameOrId}'`)
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

export async function createSnapshot(img: Qcow2OpenImage, name: string, now = Date.now()): Promise<SnapshotInfo> {
  const w = writerOf(img)
  const state = img.state
  if (hasDataFile(state.header)) {
    throw new UnsupportedFeatureError(`qcow2: ${state.filename}: internal snapshots are not supported with an external data file (as in QEMU)`)
  }
  if (name === '') throw new UsageError('qcow2: a snapshot needs a name')
  return w.mutex.run(async () => {
    if (state.snapshots.some((s) => s.name === name || s.id === name)) {
      throw new UsageError(`qcow2: ${state.filename}: a snapshot named '${name}' already exists`)
    }
    const h = state.header
    w.assertUsable()
    await checkOverflow(state, w, state.l1, h.l1Size)
    // the snapshot takes the active L1 table as it is; the active image gets a copy
    const snap = newSnapshot(state, name, now, h.l1Size > 0 ? h.l1TableOffset : 0)
    const snaps = [...state.snapshots, snap]
    await commitShadow(state, w, { l1: state.l1.slice(), l1Size: h.l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps) })
    return listSnapshots(img).find((s) => s.id === snap.id)!
  })
}

export async function deleteSnapshot(img: Qcow2OpenImage, nameOrId: string): Promise<void> {
  const w = writerOf(img)
  const state = img.state
  return w.mutex.run(async () => {
    const s = find(state, nameOrId)
    w.assertUsable()
    const snaps = state.snapshots.filter((x) => x !== s)
    await commitShadow(state, w, { l1: state.l1.slice(), l1Size: state.header.l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps) })
  })
}

/**
 * Apply (goto) a snapshot. When the snapshot's disk size differs from the
 * image's, the image takes the snapshot's size, as qcow2_snapshot_goto does
 * (it truncates first); a v2 image with snapshots cannot be resized, so there
 * it is refused as in QEMU. The new active L1 table (of the new size when
 * the size changes, or when the snapshot's table is larger) is part of the
 * shadow commit, whose one header write switches size, l1_size and
 * l1_table_offset together, so a crash leaves either the old image or the
 * snapshot's, never a mix.
 */
export async function applySnapshot(img: Qcow2OpenImage, nameOrId: string): Promise<void> {
  const w = writerOf(img)
  const state = img.state
  return w.mutex.run(async () => {
    // QEMU refuses before it looks the snapshot up (bdrv_snapshot_goto): the bitmaps would not match the data
    w.bitmaps?.checkSnapshotApply(nameOrId)
    const s = find(state, nameOrId)
    const h = state.header
    const newSize = s.diskSize ?? h.size
    const resize = newSize !== h.size
    if (resize && h.version < 3) {
      throw new UnsupportedFeatureError(
        `qcow2: ${state.filename}: snapshot '${s.name}' has another disk size (${newSize}) than the image (${h.size}): Can't resize a v2 image which has snapshots`,
      )
    }
    w.assertUsable()
    const newTable = resize || s.l1Size > h.l1Size
    const l1Size = newTable ? Math.max(s.l1Size, l1EntriesNeeded({ ...h, size: newSize })) : h.l1Size
    const snapL1 = new Uint8Array(l1Size * 8)
    if (s.l1Size > 0) snapL1.set(await state.device.read(s.l1TableOffset, s.l1Size * 8, 'l1'))
    await checkOverflow(state, w, snapL1, l1Size)
    // the active L1 becomes a copy of the snapshot's (at the snapshot's size, as qcow2_snapshot_goto)
    const snaps = [...state.snapshots]
    await commitShadow(state, w, { l1: snapL1, l1Size, snapshots: snaps, table: encodeSnapshotTable(snaps), size: newSize })
  })
}
