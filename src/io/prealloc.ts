/**
 * Preallocation on any BlockDevice, the way qemu-img 7.2's file driver does it
 * (block/file-posix.c, handle_aiocb_truncate):
 *
 * - `falloc`: posix_fallocate of the new range: blocks without data written.
 *   Where the filesystem has no fallocate, glibc's posix_fallocate writes into
 *   every block instead, so qemu-img's falloc still succeeds there; devices
 *   without `allocate()` (and files where fallocate(2) says EOPNOTSUPP, or
 *   without the native addon) do the same here by writing zeros.
 * - `full`: the file is grown, then zeros are written over the new range.
 * - `off`: the file is grown (sparse).
 *
 * A raw file made from nothing (size 0) also gets its first block written
 * (qemu's allocate_first_block, for O_DIRECT alignment probing): 4 KiB, or
 * 512 bytes when the file is smaller than 4 KiB; not for `full`, which writes
 * everything anyway.
 */
import type { BlockDevice, IoTag } from './block-device.js'

export type RawPreallocation = 'off' | 'falloc' | 'full'

const CHUNK = 4 << 20

/** Host blocks for [offset, offset+length): the device's allocate() when it has one, else by writing. */
export async function allocate(dev: BlockDevice, offset: number, length: number, tag: IoTag = 'data'): Promise<void> {
  if (length <= 0) return
  if (dev.allocate) return dev.allocate(offset, length)
  return allocateByWriting(dev, offset, length, tag)
}

/**
 * posix_fallocate's fallback: blocks are allocated by writing them. Bytes below
 * the device's end are written back as they are, bytes past it as zeros.
 */
export async function allocateByWriting(dev: BlockDevice, offset: number, length: number, tag: IoTag = 'data'): Promise<void> {
  const end = offset + length
  const zeros = new Uint8Array(Math.min(CHUNK, length))
  for (let p = offset; p < end;) {
    const n = Math.min(CHUNK, end - p)
    if (p < dev.size) {
      const m = Math.min(n, dev.size - p)
      await dev.write(p, await dev.read(p, m, tag), tag)
      p += m
    } else {
      await dev.write(p, n === zeros.byteLength ? zeros : zeros.subarray(0, n), tag)
      p += n
    }
  }
}

/** Zeros written over [offset, offset+length) (preallocation=full). */
export async function writeZeros(dev: BlockDevice, offset: number, length: number, tag: IoTag = 'data'): Promise<void> {
  if (length <= 0) return
  const zeros = new Uint8Array(Math.min(CHUNK, length))
  for (let p = 0; p < length; p += zeros.byteLength) {
    const n = Math.min(zeros.byteLength, length - p)
    await dev.write(offset + p, n === zeros.byteLength ? zeros : zeros.subarray(0, n), tag)
  }
}

/**
 * A raw file of `size` bytes on `dev` (emptied first), as qemu-img create -f raw
 * (and qcow2's external data file) makes it: grown from 0 with the given mode.
 */
export async function createRawFile(dev: BlockDevice, size: number, mode: RawPreallocation): Promise<void> {
  if (dev.size > 0) await dev.truncate(0)
  if (size <= 0) return
  if (mode === 'full') {
    await dev.truncate(size)
    await writeZeros(dev, 0, size)
    return
  }
  if (mode === 'falloc') await allocate(dev, 0, size)
  else await dev.truncate(size)
  await dev.write(0, new Uint8Array(size < 4096 ? 512 : 4096), 'data')
}
