/**
 * The persistent dirty bitmap directory (docs/interop/qcow2.txt, "Bitmaps"):
 * reading it for info and check, the constraints QEMU applies before it will
 * use a bitmap (bitmap_list_load, check_dir_entry, check_table_entry), and
 * encoding a directory for the writer (bitmap-write.ts).
 */
import { CorruptImageError, UnsupportedFeatureError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { putU16be, putU32be, putU64be, u16be, u32be, u64be, u8 } from '../../../util/bytes.js'
import type { BitmapsExtension } from './header.js'

export interface Qcow2Bitmap {
  name: string
  /** the name exactly as stored (re-encoded unchanged when the directory is rewritten) */
  nameBytes: Uint8Array
  tableOffset: number
  tableSize: number
  flags: number
  type: number
  granularityBits: number
  extraData: Uint8Array
  entryOffset: number
}

export const BME_FLAG_IN_USE = 1 << 0
export const BME_FLAG_AUTO = 1 << 1
export const BME_RESERVED_FLAGS = ~(BME_FLAG_IN_USE | BME_FLAG_AUTO) >>> 0
/** bitmap table entry bit 0: with offset 0, the whole cluster of bitmap data reads as ones */
export const BME_TABLE_ENTRY_ALL_ONES = 1
export const BME_TYPE_DIRTY_TRACKING = 1
export const BME_MAX_TABLE_SIZE = 0x8000000
export const BME_MAX_PHYS_SIZE = 0x20000000
export const BME_MIN_GRANULARITY_BITS = 9
export const BME_MAX_GRANULARITY_BITS = 31
export const BME_MAX_NAME_SIZE = 1023

/** Directory limit QEMU applies (64 KiB of entries per bitmap, 65535 bitmaps). */
const MAX_DIRECTORY_BYTES = 65535 * 1024

export async function readBitmapDirectory(dev: BlockDevice, file: string, ext: BitmapsExtension): Promise<Qcow2Bitmap[]> {
  const fail = (msg: string, at: number): never => {
    throw new CorruptImageError(`qcow2: ${file}: bitmap directory: ${msg} (at ${hex(at)})`, { file, structure: 'bitmap', offset: at })
  }
  if (ext.directorySize > MAX_DIRECTORY_BYTES) fail(`directory of ${ext.directorySize} bytes is too large`, ext.directoryOffset)
  const dir = await dev.read(ext.directoryOffset, ext.directorySize, 'bitmap')
  const out: Qcow2Bitmap[] = []
  let pos = 0
  for (let i = 0; i < ext.nbBitmaps; i++) {
    if (pos + 24 > dir.byteLength) fail(`entry ${i} runs past the directory end`, ext.directoryOffset + pos)
    const nameSize = u16be(dir, pos + 18)
    const extraSize = u32be(dir, pos + 20)
    const len = 24 + extraSize + nameSize
    if (pos + len > dir.byteLength) fail(`entry ${i} runs past the directory end`, ext.directoryOffset + pos)
    const nameBytes = dir.slice(pos + 24 + extraSize, pos + len)
    out.push({
      tableOffset: Number(u64be(dir, pos)),
      tableSize: u32be(dir, pos + 8),
      flags: u32be(dir, pos + 12),
      type: u8(dir, pos + 16),
      granularityBits: u8(dir, pos + 17),
      extraData: dir.slice(pos + 24, pos + 24 + extraSize),
      name: new TextDecoder().decode(nameBytes),
      nameBytes,
      entryOffset: ext.directoryOffset + pos,
    })
    pos += Math.ceil(len / 8) * 8
  }
  return out
}

export function bitmapFlagNames(flags: number): string[] {
  const names: string[] = []
  if (flags & BME_FLAG_IN_USE) names.push('in-use')
  if (flags & BME_FLAG_AUTO) names.push('auto')
  return names
}

/** Bytes of one directory entry (24-byte header, extra data, name), padded to 8. */
export function directoryEntrySize(nameSize: number, extraSize: number): number {
  return Math.ceil((24 + nameSize + extraSize) / 8) * 8
}

/** Bits of a bitmap of `granularityBits` over a disk of `size` bytes, and the bitmap table entries it needs. */
export function bitmapGeometry(size: number, granularityBits: number, clusterSize: number): { bits: number; bytes: number; tableSize: number } {
  const bits = Math.ceil(size / 2 ** granularityBits)
  const bytes = Math.ceil(bits / 8)
  return { bits, bytes, tableSize: Math.ceil(bytes / clusterSize) }
}

/**
 * The constraints QEMU checks before it uses a bitmap directory read-write
 * (bitmap_list_load and check_dir_entry in block/qcow2-bitmap.c): a
 * directory that breaks them makes QEMU refuse to open the image.
 */
export function validateBitmapDirectory(list: Qcow2Bitmap[], ext: BitmapsExtension, size: number, clusterSize: number, file: string): void {
  const corrupt = (msg: string, at: number): never => {
    throw new CorruptImageError(`qcow2: ${file}: bitmap directory: ${msg} (at ${hex(at)})`, { file, structure: 'bitmap', offset: at })
  }
  if (ext.directorySize === 0) corrupt('Requested bitmap directory size is zero', ext.directoryOffset)
  if (ext.directoryOffset % clusterSize !== 0) corrupt(`directory offset is not aligned to cluster size ${hex(clusterSize)}`, ext.directoryOffset)
  let total = 0
  for (const bm of list) {
    const at = bm.entryOffset
    if (bm.extraData.byteLength !== 0) {
      throw new UnsupportedFeatureError(`qcow2: ${file}: bitmap '${bm.name}': Bitmap extra data is not supported (bitmap directory entry at ${hex(at)})`, {
        file,
        structure: 'bitmap',
        offset: at,
      })
    }
    if (bitmapEntryBroken(bm, size, clusterSize)) corrupt(`Bitmap '${bm.name}' doesn't satisfy the constraints`, at)
    total += directoryEntrySize(bm.nameBytes.byteLength, bm.extraData.byteLength)
  }
  if (total !== ext.directorySize) {
    corrupt(`Broken bitmap directory: ${ext.nbBitmaps} entries take ${total} bytes, the header extension says ${ext.directorySize}`, ext.directoryOffset)
  }
}

/** True when a directory entry breaks QEMU's check_dir_entry (extra data aside). */
export function bitmapEntryBroken(bm: Qcow2Bitmap, size: number, clusterSize: number): boolean {
  return (
    bm.tableSize === 0 ||
    bm.tableOffset === 0 ||
    bm.tableOffset % clusterSize !== 0 ||
    bm.tableSize > BME_MAX_TABLE_SIZE ||
    bm.granularityBits > BME_MAX_GRANULARITY_BITS ||
    bm.granularityBits < BME_MIN_GRANULARITY_BITS ||
    (bm.flags & BME_RESERVED_FLAGS) !== 0 ||
    bm.nameBytes.byteLength > BME_MAX_NAME_SIZE ||
    bm.type !== BME_TYPE_DIRTY_TRACKING ||
    bm.tableSize * clusterSize > BME_MAX_PHYS_SIZE ||
    ((bm.flags & BME_FLAG_IN_USE) === 0 && size > bm.tableSize * clusterSize * 8 * 2 ** bm.granularityBits)
  )
}

/** Decode one bitmap table entry; undefined when it breaks the spec (check_table_entry). */
export function decodeBitmapTableEntry(table: Uint8Array, i: number, clusterSize: number): { offset: number; allOnes: boolean } | undefined {
  const hi = u32be(table, i * 8)
  const lo = u32be(table, i * 8 + 4)
  if ((hi & 0xff000000) !== 0 || (lo & 0x1fe) !== 0) return undefined
  const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0)
  const allOnes = (lo & 1) !== 0
  if (offset !== 0 && (allOnes || offset % clusterSize !== 0)) return undefined
  return { offset, allOnes }
}

/** A directory of `entries` (no extra data), each entry written from its own fields. */
export function encodeBitmapDirectory(
  entries: ReadonlyArray<Pick<Qcow2Bitmap, 'nameBytes' | 'tableOffset' | 'tableSize' | 'flags' | 'granularityBits'>>,
): Uint8Array {
  let size = 0
  for (const e of entries) size += directoryEntrySize(e.nameBytes.byteLength, 0)
  const dir = new Uint8Array(size)
  let pos = 0
  for (const e of entries) {
    putU64be(dir, pos, e.tableOffset)
    putU32be(dir, pos + 8, e.tableSize)
    putU32be(dir, pos + 12, e.flags)
    dir[pos + 16] = BME_TYPE_DIRTY_TRACKING
    dir[pos + 17] = e.granularityBits
    putU16be(dir, pos + 18, e.nameBytes.byteLength)
    putU32be(dir, pos + 20, 0)
    dir.set(e.nameBytes, pos + 24)
    pos += directoryEntrySize(e.nameBytes.byteLength, 0)
  }
  return dir
}
