/** A fresh store: zeroed area 0, then the header (so a crash leaves magic 0, never a header over garbage). */
import { UsageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { parseSize } from '../../util/size.js'
import { SECTOR_BYTES, StoreLayout, isValidChunkSectors } from './constants.js'
import { freshHeader, writeHeader } from './header.js'

/** lvm2's default snapshot chunk (4 KiB, 8 sectors); the kernel's own default is 16 KiB. */
export const DEFAULT_CREATE_CHUNK_BYTES = 4096

export interface CreateStoreOptions {
  chunkSectors: number
  /** COW size in bytes; the device is truncated to it */
  cowSize: number
  /** for messages only */
  originSize?: number
}

export function parseCreateOptions(options: Record<string, string>, size: number): CreateStoreOptions {
  for (const k of Object.keys(options)) {
    if (!['origin', 'origin_format', 'chunk_size', 'on_full'].includes(k))
      throw new UsageError(`dmsnap: unknown create option '${k}' (known: origin, chunk_size)`)
  }
  const chunkBytes = options.chunk_size !== undefined ? parseSize(options.chunk_size, 'chunk_size') : DEFAULT_CREATE_CHUNK_BYTES
  if (chunkBytes % SECTOR_BYTES !== 0 || !isValidChunkSectors(chunkBytes / SECTOR_BYTES)) {
    throw new UsageError(`dmsnap: chunk_size ${chunkBytes} must be a power of two between 512 and 1 GiB`)
  }
  return { chunkSectors: chunkBytes / SECTOR_BYTES, cowSize: size }
}

export async function createStore(dev: BlockDevice, o: CreateStoreOptions): Promise<StoreLayout> {
  const layout = new StoreLayout(o.chunkSectors, o.cowSize)
  if (layout.cowChunks < 3) {
    throw new UsageError(
      `dmsnap: COW size ${o.cowSize} is too small: header, one area and one data chunk need ${3 * layout.chunkBytes} bytes with chunk size ${layout.chunkBytes}`,
    )
  }
  if (dev.size !== o.cowSize) await dev.truncate(o.cowSize)
  await dev.write(layout.offset(1), new Uint8Array(layout.chunkBytes), 'cow-area')
  await dev.flush()
  await writeHeader(dev, freshHeader(o.chunkSectors))
  await dev.flush()
  return layout
}
