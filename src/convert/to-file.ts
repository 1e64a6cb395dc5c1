/**
 * convert from a source path to a target file, safely at every edge:
 *  - the target's options are checked and the source (its whole chain, data
 *    file and dm-snapshot origin) is opened before anything is created;
 *  - a target that is any file the source reads (same device and inode,
 *    through symlinks and hard links) is refused before it is touched;
 *  - a target this call created (or emptied) is removed when the conversion
 *    fails or is aborted, so nothing half-made is left that looks like a good
 *    image; a block device is never removed (it is said to be partial).
 */
import { lstat, rm, stat } from 'node:fs/promises'
import { dirname, resolve } from 'node:path'
import { AbortedError, ImgtoolError, UnsupportedFeatureError, UsageError, checkAborted } from '../errors.js'
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import { openFileDevice } from '../io/file-device.js'
import type { DiskImage, SnapshotSelector } from '../image/disk-image.js'
import type { FormatName } from '../image/probe.js'
import { driverFor, makeContext, openImage } from '../open.js'
import { parseRawPreallocation } from '../formats/raw/index.js'
import { convert, type ConvertOptions, type ConvertResult, type SalvageEvent } from './convert.js'
import { unsafeCacheOpener, type CacheMode } from './unsafe-cache.js'

export type TargetFormat = 'raw' | 'qcow2' | 'dmsnap' | 'vpc' | 'vmdk'

export interface ConvertFileOptions {
  sourceFormat?: FormatName
  /** source open options (origin=PATH for a dm-snapshot source) */
  sourceOptions?: Record<string, string>
  /** -U: open the source (and its chain) without image locks */
  sourceForceShare?: boolean
  targetFormat: TargetFormat
  /** target create options (-o) */
  options?: Record<string, string>
  /** -B: the target's backing file (qcow2 targets) and its format */
  backingFile?: string
  backingFormat?: string
  compress?: boolean
  minSparse?: number
  inFlight?: number
  /** -W: out-of-order writes (see ConvertOptions.outOfOrder) */
  outOfOrder?: boolean
  /** qemu's cache mode for the target (default unsafe, as qemu-img convert: no flush) */
  cache?: CacheMode
  /**
   * -n: write into the existing target (opened as `targetFormat`) instead of creating one; it must be at
   * least as large as the source and is never removed. Every guest range the source does not fill with
   * data is written as zeros, unless `targetIsZero` (--target-is-zero) says the target already reads as zeros.
   */
  skipCreate?: boolean
  targetIsZero?: boolean
  /** -r: bytes read per second at most */
  rateLimit?: number
  /** -C: copy offloading as qemu-img -C (see copy-offload.ts) */
  copyRange?: boolean
  /** -l: an internal snapshot of the source is what is converted (qcow2 sources) */
  snapshot?: SnapshotSelector
  /** --salvage: read errors of the source become zeros in the target, each failed sector reported here */
  salvage?: (event: SalvageEvent) => void
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
  /**
   * what the target is made from: the source itself (default) or a view of it
   * (dd's window of guest bytes); the target gets the view's virtual size
   */
  view?: (source: DiskImage) => DiskImage
  /** the command named in a refusal (default convert) */
  verb?: string
}

interface FileId {
  path: string
  dev: number
  ino: number
  rdev: number
  block: boolean
}

async function fileId(path: string): Promise<FileId | undefined> {
  try {
    const st = await stat(path)
    return { path, dev: st.dev, ino: st.ino, rdev: st.rdev, block: st.isBlockDevice() }
  } catch {
    return undefined
  }
}

function sameFile(a: FileId, b: FileId): boolean {
  if (a.block && b.block) return a.rdev === b.rdev
  return a.dev === b.dev && a.ino === b.ino
}

/** A device opener that remembers every file opened through it (the source's chain, data file, origin). */
export function recordingOpener(inner: DeviceOpener, opened: string[]): DeviceOpener {
  return async (path, options) => {
    const dev = await inner(path, options)
    opened.push(path)
    return dev
  }
}

/**
 * Refuse `target` when it is one of `protectedFiles` (device and inode, so a
 * symlink or hard link to the source is caught too). Nothing is touched.
 */
export async function refuseSourceAsTarget(target: string, protectedFiles: ReadonlyArray<{ path: string; role: string }>, verb = 'convert'): Promise<void> {
  const t = await fileId(target)
  if (!t) return
  for (const { path, role } of protectedFiles) {
    const s = await fileId(path)
    if (s && sameFile(s, t)) {
      const same = resolve(path) === resolve(target) ? '' : ` ('${path}')`
      throw new UsageError(`${verb}: the target '${target}' is ${role}${same}: refusing to overwrite it`, { file: target, structure: 'target' })
    }
  }
}

