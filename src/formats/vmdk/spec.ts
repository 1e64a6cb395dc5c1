/**
 * VMDK on-disk layouts (VMware's Virtual Disk Format 5.0): the hosted sparse
 * extent header ("KDMV"), stream markers, grain table entries. Every field is
 * little-endian; sizes and offsets in the header count 512-byte sectors and
 * are read as bigint, turned into numbers only by `toSafeNumber`.
 */
import { putU32le, putU64le, u32le, u64le } from '../../util/bytes.js'

export const SECTOR = 512
/** "KDMV" as the first four bytes of a hosted sparse extent */
export const SPARSE_MAGIC = 0x564d444b
export const HEADER_SIZE = 512

export const FLAG_NL_DETECT = 1 << 0
export const FLAG_RGD = 1 << 1
export const FLAG_ZERO_GRAIN = 1 << 2
export const FLAG_COMPRESSED = 1 << 16
export const FLAG_MARKERS = 1 << 17

export const COMPRESSION_NONE = 0
export const COMPRESSION_DEFLATE = 1

/** gdOffset of a stream-optimized header whose grain directory is named by the footer */
export const GD_AT_END = 0xffffffffffffffffn

/** a grain table entry of 1 means "reads as zeros" when the header has FLAG_ZERO_GRAIN */
export const GTE_ZEROED = 1

/** QEMU's limits (vmdk_add_extent, vmdk_open_vmdk4) */
export const MAX_GTES_PER_GT = 512
export const MAX_GRAIN_SECTORS = 0x200000
export const MAX_GD_ENTRIES = 32 * 1024 * 1024
/** an extent addresses at most 2^32 sectors (VMDK_EXTENT_MAX_SECTORS) */
export const MAX_EXTENT_SECTORS = 2n ** 32n

export const MARKER_EOS = 0
export const MARKER_GT = 1
export const MARKER_GD = 2
export const MARKER_FOOTER = 3

/** The descriptor a hosted sparse extent or a descriptor file may hold; QEMU reads at most 1 MiB of it. */
export const MAX_DESCRIPTOR_BYTES = (1 << 20) - 1

export interface SparseHeader {
  magic: number
  version: number
  flags: number
  /** sectors */
  capacity: bigint
  /** sectors per grain */
  grainSize: bigint
  descriptorOffset: bigint
  descriptorSize: bigint
  numGTEsPerGT: number
  rgdOffset: bigint
  gdOffset: bigint
  /** sectors before the first grain (QEMU's grain_offset) */
  overhead: bigint
  uncleanShutdown: number
  /** the four newline-detection bytes: '\n', ' ', '\r', '\n' */
  newlineChars: [number, number, number, number]
  compressAlgorithm: number
}

export function decodeHeader(b: Uint8Array): SparseHeader {
  return {
    magic: u32le(b, 0),
    version: u32le(b, 4),
    flags: u32le(b, 8),
    capacity: u64le(b, 12),
    grainSize: u64le(b, 20),
    descriptorOffset: u64le(b, 28),
    descriptorSize: u64le(b, 36),
    numGTEsPerGT: u32le(b, 44),
    rgdOffset: u64le(b, 48),
    gdOffset: u64le(b, 56),
    overhead: u64le(b, 64),
    uncleanShutdown: b[72]!,
    newlineChars: [b[73]!, b[74]!, b[75]!, b[76]!],
    compressAlgorithm: b[77]! | (b[78]! << 8),
  }
}

export function encodeHeader(h: SparseHeader): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE)
  putU32le(b, 0, h.magic)
  putU32le(b, 4, h.version)
  putU32le(b, 8, h.flags)
  putU64le(b, 12, h.capacity)
  putU64le(b, 20, h.grainSize)
  putU64le(b, 28, h.descriptorOffset)
  putU64le(b, 36, h.descriptorSize)
  putU32le(b, 44, h.numGTEsPerGT)
  putU64le(b, 48, h.rgdOffset)
  putU64le(b, 56, h.gdOffset)
  putU64le(b, 64, h.overhead)
  b[72] = h.uncleanShutdown
  b.set(h.newlineChars, 73)
  b[77] = h.compressAlgorithm & 0xff
  b[78] = h.compressAlgorithm >> 8
  return b
}

/** A stream marker: a grain (size > 0: lba, then `size` deflated bytes) or a metadata marker (size 0, then type). */
export interface Marker {
  value: bigint
  size: number
  type: number
}

export function decodeMarker(b: Uint8Array, at = 0): Marker {
  return { value: u64le(b, at), size: u32le(b, at + 8), type: u32le(b, at + 12) }
}

/** A metadata marker sector: value (sectors that follow), size 0, type. */
export function encodeMarker(value: bigint | number, type: number): Uint8Array {
  const b = new Uint8Array(SECTOR)
  putU64le(b, 0, value)
  putU32le(b, 8, 0)
  putU32le(b, 12, type)
  return b
}

/** A grain table entry, decoded once. */
export type GrainEntry = { kind: 'unallocated' } | { kind: 'zero' } | { kind: 'normal'; sector: number } | { kind: 'compressed'; sector: number }

export function decodeGrainEntry(v: number, zeroGrain: boolean, compressed: boolean): GrainEntry {
  if (v === 0) return { kind: 'unallocated' }
  if (v === GTE_ZEROED && zeroGrain) return { kind: 'zero' }
  return compressed ? { kind: 'compressed', sector: v } : { kind: 'normal', sector: v }
}

/** The header fields qemu-img writes, for a fresh hosted sparse extent. */
export function headerLayout(capacitySectors: number, grainSectors: number, gtes: number, descriptorSectors: number) {
  const gdEntries = Math.ceil(capacitySectors / (gtes * grainSectors))
  const gdSectors = Math.ceil((gdEntries * 4) / SECTOR)
  const gtSectors = Math.ceil((gtes * 4) / SECTOR)
  const rgd = 1 + descriptorSectors
  const rgdGts = rgd + gdSectors
  const gd = rgdGts + gdEntries * gtSectors
  const gdGts = gd + gdSectors
  const overhead = Math.ceil((gdGts + gdEntries * gtSectors) / grainSectors) * grainSectors
  return { gdEntries, gdSectors, gtSectors, rgd, rgdGts, gd, gdGts, overhead }
}
