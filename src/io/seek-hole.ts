/**
 * Loads the optional native lseek(SEEK_DATA/SEEK_HOLE) addon built by `npm install`
 * (native/seekhole.c). Without it, hole detection is simply unavailable.
 */
import { createRequire } from 'node:module'

export interface SeekHole {
  /** whence 0 = SEEK_DATA, 1 = SEEK_HOLE; returns the offset or -errno */
  seek(fd: number, offset: number, whence: 0 | 1): number
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
