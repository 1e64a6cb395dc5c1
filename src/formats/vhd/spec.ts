/**
 * VHD on-disk layouts (Microsoft's "Virtual Hard Disk Image Format
 * Specification"; QEMU calls the format `vpc`): the 512-byte hard disk footer,
 * the 1 KiB dynamic disk header, the block allocation table (BAT), CHS
 * geometry, and the one's-complement checksum. Everything is big-endian.
 */
import { CorruptImageError, hex } from '../../errors.js'
import { putU16be, putU32be, putU64be, toSafeNumber, u16be, u32be, u64be } from '../../util/bytes.js'

export const FOOTER_SIZE = 512
export const HEADER_SIZE = 1024
export const SECTOR = 512
export const FOOTER_COOKIE = 'conectix'
export const HEADER_COOKIE = 'cxsparse'

export const TYPE_FIXED = 2
export const TYPE_DYNAMIC = 3
export const TYPE_DIFFERENCING = 4

/** A BAT entry that maps no block. */
export const BAT_UNUSED = 0xffffffff

/** Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_EPOCH = 946684800

/** The largest CHS geometry a footer can hold, and the size limit QEMU keeps (2040 GiB). */
export const CHS_MAX_C = 65535
export const CHS_MAX_H = 16
export const CHS_MAX_S = 255
export const MAX_GEOMETRY_SECTORS = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S
export const MAX_SECTORS = 0xff000000

/** Block size qemu-img (and Hyper-V) gives a new dynamic disk. */
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024

/** Creator applications whose disks are sized by current_size rather than by CHS geometry. */
const SIZE_BY_CURRENT_SIZE = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0']

export interface Footer {
  cookie: string
  features: number
  version: number
  /** offset of the dynamic disk header; all ones for fixed disks */
  dataOffset: bigint
  timestamp: number
  creatorApp: string
  creatorVersion: number
  creatorOs: string
  originalSize: bigint
  currentSize: bigint
  cylinders: number
  heads: number
  sectorsPerTrack: number
  diskType: number
  checksum: number
  uuid: Uint8Array
  savedState: number
}

export interface ParentLocator {
  platform: string
  dataSpace: number
  dataLength: number
  dataOffset: bigint
}

export interface DynamicHeader {
  cookie: string
  dataOffset: bigint
  tableOffset: bigint
  version: number
  maxTableEntries: number
  blockSize: number
  checksum: number
  parentUuid: Uint8Array
  parentTimestamp: number
  /** UTF-16BE in the file */
  parentName: string
  locators: ParentLocator[]
}

const ascii = (b: Uint8Array, o: number, n: number): string => String.fromCharCode(...b.subarray(o, o + n))

function putAscii(b: Uint8Array, o: number, s: string): void {
  for (let i = 0; i < s.length; i++) b[o + i] = s.charCodeAt(i) & 0xff
}

/** One's complement of the byte sum, with the 4 checksum bytes at `at` counted as zero. */
export function vhdChecksum(b: Uint8Array, at: number): number {
  let sum = 0
  for (let i = 0; i < b.byteLength; i++) if (i < at || i >= at + 4) sum += b[i]!
  return ~sum >>> 0
}

export const FOOTER_CHECKSUM_AT = 64
export const HEADER_CHECKSUM_AT = 36

export function decodeFooter(b: Uint8Array): Footer {
  return {
    cookie: ascii(b, 0, 8),
    features: u32be(b, 8),
    version: u32be(b, 12),
    dataOffset: u64be(b, 16),
    timestamp: u32be(b, 24),
    creatorApp: ascii(b, 28, 4),
    creatorVersion: u32be(b, 32),
    creatorOs: ascii(b, 36, 4),
    originalSize: u64be(b, 40),
    currentSize: u64be(b, 48),
    cylinders: u16be(b, 56),
    heads: b[58]!,
    sectorsPerTrack: b[59]!,
    diskType: u32be(b, 60),
    checksum: u32be(b, 64),
    uuid: b.slice(68, 84),
    savedState: b[84]!,
  }
}

export function encodeFooter(f: Footer): Uint8Array {
  const b = new Uint8Array(FOOTER_SIZE)
  putAscii(b, 0, f.cookie)
  putU32be(b, 8, f.features)
  putU32be(b, 12, f.version)
  putU64be(b, 16, f.dataOffset)
  putU32be(b, 24, f.timestamp)
  putAscii(b, 28, f.creatorApp)
  putU32be(b, 32, f.creatorVersion)
  putAscii(b, 36, f.creatorOs)
  putU64be(b, 40, f.originalSize)
  putU64be(b, 48, f.currentSize)
  putU16be(b, 56, f.cylinders)
  b[58] = f.heads
  b[59] = f.sectorsPerTrack
  putU32be(b, 60, f.diskType)
  b.set(f.uuid.subarray(0, 16), 68)
  b[84] = f.savedState
  putU32be(b, FOOTER_CHECKSUM_AT, vhdChecksum(b, FOOTER_CHECKSUM_AT))
  return b
}

