/**
 * Undo journal for VMDK repair: the shared region journal (src/check/region-journal.ts: the bytes a repair step
 * overwrites or cuts, and the size before a truncate, flushed before the step; a seal when the repair ends) under
 * the magic "IMGTOOL-VMKUNDO1".
 */
import type { BlockDevice } from '../../io/block-device.js'
import { RegionJournal, applyRegionUndo, type JournalKind } from '../../check/region-journal.js'
import type { UndoOptions } from '../../check/undo.js'

export const VMDK_UNDO_MAGIC = 'IMGTOOL-VMKUNDO1'
const KIND: JournalKind = { magic: VMDK_UNDO_MAGIC, format: 'vmdk' }

export class VmdkJournal extends RegionJournal {
  constructor(dev: BlockDevice) {
    super(dev, KIND)
  }
}

/**
 * Put `image` back as the repair that wrote `journal` found it; returns the records applied. Refuses garbage and
 * (unless options.force) a journal that cannot be checked against `image` or whose checks fail.
 */
export async function applyVmdkUndo(journal: BlockDevice, image: BlockDevice, options: UndoOptions = {}): Promise<number> {
  return applyRegionUndo(KIND, journal, image, options)
}
