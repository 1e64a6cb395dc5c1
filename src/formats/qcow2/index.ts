/**
 * The qcow2 format's entry for the layers above (the public API): what they
 * may call beyond the DiskImage interface. Nothing outside this folder
 * imports another file of it.
 */
export { qcow2Driver } from './driver.js'
export { Qcow2Image } from './image.js'
export { listSnapshots, createSnapshot, applySnapshot, deleteSnapshot } from './ops/snapshot-ops.js'
export { resizeQcow2 } from './ops/resize.js'
export { amendQcow2, parseAmendOptions, QCOW2_AMEND_OPTIONS, type AmendOptionHelp, type Qcow2AmendOptions } from './ops/amend.js'
export { parseCreateOptions } from './ops/create.js'
export { CompressPool } from './write/compress-write.js'
export { applyQcow2Undo } from './repair/journal.js'
export { combinePath, protocolPrefix } from './spec/paths.js'
export { readHeader, type Qcow2Header } from './spec/header.js'
export { readBitmapDirectory, BME_FLAG_IN_USE, type Qcow2Bitmap } from './spec/bitmap-directory.js'
export { parseQcow2MeasureOptions, checkQcow2MeasureSize, measureQcow2, qcow2BitmapsSize, type Qcow2MeasureOptions } from './ops/measure.js'
export { deflateAddon } from './write/deflate-addon.js'
export { rebaseQcow2, type RebaseQcow2Options, type RebaseQcow2Result } from './ops/rebase.js'
export { commitQcow2, emptyOverlay, type CommitQcow2Options, type CommitQcow2Result } from './ops/commit.js'
export {
  editQcow2Bitmaps,
  readQcow2Bitmaps,
  type BitmapEditOp,
  type BitmapEditResult,
  type BitmapSourceImage,
  type Qcow2BitmapContents,
} from './ops/bitmap-edit.js'
