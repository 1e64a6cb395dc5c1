/**
 * The library's operations: each one call, taking paths (or an open Image
 * where that makes sense), reporting progress through `onProgress` and
 * stopping when its AbortSignal fires. They return data; nothing prints.
 */
import { UsageError, checkAborted } from '../errors.js'
import { openFileDevice } from '../io/file-device.js'
import type { DiskImage, SnapshotInfo } from '../image/disk-image.js'
import { driverFor, makeContext, openImage as openByPath } from '../open.js'
// the convert and compare engines load when they are called: importing the package stays cheap (the CLI's start)
import type { CompareResult } from '../convert/compare.js'
import type { SalvageEvent } from '../convert/convert.js'
import type { SnapshotSelector } from '../image/disk-image.js'
import type { ConvertFileResult, TargetFormat } from '../convert/to-file.js'
import type { CacheMode } from '../convert/unsafe-cache.js'
import { diskImageOf, formatOption, openOptionsOf, type Image, type OpenOptions } from './image.js'

export type Progress = (done: number, total: number) => void

export interface CommonOptions {
  onProgress?: Progress
  signal?: AbortSignal
}

async function withImage<R>(target: Image | string, o: OpenOptions, fn: (d: DiskImage) => Promise<R>): Promise<R> {
  if (typeof target !== 'string') return fn(diskImageOf(target))
  const d = await openByPath(target, {
    format: formatOption(o.format),
    readOnly: o.readOnly ?? true,
    options: openOptionsOf(o),
    forceShare: o.forceShare === true,
  })
  try {
    return await fn(d)
  } finally {
    await d.close()
  }
}

// ---------------------------------------------------------------------------
// create

export interface CreateOptions {
  format: 'raw' | 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'
  /** virtual size in bytes, or as qemu-img takes it ('10G', '512M'); with a backing file it may be left out */
  size?: number | string
  /** format options as qemu-img create -o takes them (cluster_size, compat, preallocation, chunk_size, backing_file...) */
  options?: Record<string, string>
  backingFile?: string
  backingFormat?: string
  /** default true: with a backing file and no size, open the backing file for its size (false: qemu-img create -u) */
  openBacking?: boolean
  /** dm-snapshot: the origin */
  origin?: string
  /**
   * Called once the size is known, before the options are checked and before
   * the file is touched (imgtool prints qemu-img's "Formatting" line here).
   */
  onPlan?: (plan: CreatePlan) => void
  signal?: AbortSignal
}

/** What createImage is about to make. */
export interface CreatePlan {
  format: 'raw' | 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'
  size: number
  /** the format options as given (backing_file and backing_fmt among them when given there) */
  options: Record<string, string>
  backingFile?: string
  backingFormat?: string
}

export interface CreateResult {
  filename: string
  format: string
  size: number
}

/**
 * Create a new image file. Options are checked before the file is touched:
 * a mistake leaves no new file and an existing one intact; a qcow2 image that
 * fails half way is removed (as qemu-img).
 */
