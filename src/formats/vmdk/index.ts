/** VMDK: the format's only entry. */
import type { FormatDriver } from '../../image/context.js'
import { createVmdk } from './create.js'
import { openVmdk } from './image.js'

export { VmdkImage, openVmdk } from './image.js'
export { checkVmdk } from './check.js'
export { repairVmdk } from './repair.js'
export { applyVmdkUndo, VMDK_UNDO_MAGIC } from './journal.js'
export { createVmdk, flatExtentName, parseVmdkCreateOptions, type VmdkCreateOptions } from './create.js'
export { writeStreamOptimized, type StreamSink, type StreamWriteResult } from './stream.js'
// for validate: the strict descriptor grammar and the sparse header codec, on bytes it read itself
export { parseDescriptor, type Descriptor, type ExtentLine } from './descriptor.js'
export { decodeHeader, GD_AT_END, MAX_DESCRIPTOR_BYTES, MAX_GD_ENTRIES, SPARSE_MAGIC, type SparseHeader } from './spec.js'

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  open: (device, context, options) => openVmdk(device, context, options),
  create: (device, context, options) => createVmdk(device, context, options),
}
