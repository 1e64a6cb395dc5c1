/**
 * qemu-img bitmap: edit the persistent dirty bitmaps of a qcow2 image, and
 * read a bitmap's contents back.
 */
import { UnsupportedFeatureError, UsageError, checkAborted } from '../errors.js'
import type { DiskImage } from '../image/disk-image.js'
import { openImage as openByPath } from '../open.js'
import { formatOption, type OpenOptions } from './image.js'

/** One operation of qemu-img bitmap, applied in the order given. */
export type BitmapOperation =
  | { op: 'add' }
  | { op: 'remove' }
  | { op: 'clear' }
  | { op: 'enable' }
  | { op: 'disable' }
  | { op: 'merge'; /** the bitmap merged into the named one */ source: string }

export interface BitmapOptions {
  /** the operations, in order (qemu-img bitmap --add, --remove, --clear, --enable, --disable, --merge SOURCE) */
  operations: BitmapOperation[]
  /** the image's format; probed when absent */
  format?: OpenOptions['format']
  /** --add's granularity in bytes (a power of two, at least 512); the default is qemu's (the cluster size within 4 KiB..64 KiB) */
  granularity?: number
  /** --merge's bitmaps are in this image (-b) instead of the edited one */
  sourceFile?: string
  /** the format of `sourceFile` (-F); probed when absent */
  sourceFormat?: OpenOptions['format']
  signal?: AbortSignal
}

export interface BitmapResult {
  /** operations done */
  done: number
}

/** A persistent bitmap's contents. */
export interface BitmapContents {
  name: string
  granularity: number
  /** as qemu-img info shows them: in-use, auto */
  flags: string[]
  /** one bit per `granularity` bytes of the disk, LSB first; undefined for an in-use (inconsistent) bitmap */
  bits: Uint8Array | undefined
}

/**
 * Apply `operations` to bitmap `name` of the image at `path`, as qemu-img
 * bitmap does: in order; when one fails, the ones before it are kept and the
 * error (qemu's words: "Operation OP on bitmap NAME failed: ...") is thrown.
 */
export async function bitmap(path: string, name: string, o: BitmapOptions): Promise<BitmapResult> {
  checkAborted(o.signal, 'bitmap')
  if (o.operations.length === 0) throw new UsageError('Need at least one of --add, --remove, --clear, --enable, --disable, or --merge')
  if (o.granularity !== undefined && !o.operations.some((x) => x.op === 'add')) throw new UsageError('granularity only supported with --add')
  if (o.sourceFile !== undefined && !o.operations.some((x) => x.op === 'merge')) throw new UsageError('Merge bitmap source file only supported with --merge')
  if (o.sourceFormat !== undefined && o.sourceFile === undefined) throw new UsageError('-F only supported with -b')
  const q = await import('../formats/qcow2/index.js')
  // the merge source image, read first (read-only)
  let from: import('../formats/qcow2/index.js').BitmapSourceImage | undefined
  if (o.sourceFile !== undefined) {
    const s = await openByPath(o.sourceFile, { format: formatOption(o.sourceFormat), readOnly: true })
    try {
      from = { size: s.virtualSize, bitmaps: s.format === 'qcow2' ? await q.readQcow2Bitmaps(s as import('../formats/qcow2/index.js').Qcow2Image) : [] }
    } finally {
      await s.close()
    }
  }
  const d = await openByPath(path, { format: formatOption(o.format), readOnly: false, bitmapsByCaller: true })
  if (d.format !== 'qcow2') {
    // no persistent bitmaps there: --add is refused, the others find no bitmap
    await d.close()
    const first = o.operations[0]!
    const msg =
      first.op === 'add'
        ? name === ''
          ? 'Bitmap name cannot be empty'
          : `Can't store persistent bitmaps to '${path}': Operation not supported`
        : `Dirty bitmap '${name}' not found`
    throw new UnsupportedFeatureError(`Operation ${first.op} on bitmap ${name} failed: ${msg}`)
  }
  const ops = o.operations.map((x) => {
    if (x.op === 'add') return { op: 'add' as const, ...(o.granularity !== undefined ? { granularity: o.granularity % 2 ** 32 } : {}) }
    if (x.op === 'merge') return { op: 'merge' as const, source: x.source, ...(from ? { from } : {}) }
    return { op: x.op }
  })
  const r = await q.editQcow2Bitmaps(d as import('../formats/qcow2/index.js').Qcow2Image, name, ops)
  if (r.error !== undefined) throw new UsageError(r.error)
  return { done: r.done }
}

