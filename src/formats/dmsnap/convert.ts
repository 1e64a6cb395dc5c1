/**
 * raw/qcow2 → dm-snapshot: a COW against a given origin holding only the chunks
 * where the source differs from the origin, in ascending order (lvm-like and
 * merge-friendly), written through the normal allocation/commit path.
 * (The other direction needs nothing here: the view is a DiskImage.)
 */
import { UsageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage } from '../../image/disk-image.js'
import { SECTOR_BYTES, StoreLayout, isValidChunkSectors } from './constants.js'
import { DEFAULT_CREATE_CHUNK_BYTES, createStore } from './create.js'
import { DmsnapImage } from './image.js'

export interface ConvertToCowOptions {
  /** chunk size in bytes (default 4096) */
  chunkSize?: number
  /** COW size in bytes; default: the smallest that holds every exception */
  cowSize?: number
  onProgress?: (done: number, total: number) => void
}

export interface ConvertToCowResult {
  exceptions: number
  chunkSize: number
  cowSize: number
}

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))
}

/** Minimal COW size for n exceptions: header, areas, data, and the zeroed area after a full last area. */
export function minCowChunks(layout: StoreLayout, n: number): number {
  const lastData = n > 0 ? layout.dataChunk(n - 1) + 1 : 2
  return Math.max(lastData, layout.areaLocation(Math.floor(n / layout.perArea)) + 1)
}

export async function convertToCow(source: DiskImage, origin: DiskImage, cow: BlockDevice, options: ConvertToCowOptions = {}): Promise<ConvertToCowResult> {
  const cb = options.chunkSize ?? DEFAULT_CREATE_CHUNK_BYTES
  if (cb % SECTOR_BYTES !== 0 || !isValidChunkSectors(cb / SECTOR_BYTES))
    throw new UsageError(`dmsnap: chunk size ${cb} must be a power of two between 512 and 1 GiB`)
  if (source.virtualSize !== origin.virtualSize) {
    throw new UsageError(`dmsnap: the source (${source.virtualSize} bytes) and the origin (${origin.virtualSize} bytes) must have the same size`)
  }
  const size = origin.virtualSize
  const nChunks = Math.ceil(size / cb)
  const differing: number[] = []
  const step = Math.max(cb, Math.floor((1 << 20) / cb) * cb)
  for (let off = 0; off < size; off += step) {
    const n = Math.min(step, size - off)
    const [a, b] = await Promise.all([source.read(off, n), origin.read(off, n)])
    for (let o = 0; o < n; o += cb) {
      const m = Math.min(cb, n - o)
      if (!bytesEqual(a.subarray(o, o + m), b.subarray(o, o + m))) differing.push((off + o) / cb)
    }
    options.onProgress?.(Math.min(off + n, size), size * 2)
  }
  const sizing = new StoreLayout(cb / SECTOR_BYTES, 0)
  const need = Math.max(3, minCowChunks(sizing, differing.length)) * cb
  const cowSize = options.cowSize ?? need
  if (cowSize < need) throw new UsageError(`dmsnap: COW size ${cowSize} is too small: ${differing.length} changed chunk(s) need ${need} bytes`)
  await createStore(cow, { chunkSectors: cb / SECTOR_BYTES, cowSize })
  const img = await DmsnapImage.open(cow, { origin, readOnly: false, onFull: 'refuse' })
  for (const [i, c] of differing.entries()) {
    const n = Math.min(cb, size - c * cb)
    await img.write(c * cb, await source.read(c * cb, n))
    if ((i + 1) % sizing.perArea === 0) await img.flush()
    options.onProgress?.(size + Math.round(((i + 1) / Math.max(1, differing.length)) * size), size * 2)
  }
  await img.flush()
  await cow.flush()
  void nChunks
  return { exceptions: differing.length, chunkSize: cb, cowSize }
}
