/**
 * imgtool as a library: check, repair, inspect, create and convert qcow2
 * images, raw files and Linux dm-snapshot COW stores, with qemu-img's answers.
 *
 * ```ts
 * import { openImage, check, convert } from 'imgtool'
 *
 * const report = await check('disk.qcow2')          // qemu-img check's counters + findings
 * if (report.corruptions === 0) await convert('disk.qcow2', 'disk.raw', { targetFormat: 'raw' })
 * await using img = await openImage('disk.qcow2')   // read-only unless readOnly: false
 * const first = await img.read(0, 512)
 * ```
 *
 * Every function returns data and throws ImgtoolError subclasses with a
 * stable `code`; nothing prints. This file is the package's only entry.
 */
export { openImage, type Image, type OpenOptions, type ReferencePolicy } from './api/image.js'
export { check, type CheckImageOptions } from './api/check.js'
export { imageInfo, mapImage, type InfoOptions, type MapOptions } from './api/inspect.js'
export {
  repair,
  undoRepair,
  RepairIncompleteError,
  type RepairOptions,
  type RepairOutcome,
  type UndoRepairOptions,
  type UndoRepairResult,
} from './api/repair.js'
export {
  createImage,
  convert,
  compare,
  snapshot,
  resize,
  merge,
  type CommonOptions,
  type Progress,
  type CreateOptions,
  type CreateResult,
  type CreatePlan,
  type ConvertOptions,
  type ConvertResult,
  type SalvageEvent,
  type TargetFormat,
  type CompareOptions,
  type CompareResult,
  type SnapshotResult,
  type SnapshotOptions,
  type Qcow2OpOptions,
  type ResizeOptions,
  type MergeOptions,
  type MergeResult,
} from './api/ops.js'
export { rebase, commit, type RebaseOptions, type RebaseResult, type CommitOptions, type CommitResult } from './api/rebase.js'
export { amend, amendOptionHelp, type AmendOptions, type AmendOptionHelp, type AmendResult } from './api/amend.js'
export { bitmap, readBitmaps, type BitmapOperation, type BitmapOptions, type BitmapResult, type BitmapContents } from './api/bitmap.js'
export { measure, type MeasureOptions, type MeasureResult } from './api/measure.js'
export { dd, type DdOptions, type DdResult } from './api/dd.js'
export { nativeParts, QEMU_IMG_VERSION, type NativeParts } from './api/native.js'
export { exportImage, type ExportOptions, type ExportResult } from './convert/export.js'
export { CACHE_MODES, type CacheMode } from './convert/unsafe-cache.js'
export type { CheckReport, Finding, Notice, Severity, GuestRange, RepairMode, RepairAction, RepairResult } from './check/types.js'
export { checkExitCode, EXIT_CLEAN, EXIT_CHECK_FAILED, EXIT_CORRUPT, EXIT_LEAKS, EXIT_NO_CHECK } from './check/types.js'
export type { Extent, ImageInfo, SnapshotInfo, SnapshotSelector } from './image/disk-image.js'
export type { BlockDevice, IoTag, HostStatus } from './io/block-device.js'
export { MemoryDevice } from './io/memory-device.js'
export { FORMAT_NAMES, isFormatName, type FormatName } from './image/probe.js'
/** qemu-img's sizes: parseSize('1.5M') is 1572864; humanSize(1572864) is '1.5 MiB'. */
export { parseSize, humanSize } from './util/size.js'
/** Text from an image (a backing file name in a header) made safe to print: control characters become \xNN. */
export { escapeControls } from './util/text.js'
export {
  ImgtoolError,
  UsageError,
  NotFoundError,
  WrongFormatError,
  UnsupportedFeatureError,
  NoCheckError,
  CorruptImageError,
  ImageIoError,
  ReadOnlyError,
  ImageLockedError,
  AbortedError,
  isImgtoolError,
  type ErrorCode,
  type ErrorDetails,
} from './errors.js'
export {
  validate,
  resolvePolicy,
  basePolicy,
  mergePolicy,
  PRESETS,
  PRESET_NAMES,
  KNOWN_FORMATS,
  QCOW2_INCOMPATIBLE,
  QCOW2_COMPATIBLE,
  QCOW2_AUTOCLEAR,
  VHD_SUBFORMATS,
  VMDK_CREATE_TYPES,
  CODES,
  CHECK_GROUPS,
  type ValidateOptions,
  type Policy,
  type PolicyInput,
  type PresetName,
  type Limits,
  type CheckGroup,
  type CodeInfo,
  type ViolationCode,
  type ViolationSeverity,
  type ValidationReport,
  type Violation,
  type CheckStatus,
  type GuestDigest,
} from './validate/index.js'