export async function createImage(path: string, o: CreateOptions): Promise<CreateResult> {
  checkAborted(o.signal, 'create')
  const format = o.format
  if (format !== 'qcow2' && format !== 'raw' && format !== 'dmsnap' && format !== 'vpc' && format !== 'vmdk')
    throw new UsageError(`Unknown file format '${String(format)}' for create (qcow2, raw, dmsnap, vpc, vmdk)`)
  const options = { ...(o.options ?? {}) }
  if (o.origin !== undefined) options['origin'] = o.origin
  if (options['origin'] !== undefined && format !== 'dmsnap') throw new UsageError('an origin goes with dmsnap stores')
  const backing = o.backingFile ?? options['backing_file']
  const backingFormat = o.backingFormat ?? options['backing_fmt']
  if (backing !== undefined && backingFormat === undefined) throw new UsageError(`${path}: Backing file specified without backing format`)
  const { parseSize } = await import('../util/size.js')
  if (o.size !== undefined && options['size'] !== undefined) throw new UsageError(`${path}: The image size must be specified only once`)
  let size = typeof o.size === 'string' ? parseSize(o.size) : (o.size ?? (options['size'] !== undefined ? parseSize(options['size']) : undefined))
  if (size === undefined && backing !== undefined && o.openBacking !== false) {
    const { combinePath, protocolPrefix } = await import('../formats/qcow2/index.js')
    const { escapeControls } = await import('../util/text.js')
    const protocol = protocolPrefix(backing)
    if (protocol !== undefined) {
      throw new UsageError(
        `${path}: backing file ${escapeControls(backing)} names the protocol '${escapeControls(protocol)}:'; imgtool opens only plain file names (give SIZE and -u to write the name without opening it)`,
      )
    }
    const { isFormatName } = await import('../image/probe.js')
    const b = await openByPath(combinePath(path, backing), { format: isFormatName(backingFormat!) ? backingFormat : undefined, readOnly: true })
    size = b.virtualSize
    await b.close()
  }
  if (size === undefined) throw new UsageError('Image creation needs a size parameter')
  if (!Number.isSafeInteger(size) || size < 0) throw new UsageError(`Invalid image size ${size}`)
  if (format === 'raw' && (backing !== undefined || Object.keys(options).some((k) => k !== 'size' && k !== 'preallocation'))) {
    throw new UsageError(`raw images take no options but size and preallocation`)
  }
  o.onPlan?.({
    format,
    size,
    options: { ...options },
    ...(backing !== undefined ? { backingFile: backing } : {}),
    ...(backingFormat !== undefined ? { backingFormat } : {}),
  })
  // options checked before the file is touched: a mistake leaves no new file and an existing one intact, as qemu-img
  if (format === 'qcow2') {
    const { parseCreateOptions } = await import('../formats/qcow2/index.js')
    const q = { ...options }
    delete q['backing_file']
    delete q['backing_fmt']
    parseCreateOptions({ size, options: q, ...(backing !== undefined ? { backingFile: backing, backingFormat: backingFormat! } : {}) })
  } else if (format === 'vpc') {
    if (backing !== undefined) throw new UsageError(`Backing file not supported for file format 'vpc'`)
    const { parseVhdCreateOptions } = await import('../formats/vhd/index.js')
    parseVhdCreateOptions({ size, options })
  } else if (format === 'vmdk') {
    if (backing !== undefined) throw new UsageError(`vmdk: imgtool does not create delta disks (backing files)`)
    const { parseVmdkCreateOptions } = await import('../formats/vmdk/index.js')
    parseVmdkCreateOptions({ size, options })
  } else if (format === 'raw' && options['preallocation'] !== 'metadata') {
    // (qemu-img creates the file before it refuses metadata for raw)
    const { parseRawPreallocation } = await import('../formats/raw/index.js')
    parseRawPreallocation(options['preallocation'], path)
  }
  const { existsSync, rmSync } = await import('node:fs')
  const existed = existsSync(path)
  const dev = await openFileDevice(path, { readOnly: false, create: true })
  let ok = false
  try {
    const context = makeContext(openFileDevice)
    if (format === 'dmsnap') {
      if (backing !== undefined) throw new UsageError('dmsnap stores take --origin, not a backing file')
      await driverFor('dmsnap').create!(dev, context, { size, options })
    } else if (format === 'raw') {
      await driverFor('raw').create!(dev, context, { size, options })
    } else if (format === 'vpc' || format === 'vmdk') {
      await driverFor(format).create!(dev, context, { size, options })
    } else {
      delete options['backing_file']
      delete options['backing_fmt']
      const extra = backing !== undefined ? { backingFile: backing, backingFormat: backingFormat! } : {}
      await driverFor('qcow2').create!(dev, context, { size, options, ...extra })
    }
    await dev.flush()
    ok = true
  } finally {
    await dev.close()
    // a qcow2 image that could not be made is not left behind half made (qemu-img leaves none)
    if (!ok && !existed && (format === 'qcow2' || format === 'vpc' || format === 'vmdk')) rmSync(path, { force: true })
  }
  return { filename: path, format, size }
}

// ---------------------------------------------------------------------------
// convert, compare

