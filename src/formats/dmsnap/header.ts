/** Chunk 0: the store header (magic, valid, version, chunk size). Only the first 16 bytes mean anything. */
import { putU32le, u32le, isAllZero } from '../../util/bytes.js'
import type { BlockDevice } from '../../io/block-device.js'
import { SECTOR_BYTES, SNAP_MAGIC, SNAPSHOT_DISK_VERSION, isValidChunkSectors } from './constants.js'

export const HEADER_BYTES = 16

export interface StoreHeader {
  magic: number
  valid: number
  version: number
  chunkSectors: number
}

export type HeaderProblem =
  | { kind: 'too-small' }
  | { kind: 'uninitialised' }
  | { kind: 'bad-magic'; found: number }
  | { kind: 'bad-version'; found: number }
  | { kind: 'bad-chunk-size'; found: number }

export function decodeHeader(b: Uint8Array): StoreHeader {
  return { magic: u32le(b, 0), valid: u32le(b, 4), version: u32le(b, 8), chunkSectors: u32le(b, 12) }
}

/** A header chunk the way the kernel's write_header() builds it: cleared, then the four fields. */
export function encodeHeader(h: StoreHeader, chunkBytes: number): Uint8Array {
  const b = new Uint8Array(chunkBytes)
  putU32le(b, 0, h.magic)
  putU32le(b, 4, h.valid)
  putU32le(b, 8, h.version)
  putU32le(b, 12, h.chunkSectors)
  return b
}

export function freshHeader(chunkSectors: number, valid = 1): StoreHeader {
  return { magic: SNAP_MAGIC, valid, version: SNAPSHOT_DISK_VERSION, chunkSectors }
}

/** The first problem the kernel's read_header()/read_metadata() would refuse the store for. */
export function headerProblem(h: StoreHeader, deviceBytes: number): HeaderProblem | undefined {
  if (deviceBytes < HEADER_BYTES) return { kind: 'too-small' }
  if (h.magic === 0) return { kind: 'uninitialised' }
  if (h.magic !== SNAP_MAGIC) return { kind: 'bad-magic', found: h.magic }
  if (!isValidChunkSectors(h.chunkSectors)) return { kind: 'bad-chunk-size', found: h.chunkSectors }
  if (h.version !== SNAPSHOT_DISK_VERSION) return { kind: 'bad-version', found: h.version }
  return undefined
}

export async function readHeader(dev: BlockDevice): Promise<StoreHeader> {
  return decodeHeader(await dev.read(0, SECTOR_BYTES, 'cow-header'))
}

/** Non-zero bytes in chunk 0 after the 16 header bytes (the kernel writes zeros there). */
export async function headerTailDirty(dev: BlockDevice, chunkBytes: number): Promise<boolean> {
  const b = await dev.read(0, chunkBytes, 'cow-header')
  return !isAllZero(b.subarray(HEADER_BYTES))
}

/** Write the header from its own buffer (seed 002: never from the area buffer). */
export async function writeHeader(dev: BlockDevice, h: StoreHeader): Promise<void> {
  await dev.write(0, encodeHeader(h, h.chunkSectors * SECTOR_BYTES), 'cow-header')
}
