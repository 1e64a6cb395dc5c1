/**
 * The library's operations: each one call, taking paths (or an open Image
 * where that makes sense), reporting progress through `onProgress` and
 * stopping when its AbortSignal fires. They return data; nothing prints.
 */
import { UsageError, checkAborted } from '../errors.js'
import { openFileDevice } from '../io/file-device.js'
import type { DiskImage, SnapshotInfo } from '../image/disk-image.js'
import { driverFor, makeContext, openImage as openByPath } from '../open.js'
import { compareImages, type CompareResult } from '../convert/compare.js'
import { convertFile, type ConvertFileResult, type TargetFormat } from '../convert/to-file.js'
import { diskImageOf, formatOption, openOptionsOf, type Image, type OpenOptions } from './image.js'

export type Progress = (done: number, total: number) => void

export interface CommonOptions {
  onProgress?: Progress
  signal?: AbortSignal
}

async function withImage<R>(target: Image | string, o: OpenOptions, fn: (d: DiskImage) => Promise<R>): Promise<R> {
  if (typeof target !== 'string') return fn(diskImageOf(target))
  const d = await openByPath(target, { format: formatOption(o.format), readOnly: o.readOnly ?? true, options: openOptionsOf(o) })
  try {
    return await fn(d)
  } finally {
    await d.close()
  }
}

// ---------------------------------------------------------------------------
// create

export interface CreateOptions {
  format: 'raw' | 'qcow2' | 'dmsnap' | 'vpc'
  /** virtual size in bytes, or as qemu-img takes it ('10G', '512M'); with a backing file it may be left out */
  size?: number | string
  /** format options as qemu-img create -o takes them (cluster_size, compat, preallocation, chunk_size...) */
  options?: Record<string, string>
  backingFile?: string
  backingFormat?: string
  /** dm-snapshot: the origin */
  origin?: string
  signal?: AbortSignal
}

export interface CreateResult {
  filename: string
  format: string
  size: number
}

/**
 * Create a new image file. Options are checked before the file is touched:
 * a mistake leaves no new file and an existing one intact; an image that fails
 * half way is removed.
 */