export interface ConvertOptions extends CommonOptions {
  /** source format (probed when absent) */
  format?: OpenOptions['format']
  /** dm-snapshot source: its origin */
  origin?: string
  /** target format (default raw) */
  targetFormat?: TargetFormat
  /** target create options (-o) */
  options?: Record<string, string>
  backingFile?: string
  backingFormat?: string
  /** write compressed clusters (qcow2 targets) */
  compress?: boolean
  /** zero runs of at least this many bytes stay sparse; 0 allocates the whole target (default 4096) */
  minSparse?: number
  /**
   * the target's cache mode, as qemu-img -t: 'unsafe' (default: no flush), 'writeback' or 'none' (flushed once
   * at the end), 'writethrough' or 'directsync' (every write flushed)
   */
  cache?: CacheMode
  /** -n: write into the existing target instead of creating it (it must be at least as large as the source) */
  skipCreate?: boolean
  /** --target-is-zero (with -n): the existing target reads as zeros, so zero ranges are not written */
  targetIsZero?: boolean
  /** reads in flight (qemu-img convert -m; default 4) */
  parallel?: number
  /** qemu-img convert -W: chunks are written as soon as they are read, not in guest order */
  outOfOrder?: boolean
  /** qemu-img's -U: open the source (and its chain) without image locks */
  forceShare?: boolean
  /** --bitmaps: copy the source's persistent bitmaps (qcow2 to qcow2) */
  bitmaps?: boolean
  /** --skip-broken-bitmaps (with `bitmaps`): in-use bitmaps are skipped with a warning instead of refused */
  skipBrokenBitmaps?: boolean
  /** called with each warning (a skipped bitmap) */
  onWarning?: (warning: string) => void
  /**
   * --salvage: read errors of the source become zeros in the target instead of failing the convert; each
   * sector that could not be read (or whose allocation status could not be) is handed to this function
   */
  salvage?: (event: SalvageEvent) => void
  /** qemu-img's -r: at most this many bytes per second (0: no limit) */
  rateLimit?: number
  /** qemu-img's -C: copy offloading (copy_file_range) while it works; not with compress, minSparse or salvage */
  copyRange?: boolean
  /** qemu-img's -l: convert this internal snapshot of the source (qcow2) instead of its current state */
  snapshot?: SnapshotSelector
}

export type { ConvertFileResult as ConvertResult, SalvageEvent, TargetFormat }

/**
 * Convert an image file into a new file, or (raw, or vmdk with
 * `options.subformat = 'streamOptimized'`) into a stream such as stdout. The target file is refused when it is any file the source reads; a
 * failed or aborted convert removes the target it made. A stream gets the
 * guest bytes in order; a reader that goes away (EPIPE) ends it quietly.
 */
export async function convert(source: string, target: string | NodeJS.WritableStream, o: ConvertOptions = {}): Promise<ConvertFileResult> {
  // persistent bitmaps: checked before anything is created, copied once the guest bytes are
  const bitmaps = o.bitmaps || o.skipBrokenBitmaps ? await (await import('./bitmap.js')).planConvertBitmaps(source, target, o) : undefined
  if (typeof target !== 'string') return convertToStream(source, target, o)
  const { convertFile } = await import('../convert/to-file.js')
  if (bitmaps) return bitmaps.copyAfter(() => convertFileWith(convertFile, source, target, o))
  return convertFileWith(convertFile, source, target, o)
}

