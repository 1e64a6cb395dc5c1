import type { FormatDriver } from '../../image/context.js'
import { createQcow2 } from './create.js'
import { openQcow2 } from './image.js'

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  open: (device, context, options) => openQcow2(device, context, options),
  create: (device, context, options) => createQcow2(device, context, options),
}
