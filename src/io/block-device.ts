/**
 * The one narrow I/O interface every format goes through, so tests can count
 * it, fail it, tear it and crash it. Offsets and lengths are bytes.
 */
export type IoTag =
  | 'header'
  | 'header-ext'
  | 'l1'
  | 'l2'
  | 'reftable'
  | 'refblock'
  | 'snapshot'
  | 'bitmap'
  | 'data'
  | 'compressed'
  | 'journal'
  | 'cow-header'
  | 'cow-area'
  | 'cow-data'
  | 'origin'
  | 'probe'
  | (string & {})

/** Host allocation status of a byte range (SEEK_DATA/SEEK_HOLE where the host supports it). */
export interface HostStatus {
  /** true: the range holds data; false: it is a hole (reads as zeros). */
  data: boolean
  /** how many bytes from `offset` share this status (at least 1, at most the length asked). */
  length: number
}

export interface BlockDevice {
  /** Current size in bytes. Reads beyond it return zeros (as QEMU's block layer does). */
  readonly size: number
  readonly readOnly: boolean
  /** A name for messages: the file path, or a label for memory devices. */
  readonly name: string
  read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array>
  /**
   * Optional: read `buf.byteLength` bytes at `offset` into `buf` (past the end:
   * zeros), so a caller can reuse its buffers. Call it through readInto()
   * below, which falls back to read() for devices without it.
   */
  readInto?(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void>
  write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void>
  /** The durability barrier: every write before it is durable after it. */
  flush(): Promise<void>
  truncate(size: number): Promise<void>
  close(): Promise<void>
  /** Optional: hole detection (files on Linux). Without it every byte counts as data. */
  hostStatus?(offset: number, length: number): Promise<HostStatus>
  /** Optional: bytes actually allocated on the host (st_blocks * 512). */
  allocatedSize?(): Promise<number>
  /**
   * Optional: host blocks for [offset, offset+length) without writing data, as
   * posix_fallocate (preallocation=falloc): bytes already there are kept, bytes
   * past the old end read as zeros, and the device grows to cover the range.
   * Call it through allocate() in prealloc.ts, which writes for devices without it.
   */
  allocate?(offset: number, length: number): Promise<void>
}

/** Read into `buf`: the device's readInto when it has one, else read() and a copy. */
export async function readInto(dev: BlockDevice, offset: number, buf: Uint8Array, tag?: IoTag): Promise<void> {
  if (dev.readInto) return dev.readInto(offset, buf, tag)
  buf.set(await dev.read(offset, buf.byteLength, tag))
}

export interface OpenDeviceOptions {
  readOnly: boolean
  /** create (or truncate) the file; it is emptied only once it is locked */
  create?: boolean
  /**
   * with create: create a new file only, never open or truncate an existing one
   * (EEXIST, a symlink too, dangling or not); the new file is owner-only (0600)
   */
  exclusive?: boolean
  /**
   * qemu-img's -U (force-share): take no image locks and test none, so an
   * image another process holds can still be read. Read-only opens only.
   */
  forceShare?: boolean
}

export type DeviceOpener = (path: string, options: OpenDeviceOptions) => Promise<BlockDevice>