function convertFileWith(
  convertFile: typeof import('../convert/to-file.js').convertFile,
  source: string,
  target: string,
  o: ConvertOptions,
): Promise<ConvertFileResult> {
  return convertFile(source, target, {
    ...(o.format !== undefined ? { sourceFormat: formatOption(o.format)! } : {}),
    sourceOptions: o.origin !== undefined ? { origin: o.origin } : {},
    targetFormat: o.targetFormat ?? 'raw',
    options: o.options ?? {},
    ...(o.backingFile !== undefined ? { backingFile: o.backingFile, backingFormat: o.backingFormat ?? 'qcow2' } : {}),
    ...(o.compress !== undefined ? { compress: o.compress } : {}),
    ...(o.minSparse !== undefined ? { minSparse: o.minSparse } : {}),
    ...(o.cache !== undefined ? { cache: o.cache } : {}),
    ...(o.skipCreate ? { skipCreate: true } : {}),
    ...(o.targetIsZero ? { targetIsZero: true } : {}),
    ...(o.parallel !== undefined ? { inFlight: o.parallel } : {}),
    ...(o.outOfOrder ? { outOfOrder: true } : {}),
    ...(o.forceShare ? { sourceForceShare: true } : {}),
    ...(o.salvage ? { salvage: o.salvage } : {}),
    ...(o.snapshot ? { snapshot: o.snapshot } : {}),
    ...(o.rateLimit ? { rateLimit: o.rateLimit } : {}),
    ...(o.copyRange ? { copyRange: true } : {}),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  })
}

/** convert to a stream: the guest bytes as raw (nothing is created, nothing to clean up). */
async function convertToStream(source: string, output: NodeJS.WritableStream, o: ConvertOptions): Promise<ConvertFileResult> {
  checkAborted(o.signal, 'convert')
  if (o.salvage) throw new UsageError('--salvage needs a target file (not a stream)')
  if (o.snapshot) throw new UsageError('-l needs a target file (not a stream)')
  const target = o.targetFormat ?? 'raw'
  if (target === 'vmdk' && o.options?.['subformat'] === 'streamOptimized') return vmdkToStream(source, output, o)
  if (target !== 'raw') throw new UsageError('Only raw output, or vmdk with -o subformat=streamOptimized, can go to a stream')
  const { rawStream } = await import('../convert/convert.js')
  const { writeStream } = await import('../convert/export.js')
  const src = await openByPath(source, {
    format: formatOption(o.format),
    readOnly: true,
    options: o.origin !== undefined ? { origin: o.origin } : {},
    forceShare: o.forceShare === true,
  })
  let done = 0
  try {
    for await (const chunk of rawStream(src, { inFlight: o.parallel ?? 4 })) {
      if (!(await writeStream(output, chunk))) break
      done += chunk.byteLength
      o.onProgress?.(done, src.virtualSize)
      checkAborted(o.signal, 'convert')
    }
  } finally {
    await src.close()
  }
  return { bytesRead: done, bytesWritten: done, compressedClusters: 0, created: false }
}

/**
 * convert to a stream as a streamOptimized vmdk, written front to back (the
 * format was made for it). A reader that goes away ends it quietly, as raw.
 */
async function vmdkToStream(source: string, output: NodeJS.WritableStream, o: ConvertOptions): Promise<ConvertFileResult> {
  const { parseVmdkCreateOptions, writeStreamOptimized } = await import('../formats/vmdk/index.js')
  const { writeStream } = await import('../convert/export.js')
  const src = await openByPath(source, {
    format: formatOption(o.format),
    readOnly: true,
    options: o.origin !== undefined ? { origin: o.origin } : {},
    forceShare: o.forceShare === true,
  })
  const gone = new Error('the reader went away')
  try {
    const vo = parseVmdkCreateOptions({ size: src.virtualSize, options: o.options ?? {} })
    const sink = {
      write: async (b: Uint8Array) => {
        if (!(await writeStream(output, b))) throw gone
      },
    }
    const r = await writeStreamOptimized(src, sink, vo, 'stream.vmdk', {
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    })
    return { ...r, created: false }
  } catch (e) {
    if (e === gone) return { bytesRead: 0, bytesWritten: 0, compressedClusters: 0, created: false }
    throw e
  } finally {
    await src.close()
  }
}

export interface CompareOptions extends CommonOptions {
  /** strict: sizes and allocation status must match too (qemu-img compare -s) */
  strict?: boolean
  /** formats of the two images (probed when absent) */
  formats?: [OpenOptions['format'], OpenOptions['format']]
  /** a dm-snapshot image among the two: its origin */
  origin?: string
  /** qemu-img's -U: open both without image locks */
  forceShare?: boolean
}

export type { CompareResult }