export async function createImage(path: string, o: CreateOptions): Promise<CreateResult> {
  checkAborted(o.signal, 'create')
  const format = o.format
  if (format !== 'qcow2' && format !== 'raw' && format !== 'dmsnap' && format !== 'vpc')
    throw new UsageError(`Unknown file format '${String(format)}' for create (qcow2, raw, dmsnap, vpc)`)
  const options = { ...(o.options ?? {}) }
  if (o.origin !== undefined) options['origin'] = o.origin
  if (options['origin'] !== undefined && format !== 'dmsnap') throw new UsageError('an origin goes with dmsnap stores')
  const backing = o.backingFile ?? options['backing_file']
  const backingFormat = o.backingFormat ?? options['backing_fmt']
  delete options['backing_file']
  delete options['backing_fmt']
  if (backing !== undefined && backingFormat === undefined) throw new UsageError(`${path}: Backing file specified without backing format`)
  if (backing !== undefined && format !== 'qcow2') throw new UsageError(`${format} images take no backing file`)
  const { parseSize } = await import('../util/size.js')
  if (o.size !== undefined && options['size'] !== undefined) throw new UsageError('The image size must be specified only once')
  let size = typeof o.size === 'string' ? parseSize(o.size) : (o.size ?? (options['size'] !== undefined ? parseSize(options['size']) : undefined))
  delete options['size']
  if (size === undefined && backing !== undefined) {
    const { combinePath, protocolPrefix } = await import('../formats/qcow2/index.js')
    const protocol = protocolPrefix(backing)
    if (protocol !== undefined) {
      throw new UsageError(
        `${path}: backing file names the protocol '${protocol}:'; imgtool opens only plain file names (give the size to write the name without opening it)`,
      )
    }
    const b = await openByPath(combinePath(path, backing), { format: formatOption(backingFormat), readOnly: true })
    size = b.virtualSize
    await b.close()
  }
  if (size === undefined) throw new UsageError('Image creation needs a size parameter')
  if (!Number.isSafeInteger(size) || size < 0) throw new UsageError(`Invalid image size ${size}`)
  if (format === 'qcow2') {
    const { parseCreateOptions } = await import('../formats/qcow2/index.js')
    parseCreateOptions({ size, options, ...(backing !== undefined ? { backingFile: backing, backingFormat: backingFormat! } : {}) })
  } else if (format === 'vpc') {
    const { parseVhdCreateOptions } = await import('../formats/vhd/index.js')
    parseVhdCreateOptions({ size, options })
  } else if (format === 'raw') {
    for (const k of Object.keys(options)) if (k !== 'preallocation') throw new UsageError(`raw images take no options but size and preallocation`)
    if (options['preallocation'] !== 'metadata') {
      // (qemu-img creates the file before it refuses metadata for raw)
      const { parseRawPreallocation } = await import('../formats/raw/create.js')
      parseRawPreallocation(options['preallocation'], path)
    }
  }
  const { existsSync, rmSync } = await import('node:fs')
  const existed = existsSync(path)
  const dev = await openFileDevice(path, { readOnly: false, create: true })
  let ok = false
  try {
    const context = makeContext(openFileDevice)
    const extra = backing !== undefined ? { backingFile: backing, backingFormat: backingFormat! } : {}
    await driverFor(format).create!(dev, context, { size, options, ...extra })
    await dev.flush()
    ok = true
  } finally {
    await dev.close()
    // a qcow2 image that could not be made is not left behind half made (qemu-img leaves none)
    if (!ok && !existed && (format === 'qcow2' || format === 'vpc')) rmSync(path, { force: true })
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
  /** 'unsafe' (default, as qemu-img: no flush) or 'writeback' (flushed once at the end) */
  cache?: 'unsafe' | 'writeback'
}

export type { ConvertFileResult as ConvertResult, TargetFormat }

/**
 * Convert an image file into a new file. The target is refused when it is any
 * file the source reads; a failed or aborted convert removes the target it made.
 */
export async function convert(source: string, target: string, o: ConvertOptions = {}): Promise<ConvertFileResult> {
  return convertFile(source, target, {
    ...(o.format !== undefined ? { sourceFormat: formatOption(o.format)! } : {}),
    sourceOptions: o.origin !== undefined ? { origin: o.origin } : {},
    targetFormat: o.targetFormat ?? 'raw',
    options: o.options ?? {},
    ...(o.backingFile !== undefined ? { backingFile: o.backingFile, backingFormat: o.backingFormat ?? 'qcow2' } : {}),
    ...(o.compress !== undefined ? { compress: o.compress } : {}),
    ...(o.minSparse !== undefined ? { minSparse: o.minSparse } : {}),
    ...(o.cache !== undefined ? { cache: o.cache } : {}),
    ...(o.onProgress ? { onProgress: o.onProgress } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  })
}

export interface CompareOptions extends CommonOptions {
  /** strict: sizes and allocation status must match too (qemu-img compare -s) */
  strict?: boolean
  /** formats of the two images (probed when absent) */
  formats?: [OpenOptions['format'], OpenOptions['format']]
  /** a dm-snapshot image among the two: its origin */
  origin?: string
}

export type { CompareResult }

/** Compare the guest contents of two images (qemu-img compare's meaning), paths or open images. */
export async function compare(a: Image | string, b: Image | string, o: CompareOptions = {}): Promise<CompareResult> {
  checkAborted(o.signal, 'compare')
  const oa: OpenOptions = { ...(o.formats?.[0] ? { format: o.formats[0] } : {}), ...(o.origin ? { origin: o.origin } : {}) }
  const ob: OpenOptions = { ...(o.formats?.[1] ? { format: o.formats[1] } : {}), ...(o.origin ? { origin: o.origin } : {}) }
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

async function writableQcow2<R>(
  path: string,
  what: string,
  readOnly: boolean,
  fn: (img: import('../formats/qcow2/index.js').Qcow2Image, notices: string[]) => Promise<R>,
  format?: OpenOptions['format'],
): Promise<R> {
  const d = await openByPath(path, { format: formatOption(format), readOnly })
  let closed = false
  try {
    if (d.format !== 'qcow2') throw new UsageError(`${d.format}: ${what} needs a qcow2 image`)
    const img = d as import('../formats/qcow2/index.js').Qcow2Image
    const r = await fn(img, [...(img.writer?.notices ?? [])])
    if (what === 'resize') closed = true
    return r
  } finally {
    if (!closed) await d.close()
  }
}

export interface SnapshotResult {
  /** notes about the image met on the way (e.g. stale refcounts rebuilt) */
  notices: string[]
}

/** Internal snapshots of qcow2 images (qemu-img snapshot). */
export const snapshot = {
  /** the snapshot table */
  async list(path: string, o: { format?: OpenOptions['format'] } = {}): Promise<SnapshotInfo[]> {
    return writableQcow2(path, 'internal snapshots', true, async (img) => (await import('../formats/qcow2/index.js')).listSnapshots(img), o.format)
  },
  /** create snapshot `name` of the image's current state */
  async create(path: string, name: string, o: { format?: OpenOptions['format'] } = {}): Promise<SnapshotResult & { snapshot: SnapshotInfo }> {
    return writableQcow2(
      path,
      'internal snapshots',
      false,
      async (img, notices) => ({ snapshot: await (await import('../formats/qcow2/index.js')).createSnapshot(img, name), notices }),
      o.format,
    )
  },
  /** revert the image to snapshot `name` (or id) */
  async apply(path: string, name: string, o: { format?: OpenOptions['format'] } = {}): Promise<SnapshotResult> {
    return writableQcow2(
      path,
      'internal snapshots',
      false,
      async (img, notices) => {
        await (await import('../formats/qcow2/index.js')).applySnapshot(img, name)
        return { notices }
      },
      o.format,
    )
  },
  /** delete snapshot `name` (or id) */
  async delete(path: string, name: string, o: { format?: OpenOptions['format'] } = {}): Promise<SnapshotResult> {
    return writableQcow2(
      path,
      'internal snapshots',
      false,
      async (img, notices) => {
        await (await import('../formats/qcow2/index.js')).deleteSnapshot(img, name)
        return { notices }
      },
      o.format,
    )
  },
}

export interface ResizeOptions {
  format?: OpenOptions['format']
  /** allow a smaller size (only unallocated space past the new end may go) */
  shrink?: boolean
  signal?: AbortSignal
}

/**
 * Change an image's virtual size. `size` in bytes, or a string as qemu-img
 * resize takes it: '2G', '+1M', '-512K'.
 */
export async function resize(path: string, size: number | string, o: ResizeOptions = {}): Promise<{ size: number; notices: string[] }> {
  checkAborted(o.signal, 'resize')
  const { parseSize } = await import('../util/size.js')
  return writableQcow2(
    path,
    'resize',
    false,
    async (img, notices) => {
      let target: number
      if (typeof size === 'number') target = size
      else {
        const rel = size.startsWith('+') ? 1 : size.startsWith('-') ? -1 : 0
        const n = parseSize(rel ? size.slice(1) : size)
        target = rel ? img.virtualSize + rel * n : n
      }
      if (!Number.isSafeInteger(target) || target < 0) throw new UsageError('New image size must be positive')
      if (target < img.virtualSize && !o.shrink) throw new UsageError('Use the --shrink option to perform a shrink operation.')
      const { resizeQcow2 } = await import('../formats/qcow2/index.js')
      await resizeQcow2(img, target)
      return { size: target, notices }
    },
    o.format,
  )
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
