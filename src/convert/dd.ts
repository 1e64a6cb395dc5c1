/**
 * qemu-img dd: a range of an image's guest bytes copied into a new image of
 * any target format. The range is a window over the source (a DiskImage
 * whose byte 0 is the source's byte `offset`), handed to the convert
 * pipeline, so the target is created, written, refused (when it is a file the
 * source reads) and cleaned up exactly as convert's are.
 */
import { UsageError } from '../errors.js'
import type { DiskImage, Extent, ImageInfo } from '../image/disk-image.js'
import type { FormatName } from '../image/probe.js'
import { convertFile, type TargetFormat } from './to-file.js'

/** The source's guest bytes [offset, offset + length) as an image of `length` bytes (read-only). */
export function windowImage(src: DiskImage, offset: number, length: number): DiskImage {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > src.virtualSize) {
    throw new UsageError(`${src.format}: ${src.filename}: window ${offset}+${length} is outside the virtual size ${src.virtualSize}`)
  }
  return {
    format: src.format,
    filename: src.filename,
    virtualSize: length,
    readOnly: true,
    read: (o, n) => {
      if (o < 0 || n < 0 || o + n > length) throw new UsageError(`${src.filename}: read ${o}+${n} is beyond the window of ${length} bytes`)
      return src.read(offset + o, n)
    },
    async *extents(from = 0, n = length - from): AsyncIterable<Extent> {
      const lo = offset + from
      const hi = lo + Math.max(0, Math.min(n, length - from))
      for await (const e of src.extents(lo, hi - lo)) {
        const start = Math.max(e.start, lo)
        const end = Math.min(e.start + e.length, hi)
        if (end <= start) continue
        const w: Extent = { ...e, start: start - offset, length: end - start }
        if (e.hostOffset !== undefined) w.hostOffset = e.hostOffset + (start - e.start)
        yield w
      }
    },
    info: async (): Promise<ImageInfo> => ({ ...(await src.info()), virtualSize: length }),
    flush: () => src.flush(),
    // the source belongs to whoever opened it: closing the window leaves it open
    close: () => Promise.resolve(),
  }
}

export interface DdFileOptions {
  sourceFormat?: FormatName
  sourceForceShare?: boolean
  targetFormat: TargetFormat
  /** bytes per block: 1 to 2^31-1 (qemu-img's bs=, default 512) */
  blockSize?: number
  /** blocks to read, counted from the start of the input, skipped blocks included (qemu-img's count=) */
  count?: number
  /** blocks of the input to skip (qemu-img's skip=) */
  skip?: number
  signal?: AbortSignal
}

export interface DdResult {
  /** the output's virtual size as created (before the target format rounds it) */
  size: number
  /** guest bytes of the input copied */
  bytesCopied: number
  /** skip= pointed past the end of the input: the output is empty (qemu-img warns and succeeds) */
  skippedPastEnd: boolean
}

const INT_MAX = 2 ** 31 - 1

/**
 * The window qemu-img 7.2 copies: the input's size, cut to count*bs when
 * count= is given and smaller; the output is that size less skip*bs (count
 * includes the skipped blocks), empty when skip= reaches past it.
 */
export function ddWindow(
  inputSize: number,
  o: Pick<DdFileOptions, 'blockSize' | 'count' | 'skip'>,
): { offset: number; length: number; skippedPastEnd: boolean } {
  const bs = o.blockSize ?? 512
  if (!Number.isInteger(bs) || bs < 1 || bs > INT_MAX) throw new UsageError(`Invalid bs specified. Must be between 1 and ${INT_MAX}.`)
  for (const [k, v] of [
    ['count', o.count],
    ['skip', o.skip],
  ] as const) {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 0)) throw new UsageError(`Invalid ${k} specified. Must be between 0 and 9223372036854775807.`)
  }
  let size = inputSize
  if (o.count !== undefined && o.count * bs < size) size = o.count * bs
  const skip = o.skip ?? 0
  // the product may pass 2^53 only when it is past every image's end
  if (skip * bs > size || !Number.isSafeInteger(skip * bs)) return { offset: size, length: 0, skippedPastEnd: o.skip !== undefined }
  return { offset: skip * bs, length: size - skip * bs, skippedPastEnd: false }
}

/** Copy the window of the image at `input` (see ddWindow) into a new `output` of `targetFormat`. */
export async function ddFile(input: string, output: string, o: DdFileOptions): Promise<DdResult> {
  let window: ReturnType<typeof ddWindow> | undefined
  const r = await convertFile(input, output, {
    ...(o.sourceFormat !== undefined ? { sourceFormat: o.sourceFormat } : {}),
    sourceForceShare: o.sourceForceShare === true,
    targetFormat: o.targetFormat,
    verb: 'dd',
    view: (src) => {
      window = ddWindow(src.virtualSize, o)
      return windowImage(src, window.offset, window.length)
    },
    ...(o.signal ? { signal: o.signal } : {}),
  })
  return { size: window!.length, bytesCopied: r.bytesRead, skippedPastEnd: window!.skippedPastEnd }
}
