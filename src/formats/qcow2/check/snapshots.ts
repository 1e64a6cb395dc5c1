/**
 * Reading the snapshot table the way qemu-img check does (check mode:
 * qcow2_check_read_snapshot_table + qcow2_do_read_snapshots). Problems that
 * make the table unreadable fail the whole check (as qemu-img does, with its
 * errno text); entries that are merely incomplete are corruptions.
 */
import type { BlockDevice } from '../../../io/block-device.js'
import { u16be, u32be, u64be } from '../../../util/bytes.js'
import { MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES } from '../spec/constants.js'

export interface CheckSnapshot {
  index: number
  entryOffset: number
  l1TableOffset: number
  /** l1_table_offset is not cluster aligned (decided on the exact 64-bit value, not on the double) */
  l1Unaligned: boolean
  /** l1_table_offset in hex, exact (a double loses the low bits above 2^53) */
  l1TableOffsetHex: string
  l1Size: number
  id: string
  name: string
  extraDataSize: number
}

export interface SnapshotTableCheck {
  snapshots: CheckSnapshot[]
  /** bytes from snapshots_offset to the end of the last entry (qemu's snapshots_size) */
  size: number
  offset: number
  /** header nb_snapshots as found */
  nbSnapshots: number
  /** v3 entries with less than 16 bytes of extra data */
  incomplete: number[]
  /** with fix-errors only: entries dropped, extra data truncated */
  reduced: number
  extraDropped: number
  diagnostics: string[]
  /** the table cannot be read: qemu-img says "Check failed: <errno text>" */
  failure?: { errno: 'EFBIG' | 'EINVAL' | 'EIO'; message: string }
}

const SNAPSHOT_FIXED = 40
const SNAPSHOT_READ_WINDOW = 65536

