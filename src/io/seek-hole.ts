/**
 * Loads the optional native addon built by `npm install` (native/seekhole.c):
 * lseek(SEEK_DATA/SEEK_HOLE) for hole detection, and plain lseek plus
 * fcntl(F_GETFL) for the file offset of a descriptor someone else opened
 * (cat's stdout), copy_file_range, and fallocate. Without it, hole detection is
 * simply unavailable, cat writes its output one write after another, and
 * preallocation writes zeros. It also carries the OFD lock primitives of
 * src/io/lock.ts (without it, images are opened without locks) and clears
 * O_NONBLOCK after open (without it, the flag stays: it changes nothing for
 * regular files and block devices).
 */
import { createRequire } from 'node:module'

export interface SeekHole {
  /** whence 0 = SEEK_DATA, 1 = SEEK_HOLE; returns the offset or -errno */
  seek(fd: number, offset: number, whence: 0 | 1): number
  /** whence 0 = SEEK_SET, 1 = SEEK_CUR, 2 = SEEK_END; returns the new offset or -errno (absent from addons built before it) */
  lseek?(fd: number, offset: number, whence: 0 | 1 | 2): number
  /** fcntl(fd, F_GETFL): the status flags or -errno */
  getfl?(fd: number): number
  /** the platform's O_APPEND bit */
  O_APPEND?: number
  /** copy_file_range on a libuv thread: bytes copied (fewer at the input's end) or -errno */
  copyRange?(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): Promise<number> | number
  /** fallocate(fd, 0, offset, length) on a libuv thread: 0 or -errno (absent from addons built before it) */
  fallocate?(fd: number, offset: number, length: number): Promise<number> | number
  /** read, -S zero scan and write of one chunk on a libuv thread: bytes written, -errno (read), -(4096 + errno) (write) */
  copySparse?(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number, block: number): Promise<number> | number
  /** clear O_NONBLOCK on fd: 0 or -errno (absent from addons built before it) */
  clearNonblock?(fd: number): number
  /** F_OFD_SETLK of one byte (a read lock, or an unlock): 0 or -errno; see src/io/lock.ts */
  ofdLock?(fd: number, byte: number, lock: boolean): number
  /** F_OFD_GETLK (exclusive) of one byte: 0 free, 1 locked by another open file, or -errno */
  ofdTest?(fd: number, byte: number): number
  /** fcntl(F_DUPFD_CLOEXEC): a new descriptor on the same open file, or -errno */
  dup?(fd: number): number
  /** close(2): 0 or -errno */
  close?(fd: number): number
}

let loaded: SeekHole | null | undefined

export function seekHoleAddon(): SeekHole | null {
  if (loaded !== undefined) return loaded
  if (process.env['IMGTOOL_NO_SEEK_HOLE'] === '1') return (loaded = null)
  try {
    const require = createRequire(import.meta.url)
    loaded = require('../../build/Release/seekhole.node') as SeekHole
  } catch {
    loaded = null
  }
  return loaded
}

export const ENXIO = 6

/** The file offset of a descriptor, as the process that opened it sees it. */
export interface FileOffset {
  /** the current offset (lseek SEEK_CUR), or -errno */
  tell(fd: number): number
  /** set the offset (lseek SEEK_SET); the new offset, or -errno */
  seekTo(fd: number, offset: number): number
  /** whether writes to fd go to the end of the file whatever their position (O_APPEND), or undefined when unknown */
  isAppend(fd: number): boolean | undefined
}

/** lseek/fcntl for a descriptor's offset, or null without the addon (or with one built before they existed). */
export function fileOffsetAddon(): FileOffset | null {
  const a = seekHoleAddon()
  if (!a || typeof a.lseek !== 'function' || typeof a.getfl !== 'function' || typeof a.O_APPEND !== 'number') return null
  const { lseek, getfl, O_APPEND } = a
  return {
    tell: (fd) => lseek(fd, 0, 1),
    seekTo: (fd, offset) => lseek(fd, offset, 0),
    isAppend(fd) {
      const fl = getfl(fd)
      return fl < 0 ? undefined : (fl & O_APPEND) !== 0
    },
  }
}

/**
 * copy_file_range(fdIn, offIn -> fdOut, offOut, length) off the main thread: the
 * bytes copied (fewer when the input ends first) or -errno; null without the addon.
 */
export type CopyRange = (fdIn: number, offIn: number, fdOut: number, offOut: number, length: number) => Promise<number>

export function copyRangeAddon(): CopyRange | null {
  const a = seekHoleAddon()
  if (!a || typeof a.copyRange !== 'function') return null
  const copyRange = a.copyRange
  return async (fdIn, offIn, fdOut, offOut, length) => copyRange(fdIn, offIn, fdOut, offOut, length)
}

/**
 * One convert chunk copied off the main thread: `length` bytes read at offIn of
 * fdIn (zeros past its end), and only the runs of `block`-sized blocks (aligned
 * to offOut) holding a non-zero byte written at offOut of fdOut. The bytes
 * written, -errno for a failed read, or -(COPY_SPARSE_WRITE_ERROR + errno) for
 * a failed write; null without the addon (or with one built before it).
 */
export type CopySparse = (fdIn: number, offIn: number, fdOut: number, offOut: number, length: number, block: number) => Promise<number>
export const COPY_SPARSE_WRITE_ERROR = 4096
/** the largest chunk copySparse takes (native/seekhole.c's SPARSE_MAX) */
export const COPY_SPARSE_MAX = 64 * 1024 * 1024

export function copySparseAddon(): CopySparse | null {
  // IMGTOOL_NO_SPARSE_COPY=1: convert's JavaScript data path with the rest of the addon (bench A/B)
  if (process.env['IMGTOOL_NO_SPARSE_COPY'] === '1') return null
  const a = seekHoleAddon()
  if (!a || typeof a.copySparse !== 'function') return null
  const copySparse = a.copySparse
  return async (fdIn, offIn, fdOut, offOut, length, block) => copySparse(fdIn, offIn, fdOut, offOut, length, block)
}

/**
 * fallocate(fd, mode 0, offset, length) off the main thread: 0, or -errno
 * (-EOPNOTSUPP where the filesystem cannot, -ENOSYS off Linux); null without
 * the addon (or with one built before it had fallocate).
 */
export type Fallocate = (fd: number, offset: number, length: number) => Promise<number>

export function fallocateAddon(): Fallocate | null {
  const a = seekHoleAddon()
  if (!a || typeof a.fallocate !== 'function') return null
  const fallocate = a.fallocate
  return async (fd, offset, length) => fallocate(fd, offset, length)
}

export const EOPNOTSUPP = 95
export const ENOSYS = 38

/**
 * Clear O_NONBLOCK (images are opened with it so a FIFO cannot block open(2)).
 * Without the addon the flag stays, which Linux ignores for regular files and
 * block devices.
 */
export function clearNonblock(fd: number): void {
  const a = seekHoleAddon()
  if (a && typeof a.clearNonblock === 'function') a.clearNonblock(fd)
}