/**
 * The VMDK module, loaded for vmdk targets only: its 14 modules cost a conversion to another format about 0.04 s
 * of CPU at start-up (bench/README.md, 2026-12-05).
 */
const vmdkModule = () => import('../formats/vmdk/index.js')

/** The target's create options checked before any file is created (a mistake leaves no new file). */
export async function checkTargetOptions(
  format: TargetFormat,
  size: number,
  options: Record<string, string>,
  backingFile?: string,
  backingFormat?: string,
): Promise<void> {
  if (format === 'qcow2') {
    const o = { ...options }
    delete o['backing_file']
    delete o['backing_fmt']
    const { parseCreateOptions } = await import('../formats/qcow2/index.js')
    parseCreateOptions({ size, options: o, ...(backingFile !== undefined ? { backingFile, backingFormat: backingFormat ?? 'qcow2' } : {}) })
  } else if (format === 'raw') {
    for (const k of Object.keys(options)) if (k !== 'size' && k !== 'preallocation') throw new UsageError(`Invalid parameter '${k}' for raw`)
    parseRawPreallocation(options['preallocation'], 'raw')
  } else if (format === 'vpc') {
    // the vpc driver checks its options before it writes a byte; a target it refuses is removed
  } else if (format === 'vmdk') {
    ;(await vmdkModule()).parseVmdkCreateOptions({ size, options })
  } else {
    for (const k of Object.keys(options)) {
      if (!['origin', 'chunk_size', 'cow_size'].includes(k)) throw new UsageError(`-O dmsnap: unknown option '${k}' (origin, chunk_size, cow_size)`)
    }
    if (!options['origin']) throw new UsageError('-O dmsnap needs the origin: -o origin=PATH')
  }
}

/**
 * The snapshot `sel` of an open source (qemu-img -l), read-only; a format without internal snapshots is
 * refused in qemu-img's words.
 */
export async function loadSnapshotOf(src: DiskImage, sel: SnapshotSelector): Promise<DiskImage> {
  if (!src.loadSnapshot) {
    throw new UnsupportedFeatureError(
      `Failed to load snapshot: Block format '${src.format}' used by device '' does not support temporarily loading internal snapshots`,
      { file: src.filename, structure: 'header' },
    )
  }
  return src.loadSnapshot(sel)
}

export interface ConvertFileResult extends ConvertResult {
  /** the target was created by this call (not a block device written in place) */
  created: boolean
}

/**
 * Convert the image at `srcPath` into a new `dstPath` of `targetFormat`.
 * On failure or abort a target this call created is removed; the error says
 * so. The source is never written.
 */
export async function convertFile(srcPath: string, dstPath: string, o: ConvertFileOptions): Promise<ConvertFileResult> {
  const options = { ...(o.options ?? {}) }
  // -c with vmdk is accepted as qemu-img accepts it: streamOptimized grains are compressed anyway, other subformats store them whole
  if (o.compress && o.targetFormat !== 'qcow2' && o.targetFormat !== 'vmdk') throw new UsageError('Compression not supported for this file format')
  if (o.backingFile !== undefined && o.targetFormat !== 'qcow2') throw new UsageError('-B needs a target format with backing files (qcow2)')
  if (o.targetIsZero && !o.skipCreate) throw new UsageError('--target-is-zero requires use of -n flag')
  if (o.skipCreate && Object.keys(options).length > 0) throw new UsageError('-o has no effect when skipping image creation')
  if (o.skipCreate && o.targetFormat === 'dmsnap') throw new UsageError('-n cannot write into a dm-snapshot store')
  if (o.salvage && (o.targetFormat === 'dmsnap' || (o.targetFormat === 'vmdk' && options['subformat'] === 'streamOptimized')))
    throw new UsageError('--salvage is not supported for this target (dm-snapshot stores and streamOptimized vmdk are written by their own copy)')
  checkAborted(o.signal, 'convert')

  // 1. the source, every file it reads recorded
  const sourceFiles: string[] = []
  const src = await openImage(srcPath, {
    format: o.sourceFormat,
    readOnly: true,
    options: o.sourceOptions ?? {},
    forceShare: o.sourceForceShare === true,
    openDevice: recordingOpener(openFileDevice, sourceFiles),
  })
  let origin: DiskImage | undefined
  try {
    const base = o.snapshot ? await loadSnapshotOf(src, o.snapshot) : src
    const view = o.view ? o.view(base) : base
    // 2. options, and the files the target must not be
    if (!o.skipCreate) await checkTargetOptions(o.targetFormat, view.virtualSize, options, o.backingFile, o.backingFormat)
    if ((await src.info()).encrypted) {
      throw new UnsupportedFeatureError(`${src.format}: ${srcPath}: encrypted images cannot be read by imgtool (no key is taken)`, {
        file: srcPath,
        structure: 'header',
      })
    }
    if (o.targetFormat === 'dmsnap') origin = await openImage(options['origin']!, { readOnly: true, openDevice: recordingOpener(openFileDevice, sourceFiles) })
    const protect = sourceFiles.map((path, i) => ({
      path,
      role:
        i === 0
          ? 'the source image'
          : origin && i === sourceFiles.length - 1
            ? 'the dm-snapshot origin'
            : 'a file the source image reads (backing file, data file or origin)',
    }))
    if (o.backingFile !== undefined) {
      // the target's own backing file (named relative to the target) must not be overwritten either
      const path = o.backingFile.startsWith('/') ? o.backingFile : resolve(dirname(dstPath), o.backingFile)
      protect.push({ path, role: "the target's own backing file" })
    }
    await refuseSourceAsTarget(dstPath, protect, o.verb)
    const flat = await vmdkFlatPath(o.targetFormat, dstPath, options)
    if (flat !== undefined) await refuseSourceAsTarget(flat, protect, o.verb)
    checkAborted(o.signal, 'convert')
    if (o.skipCreate) return await writeExisting(view, dstPath, o)
    return await writeTarget(view, origin, dstPath, o, options)
  } finally {
    await origin?.close().catch(() => undefined)
    await src.close()
  }
}

