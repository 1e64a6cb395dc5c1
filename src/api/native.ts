/**
 * Which optional native parts this installation loaded (build/Release), for
 * `imgtool --version` and for callers that want to know what they get.
 */
import { locksAvailable } from '../io/lock.js'
import { copyRangeAddon, fallocateAddon, seekHoleAddon } from '../io/seek-hole.js'

/** The qemu-img version whose behaviour imgtool follows (answers, messages, exit codes). */
export const QEMU_IMG_VERSION = '7.2'

export interface NativeParts {
  /** lseek SEEK_DATA/SEEK_HOLE: map reports host holes as qemu-img map does */
  seekHole: boolean
  /** open-file-description locks: QEMU's image locks */
  ofdLocks: boolean
  /** copy_file_range for cat */
  copyFileRange: boolean
  /** fallocate for preallocation=falloc */
  fallocate: boolean
  /** the system zlib for convert -c (qemu-img's compressed bytes) */
  deflate: boolean
}

/** (async: the qcow2 driver, which owns the deflate addon, is loaded only when asked) */
export async function nativeParts(): Promise<NativeParts> {
  const { deflateAddon } = await import('../formats/qcow2/index.js')
  return {
    seekHole: typeof seekHoleAddon()?.seek === 'function',
    ofdLocks: locksAvailable(),
    copyFileRange: copyRangeAddon() !== null,
    fallocate: fallocateAddon() !== null,
    deflate: deflateAddon() !== null,
  }
}
