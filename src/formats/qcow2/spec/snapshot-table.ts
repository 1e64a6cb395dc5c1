/** The internal snapshot table: parsing (names, ids, sizes, L1 offsets, extra data). */
import { CorruptImageError, hex } from '../../../errors.js'
import type { SnapshotInfo } from '../../../image/disk-image.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { u16be, u32be, u64be } from '../../../util/bytes.js'
import { MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES } from './constants.js'

export interface Qcow2Snapshot {
  /** byte offset of this entry in the file */
  entryOffset: number
  l1TableOffset: number
  l1Size: number
  id: string
  name: string
  dateSec: number
  dateNsec: number
  vmClockNsec: number
  vmStateSize: number
  extraData: Uint8Array
  /** from extra data, when present */
  vmStateSizeLarge?: number
  diskSize?: number
  icount?: number
}

export const SNAPSHOT_FIXED_BYTES = 40

/**
 * Read `count` entries at `offset`. Reads in pieces: the table's size is
 * bounded by QEMU's limits before anything large is read.
 */
export async function readSnapshotTable(dev: BlockDevice, file: string, offset: number, count: number): Promise<Qcow2Snapshot[]> {
  const fail = (msg: string, at: number): never => {
    throw new CorruptImageError(`qcow2: ${file}: snapshot table: ${msg} (at ${hex(at)})`, { file, structure: 'snapshot', offset: at })
  }
  if (count > MAX_SNAPSHOTS) fail(`${count} snapshots (limit ${MAX_SNAPSHOTS})`, offset)
  const out: Qcow2Snapshot[] = []
  let pos = offset
  const decoder = new TextDecoder()
  for (let i = 0; i < count; i++) {
    if (pos - offset > MAX_SNAPSHOT_TABLE_BYTES) fail(`table is too big (more than 64 MiB at entry ${i})`, pos)
    const fixed = await dev.read(pos, SNAPSHOT_FIXED_BYTES, 'snapshot')
    const l1TableOffset = Number(u64be(fixed, 0))
    const l1Size = u32be(fixed, 8)
    const idSize = u16be(fixed, 12)
    const nameSize = u16be(fixed, 14)
    const extraSize = u32be(fixed, 36)
    if (extraSize > MAX_SNAPSHOT_EXTRA_DATA) fail(`entry ${i} has too much extra metadata (${extraSize} > 1024 bytes)`, pos)
    const varLen = extraSize + idSize + nameSize
    const rest = await dev.read(pos + SNAPSHOT_FIXED_BYTES, varLen, 'snapshot')
    const extraData = rest.slice(0, extraSize)
    const snap: Qcow2Snapshot = {
      entryOffset: pos,
      l1TableOffset,
      l1Size,
      id: decoder.decode(rest.subarray(extraSize, extraSize + idSize)),
      name: decoder.decode(rest.subarray(extraSize + idSize, varLen)),
      dateSec: u32be(fixed, 16),
      dateNsec: u32be(fixed, 20),
      vmClockNsec: Number(u64be(fixed, 24)),
      vmStateSize: u32be(fixed, 32),
      extraData,
    }
    if (extraSize >= 8) snap.vmStateSizeLarge = Number(u64be(extraData, 0))
    if (extraSize >= 16) snap.diskSize = Number(u64be(extraData, 8))
    if (extraSize >= 24) snap.icount = Number(BigInt.asIntN(64, u64be(extraData, 16)))
    out.push(snap)
    pos += Math.ceil((SNAPSHOT_FIXED_BYTES + varLen) / 8) * 8
  }
  return out
}

/** Bytes the table occupies (entries padded to 8). */
export function snapshotTableBytes(snaps: Qcow2Snapshot[], offset: number): number {
  if (snaps.length === 0) return 0
  const last = snaps[snaps.length - 1]!
  const lastLen =
    SNAPSHOT_FIXED_BYTES + last.extraData.byteLength + new TextEncoder().encode(last.id).byteLength + new TextEncoder().encode(last.name).byteLength
  return last.entryOffset - offset + Math.ceil(lastLen / 8) * 8
}

/** What info and `snapshot -l` show of a snapshot. */
export function snapshotInfo(s: Qcow2Snapshot): SnapshotInfo {
  const info: SnapshotInfo = {
    id: s.id,
    name: s.name,
    vmStateSize: s.vmStateSizeLarge ?? s.vmStateSize,
    dateSec: s.dateSec,
    dateNsec: s.dateNsec,
    vmClockNsec: s.vmClockNsec,
    l1TableOffset: s.l1TableOffset,
    l1Size: s.l1Size,
    extraDataSize: s.extraData.byteLength,
  }
  if (s.icount !== undefined) info.icount = s.icount
  if (s.diskSize !== undefined) info.diskSize = s.diskSize
  return info
}
