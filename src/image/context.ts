import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import type { DiskImage } from './disk-image.js'
import type { FormatName } from './probe.js'

/**
 * Backing chains deeper than this are refused. QEMU has no limit of its own
 * (qemu-img reads a 1,001-image chain); this bound only stops a runaway, and
 * memory stays bounded below it: every image past the first few keeps a small
 * L2 cache (`L2_CACHE_BUDGET`), so a chain costs about its L1 tables plus a
 * few tables per image. Loops are refused whatever the depth.
 */
export const MAX_CHAIN_DEPTH = 4096

/** L2 cache per image: 4 MiB for the first images of a chain, 4 tables for the deeper ones. */
export function l2CacheBudget(depth: number, clusterSize: number): number {
  return depth < 8 ? 4 * 1024 * 1024 : 4 * clusterSize
}

export interface OpenImageOptions {
  format?: FormatName | undefined
  readOnly: boolean
  /** how deep in a backing chain this image is (0 = the image the user named) */
  depth?: number
  /** paths already open above this one, to refuse loops */
  chain?: readonly string[]
  /** format-specific options, e.g. dmsnap's origin */
  options?: Record<string, string>
  /**
   * Open for check/repair (qemu's check flag): structures that a normal open
   * refuses (corrupt bit, missing refcount table...) are left for check to report.
   */
  forCheck?: boolean
  /**
   * Open the image itself only, as qemu-img info does (BDRV_O_NO_BACKING and
   * NO_IO): no backing file, no external data file; guest reads are refused.
   * A missing or looping backing file is then a name to show, not a failure.
   */
  infoOnly?: boolean
  /**
   * qcow2 opened read-write: attach the writer without loading the persistent
   * bitmaps (no IN_USE marking); the caller edits them in one switch (bitmap).
   */
  bitmapsByCaller?: boolean
}

export interface CreateImageOptions {
  size: number
  /** -o key=value options, as given */
  options: Record<string, string>
  backingFile?: string
  backingFormat?: string
}

/**
 * What a format needs from the layer above to open related files (backing
 * files, external data files, origins) without importing another format.
 */
export interface OpenContext {
  openDevice: DeviceOpener
  openImage(path: string, options: OpenImageOptions): Promise<DiskImage>
}

/** A format driver: opens a DiskImage on a device. */
export interface FormatDriver {
  readonly name: FormatName
  open(device: BlockDevice, context: OpenContext, options: OpenImageOptions): Promise<DiskImage>
  /** Write a fresh image onto an empty device. */
  create?(device: BlockDevice, context: OpenContext, options: CreateImageOptions): Promise<void>
}
