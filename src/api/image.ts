/**
 * The library's image handle: one type for every format, opened by path or on
 * a caller's BlockDevice. It hides the format classes; the API's own
 * functions reach the DiskImage underneath through `diskImageOf`.
 */
import { ReadOnlyError, UsageError, WrongFormatError, checkAborted } from '../errors.js'
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import { openFileDevice } from '../io/file-device.js'
import type { DiskImage, Extent, ImageInfo } from '../image/disk-image.js'
import { isFormatName, type FormatName } from '../image/probe.js'
import { makeContext, openImage as openByPath, openImageOnDevice } from '../open.js'

/**
 * What an image may pull in besides its own file:
 * - `follow` (qemu-img's behaviour): backing files, external data files and
 *   a dm-snapshot origin named by the image or the caller are opened;
 * - `deny`: only the named file is opened; an image that names a backing or
 *   data file is refused with an error naming the reference (for images from
 *   untrusted sources).
 */
export type ReferencePolicy = 'follow' | 'deny'

export interface OpenOptions {
  /** the format; probed from the first bytes when absent */
  format?: FormatName
  /** default true: a writable open takes the writer's lock and marks qcow2 images in use */
  readOnly?: boolean
  /** dm-snapshot: the origin device or file the COW store snapshots */
  origin?: string
  /** format-specific open options (qemu-img's -o spelling, e.g. origin=PATH) */
  options?: Record<string, string>
  backingPolicy?: ReferencePolicy
  /** qemu-img's -U: take and test no image locks (read-only opens only) */
  forceShare?: boolean
  /** refuses to start once aborted */
  signal?: AbortSignal
}

/** An open image of any format. Close it (or use `await using`). */
export interface Image {
  readonly format: string
  readonly filename: string
  /** guest size in bytes */
  readonly virtualSize: number
  readonly readOnly: boolean
  /** what `imgtool info` shows, as data (qemu-img info's fields in `formatSpecific`) */
  info(): Promise<ImageInfo>
  /** guest bytes [offset, offset + length) */
  read(offset: number, length: number): Promise<Uint8Array>
  /** allocation status of the guest range, in order and without gaps (qemu-img map's records) */
  extents(offset?: number, length?: number): AsyncIterable<Extent>
  /** present when the image was opened writable */
  write?(offset: number, data: Uint8Array): Promise<void>
  /** present when the image was opened writable */
  writeZeroes?(offset: number, length: number): Promise<void>
  /** makes every write before it durable */
  flush(): Promise<void>
  close(): Promise<void>
  [Symbol.asyncDispose](): Promise<void>
}

const inner = new WeakMap<Image, DiskImage>()

class ImageHandle implements Image {
  write?: (offset: number, data: Uint8Array) => Promise<void>
  writeZeroes?: (offset: number, length: number) => Promise<void>
  private closed = false
  constructor(private readonly img: DiskImage) {
    if (img.write && !img.readOnly) this.write = (offset, data) => img.write!(offset, data)
    if (img.writeZeroes && !img.readOnly) this.writeZeroes = (offset, length) => img.writeZeroes!(offset, length)
  }
  get format(): string {
    return this.img.format
  }
  get filename(): string {
    return this.img.filename
  }
  get virtualSize(): number {
    return this.img.virtualSize
  }
  get readOnly(): boolean {
    return this.img.readOnly
  }
  info(): Promise<ImageInfo> {
    return this.img.info()
  }
  read(offset: number, length: number): Promise<Uint8Array> {
    return this.img.read(offset, length)
  }
  extents(offset = 0, length?: number): AsyncIterable<Extent> {
    return this.img.extents(offset, length ?? Math.max(0, this.img.virtualSize - offset))
  }
  flush(): Promise<void> {
    return this.img.flush()
  }
  async close(): Promise<void> {
    if (this.closed) return
    this.closed = true
    await this.img.close()
  }
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }
}

/** The DiskImage behind a handle (the API's own functions only). */
export function diskImageOf(image: Image): DiskImage {
  const d = inner.get(image)
  if (!d) throw new UsageError('not an image opened by openImage()')
  return d
}

export function wrapImage(d: DiskImage): Image {
  const h = new ImageHandle(d)
  inner.set(h, d)
  return h
}

/** An opener that opens the image's own file and refuses every other (backingPolicy 'deny'). */
function confinedOpener(top: string | undefined, base: DeviceOpener): DeviceOpener {
  // opening by path: the first file opened is the image itself; on a device, none is allowed
  let allowOne = top === undefined
  return async (path, options) => {
    if (allowOne) {
      allowOne = false
      return base(path, options)
    }
    throw new WrongFormatError(`${top ?? 'image'}: refers to '${path}' (a backing, data or origin file), and references are denied by backingPolicy`, {
      file: top,
      structure: 'reference',
    })
  }
}

export function formatOption(format: string | undefined): FormatName | undefined {
  if (format === undefined) return undefined
  if (!isFormatName(format)) throw new UsageError(`Unknown file format '${format}'`)
  return format
}

export function openOptionsOf(o: OpenOptions): Record<string, string> {
  const options = { ...(o.options ?? {}) }
  if (o.origin !== undefined) options['origin'] = o.origin
  return options
}

/**
 * Open an image by path, or on a BlockDevice of your own (a memory device, a
 * device you count or fail in tests). Read-only unless `readOnly: false`.
 */
export async function openImage(target: string | BlockDevice, o: OpenOptions = {}): Promise<Image> {
  checkAborted(o.signal, 'open')
  const format = formatOption(o.format)
  const options = openOptionsOf(o)
  const readOnly = o.readOnly ?? true
  const policy = o.backingPolicy ?? 'follow'
  if (policy !== 'follow' && policy !== 'deny') throw new UsageError(`backingPolicy must be 'follow' or 'deny', not '${String(policy)}'`)
  if (typeof target === 'string') {
    const openDevice = policy === 'deny' ? confinedOpener(undefined, openFileDevice) : openFileDevice
    const d = await openByPath(target, { format, readOnly, options, openDevice, forceShare: o.forceShare === true })
    return wrapImage(d)
  }
  if (!readOnly && target.readOnly) throw new ReadOnlyError(`${target.name}: the device is read-only`, { file: target.name })
  const context = makeContext(policy === 'deny' ? confinedOpener(target.name, openFileDevice) : openFileDevice)
  const d = await openImageOnDevice(target, { format, readOnly, options, context })
  return wrapImage(d)
}
