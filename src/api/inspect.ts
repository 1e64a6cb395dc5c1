/**
 * Looking at an image without holding it open: qemu-img info's data and
 * qemu-img map's records, each one call by path.
 */
import { checkAborted } from '../errors.js'
import type { Extent, ImageInfo } from '../image/disk-image.js'
import { mergeExtents } from '../image/range.js'
import { openImage as openByPath } from '../open.js'
import { parseSize } from '../util/size.js'
import { formatOption, openOptionsOf, type OpenOptions } from './image.js'

export interface InfoOptions extends Pick<OpenOptions, 'format' | 'origin' | 'options' | 'forceShare' | 'signal'> {
  /**
   * Open the whole backing chain and give each image's info in `backing`
   * (qemu-img info --backing-chain); a backing file that cannot be opened
   * fails. Without it only the image itself is opened, and a missing or
   * looping backing file is a name in the answer, not a failure.
   */
  backingChain?: boolean
}

/** What `imgtool info` (qemu-img info) shows about the image at `path`, as data. */
export async function imageInfo(path: string, o: InfoOptions = {}): Promise<ImageInfo> {
  checkAborted(o.signal, 'info')
  const image = await openByPath(path, {
    format: formatOption(o.format),
    readOnly: true,
    options: openOptionsOf(o),
    infoOnly: o.backingChain !== true,
    forceShare: o.forceShare === true,
  })
  try {
    return await image.info()
  } finally {
    await image.close()
  }
}

export interface MapOptions extends Pick<OpenOptions, 'format' | 'origin' | 'options' | 'forceShare' | 'signal'> {
  /** first guest byte, in bytes or as qemu-img sizes ('1M'); past the end means the end (default 0) */
  offset?: number | string
  /** how many guest bytes at most, in bytes or as qemu-img sizes (default to the end) */
  length?: number | string
}

/**
 * The allocation status of a guest range of the image at `path`, as
 * qemu-img map gives it: adjacent records with the same status merged, in
 * order and without gaps, and one empty record for an empty range. The
 * image stays open while the records are read and is closed at their end
 * (or when the loop is left).
 */
export async function* mapImage(path: string, o: MapOptions = {}): AsyncGenerator<Extent> {
  checkAborted(o.signal, 'map')
  const image = await openByPath(path, {
    format: formatOption(o.format),
    readOnly: true,
    options: openOptionsOf(o),
    forceShare: o.forceShare === true,
  })
  try {
    const start = o.offset === undefined ? 0 : typeof o.offset === 'number' ? o.offset : parseSize(o.offset, 'start offset')
    const size = image.virtualSize
    const from = Math.min(start, size)
    const maxLength = o.length === undefined ? size : typeof o.length === 'number' ? o.length : parseSize(o.length, 'max length')
    const length = Math.min(maxLength, size - from)
    let empty = true
    for await (const e of mergeExtents(image.extents(from, length))) {
      checkAborted(o.signal, 'map')
      empty = false
      yield e
    }
    if (empty) yield { start: from, length: 0, depth: 0, present: false, zero: false, data: false }
  } finally {
    await image.close()
  }
}