export async function readSnapshotsForCheck(dev: BlockDevice, clusterSize: number, version: number, fixErrors: boolean): Promise<SnapshotTableCheck> {
  const head = await dev.read(60, 12, 'header')
  let nb = u32be(head, 0)
  const offsetExact = u64be(head, 4)
  // above 2^53 the nearest double stands for it: such a table lies past the end of any file and reads as zeros
  const offset = Number(offsetExact)
  const r: SnapshotTableCheck = {
    snapshots: [],
    size: 0,
    offset,
    nbSnapshots: nb,
    incomplete: [],
    reduced: 0,
    extraDropped: 0,
    diagnostics: [],
  }
  if (nb > MAX_SNAPSHOTS && fixErrors) {
    r.diagnostics.push(`Discarding ${nb - MAX_SNAPSHOTS} overhanging snapshots`)
    r.reduced += nb - MAX_SNAPSHOTS
    nb = MAX_SNAPSHOTS
  }
  // qcow2_validate_table
  if (nb > MAX_SNAPSHOTS) {
    r.diagnostics.push('qemu-img: ERROR snapshot table too large')
    r.diagnostics.push(`You can force-remove all ${nb - MAX_SNAPSHOTS} overhanging snapshots with qemu-img check -r all`)
    r.failure = { errno: 'EFBIG', message: `snapshot table too large: ${nb} snapshots (limit ${MAX_SNAPSHOTS})` }
    return r
  }
  // qcow2_validate_table: aligned, and the table's end within int64
  if (offsetExact % BigInt(clusterSize) !== 0n || offsetExact > (1n << 63n) - 1n - BigInt(nb * SNAPSHOT_FIXED)) {
    r.diagnostics.push('qemu-img: ERROR snapshot table offset invalid')
    const why = offsetExact % BigInt(clusterSize) !== 0n ? 'not cluster aligned' : 'the table would end past 2^63'
    r.failure = { errno: 'EINVAL', message: `snapshot table offset 0x${offsetExact.toString(16)} is invalid (${why})` }
    return r
  }
  if (nb === 0) return r
  const dec = new TextDecoder()
  // entries are read through a 64 KiB window: 65,536 entries cost a few hundred reads, not 131,072 (a
  // repair reads the table several times); a window that cannot be read falls back to the entry's own read,
  // so a read error is the entry's, as before
  let windowStart = -1
  let window: Uint8Array = new Uint8Array(0)
  const readAt = async (at: number, length: number): Promise<Uint8Array> => {
    if (windowStart < 0 || at < windowStart || at + length > windowStart + window.byteLength) {
      try {
        window = await dev.read(at, Math.max(length, SNAPSHOT_READ_WINDOW), 'snapshot')
        windowStart = at
      } catch {
        windowStart = -1
        return dev.read(at, length, 'snapshot')
      }
    }
    return window.subarray(at - windowStart, at - windowStart + length)
  }
  let pos = offset
  for (let i = 0; i < nb; i++) {
    pos = Math.ceil(pos / 8) * 8
    let fixed: Uint8Array
    try {
      fixed = await readAt(pos, SNAPSHOT_FIXED)
    } catch (e) {
      r.diagnostics.push(`qemu-img: ERROR failed to read the snapshot table: Failed to read snapshot table: Input/output error`)
      r.failure = { errno: 'EIO', message: `cannot read snapshot table entry ${i}: ${(e as Error).message}` }
      return r
    }
    const entryOffset = pos
    pos += SNAPSHOT_FIXED
    const l1Raw = u64be(fixed, 0)
    const l1TableOffset = Number(l1Raw)
    const l1Unaligned = (u32be(fixed, 4) & (clusterSize - 1)) !== 0
    const l1Size = u32be(fixed, 8)
    const idSize = u16be(fixed, 12)
    const nameSize = u16be(fixed, 14)
    const origExtra = u32be(fixed, 36)
    let extra = origExtra
    if (extra > MAX_SNAPSHOT_EXTRA_DATA) {
      if (!fixErrors) {
        r.diagnostics.push(`qemu-img: ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry ${i}`)
        r.diagnostics.push('You can force-remove this extra metadata with qemu-img check -r all')
        r.failure = { errno: 'EFBIG', message: `snapshot table entry ${i} has ${extra} bytes of extra data (limit ${MAX_SNAPSHOT_EXTRA_DATA})` }
        return r
      }
      r.diagnostics.push(`Discarding too much extra metadata in snapshot table entry ${i} (${extra} > ${MAX_SNAPSHOT_EXTRA_DATA})`)
      r.extraDropped++
      extra = MAX_SNAPSHOT_EXTRA_DATA
    }
    // qemu skips the whole original extra data, even when it keeps only 1024 bytes of it
    pos += origExtra
    const names = await readAt(pos, idSize + nameSize)
    pos += idSize + nameSize
    const id = dec.decode(names.subarray(0, idSize))
    const name = dec.decode(names.subarray(idSize))
    if (pos - offset > MAX_SNAPSHOT_TABLE_BYTES) {
      if (!fixErrors) {
        r.diagnostics.push('qemu-img: ERROR failed to read the snapshot table: Snapshot table is too big')
        r.diagnostics.push(`You can force-remove all ${nb - i} overhanging snapshots with qemu-img check -r all`)
        r.failure = { errno: 'EFBIG', message: `snapshot table is larger than 64 MiB at entry ${i}` }
        return r
      }
      r.diagnostics.push(`Discarding ${nb - i} overhanging snapshots (snapshot table is too big)`)
      r.reduced += nb - i
      break
    }
    r.snapshots.push({
      index: i,
      entryOffset,
      l1TableOffset,
      l1Unaligned,
      l1TableOffsetHex: l1Raw === 0n ? '0' : `0x${l1Raw.toString(16)}`,
      l1Size,
      id,
      name,
      extraDataSize: extra,
    })
    r.size = pos - offset
  }
  if (version >= 3) {
    for (const s of r.snapshots) {
      if (s.extraDataSize < 16) {
        r.incomplete.push(s.index)
        r.diagnostics.push(`${fixErrors ? 'Repairing' : 'ERROR'} snapshot table entry ${s.index} is incomplete`)
      }
    }
  }
  return r
}
