/**
 * The qcow2 format's entry for the layers above (the public API): what they
 * may call beyond the DiskImage interface. Nothing outside this folder
 * imports another file of it.
 */
export { qcow2Driver } from './driver.js'
export { Qcow2Image } from './image.js'
export { listSnapshots, createSnapshot, applySnapshot, deleteSnapshot } from './snapshot-ops.js'
export { resizeQcow2 } from './resize.js'
export { parseCreateOptions } from './create.js'
export { CompressPool } from './compress-write.js'
