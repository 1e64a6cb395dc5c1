/**
 * qemu-img create -f vmdk: `subformat=monolithicSparse|monolithicFlat|streamOptimized`
 * (monolithicSparse by default), `adapter_type`, `hwversion`, `compat6`,
 * `zeroed_grain`, `toolsversion`. The size is rounded up to whole sectors.
 * Layouts are qemu-img's: a sparse extent is header, embedded descriptor (20
 * sectors at sector 1), redundant grain directory and its tables, grain
 * directory and its tables, the file cut at the first grain (64 KiB grains,
 * 512 entries per table); a flat image is a descriptor file naming
 * `NAME-flat.EXT`, of the size in bytes.
 *
 * Crash order: the tables and directories (all empty) are written and
 * flushed before the header that names them; a crash leaves a file without a
 * valid header, which create's caller removes.
 */
import { randomInt } from 'node:crypto'
import { UsageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { CreateImageOptions, OpenContext } from '../../image/context.js'
import { formatDescriptor } from './descriptor.js'
import {
  COMPRESSION_DEFLATE,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NL_DETECT,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  SECTOR,
  SPARSE_MAGIC,
  encodeHeader,
  headerLayout,
} from './spec.js'

export type VmdkSubformat = 'monolithicSparse' | 'monolithicFlat' | 'streamOptimized'

export interface VmdkCreateOptions {
  size: number
  subformat: VmdkSubformat
  adapterType: 'ide' | 'buslogic' | 'lsilogic' | 'legacyESX'
  hwVersion: string
  toolsVersion: string
  zeroedGrain: boolean
}

const KEYS = ['subformat', 'adapter_type', 'hwversion', 'compat6', 'zeroed_grain', 'toolsversion', 'size']
/** 2 TiB - 64 KiB: what one sparse extent addresses (2^32 sectors, whole grains) */
const MAX_SPARSE = 2 ** 32 * SECTOR - 65536
const GRAIN_SECTORS = 128
const GTES = 512
const DESCRIPTOR_SECTORS = 20

function onOff(key: string, v: string | undefined): boolean {
  if (v === undefined || v === 'off' || v === 'false') return false
  if (v === 'on' || v === 'true' || v === '') return true
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off'`)
}

export function parseVmdkCreateOptions(o: { size: number; options: Record<string, string> }): VmdkCreateOptions {
  for (const k of Object.keys(o.options)) if (!KEYS.includes(k)) throw new UsageError(`Invalid parameter '${k}' for vmdk (${KEYS.slice(0, -1).join(', ')})`)
  const sub = o.options['subformat'] ?? 'monolithicSparse'
  if (sub === 'twoGbMaxExtentSparse' || sub === 'twoGbMaxExtentFlat') throw new UsageError(`vmdk: imgtool does not create ${sub} images yet`)
  if (sub !== 'monolithicSparse' && sub !== 'monolithicFlat' && sub !== 'streamOptimized') throw new UsageError(`Unknown subformat: ${sub}`)
  const adapter = o.options['adapter_type'] ?? 'ide'
  if (adapter !== 'ide' && adapter !== 'buslogic' && adapter !== 'lsilogic' && adapter !== 'legacyESX') {
    throw new UsageError(`Unknown adapter type: '${adapter}'`)
  }
  const compat6 = onOff('compat6', o.options['compat6'])
  const hw = o.options['hwversion']
  if (compat6 && hw !== undefined && hw !== 'undefined') throw new UsageError('compat6 cannot be enabled with hwversion set')
  const size = Math.ceil(o.size / SECTOR) * SECTOR
  if (sub !== 'monolithicFlat' && size > MAX_SPARSE) throw new UsageError(`vmdk: a ${sub} extent holds at most ${MAX_SPARSE} bytes`)
  return {
    size,
    subformat: sub,
    adapterType: adapter,
    hwVersion: compat6 ? '6' : hw !== undefined && hw !== 'undefined' ? hw : '4',
    toolsVersion: o.options['toolsversion'] ?? '2147483647',
    zeroedGrain: onOff('zeroed_grain', o.options['zeroed_grain']),
  }
}

function baseName(path: string): string {
  return path.slice(path.lastIndexOf('/') + 1)
}

/** qemu-img's flat extent name: NAME-flat.EXT beside the descriptor */
export function flatExtentName(path: string): string {
  const base = baseName(path)
  const dot = base.lastIndexOf('.')
  return dot < 0 ? `${base}-flat` : `${base.slice(0, dot)}-flat${base.slice(dot)}`
}

function descriptorText(o: VmdkCreateOptions, createType: string, extent: { type: 'SPARSE' | 'FLAT'; name: string; offset?: number }): string {
  const sectors = o.size / SECTOR
  const heads = o.adapterType === 'ide' ? 16 : 255
  return formatDescriptor({
    cid: randomInt(0, 0xffffffff),
    parentCid: 0xffffffff,
    createType,
    extents: [{ access: 'RW', sectors, type: extent.type, name: extent.name, ...(extent.offset !== undefined ? { offset: extent.offset } : {}) }],
    ddb: [
      ['ddb.virtualHWVersion', o.hwVersion],
      ['ddb.geometry.cylinders', String(Math.floor(sectors / (heads * 63)))],
      ['ddb.geometry.heads', String(heads)],
      ['ddb.geometry.sectors', '63'],
      ['ddb.adapterType', o.adapterType],
      ['ddb.toolsVersion', o.toolsVersion],
    ],
  })
}

/** The embedded descriptor of a streamOptimized extent named `name` (stream.ts). */
export function streamDescriptor(o: VmdkCreateOptions, name: string): string {
  return descriptorText(o, 'streamOptimized', { type: 'SPARSE', name })
}

export async function createVmdk(device: BlockDevice, context: OpenContext, options: CreateImageOptions): Promise<void> {
  const o = parseVmdkCreateOptions(options)
  if (o.subformat === 'monolithicFlat') {
    const name = flatExtentName(device.name)
    const dir = device.name.slice(0, device.name.lastIndexOf('/') + 1)
    const flat = await context.openDevice(dir + name, { readOnly: false, create: true })
    try {
      await flat.truncate(o.size)
      await flat.flush()
    } finally {
      await flat.close()
    }
    const text = new TextEncoder().encode(descriptorText(o, 'monolithicFlat', { type: 'FLAT', name, offset: 0 }))
    await device.truncate(0)
    await device.write(0, text, 'header')
    await device.flush()
    return
  }
  await writeSparse(device, o)
}

async function writeSparse(device: BlockDevice, o: VmdkCreateOptions): Promise<void> {
  const stream = o.subformat === 'streamOptimized'
  const capacity = o.size / SECTOR
  const l = headerLayout(capacity, GRAIN_SECTORS, GTES, DESCRIPTOR_SECTORS)
  await device.truncate(0)
  await device.truncate(l.overhead * SECTOR)
  // directories: entry i names table i, tables all zeros (the file is fresh)
  const dir = (firstTable: number): Uint8Array => {
    const b = new Uint8Array(l.gdSectors * SECTOR)
    const dv = new DataView(b.buffer)
    for (let i = 0; i < l.gdEntries; i++) dv.setUint32(i * 4, firstTable + i * l.gtSectors, true)
    return b
  }
  await device.write(l.rgd * SECTOR, dir(l.rgdGts), 'l1')
  await device.write(l.gd * SECTOR, dir(l.gdGts), 'l1')
  const text = new TextEncoder().encode(descriptorText(o, o.subformat, { type: 'SPARSE', name: baseName(device.name) }))
  await device.write(SECTOR, text, 'header')
  await device.flush()
  let flags = FLAG_NL_DETECT | FLAG_RGD
  if (o.zeroedGrain) flags |= FLAG_ZERO_GRAIN
  if (stream) flags |= FLAG_COMPRESSED | FLAG_MARKERS
  const header = encodeHeader({
    magic: SPARSE_MAGIC,
    version: stream ? 3 : o.zeroedGrain ? 2 : 1,
    flags,
    capacity: BigInt(capacity),
    grainSize: BigInt(GRAIN_SECTORS),
    descriptorOffset: 1n,
    descriptorSize: BigInt(DESCRIPTOR_SECTORS),
    numGTEsPerGT: GTES,
    rgdOffset: BigInt(l.rgd),
    gdOffset: BigInt(l.gd),
    overhead: BigInt(l.overhead),
    uncleanShutdown: 0,
    newlineChars: [0x0a, 0x20, 0x0d, 0x0a],
    compressAlgorithm: stream ? COMPRESSION_DEFLATE : 0,
  })
  await device.write(0, header, 'header')
  await device.flush()
}
