/** VMDK: the format's only entry. */
import type { FormatDriver } from '../../image/context.js'
import { createVmdk } from './create.js'
import { openVmdk } from './image.js'

export { VmdkImage, openVmdk } from './image.js'
export { checkVmdk } from './check.js'
export { createVmdk, flatExtentName, parseVmdkCreateOptions, type VmdkCreateOptions } from './create.js'
export { writeStreamOptimized, type StreamSink, type StreamWriteResult } from './stream.js'

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  open: (device, context, options) => openVmdk(device, context, options),
  create: (device, context, options) => createVmdk(device, context, options),
}