export function decodeHeader(b: Uint8Array): DynamicHeader {
  const nameBytes = b.subarray(64, 576)
  let parentName = ''
  for (let i = 0; i + 1 < nameBytes.byteLength; i += 2) {
    const c = (nameBytes[i]! << 8) | nameBytes[i + 1]!
    if (c === 0) break
    parentName += String.fromCharCode(c)
  }
  const locators: ParentLocator[] = []
  for (let i = 0; i < 8; i++) {
    const o = 576 + 24 * i
    locators.push({ platform: ascii(b, o, 4), dataSpace: u32be(b, o + 4), dataLength: u32be(b, o + 8), dataOffset: u64be(b, o + 16) })
  }
  return {
    cookie: ascii(b, 0, 8),
    dataOffset: u64be(b, 8),
    tableOffset: u64be(b, 16),
    version: u32be(b, 24),
    maxTableEntries: u32be(b, 28),
    blockSize: u32be(b, 32),
    checksum: u32be(b, 36),
    parentUuid: b.slice(40, 56),
    parentTimestamp: u32be(b, 56),
    parentName,
    locators,
  }
}

/** A dynamic disk header as qemu-img writes one (no parent). */
export function encodeHeader(h: { tableOffset: number; maxTableEntries: number; blockSize: number }): Uint8Array {
  const b = new Uint8Array(HEADER_SIZE)
  putAscii(b, 0, HEADER_COOKIE)
  putU64be(b, 8, 0xffffffffffffffffn)
  putU64be(b, 16, h.tableOffset)
  putU32be(b, 24, 0x00010000)
  putU32be(b, 28, h.maxTableEntries)
  putU32be(b, 32, h.blockSize)
  putU32be(b, HEADER_CHECKSUM_AT, vhdChecksum(b, HEADER_CHECKSUM_AT))
  return b
}

/** Bytes of a block's sector bitmap: one bit per sector, padded to whole sectors. */
export function bitmapSize(blockSize: number): number {
  return Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR
}

/**
 * The guest size a footer describes, as QEMU computes it: cylinders x heads x
 * sectors, except for creators known to size disks by current_size (Hyper-V,
 * disk2vhd, XenServer, qemu-img with force_size) and for the maximum geometry,
 * where current_size is the only size there is.
 */
export function footerVirtualSize(f: Footer, file: string, at: number): number {
  let sectors = f.cylinders * f.heads * f.sectorsPerTrack
  if (SIZE_BY_CURRENT_SIZE.includes(f.creatorApp) || sectors === MAX_GEOMETRY_SECTORS) {
    sectors = Math.floor(toSafeNumber(f.currentSize, `vpc: ${file}: footer current size`) / SECTOR)
  }
  if (sectors > MAX_SECTORS) {
    throw new CorruptImageError(`vpc: ${file}: footer at ${hex(at)} gives ${sectors} sectors, more than the 2040 GiB VHD allows (${MAX_SECTORS})`, {
      file,
      structure: 'footer',
      offset: at,
    })
  }
  return sectors * SECTOR
}

export interface Geometry {
  cylinders: number
  heads: number
  sectorsPerTrack: number
}

/** The VHD specification's CHS algorithm for a sector count (which may round it down). */
export function chsFor(totalSectors: number): Geometry {
  const total = Math.min(totalSectors, MAX_GEOMETRY_SECTORS)
  let spt: number
  let heads: number
  let cth: number
  if (total >= 65535 * 16 * 63) {
    spt = 255
    heads = 16
    cth = Math.floor(total / spt)
  } else {
    spt = 17
    cth = Math.floor(total / spt)
    heads = Math.max(4, Math.ceil(cth / 1024))
    if (cth >= heads * 1024 || heads > 16) {
      spt = 31
      heads = 16
      cth = Math.floor(total / spt)
    }
    if (cth >= heads * 1024) {
      spt = 63
      heads = 16
      cth = Math.floor(total / spt)
    }
  }
  return { cylinders: Math.floor(cth / heads), heads, sectorsPerTrack: spt }
}

/**
 * qemu-img create's sizing: without force_size, the smallest CHS geometry
 * holding at least `size` (rounded up to sectors) and the size it gives;
 * with force_size (or when no geometry fits), the maximum geometry and the
 * size itself.
 */
export function sizeAndGeometry(size: number, forceSize: boolean): { size: number; geometry: Geometry } {
  const requested = Math.ceil(size / SECTOR)
  let g: Geometry = { cylinders: CHS_MAX_C, heads: CHS_MAX_H, sectorsPerTrack: CHS_MAX_S }
  if (!forceSize) {
    const total = Math.min(MAX_GEOMETRY_SECTORS, requested)
    g = { cylinders: 0, heads: 0, sectorsPerTrack: 0 }
    for (let i = 0; total > g.cylinders * g.heads * g.sectorsPerTrack; i++) g = chsFor(total + i)
  }
  const chsSectors = g.cylinders * g.heads * g.sectorsPerTrack
  const sectors = chsSectors === MAX_GEOMETRY_SECTORS ? requested : chsSectors
  return { size: sectors * SECTOR, geometry: g }
}
