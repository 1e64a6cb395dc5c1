/** VHD (qemu-img's `vpc`): the format's only entry. */
import type { FormatDriver } from '../../image/context.js'
import { createVhd } from './create.js'
import { openVhd } from './image.js'

export { VhdImage, UnreadableVhd, openVhd } from './image.js'
export { createVhd, parseVhdCreateOptions } from './create.js'
export { checkVhd } from './check.js'
export { repairVhd } from './repair.js'
export { applyVhdUndo, VHD_UNDO_MAGIC } from './journal.js'

export const vhdDriver: FormatDriver = {
  name: 'vpc',
  open: (device, context, options) => openVhd(device, context, options),
  create: (device, _context, options) => createVhd(device, options),
}
