/**
 * One image interface for every format. convert, compare and map use only
 * this, never a concrete format.
 */
import type { CheckOptions, CheckReport, RepairMode, RepairResult } from '../check/types.js'

/**
 * Allocation status of a guest range, with qemu-img map's meaning:
 * - present: allocated in some layer of the chain (BDRV_BLOCK_ALLOCATED)
 * - zero: reads as zeros
 * - data: backed by data somewhere (BDRV_BLOCK_DATA)
 * - depth: the layer it came from (0 = this image, 1 = its backing file...)
 * - hostOffset/file: where the bytes are when they map 1:1 to a host range
 */
export interface Extent {
  start: number
  length: number
  depth: number
  present: boolean
  zero: boolean
  data: boolean
  hostOffset?: number
  file?: string
}

export type ExtentKind = 'data' | 'zero' | 'unallocated'

export function extentKind(e: Extent): ExtentKind {
  if (e.zero) return 'zero'
  if (e.data) return 'data'
  return 'unallocated'
}

export interface SnapshotInfo {
  id: string
  name: string
  vmStateSize: number
  dateSec: number
  dateNsec: number
  vmClockNsec: number
  icount?: number
  /** guest disk size recorded with the snapshot (v3 extra data) */
  diskSize?: number
  l1TableOffset: number
  l1Size: number
  extraDataSize: number
}

/** What `info` shows, independent of rendering. Format-specific data keeps qemu's field names. */
export interface ImageInfo {
  filename: string
  format: string
  virtualSize: number
  actualSize?: number
  clusterSize?: number
  dirty?: boolean
  /** qemu-img info's "encrypted": the guest data is encrypted */
  encrypted?: boolean
  backingFilename?: string
  fullBackingFilename?: string
  backingFormat?: string
  snapshots?: SnapshotInfo[]
  formatSpecific?: { type: string; data: Record<string, unknown> }
  /** the backing image's info, for --backing-chain */
  backing?: ImageInfo
}

/**
 * An internal snapshot as qemu-img's -l names it: `snapshot.id=ID` and/or `snapshot.name=NAME` (both must
 * match when both are given), or a bare word tried as an id, then as a name (`idOrName`).
 */
export interface SnapshotSelector {
  id?: string
  name?: string
  idOrName?: string
}

export interface DiskImage {
  readonly format: string
  readonly filename: string
  readonly virtualSize: number
  readonly readOnly: boolean
  /** The backing image, when the format has one. */
  readonly backing?: DiskImage | undefined
  /** Guest bytes; ranges past the virtual size are refused. */
  read(offset: number, length: number): Promise<Uint8Array>
  /** Allocation status covering [offset, offset+length) in order, without gaps. */
  extents(offset?: number, length?: number): AsyncIterable<Extent>
  info(): Promise<ImageInfo>
  /** Writable images implement these. */
  write?(offset: number, data: Uint8Array): Promise<void>
  writeZeroes?(offset: number, length: number, options?: { discard?: boolean }): Promise<void>
  flush(): Promise<void>
  close(): Promise<void>
  /**
   * Formats with internal snapshots (qcow2): a read-only view of one snapshot's guest bytes, as qemu's
   * bdrv_snapshot_load_tmp (the current virtual size; what the snapshot does not map reads from the backing
   * file). The view shares this image's files: closing it closes nothing, closing this image ends it.
   */
  loadSnapshot?(selector: SnapshotSelector): Promise<DiskImage>
  /** Formats that can be checked (qemu-img check) implement these. */
  check?(options?: CheckOptions): Promise<CheckReport>
  repair?(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult>
}

/** Where a writable image stores guest bytes as they are (see DiskImage.inPlace). */
export interface InPlaceRange {
  /** the host file, as the image's extents name it */
  file: string
  /** the host byte that holds the range's first guest byte */
  hostOffset: number
}

/**
 * A writable image whose guest range [offset, offset + length) is stored as it is in one host range,
 * written by nothing but those bytes (no table, bitmap or footer to update): raw, a fixed VHD, a flat
 * VMDK extent. convert's native data path writes such a range straight into the host file
 * (src/convert/sparse-copy.ts); undefined where the range is not stored so (the caller writes through
 * the image).
 */
export interface WritesInPlace {
  inPlace(offset: number, length: number): InPlaceRange | undefined
}
