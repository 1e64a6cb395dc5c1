/**
 * qemu-img resize of a raw image, as qemu's file driver truncates (block/file-posix.c,
 * handle_aiocb_truncate): growing with preallocation off (sparse), falloc (the new range allocated) or
 * full (zeros written over it); shrinking (preallocation off only) cuts the file. A growth that fails
 * puts the file back at its old length, as qemu does; the bytes below it are never written.
 */
import { UsageError } from '../../errors.js'
import { allocate, writeZeros, type RawPreallocation } from '../../io/prealloc.js'
import type { RawImage } from './image.js'

export async function resizeRaw(img: RawImage, size: number, mode: RawPreallocation = 'off'): Promise<void> {
  const dev = img.device
  const old = dev.size
  if (size <= old) {
    if (mode !== 'off') throw new UsageError('Preallocation can only be used for growing images')
    if (size < old) await dev.truncate(size)
    await dev.flush()
    return
  }
  try {
    if (mode === 'falloc') await allocate(dev, old, size - old)
    else {
      await dev.truncate(size)
      if (mode === 'full') await writeZeros(dev, old, size - old)
    }
    await dev.flush()
  } catch (e) {
    await dev.truncate(old).catch(() => undefined)
    throw e
  }
}
