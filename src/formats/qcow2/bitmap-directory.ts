/** The persistent dirty bitmap directory (names, granularity, flags) for info and check. */
import { CorruptImageError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { u16be, u32be, u64be, u8 } from '../../util/bytes.js'
import type { BitmapsExtension } from './header.js'

export interface Qcow2Bitmap {
  name: string
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
    out.push({
      tableOffset: Number(u64be(dir, pos)),
      tableSize: u32be(dir, pos + 8),
      flags: u32be(dir, pos + 12),
      type: u8(dir, pos + 16),
      granularityBits: u8(dir, pos + 17),
      extraData: dir.slice(pos + 24, pos + 24 + extraSize),
      name: new TextDecoder().decode(dir.subarray(pos + 24 + extraSize, pos + len)),
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
