/** Opening images by path: probing, format drivers, backing chains. */
import { resolve } from 'node:path'
import { UsageError, WrongFormatError } from './errors.js'
import type { BlockDevice, DeviceOpener } from './io/block-device.js'
import { openFileDevice } from './io/file-device.js'
import type { DiskImage } from './image/disk-image.js'
import { MAX_CHAIN_DEPTH, type FormatDriver, type OpenContext, type OpenImageOptions } from './image/context.js'
import { PROBE_BYTES, PROBE_TAIL_BYTES, probeFormat, probeFormatTail, type FormatName } from './image/probe.js'
import { rawDriver } from './formats/raw/index.js'

/**
 * qcow2 is loaded when a qcow2 image is opened or created: a raw, VHD or VMDK command need not load its 21
 * modules (start-up is most of a small command's time: bench/README.md, 2026-12-06).
 */
const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  open: async (device, context, options) => (await import('./formats/qcow2/index.js')).qcow2Driver.open(device, context, options),
  create: async (device, context, options) => (await import('./formats/qcow2/index.js')).qcow2Driver.create!(device, context, options),
}

/** dm-snapshot is loaded when a dm-snapshot store is opened: a qcow2 command need not pay for it. */
const dmsnapDriver: FormatDriver = {
  name: 'dmsnap',
  open: async (device, context, options) => (await import('./formats/dmsnap/index.js')).dmsnapDriver.open(device, context, options),
  create: async (device, context, options) => (await import('./formats/dmsnap/index.js')).dmsnapDriver.create!(device, context, options),
}

/** VHD (vpc) is loaded when a VHD is opened or created. */
const vhdDriver: FormatDriver = {
  name: 'vpc',
  open: async (device, context, options) => (await import('./formats/vhd/index.js')).vhdDriver.open(device, context, options),
  create: async (device, context, options) => (await import('./formats/vhd/index.js')).vhdDriver.create!(device, context, options),
}

/** VMDK is loaded when a VMDK is opened or created. */
const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  open: async (device, context, options) => (await import('./formats/vmdk/index.js')).vmdkDriver.open(device, context, options),
  create: async (device, context, options) => (await import('./formats/vmdk/index.js')).vmdkDriver.create!(device, context, options),
}

const DRIVERS: Record<string, FormatDriver> = {
  raw: rawDriver,
  qcow2: qcow2Driver,
  dmsnap: dmsnapDriver,
  vpc: vhdDriver,
  vmdk: vmdkDriver,
}

export function registeredFormats(): string[] {
  return Object.keys(DRIVERS)
}

export function driverFor(format: FormatName): FormatDriver {
  const d = DRIVERS[format]
  if (!d) throw new UsageError(`Unknown file format '${format}'`)
  return d
}

/** Open an image on an already open device (tests use memory devices this way). */
export async function openImageOnDevice(device: BlockDevice, options: OpenImageOptions & { context?: OpenContext }): Promise<DiskImage> {
  const context = options.context ?? makeContext(openFileDevice)
  let format = options.format
  if (!format) format = probeFormat(await device.read(0, Math.min(PROBE_BYTES, Math.max(device.size, 4)), 'probe'))
  // a format known by its last bytes (a fixed VHD's footer)
  if (!options.format && format === 'raw' && device.size >= PROBE_TAIL_BYTES) {
    format = probeFormatTail(await device.read(device.size - PROBE_TAIL_BYTES, PROBE_TAIL_BYTES, 'probe')) ?? format
  }
  return driverFor(format).open(device, context, options)
}

export function makeContext(openDevice: DeviceOpener): OpenContext {
  const context: OpenContext = {
    openDevice,
    async openImage(path, options) {
      const depth = options.depth ?? 0
      const chain = options.chain ?? []
      if (depth > MAX_CHAIN_DEPTH) {
        throw new WrongFormatError(`${path}: backing chain is deeper than ${MAX_CHAIN_DEPTH} images`, { file: path, structure: 'backing chain' })
      }
      const key = resolve(path)
      if (chain.includes(key)) {
        // (an array search per image: a 4,096-image chain is 8 M string compares, once)
        throw new WrongFormatError(`${path}: backing chain loop (${[...chain, key].join(' -> ')})`, { file: path, structure: 'backing chain' })
      }
      const device = await openDevice(path, { readOnly: options.readOnly })
      try {
        return await openImageOnDevice(device, { ...options, depth, chain: [...chain, key], context })
      } catch (e) {
        await device.close().catch(() => undefined)
        throw e
      }
    },
  }
  return context
}

/** Open an image file by path; `format` overrides probing. */
export async function openImage(
  path: string,
  options: {
    format?: FormatName
    readOnly?: boolean
    options?: Record<string, string>
    openDevice?: DeviceOpener
    forCheck?: boolean
    /** the image alone, for info (see OpenImageOptions.infoOnly) */
    infoOnly?: boolean
    /** qemu-img -U: no image locks on any file of the image */
    forceShare?: boolean
    /** qcow2 read-write: the caller edits the persistent bitmaps (see OpenImageOptions.bitmapsByCaller) */
    bitmapsByCaller?: boolean
  } = {},
): Promise<DiskImage> {
  const base = options.openDevice ?? openFileDevice
  // -U: no image locks on any file of the image (its backing chain and data file included)
  const opener: DeviceOpener = options.forceShare ? (p, o) => base(p, { ...o, forceShare: true }) : base
  const context = makeContext(opener)
  return context.openImage(path, {
    format: options.format,
    readOnly: options.readOnly ?? true,
    depth: 0,
    chain: [],
    options: options.options ?? {},
    forCheck: options.forCheck ?? false,
    infoOnly: options.infoOnly ?? false,
    ...(options.bitmapsByCaller ? { bitmapsByCaller: true } : {}),
  })
}
