import type { FormatDriver } from '../../image/context.js'
import { openQcow2 } from './image.js'

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  open: (device, context, options) => openQcow2(device, context, options),
  // loaded on use: opening an image need not load the creator
  create: async (device, context, options) => (await import('./ops/create.js')).createQcow2(device, context, options),
}
