/** check as a library call: the CheckReport (qemu-img check's counters and imgtool's findings). */
import { NoCheckError, checkAborted } from '../errors.js'
import type { CheckReport } from '../check/types.js'
import { openImage as openByPath } from '../open.js'
import { diskImageOf, formatOption, openOptionsOf, type Image, type OpenOptions } from './image.js'

export interface CheckImageOptions {
  /** when a path is given: its format (probed when absent) */
  format?: OpenOptions['format']
  /** dm-snapshot: the origin */
  origin?: string
  /** qemu-img -U: take and test no image locks (read an image another process holds) */
  forceShare?: boolean
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

/**
 * Check an image (a path, or an image you opened). A path is opened with
 * qemu's check flag, so structures a normal open refuses are reported as
 * findings instead. Throws NoCheckError for formats without a check (raw).
 */
export async function check(target: Image | string, o: CheckImageOptions = {}): Promise<CheckReport> {
  checkAborted(o.signal, 'check')
  const d =
    typeof target === 'string'
      ? await markOpenFailure(
          openByPath(target, { format: formatOption(o.format), readOnly: true, options: openOptionsOf(o), forCheck: true, forceShare: o.forceShare === true }),
        )
      : diskImageOf(target)
  try {
    if (typeof d.check !== 'function') throw new NoCheckError(`${d.format}: ${d.filename}: this image format does not support checks`, { file: d.filename })
    return await d.check({ ...(o.onProgress ? { onProgress: o.onProgress } : {}), ...(o.signal ? { signal: o.signal } : {}) })
  } finally {
    if (typeof target === 'string') await d.close()
  }
}

/**
 * An image that cannot even be opened for a check (qemu-img: "Could not open
 * 'X': ..."): the error is passed on as it is, marked `openFailed: true`.
 */
export async function markOpenFailure<T>(p: Promise<T>): Promise<T> {
  try {
    return await p
  } catch (e) {
    if (e !== null && typeof e === 'object') Object.assign(e, { openFailed: true })
    throw e
  }
}