async function writeTarget(
  src: DiskImage,
  origin: DiskImage | undefined,
  dstPath: string,
  o: ConvertFileOptions,
  options: Record<string, string>,
): Promise<ConvertFileResult> {
  let before: Awaited<ReturnType<typeof lstat>> | undefined
  try {
    before = await lstat(dstPath)
  } catch {
    before = undefined
  }
  const isBlock = (await fileId(dstPath))?.block ?? false
  // a monolithicFlat target is two files: the flat extent beside the descriptor is removed on failure too
  const flat = await vmdkFlatPath(o.targetFormat, dstPath, options)
  const flatExisted = flat !== undefined && (await fileId(flat)) !== undefined
  let created = false
  let ok = false
  try {
    const dev = await openFileDevice(dstPath, { readOnly: false, create: true })
    created = !isBlock
    let streamed: ConvertResult | undefined
    try {
      if (o.targetFormat === 'vmdk' && (options['subformat'] ?? '') === 'streamOptimized') streamed = await writeVmdkStream(dev, src, o, options)
      else await createTarget(dev, src, origin, o, options)
      await dev.flush()
    } finally {
      await dev.close()
    }
    if (streamed) {
      ok = true
      return { ...streamed, created }
    }
    if (o.targetFormat === 'dmsnap') {
      ok = true
      return { bytesRead: 0, bytesWritten: 0, compressedClusters: 0, created }
    }
    const dst = await openImage(dstPath, { format: o.targetFormat, readOnly: false, openDevice: unsafeCacheOpener(openFileDevice, o.cache ?? 'unsafe') })
    let pool: import('../formats/qcow2/index.js').CompressPool | undefined
    try {
      let compressFns: Pick<ConvertOptions, 'compress' | 'compressMany'> = {}
      if (o.compress && o.targetFormat === 'qcow2') {
        const { newCompressPool } = await import('../formats/qcow2/index.js')
        const q = dst as import('../formats/qcow2/index.js').Qcow2Image
        const p = (pool = await newCompressPool())
        compressFns = {
          compress: (c) => p.compress(c, q.clusterSize, q.header.compressionType),
          compressMany: (buf, offsets) => p.compressMany(buf, offsets, q.clusterSize, q.header.compressionType),
        }
      }
      const r = await convert(src, dst, {
        inFlight: o.inFlight ?? 4,
        hostFiles: true,
        targetHasBacking: o.backingFile !== undefined,
        ...(o.minSparse !== undefined ? { minSparse: o.minSparse } : {}),
        ...compressFns,
        ...(o.salvage ? { salvage: o.salvage } : {}),
        ...(o.rateLimit ? { rateLimit: o.rateLimit } : {}),
        ...(o.outOfOrder ? { outOfOrder: true } : {}),
        ...(o.copyRange ? { copyRange: true as const } : {}),
        sparseCopy: true,
        ...(o.onProgress ? { onProgress: o.onProgress } : {}),
        ...(o.signal ? { signal: o.signal } : {}),
      })
      ok = true
      return { ...r, created }
    } finally {
      await pool?.close()
      await dst.close()
    }
  } catch (e) {
    throw await cleanUp(e, dstPath, created, before !== undefined, isBlock)
  } finally {
    if (!ok && created) await rm(dstPath, { force: true }).catch(() => undefined)
    if (!ok && flat !== undefined && !flatExisted) await rm(flat, { force: true }).catch(() => undefined)
  }
}