/** Compare the guest contents of two images (qemu-img compare's meaning), paths or open images. */
export async function compare(a: Image | string, b: Image | string, o: CompareOptions = {}): Promise<CompareResult> {
  checkAborted(o.signal, 'compare')
  const { compareImages } = await import('../convert/compare.js')
  const share = o.forceShare ? { forceShare: true } : {}
  const oa: OpenOptions = { ...(o.formats?.[0] ? { format: o.formats[0] } : {}), ...(o.origin ? { origin: o.origin } : {}), ...share }
  const ob: OpenOptions = { ...(o.formats?.[1] ? { format: o.formats[1] } : {}), ...(o.origin ? { origin: o.origin } : {}), ...share }
  return withImage(a, oa, (da) =>
    withImage(b, ob, (db) =>
      compareImages(da, db, {
        strict: o.strict ?? false,
        hostFiles: typeof a === 'string' && typeof b === 'string',
        ...(o.onProgress ? { onProgress: o.onProgress } : {}),
        ...(o.signal ? { signal: o.signal } : {}),
      }),
    ),
  )
}

// ---------------------------------------------------------------------------
// snapshots, resize, merge

/** Where a snapshot or resize opens its image. */
export interface Qcow2OpOptions {
  /** the format; probed when absent (the image must turn out qcow2) */
  format?: OpenOptions['format']
  /** format-specific open options (qemu-img's -o spelling) */
  options?: Record<string, string>
  /** called with each note about the image met on opening it (e.g. stale refcounts rebuilt), as it is met */
  onNotice?: (notice: string) => void
}

async function writableQcow2<R>(
  path: string,
  readOnly: boolean,
  o: SnapshotOptions,
  fn: (img: import('../formats/qcow2/index.js').Qcow2Image, notices: string[]) => Promise<R>,
): Promise<R> {
  const d = await openByPath(path, { format: formatOption(o.format), readOnly, options: { ...(o.options ?? {}) }, forceShare: o.forceShare === true })
  try {
    if (d.format !== 'qcow2') throw new UsageError(`${d.format}: internal snapshots need a qcow2 image`)
    const img = d as import('../formats/qcow2/index.js').Qcow2Image
    const notices = [...(img.writer?.notices ?? [])]
    for (const n of notices) o.onNotice?.(n)
    return await fn(img, notices)
  } finally {
    await d.close()
  }
}

export interface SnapshotOptions extends Qcow2OpOptions {
  /** qemu-img's -U: take and test no image locks (a writable open refuses it) */
  forceShare?: boolean
}

export interface SnapshotResult {
  /** notes about the image met on the way (e.g. stale refcounts rebuilt) */
  notices: string[]
}

/** Internal snapshots of qcow2 images (qemu-img snapshot). */
export const snapshot = {
  /** the snapshot table */
  async list(path: string, o: SnapshotOptions = {}): Promise<SnapshotInfo[]> {
    return writableQcow2(path, true, o, async (img) => (await import('../formats/qcow2/index.js')).listSnapshots(img))
  },
  /** create snapshot `name` of the image's current state */
  async create(path: string, name: string, o: SnapshotOptions = {}): Promise<SnapshotResult & { snapshot: SnapshotInfo }> {
    return writableQcow2(path, false, o, async (img, notices) => ({
      snapshot: await (await import('../formats/qcow2/index.js')).createSnapshot(img, name),
      notices,
    }))
  },
  /** revert the image to snapshot `name` (or id) */
  async apply(path: string, name: string, o: SnapshotOptions = {}): Promise<SnapshotResult> {
    return writableQcow2(path, false, o, async (img, notices) => {
      await (await import('../formats/qcow2/index.js')).applySnapshot(img, name)
      return { notices }
    })
  },
  /** delete snapshot `name` (or id) */
  async delete(path: string, name: string, o: SnapshotOptions = {}): Promise<SnapshotResult> {
    return writableQcow2(path, false, o, async (img, notices) => {
      await (await import('../formats/qcow2/index.js')).deleteSnapshot(img, name)
      return { notices }
    })
  },
}

