import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import type { DiskImage } from './disk-image.js'
import type { FormatName } from './probe.js'

/** Backing chains deeper than this are refused (QEMU allows far less in practice). */
export const MAX_CHAIN_DEPTH = 64

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
