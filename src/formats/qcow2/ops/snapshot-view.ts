/**
 * Reading an internal snapshot as a source (qemu-img convert/measure -l), as
 * qemu's qcow2_snapshot_load_tmp does: the snapshot is found by id and/or
 * name, its L1 table is checked and read, and the image façade builds a
 * read-only view over it (image.ts). Nothing is written.
 */
import { CorruptImageError, NotFoundError, hex } from '../../../errors.js'
import type { SnapshotSelector } from '../../../image/disk-image.js'
import type { Qcow2State } from '../read/state.js'
import { MAX_L1_BYTES } from '../spec/constants.js'
import type { Qcow2Snapshot } from '../spec/snapshot-table.js'

/**
 * The snapshot `sel` names, with qemu's rules: `id` and `name` together must
 * both match one snapshot; `idOrName` is tried as an id first, then as a name.
 */
export function findSnapshotToLoad(snapshots: readonly Qcow2Snapshot[], sel: SnapshotSelector, file: string): Qcow2Snapshot {
  const by = (id: string | undefined, name: string | undefined) =>
    id === undefined && name === undefined ? undefined : snapshots.find((s) => (id === undefined || s.id === id) && (name === undefined || s.name === name))
  const found = sel.idOrName !== undefined ? (by(sel.idOrName, undefined) ?? by(undefined, sel.idOrName)) : by(sel.id, sel.name)
  if (!found) throw new NotFoundError("Failed to load snapshot: Can't find snapshot", { file, structure: 'snapshot table' })
  return found
}

/** The snapshot's L1 table, checked as qcow2_validate_table checks it. */
export async function readSnapshotL1(state: Qcow2State, sn: Qcow2Snapshot): Promise<Uint8Array> {
  const file = state.filename
  const where = { file, structure: 'snapshot table', offset: sn.entryOffset }
  if (sn.l1Size > MAX_L1_BYTES / 8)
    throw new CorruptImageError(`Failed to load snapshot: Snapshot L1 table too large (snapshot ${sn.id} at ${hex(sn.entryOffset)})`, where)
  if (sn.l1TableOffset % state.clusterSize !== 0)
    throw new CorruptImageError(
      `Failed to load snapshot: Snapshot L1 table offset invalid (${hex(sn.l1TableOffset)}, snapshot ${sn.id} at ${hex(sn.entryOffset)})`,
      where,
    )
  const bytes = sn.l1Size * 8
  if (bytes === 0) return new Uint8Array(0)
  if (sn.l1TableOffset + bytes > state.device.size)
    throw new CorruptImageError(
      `Failed to load snapshot: snapshot ${sn.id}'s L1 table runs past the end of the file (L1 table at ${hex(sn.l1TableOffset)}, file size ${hex(state.device.size)})`,
      { file, structure: 'snapshot l1', offset: sn.l1TableOffset },
    )
  return state.device.read(sn.l1TableOffset, bytes, 'l1')
}