export interface ResizeOptions extends Qcow2OpOptions {
  /** allow a smaller size (only unallocated space past the new end may go) */
  shrink?: boolean
  /**
   * qemu-img resize --preallocation, for growing only: raw images take off, falloc and full (as qemu's
   * file driver); qcow2 images take off, metadata, falloc and full (laid out as qemu 7.2 lays them out)
   */
  preallocation?: string
  signal?: AbortSignal
}

/**
 * Change a qcow2 or raw image's virtual size. `size` in bytes, or a string as
 * qemu-img resize takes it: '2G', '+1M', '-512K'.
 */
export async function resize(path: string, size: number | string, o: ResizeOptions = {}): Promise<{ size: number; notices: string[] }> {
  checkAborted(o.signal, 'resize')
  const { parseSize } = await import('../util/size.js')
  const prealloc = o.preallocation
  if (prealloc !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(prealloc)) throw new UsageError(`Invalid preallocation mode '${prealloc}'`)
  const d = await openByPath(path, { format: formatOption(o.format), readOnly: false, options: { ...(o.options ?? {}) } })
  let closed = false
  try {
    const notices = [...((d as { writer?: { notices: string[] } }).writer?.notices ?? [])]
    for (const n of notices) o.onNotice?.(n)
    let target: number
    if (typeof size === 'number') target = size
    else {
      const rel = size.startsWith('+') ? 1 : size.startsWith('-') ? -1 : 0
      const n = parseSize(rel ? size.slice(1) : size)
      target = rel ? d.virtualSize + rel * n : n
    }
    if (target < 0) throw new UsageError('New image size must be positive')
    if (!Number.isSafeInteger(target)) throw new UsageError(`Invalid image size ${target}`)
    if (prealloc !== undefined && prealloc !== 'off' && target <= d.virtualSize) throw new UsageError('Preallocation can only be used for growing images')
    if (target < d.virtualSize && !o.shrink) throw new UsageError('Use the --shrink option to perform a shrink operation.')
    if (d.format === 'raw') {
      if (prealloc === 'metadata') throw new UsageError('Unsupported preallocation mode: metadata')
      const { resizeRaw, RawImage } = await import('../formats/raw/index.js')
      if (!(d instanceof RawImage)) throw new UsageError(`${d.format}: resize is supported for qcow2 and raw images`)
      await resizeRaw(d, target, (prealloc ?? 'off') as 'off' | 'falloc' | 'full')
      return { size: target, notices }
    }
    if (d.format !== 'qcow2') throw new UsageError(`${d.format}: resize is supported for qcow2 and raw images`)
    const { resizeQcow2 } = await import('../formats/qcow2/index.js')
    closed = true // resizeQcow2 closes the image, whatever happens
    await resizeQcow2(d as import('../formats/qcow2/index.js').Qcow2Image, target, (prealloc ?? 'off') as 'off' | 'metadata' | 'falloc' | 'full')
    return { size: target, notices }
  } finally {
    if (!closed) await d.close()
  }
}

export interface MergeOptions extends CommonOptions {
  /** the origin's format (probed when absent) */
  originFormat?: OpenOptions['format']
}

export interface MergeResult {
  /** exception records applied to the origin */
  merged: number
  /** chunks written to the origin */
  chunksCopied: number
  chunkSize: number
  /** one line saying what was done */
  summary: string
}

/** Merge a dm-snapshot COW store into its origin (the kernel's snapshot-merge); resumable after a crash. */
export async function merge(cowPath: string, originPath: string, o: MergeOptions = {}): Promise<MergeResult> {
  checkAborted(o.signal, 'merge')
  const { mergeStore, describeMerge } = await import('../formats/dmsnap/index.js')
  const origin = await openByPath(originPath, { readOnly: false, format: formatOption(o.originFormat) })
  try {
    const cow = await openFileDevice(cowPath, { readOnly: false })
    try {
      const r = await mergeStore(cow, origin, o.onProgress ? { onProgress: o.onProgress } : {})
      return { merged: r.merged, chunksCopied: r.chunksCopied, chunkSize: r.chunkSize, summary: describeMerge(r) }
    } finally {
      await cow.close()
    }
  } finally {
    await origin.close()
  }
}
