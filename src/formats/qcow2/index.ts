/**
 * The qcow2 format's entry for the layers above (the public API): what they
 * may call beyond the DiskImage interface. Nothing outside this folder
 * imports another file of it.
 */
export { qcow2Driver } from './driver.js'
export { Qcow2Image } from './image.js'
export { parseCreateOptions } from './ops/create-options.js'
export { parseAmendOptions, QCOW2_AMEND_OPTIONS, type AmendOptionHelp, type Qcow2AmendOptions } from './ops/amend-options.js'
export { combinePath, protocolPrefix } from './spec/paths.js'
export { readHeader, type Qcow2Header } from './spec/header.js'
export { readBitmapDirectory, BME_FLAG_IN_USE, type Qcow2Bitmap } from './spec/bitmap-directory.js'
export { parseQcow2MeasureOptions, checkQcow2MeasureSize, measureQcow2, qcow2BitmapsSize, type Qcow2MeasureOptions } from './ops/measure.js'
export { deflateAddon } from './write/deflate-addon.js'
export type { CompressPool } from './write/compress-write.js'
export type { RebaseQcow2Options, RebaseQcow2Result } from './ops/rebase.js'
export type { CommitQcow2Options, CommitQcow2Result } from './ops/commit.js'
export type { BitmapEditOp, BitmapEditResult, BitmapSourceImage, Qcow2BitmapContents } from './ops/bitmap-edit.js'

// The operations below load their modules (the writer, the refcount rewriter, the bitmap editor...) on first use, so
// that opening an image to read or check it does not pay for them: about 26 modules and 2 MiB of RSS.
type SnapshotOps = typeof import('./ops/snapshot-ops.js')
type Fn<K extends keyof M, M> = M[K] extends (...a: infer A) => infer R ? (...a: A) => Promise<Awaited<R>> : never

/** The image's snapshots, as `qemu-img snapshot -l` lists them. */
export const listSnapshots: Fn<'listSnapshots', SnapshotOps> = async (...a) => (await import('./ops/snapshot-ops.js')).listSnapshots(...a)
export const createSnapshot: Fn<'createSnapshot', SnapshotOps> = async (...a) => (await import('./ops/snapshot-ops.js')).createSnapshot(...a)
export const applySnapshot: Fn<'applySnapshot', SnapshotOps> = async (...a) => (await import('./ops/snapshot-ops.js')).applySnapshot(...a)
export const deleteSnapshot: Fn<'deleteSnapshot', SnapshotOps> = async (...a) => (await import('./ops/snapshot-ops.js')).deleteSnapshot(...a)
export const resizeQcow2: Fn<'resizeQcow2', typeof import('./ops/resize.js')> = async (...a) => (await import('./ops/resize.js')).resizeQcow2(...a)
export const amendQcow2: Fn<'amendQcow2', typeof import('./ops/amend.js')> = async (...a) => (await import('./ops/amend.js')).amendQcow2(...a)
export const applyQcow2Undo: Fn<'applyQcow2Undo', typeof import('./repair/journal.js')> = async (...a) =>
  (await import('./repair/journal.js')).applyQcow2Undo(...a)
export const rebaseQcow2: Fn<'rebaseQcow2', typeof import('./ops/rebase.js')> = async (...a) => (await import('./ops/rebase.js')).rebaseQcow2(...a)
export const commitQcow2: Fn<'commitQcow2', typeof import('./ops/commit.js')> = async (...a) => (await import('./ops/commit.js')).commitQcow2(...a)
export const emptyOverlay: Fn<'emptyOverlay', typeof import('./ops/commit.js')> = async (...a) => (await import('./ops/commit.js')).emptyOverlay(...a)
export const editQcow2Bitmaps: Fn<'editQcow2Bitmaps', typeof import('./ops/bitmap-edit.js')> = async (...a) =>
  (await import('./ops/bitmap-edit.js')).editQcow2Bitmaps(...a)
export const readQcow2Bitmaps: Fn<'readQcow2Bitmaps', typeof import('./ops/bitmap-edit.js')> = async (...a) =>
  (await import('./ops/bitmap-edit.js')).readQcow2Bitmaps(...a)
/** The pool that deflates clusters for convert -c (worker threads or the native addon), loaded on use. */
export async function newCompressPool(): Promise<import('./write/compress-write.js').CompressPool> {
  return new (await import('./write/compress-write.js')).CompressPool()
}
