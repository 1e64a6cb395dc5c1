/**
 * qemu-img create -f vpc: `subformat=dynamic|fixed` (dynamic by default) and
 * `force_size=on|off`. The size is rounded up to whole sectors and, without
 * force_size, up to the nearest CHS geometry, so that Virtual PC sees the
 * whole disk; with force_size the footer holds the maximum geometry and the
 * size itself, and the creator is 'qem2' (sized by current_size).
 *
 * Layouts are qemu-img's: a fixed disk is its data followed by the footer; a
 * dynamic disk is footer, dynamic header (at 512), BAT (at 1536, all unused,
 * padded to a sector) and the footer copy. New dynamic disks use 2 MiB blocks.
 */
import { randomBytes } from 'node:crypto'
import { UsageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { CreateImageOptions } from '../../image/context.js'
import { parseSize } from '../../util/size.js'
import {
  DEFAULT_BLOCK_SIZE,
  FOOTER_COOKIE,
  FOOTER_SIZE,
  HEADER_SIZE,
  MAX_SECTORS,
  SECTOR,
  TYPE_DYNAMIC,
  TYPE_FIXED,
  VHD_EPOCH,
  encodeFooter,
  encodeHeader,
  sizeAndGeometry,
} from './spec.js'

export interface VhdCreateOptions {
  size: number
  fixed: boolean
  forceSize: boolean
}

function onOff(key: string, v: string | undefined): boolean {
  if (v === undefined || v === 'off' || v === 'false') return false
  if (v === 'on' || v === 'true' || v === '') return true
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`)
}

/** Check `-o` options as qemu-img does, before any byte is written. */
export function parseVhdCreateOptions(o: CreateImageOptions): VhdCreateOptions {
  for (const k of Object.keys(o.options)) {
    if (!['size', 'subformat', 'force_size'].includes(k)) throw new UsageError(`Invalid parameter '${k}' for vpc (subformat, force_size)`)
  }
  if (o.backingFile !== undefined) throw new UsageError('vpc images take no backing file')
  const sub = o.options['subformat'] ?? 'dynamic'
  if (sub !== 'dynamic' && sub !== 'fixed') throw new UsageError(`Invalid parameter value for 'subformat': '${sub}' (dynamic or fixed)`)
  const forceSize = onOff('force_size', o.options['force_size'])
  const requested = o.options['size'] !== undefined ? parseSize(o.options['size']) : o.size
  const { size } = sizeAndGeometry(requested, forceSize)
  if (size / SECTOR > MAX_SECTORS) throw new UsageError('Disk size is too large, max size is 2040 GiB')
  return { size, fixed: sub === 'fixed', forceSize }
}

/** The footer qemu-img writes for these options. */
export function newFooter(o: VhdCreateOptions, now = Date.now()): Uint8Array {
  const { size, geometry } = sizeAndGeometry(o.size, o.forceSize)
  return encodeFooter({
    cookie: FOOTER_COOKIE,
    features: 2,
    version: 0x00010000,
    dataOffset: o.fixed ? 0xffffffffffffffffn : 512n,
    timestamp: Math.max(0, Math.floor(now / 1000) - VHD_EPOCH) >>> 0,
    creatorApp: o.forceSize ? 'qem2' : 'qemu',
    creatorVersion: 0x00050003,
    creatorOs: 'Wi2k',
    originalSize: BigInt(size),
    currentSize: BigInt(size),
    cylinders: geometry.cylinders,
    heads: geometry.heads,
    sectorsPerTrack: geometry.sectorsPerTrack,
    diskType: o.fixed ? TYPE_FIXED : TYPE_DYNAMIC,
    checksum: 0,
    uuid: randomBytes(16),
    savedState: 0,
  })
}

/**
 * Write a new disk onto an empty device. Everything but the footer that makes
 * the file a VHD is written first and flushed; the footer last.
 */
export async function createVhd(device: BlockDevice, options: CreateImageOptions, layout: { blockSize?: number } = {}): Promise<void> {
  const o = parseVhdCreateOptions(options)
  const footer = newFooter(o)
  if (o.fixed) {
    await device.truncate(o.size + FOOTER_SIZE)
    await device.flush()
    await device.write(o.size, footer, 'footer')
    return
  }
  // (tests make small blocks; qemu-img and the driver always use 2 MiB)
  const blockSize = layout.blockSize ?? DEFAULT_BLOCK_SIZE
  const entries = Math.ceil(o.size / blockSize)
  const batOffset = FOOTER_SIZE + HEADER_SIZE
  const batBytes = Math.ceil((entries * 4) / SECTOR) * SECTOR
  const bat = new Uint8Array(batBytes).fill(0xff)
  await device.write(batOffset + batBytes, footer, 'footer')
  if (batBytes > 0) await device.write(batOffset, bat, 'bat')
  await device.write(FOOTER_SIZE, encodeHeader({ tableOffset: batOffset, maxTableEntries: entries, blockSize }), 'header')
  await device.flush()
  await device.write(0, footer, 'footer')
}