/** The persistent bitmaps of the image at `path` with their contents (empty for formats without them). */
export async function readBitmaps(path: string, o: { format?: OpenOptions['format'] } = {}): Promise<BitmapContents[]> {
  const d: DiskImage = await openByPath(path, { format: formatOption(o.format), readOnly: true })
  try {
    if (d.format !== 'qcow2') return []
    const q = await import('../formats/qcow2/index.js')
    return (await q.readQcow2Bitmaps(d as import('../formats/qcow2/index.js').Qcow2Image)).map((b) => ({
      name: b.name,
      granularity: b.granularity,
      flags: b.flags,
      bits: b.bits,
    }))
  } finally {
    await d.close()
  }
}

/** What convert --bitmaps copies, checked before the target is made. */
export interface ConvertBitmapsPlan {
  /** run the convert, then copy the bitmaps into its target; a failure removes a target the convert created */
  copyAfter<R extends { created: boolean }>(run: () => Promise<R>): Promise<R>
}

/**
 * convert --bitmaps and --skip-broken-bitmaps, with qemu-img 7.2's refusals
 * (all before the target is created, where qemu-img creates a compat=0.10
 * target and then fails).
 */
export async function planConvertBitmaps(
  source: string,
  target: string | NodeJS.WritableStream,
  o: {
    bitmaps?: boolean
    skipBrokenBitmaps?: boolean
    format?: OpenOptions['format']
    targetFormat?: string
    options?: Record<string, string>
    forceShare?: boolean
    onWarning?: (w: string) => void
  },
): Promise<ConvertBitmapsPlan> {
  if (!o.bitmaps) throw new UsageError('Use of --skip-broken-bitmaps requires --bitmaps')
  const s = await openByPath(source, { format: formatOption(o.format), readOnly: true, ...(o.forceShare ? { forceShare: true } : {}) })
  let list: import('../formats/qcow2/index.js').Qcow2BitmapContents[]
  let size: number
  try {
    if (s.format !== 'qcow2') throw new UnsupportedFeatureError('Source lacks bitmap support')
    size = s.virtualSize
    const q = await import('../formats/qcow2/index.js')
    list = await q.readQcow2Bitmaps(s as import('../formats/qcow2/index.js').Qcow2Image)
  } finally {
    await s.close()
  }
  const fmt = typeof target === 'string' ? (o.targetFormat ?? 'raw') : 'raw'
  if (fmt !== 'qcow2') throw new UnsupportedFeatureError(`Format driver '${fmt}' does not support bitmaps`)
  const compat = o.options?.['compat']
  if (compat === '0.10' || compat === 'v2') throw new UnsupportedFeatureError(`Format driver 'qcow2' does not support bitmaps`)
  const broken = list.find((b) => b.inconsistent)
  if (broken && !o.skipBrokenBitmaps) {
    throw new UnsupportedFeatureError(
      `Cannot copy inconsistent bitmap '${broken.name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it`,
    )
  }
  const from = { size, bitmaps: list }
  return {
    async copyAfter(run) {
      const r = await run()
      try {
        const q = await import('../formats/qcow2/index.js')
        for (const b of list) {
          if (b.inconsistent) {
            o.onWarning?.(`Skipping inconsistent bitmap '${b.name}'`)
            continue
          }
          const d = await openByPath(target as string, { format: 'qcow2', readOnly: false, bitmapsByCaller: true })
          if (d.format !== 'qcow2') {
            await d.close()
            throw new UnsupportedFeatureError(`Format driver '${d.format}' does not support bitmaps`)
          }
          const ops: import('../formats/qcow2/index.js').BitmapEditOp[] = [
            { op: 'add', granularity: b.granularity },
            { op: 'merge', source: b.name, from },
            ...(b.flags.includes('auto') ? [] : [{ op: 'disable' as const }]),
          ]
          const e = await q.editQcow2Bitmaps(d as import('../formats/qcow2/index.js').Qcow2Image, b.name, ops)
          if (e.error !== undefined) throw new UsageError(e.error)
        }
      } catch (e) {
        if (r.created) await (await import('node:fs/promises')).rm(target as string, { force: true })
        throw e
      }
      return r
    },
  }
}
