/**
 * compare over the DiskImage interface, with qemu-img compare's meaning:
 * identical contents (sizes may differ when the extra part reads as zeros,
 * unless strict); strict mode also wants the same allocation status. The
 * first difference is reported at 512-byte granularity, as qemu-img does.
 */
import type { DiskImage, Extent } from '../image/disk-image.js'
import { mergeExtents } from '../image/range.js'
import { isZeroFast as isAllZero } from './convert.js'

export type CompareResult =
  | { identical: true; sizeMismatch: boolean }
  | { identical: false; sizeMismatch: boolean; reason: 'content' | 'size' | 'status'; offset?: number; message: string }

export interface CompareOptions {
  strict?: boolean
  chunkSize?: number
  onProgress?: (done: number, total: number) => void
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

export async function compareImages(a: DiskImage, b: DiskImage, options: CompareOptions = {}): Promise<CompareResult> {
  const sizeMismatch = a.virtualSize !== b.virtualSize
  if (sizeMismatch && options.strict) {
    return { identical: false, sizeMismatch, reason: 'size', message: 'Strict mode: Image size mismatch!' }
  }
  const common = Math.min(a.virtualSize, b.virtualSize)
  const total = Math.max(a.virtualSize, b.virtualSize)
  const chunk = options.chunkSize ?? 2 * 1024 * 1024
  // walk both images' extents together; skip ranges that are zero in both
  const ea = statusRuns(a, common)
  const eb = statusRuns(b, common)
  let ca = (await ea.next()).value as Extent | undefined
  let cb = (await eb.next()).value as Extent | undefined
  let pos = 0
  while (pos < common && ca && cb) {
    const end = Math.min(ca.start + ca.length, cb.start + cb.length)
    if (options.strict && ca.present !== cb.present) {
      return { identical: false, sizeMismatch, reason: 'status', offset: pos, message: `Strict mode: Offset ${pos} block status mismatch!` }
    }
    const bothZero = !ca.data && !cb.data
    if (!bothZero) {
      // several reads in flight
      for (let p = pos; p < end; ) {
        const batch: Array<Promise<[Uint8Array, Uint8Array, number]>> = []
        for (let k = 0; k < 2 && p < end; k++) {
          const n = Math.min(chunk, end - p)
          const at = p
          batch.push(Promise.all([a.read(at, n), b.read(at, n)]).then(([x, y]) => [x, y, at]))
          p += n
        }
        for (const r of await Promise.all(batch)) {
          const d = firstDiff(r[0], r[1])
          if (d >= 0) {
            const offset = r[2] + d
            return { identical: false, sizeMismatch, reason: 'content', offset, message: `Content mismatch at offset ${offset}!` }
          }
        }
      }
    }
    options.onProgress?.(end, total)
    pos = end
    if (ca.start + ca.length <= pos) ca = (await ea.next()).value as Extent | undefined
    if (cb.start + cb.length <= pos) cb = (await eb.next()).value as Extent | undefined
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
          return { identical: false, sizeMismatch, reason: 'content', offset: p + d, message: `Content mismatch at offset ${p + d}!` }
        }
      }
    }
  }
  options.onProgress?.(total, total)
  return { identical: true, sizeMismatch }
}