/** convert -n: the guest bytes into an image that exists (nothing is created, so nothing is removed on failure). */
async function writeExisting(src: DiskImage, dstPath: string, o: ConvertFileOptions): Promise<ConvertFileResult> {
  const dst = await openImage(dstPath, {
    format: o.targetFormat as FormatName,
    readOnly: false,
    openDevice: unsafeCacheOpener(openFileDevice, o.cache ?? 'unsafe'),
  })
  try {
    if (dst.virtualSize < src.virtualSize) throw new UsageError('output file is smaller than input file', { file: dstPath, structure: 'target' })
    const r = await convert(src, dst, {
      inFlight: o.inFlight ?? 4,
      hostFiles: true,
      targetHasBacking: o.backingFile !== undefined,
      targetDirty: o.targetIsZero !== true,
      ...(o.minSparse !== undefined ? { minSparse: o.minSparse } : {}),
      ...(o.salvage ? { salvage: o.salvage } : {}),
      ...(o.rateLimit ? { rateLimit: o.rateLimit } : {}),
      ...(o.outOfOrder ? { outOfOrder: true } : {}),
      ...(o.copyRange ? { copyRange: true as const } : {}),
      sparseCopy: true,
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    })
    return { ...r, created: false }
  } finally {
    await dst.close()
  }
}

/** The flat extent file a monolithicFlat vmdk target writes beside its descriptor. */
async function vmdkFlatPath(format: TargetFormat, dstPath: string, options: Record<string, string>): Promise<string | undefined> {
  if (format !== 'vmdk' || options['subformat'] !== 'monolithicFlat') return undefined
  return resolve(dirname(dstPath), (await vmdkModule()).flatExtentName(dstPath))
}

/** A streamOptimized vmdk target: written front to back from the source (no image is opened on it). */
async function writeVmdkStream(dev: BlockDevice, src: DiskImage, o: ConvertFileOptions, options: Record<string, string>): Promise<ConvertResult> {
  const { writeStreamOptimized, parseVmdkCreateOptions } = await vmdkModule()
  const vo = parseVmdkCreateOptions({ size: src.virtualSize, options })
  await dev.truncate(0)
  let at = 0
  const sink = {
    write: async (b: Uint8Array) => {
      await dev.write(at, b, 'data')
      at += b.byteLength
    },
    flush: () => dev.flush(),
  }
  const name = dev.name.slice(dev.name.lastIndexOf('/') + 1)
  return writeStreamOptimized(src, sink, vo, name, { ...(o.onProgress ? { onProgress: o.onProgress } : {}), ...(o.signal ? { signal: o.signal } : {}) })
}

async function createTarget(
  dev: BlockDevice,
  src: DiskImage,
  origin: DiskImage | undefined,
  o: ConvertFileOptions,
  options: Record<string, string>,
): Promise<void> {
  const context = makeContext(openFileDevice)
  if (o.targetFormat === 'raw' || o.targetFormat === 'vpc' || o.targetFormat === 'vmdk')
    return driverFor(o.targetFormat).create!(dev, context, { size: src.virtualSize, options })
  if (o.targetFormat === 'qcow2') {
    const extra = o.backingFile !== undefined ? { backingFile: o.backingFile, backingFormat: o.backingFormat ?? 'qcow2' } : {}
    return driverFor('qcow2').create!(dev, context, { size: src.virtualSize, options, ...extra })
  }
  const { convertToCow } = await import('../formats/dmsnap/index.js')
  const { parseSize } = await import('../util/size.js')
  const c: { chunkSize?: number; cowSize?: number; onProgress?: (d: number, t: number) => void } = {}
  if (options['chunk_size'] !== undefined) c.chunkSize = parseSize(options['chunk_size'], 'chunk_size')
  if (options['cow_size'] !== undefined) c.cowSize = parseSize(options['cow_size'], 'cow_size')
  if (o.onProgress) c.onProgress = o.onProgress
  await convertToCow(src, origin!, dev, c)
}

/** The error to report: an abort becomes AbortedError; either way the message says what became of the target. */
async function cleanUp(e: unknown, dstPath: string, created: boolean, existed: boolean, isBlock: boolean): Promise<unknown> {
  const aborted = e instanceof AbortedError || (e instanceof Error && e.name === 'AbortError')
  const fate = isBlock
    ? `the target '${dstPath}' is left partial`
    : created
      ? existed
        ? `the partial target '${dstPath}' was removed (it had been emptied)`
        : `the partial target '${dstPath}' was removed`
      : undefined
  if (aborted) return new AbortedError(`${(e as Error).message}${fate ? `; ${fate}` : ''}`, { file: dstPath })
  if (fate && e instanceof ImgtoolError) {
    e.message = `${e.message} (${fate})`
  }
  return e
}
