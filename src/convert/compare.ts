/**
 * compare over the DiskImage interface, with qemu-img compare's meaning:
 * identical contents (sizes may differ when the extra part reads as zeros,
 * unless strict); strict mode also wants the same allocation status. The
 * first difference is reported at 512-byte granularity, as qemu-img does.
 */
import { checkAborted } from '../errors.js'
import type { DiskImage, Extent } from '../image/disk-image.js'
import { mergeExtents } from '../image/range.js'
import { isAllZero } from '../util/bytes.js'
import { BufferPool, HostFiles, readGuest, sourceOf, type Source } from './host-reads.js'

/**
 * `sizeWarning`: qemu-img's "Warning: Image size mismatch!" is printed — the sizes differ and the common
 * part was found identical (a difference inside the common part is reported alone, as qemu-img does).
 */
export type CompareResult =
  | { identical: true; sizeMismatch: boolean; sizeWarning: boolean }
  | { identical: false; sizeMismatch: boolean; sizeWarning: boolean; reason: 'content' | 'size' | 'status'; offset?: number; message: string }

export interface CompareOptions {
  strict?: boolean
  chunkSize?: number
  /** reads in flight per image (default 4) */
  inFlight?: number
  /**
   * read ranges that extents map 1:1 to a host file straight from that file
   * into reused buffers (host-reads.ts); for images opened from files (the CLI)
   */
  hostFiles?: boolean
  onProgress?: (done: number, total: number) => void
  /** stops the comparison between pieces (AbortedError) */
  signal?: AbortSignal
}

async function* statusRuns(img: DiskImage, end: number): AsyncGenerator<Extent> {
  yield* mergeExtents(img.extents(0, end)) as AsyncIterable<Extent>
}

/** First differing 512-byte sector of two equal-length buffers, or -1. */
function firstDiff(a: Uint8Array, b: Uint8Array): number {
  if (Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) return -1
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== b[i]) return Math.floor(i / 512) * 512
  return -1
}

/** First non-zero 512-byte sector of a buffer, or -1. */
function firstNonZero(a: Uint8Array): number {
  if (isAllZero(a)) return -1
  for (let i = 0; i < a.byteLength; i++) if (a[i] !== 0) return Math.floor(i / 512) * 512
  return -1
}

export async function compareImages(a: DiskImage, b: DiskImage, options: CompareOptions = {}): Promise<CompareResult> {
  const sizeMismatch = a.virtualSize !== b.virtualSize
  if (sizeMismatch && options.strict) {
    return { identical: false, sizeMismatch, sizeWarning: false, reason: 'size', message: 'Strict mode: Image size mismatch!' }
  }
  const common = Math.min(a.virtualSize, b.virtualSize)
  const total = Math.max(a.virtualSize, b.virtualSize)
  const chunk = options.chunkSize ?? 2 * 1024 * 1024
  const inFlight = Math.max(1, options.inFlight ?? 4)
  const hostFiles = options.hostFiles ?? false
  const files = new HostFiles()
  const pool = new BufferPool(chunk)
  try {
    // walk both images' extents together: ranges that read as zeros in both are not read,
    // ranges that read as zeros in one are read from the other only
    const ea = statusRuns(a, common)
    const eb = statusRuns(b, common)
    let ca = (await ea.next()).value as Extent | undefined
    let cb = (await eb.next()).value as Extent | undefined
    let pos = 0
    /** pieces in flight, checked in guest order: the first difference is the lowest */
    const queue: Array<{ at: number; end: number; diff: Promise<number> }> = []
    const settle = async (): Promise<CompareResult | undefined> => {
      checkAborted(options.signal, 'compare')
      const job = queue.shift()!
      const d = await job.diff
      options.onProgress?.(job.end, total)
      if (d < 0) return undefined
      const offset = job.at + d
      for (const j of queue) j.diff.catch(() => undefined)
      return { identical: false, sizeMismatch, sizeWarning: false, reason: 'content', offset, message: `Content mismatch at offset ${offset}!` }
    }
    const piece = async (at: number, n: number, sa: Source, sb: Source): Promise<number> => {
      const [x, y] = await Promise.all([
        sa.kind === 'zero' ? undefined : readGuest(a, sa, at, n, files, pool),
        sb.kind === 'zero' ? undefined : readGuest(b, sb, at, n, files, pool),
      ])
      const d = x && y ? firstDiff(x, y) : firstNonZero((x ?? y)!)
      if (x) pool.put(x)
      if (y) pool.put(y)
      return d
    }
    while (pos < common && ca && cb) {
      const end = Math.min(ca.start + ca.length, cb.start + cb.length)
      if (options.strict && ca.present !== cb.present) {
        while (queue.length > 0) {
          const r = await settle()
          if (r) return r
        }
        return {
          identical: false,
          sizeMismatch,
          sizeWarning: false,
          reason: 'status',
          offset: pos,
          message: `Strict mode: Offset ${pos} block status mismatch!`,
        }
      }
      if (ca.zero && cb.zero) {
        queue.push({ at: pos, end, diff: Promise.resolve(-1) })
      } else {
        for (let p = pos; p < end;) {
          const n = Math.min(chunk, end - p)
          const diff = piece(p, n, sourceOf(ca, p, hostFiles), sourceOf(cb, p, hostFiles))
          diff.catch(() => undefined) // surfaced when settled
          queue.push({ at: p, end: p + n, diff })
          p += n
          while (queue.length >= inFlight) {
            const r = await settle()
            if (r) return r
          }
        }
      }
      pos = end
      if (ca.start + ca.length <= pos) ca = (await ea.next()).value as Extent | undefined
      if (cb.start + cb.length <= pos) cb = (await eb.next()).value as Extent | undefined
    }
    while (queue.length > 0) {
      const r = await settle()
      if (r) return r
    }
  } finally {
    await files.close()
  }
  if (sizeMismatch) {
    const big = a.virtualSize > b.virtualSize ? a : b
    for await (const e of mergeExtents(big.extents(common, total - common)) as AsyncIterable<Extent>) {
      if (!e.data) continue
      for (let p = e.start; p < e.start + e.length; p += chunk) {
        const n = Math.min(chunk, e.start + e.length - p)
        const buf = await big.read(p, n)
        if (!isAllZero(buf)) {
          const d = firstDiff(buf, new Uint8Array(n))
          return { identical: false, sizeMismatch, sizeWarning: true, reason: 'content', offset: p + d, message: `Content mismatch at offset ${p + d}!` }
        }
      }
    }
  }
  options.onProgress?.(total, total)
  return { identical: true, sizeMismatch, sizeWarning: sizeMismatch }
}
