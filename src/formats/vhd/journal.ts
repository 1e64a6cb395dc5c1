/**
 * Undo journal for VHD repair: the shared region journal (src/check/region-journal.ts: the bytes a repair step
 * overwrites or cuts, and the size before a truncate, flushed before the step; a seal when the repair ends) under
 * the magic "IMGTOOL-VHDUNDO1".
 */
import type { BlockDevice } from '../../io/block-device.js'
import { RegionJournal, applyRegionUndo, type JournalKind } from '../../check/region-journal.js'
import type { UndoOptions } from '../../check/undo.js'

export const VHD_UNDO_MAGIC = 'IMGTOOL-VHDUNDO1'
const KIND: JournalKind = { magic: VHD_UNDO_MAGIC, format: 'vpc' }

export class VhdJournal extends RegionJournal {
  constructor(dev: BlockDevice) {
    super(dev, KIND)
  }
}

/**
 * Put `image` back as the repair that wrote `journal` found it; returns the records applied. Refuses garbage and
 * (unless options.force) a journal that cannot be checked against `image` or whose checks fail.
 */
export async function applyVhdUndo(journal: BlockDevice, image: BlockDevice, options: UndoOptions = {}): Promise<number> {
  return applyRegionUndo(KIND, journal, image, options)
}
