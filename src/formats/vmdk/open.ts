/**
 * Opening a VMDK: a hosted sparse extent ("KDMV" at 0, its descriptor
 * embedded), or a descriptor file naming its extent files. Every refusal is
 * one line naming the file, the structure and its offset (or descriptor
 * line). Memory is bounded: a grain directory of at most QEMU's 32 Mi entries
 * that must lie inside its file, a descriptor of at most 1 MiB.
 *
 * Extent names are taken relative to the descriptor's directory and must stay
 * inside it: an absolute name, a `..` component or a protocol prefix is
 * refused unless the caller passes `-o extent-paths=any` (protocol prefixes
 * are refused always).
 */
import { CorruptImageError, NotFoundError, UnsupportedFeatureError, UsageError, hex, isImgtoolError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { OpenContext, OpenImageOptions } from '../../image/context.js'
import { toSafeNumber } from '../../util/bytes.js'
import { escapeControls } from '../../util/text.js'
import { parseDescriptor, type Descriptor, type ExtentLine } from './descriptor.js'
import {
  COMPRESSION_DEFLATE,
  FLAG_MARKERS,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  GD_AT_END,
  HEADER_SIZE,
  MARKER_EOS,
  MARKER_FOOTER,
  MAX_DESCRIPTOR_BYTES,
  MAX_GD_ENTRIES,
  MAX_GRAIN_SECTORS,
  MAX_GTES_PER_GT,
  SECTOR,
  SPARSE_MAGIC,
  decodeHeader,
  decodeMarker,
  type SparseHeader,
} from './spec.js'

export interface ExtentBase {
  device: BlockDevice
  /** the extent file's name as qemu-img shows it (the descriptor's directory + the name) */
  file: string
  /** first guest byte of the extent */
  start: number
  /** guest bytes the extent covers */
  length: number
  /** the descriptor's extent type ('' for a hosted sparse file, as qemu-img shows it) */
  type: string
  /** the descriptor line that named the extent (0: hosted) */
  line: number
}

export interface FlatExtent extends ExtentBase {
  kind: 'flat'
  /** host byte where the extent's data starts */
  hostStart: number
}

export interface SparseExtent extends ExtentBase {
  kind: 'sparse'
  header: SparseHeader
  /** where the header in force was read: 0, or the footer's header sector of a stream */
  headerOffset: number
  grainSize: number
  gtes: number
  gdOffset: number
  gd: Uint32Array
  rgdOffset: number | undefined
  rgd: Uint32Array | undefined
  compressed: boolean
  markers: boolean
  zeroGrain: boolean
  /** host offset of the footer marker of a stream whose header says GD_AT_END */
  footerOffset: number | undefined
  overhead: number
}

export type VmdkExtent = FlatExtent | SparseExtent

export interface VmdkLayout {
  descriptor: Descriptor
  /** where the descriptor text sits in the image's own file */
  descriptorOffset: number
  createType: string
  extents: VmdkExtent[]
  virtualSize: number
  /** extent devices this image opened (not the image's own device) */
  extraDevices: BlockDevice[]
  /** problems a check-open let through (a normal open throws them) */
  problems: CorruptImageError[]
}

export function corrupt(file: string, structure: string, offset: number, what: string): CorruptImageError {
  return new CorruptImageError(`vmdk: ${file}: ${structure} at ${hex(offset)}: ${what}`, { file, structure, offset })
}

type Fail = (e: CorruptImageError) => void

const U64_MASK = (1n << 64n) - 1n
/** QEMU's BDRV_MAX_LENGTH: INT64_MAX aligned down to 1 GiB, the end of the last byte offset it reads */
const BDRV_MAX_LENGTH = ((1n << 63n) - 1n) & ~((1n << 30n) - 1n)

/** where QEMU reads a hosted sparse file's descriptor, and how much of it (DESC_SIZE) */
const EMBEDDED_DESCRIPTOR_AT = 0x200
const EMBEDDED_DESCRIPTOR_BYTES = 20 * SECTOR

const writable = (o: OpenImageOptions): boolean => !o.readOnly && !(o.forCheck ?? false)

/** Read the descriptor and every extent. */
export async function readLayout(device: BlockDevice, context: OpenContext, options: OpenImageOptions): Promise<VmdkLayout> {
  const lenient = options.forCheck ?? false
  const problems: CorruptImageError[] = []
  const fail: Fail = (e) => {
    if (!lenient) throw e
    problems.push(e)
  }
  const file = device.name
  if (device.size < 4) throw corrupt(file, 'header', 0, `the file (${device.size} bytes) is too small for a VMDK`)
  const head = await device.read(0, Math.min(HEADER_SIZE, device.size), 'header')
  const magic = head[0]! | (head[1]! << 8) | (head[2]! << 16) | (head[3]! << 24)
  if (magic >>> 0 === SPARSE_MAGIC) {
    const extent = await readSparse(device, file, 0, '', 0, fail, writable(options), problems)
    // QEMU reads a hosted file's descriptor at 0x200, 20 sectors, whatever the header's descriptor offset and
    // size say (block/vmdk.c: desc_offset = 0x200; CID, parentCID, parentFileNameHint by strstr in DESC_SIZE)
    const text = await device.read(EMBEDDED_DESCRIPTOR_AT, EMBEDDED_DESCRIPTOR_BYTES, 'header')
    const descriptor = parseDescriptor(text, file, 'embedded descriptor', EMBEDDED_DESCRIPTOR_AT, { mode: 'qemu', hosted: true })
    refuseParent(descriptor, file)
    // QEMU names a hosted sparse file by its header, not by the descriptor's createType
    const createType = extent.compressed ? 'streamOptimized' : 'monolithicSparse'
    return { descriptor, descriptorOffset: EMBEDDED_DESCRIPTOR_AT, createType, extents: [extent], virtualSize: extent.length, extraDevices: [], problems }
  }
  return readDescriptorFile(device, context, options, fail, problems)
}

/** QEMU opens a parent only when the descriptor names one (parentFileNameHint); a parentCID alone is just shown */
function refuseParent(d: Descriptor, file: string): void {
  if (d.entries.has('parentFileNameHint')) {
    throw new UnsupportedFeatureError(`vmdk: ${file}: a delta disk (parentCID ${d.parentCid.toString(16)}): imgtool does not read VMDK parents`, {
      file,
      structure: 'descriptor',
    })
  }
}

const READABLE_CREATE_TYPES = ['monolithicFlat', 'vmfs', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat']
const QEMU_CREATE_TYPES = [...READABLE_CREATE_TYPES, 'vmfsSparse', 'seSparse']

async function readDescriptorFile(
  device: BlockDevice,
  context: OpenContext,
  options: OpenImageOptions,
  fail: Fail,
  problems: CorruptImageError[],
): Promise<VmdkLayout> {
  const file = device.name
  // QEMU reads the first 1 MiB - 1 bytes of a descriptor file (vmdk_read_desc), up to the first NUL
  const descriptor = parseDescriptor(await device.read(0, Math.min(device.size, MAX_DESCRIPTOR_BYTES), 'header'), file, 'descriptor', 0, { mode: 'qemu' })
  refuseParent(descriptor, file)
  const ct = descriptor.createType
  if (!QEMU_CREATE_TYPES.includes(ct)) {
    throw new UnsupportedFeatureError(`vmdk: ${file}: descriptor: unsupported image type '${escapeControls(ct)}' in a descriptor file`, {
      file,
      structure: 'descriptor',
    })
  }
  if (!READABLE_CREATE_TYPES.includes(ct)) {
    throw new UnsupportedFeatureError(`vmdk: ${file}: descriptor: image type '${ct}' (imgtool reads ${READABLE_CREATE_TYPES.join(', ')})`, {
      file,
      structure: 'descriptor',
    })
  }
  if (descriptor.extents.length === 0) throw new CorruptImageError(`vmdk: ${file}: descriptor: no extent lines`, { file, structure: 'descriptor', offset: 0 })
  const anyPath = options.options?.['extent-paths'] === 'any'
  const opened = new Map<string, BlockDevice>()
  const extra: BlockDevice[] = []
  const extents: VmdkExtent[] = []
  let start = 0
  try {
    for (const line of descriptor.extents) {
      if (line.access !== 'RW') {
        throw new UnsupportedFeatureError(`vmdk: ${file}: descriptor line ${line.line}: ${line.access} extent (QEMU skips it; imgtool reads RW extents only)`, {
          file,
          structure: 'descriptor',
          line: line.line,
        })
      }
      const path = extentPath(file, line, anyPath)
      let dev = opened.get(path)
      if (!dev) {
        dev = await openExtentDevice(context, path, options.readOnly, file, line)
        opened.set(path, dev)
        extra.push(dev)
      }
      const length = toSafeNumber(line.sectors * BigInt(SECTOR), `vmdk: ${file}: descriptor line ${line.line}: extent size`)
      if (line.type === 'FLAT' || line.type === 'VMFS') {
        const hostStart = toSafeNumber((line.offset ?? 0n) * BigInt(SECTOR), `vmdk: ${file}: descriptor line ${line.line}: extent offset`)
        extents.push({ kind: 'flat', device: dev, file: path, start, length, type: line.type, line: line.line, hostStart })
      } else if (line.type === 'SPARSE') {
        const s = await readSparse(dev, path, start, line.type, line.line, fail, writable(options), problems)
        if (s.length !== length) {
          fail(corrupt(path, 'header', 12, `capacity ${s.length / SECTOR} sectors, but descriptor line ${line.line} of ${file} says ${line.sectors}`))
        }
        // the descriptor's size places the extents (as QEMU does: it uses the header's capacity for the extent itself)
        extents.push(s)
      } else {
        throw new UnsupportedFeatureError(`vmdk: ${file}: descriptor line ${line.line}: extent type ${line.type} (imgtool reads FLAT, VMFS and SPARSE)`, {
          file,
          structure: 'descriptor',
          line: line.line,
        })
      }
      start += extents[extents.length - 1]!.length
    }
  } catch (e) {
    for (const d of extra) await d.close().catch(() => undefined)
    throw e
  }
  return { descriptor, descriptorOffset: 0, createType: descriptor.createType, extents, virtualSize: start, extraDevices: extra, problems }
}

function extentPath(descriptorFile: string, line: ExtentLine, anyPath: boolean): string {
  const name = line.name
  const refuse = (why: string): never => {
    throw new UsageError(`vmdk: ${descriptorFile}: descriptor line ${line.line}: extent file '${escapeControls(name)}' ${why}`, {
      file: descriptorFile,
      structure: 'descriptor',
      line: line.line,
    })
  }
  if (/^[^:/]*:/.test(name)) refuse('names a protocol (imgtool opens plain file names only)')
  const absolute = name.startsWith('/')
  if (!anyPath) {
    if (absolute) refuse("is an absolute path outside the descriptor's directory (allow with -o extent-paths=any)")
    if (name.split('/').includes('..')) refuse("leaves the descriptor's directory through '..' (allow with -o extent-paths=any)")
  }
  if (absolute) return name
  const slash = descriptorFile.lastIndexOf('/')
  return slash < 0 ? name : descriptorFile.slice(0, slash + 1) + name
}

async function openExtentDevice(context: OpenContext, path: string, readOnly: boolean, file: string, line: ExtentLine): Promise<BlockDevice> {
  try {
    return await context.openDevice(path, { readOnly })
  } catch (e) {
    if (isImgtoolError(e) && e.code === 'NOT_FOUND') {
      throw new NotFoundError(`vmdk: ${file}: descriptor line ${line.line}: extent file '${escapeControls(path)}' does not exist`, {
        file,
        structure: 'descriptor',
        line: line.line,
      })
    }
    throw e
  }
}

/** A hosted sparse extent: header (or a stream's footer), grain directory and its redundant copy. */
export async function readSparse(
  device: BlockDevice,
  file: string,
  start: number,
  type: string,
  line: number,
  fail: Fail,
  forWriting = false,
  problems: CorruptImageError[] = [],
): Promise<SparseExtent> {
  /** what QEMU reads as zeros: refused when the image is open for writing, else kept for check */
  const zeros = (e: CorruptImageError): void => {
    if (forWriting) throw e
    problems.push(e)
  }
  if (device.size < HEADER_SIZE) throw corrupt(file, 'header', 0, `the file (${device.size} bytes) is too small for a sparse extent header`)
  const first = decodeHeader(await device.read(0, HEADER_SIZE, 'header'))
  if (first.magic !== SPARSE_MAGIC) throw corrupt(file, 'header', 0, `no "KDMV" magic (found ${hex(first.magic)})`)
  if (first.capacity === 0n && first.descriptorOffset !== 0n) {
    throw new UnsupportedFeatureError(`vmdk: ${file}: header at 0x0: capacity 0 with a descriptor (a descriptor-only sparse file)`, {
      file,
      structure: 'header',
      offset: 0,
    })
  }
  let header = first
  let headerOffset = 0
  let footerOffset: number | undefined
  if (first.gdOffset === GD_AT_END) {
    const end = Math.floor(device.size / SECTOR) * SECTOR
    const at = end - 3 * SECTOR
    if (at < SECTOR)
      throw corrupt(file, 'footer', 0, `the header's grain directory is at the end, but the file (${device.size} bytes) has no room for a footer`)
    const f = await device.read(at, 3 * SECTOR, 'header')
    const fm = decodeMarker(f, 0)
    const eos = decodeMarker(f, 2 * SECTOR)
    const magic = f[SECTOR]! | (f[SECTOR + 1]! << 8) | (f[SECTOR + 2]! << 16) | (f[SECTOR + 3]! << 24)
    if (fm.size !== 0 || fm.type !== MARKER_FOOTER || magic >>> 0 !== SPARSE_MAGIC || eos.value !== 0n || eos.size !== 0 || eos.type !== MARKER_EOS) {
      throw corrupt(file, 'footer', at, 'invalid footer (a footer marker, a "KDMV" header and an end-of-stream marker in the last three sectors)')
    }
    header = decodeHeader(f.subarray(SECTOR, 2 * SECTOR))
    headerOffset = at + SECTOR
    footerOffset = at
    if (header.gdOffset === GD_AT_END) throw corrupt(file, 'footer', headerOffset + 56, 'the footer names no grain directory either')
  }
  const ho = headerOffset
  if (header.version > 3) {
    throw new UnsupportedFeatureError(`vmdk: ${file}: header at ${hex(ho)}: unsupported VMDK version ${header.version}`, {
      file,
      structure: 'header',
      offset: ho + 4,
    })
  }
  // QEMU: any algorithm but deflate (1) is no compression
  const compressed = header.compressAlgorithm === COMPRESSION_DEFLATE
  if (header.numGTEsPerGT > MAX_GTES_PER_GT)
    throw corrupt(file, 'header', ho + 44, `${header.numGTEsPerGT} entries per grain table (at most ${MAX_GTES_PER_GT})`)
  if (header.numGTEsPerGT === 0 || header.grainSize === 0n) throw corrupt(file, 'header', ho + 20, 'grain size or grain table size is 0')
  if (header.grainSize > BigInt(MAX_GRAIN_SECTORS)) {
    throw corrupt(file, 'header', ho + 20, `grain size of ${header.grainSize} sectors (at most ${MAX_GRAIN_SECTORS}: 1 GiB)`)
  }
  const grainSectors = Number(header.grainSize)
  const perGt = BigInt(header.numGTEsPerGT) * header.grainSize
  const gdEntriesBig = (header.capacity + perGt - 1n) / perGt
  if (gdEntriesBig > BigInt(MAX_GD_ENTRIES)) {
    throw corrupt(file, 'header', ho + 12, `capacity ${header.capacity} sectors needs ${gdEntriesBig} grain directory entries (at most ${MAX_GD_ENTRIES})`)
  }
  const gdEntries = Number(gdEntriesBig)
  const length = toSafeNumber(header.capacity * BigInt(SECTOR), `vmdk: ${file}: header capacity`)
  // QEMU: "File truncated" when the file has fewer sectors (rounded up) than the header's overhead
  const fileSectors = BigInt(Math.ceil(device.size / SECTOR))
  if (fileSectors < header.overhead) {
    throw corrupt(file, 'header', ho + 64, `file truncated: the grains start at sector ${header.overhead}, past the end of the file (size ${hex(device.size)})`)
  }
  const overhead = Number(header.overhead) * SECTOR
  const readDir = async (offsetSectors: bigint, what: string, fieldAt: number): Promise<{ offset: number; table: Uint32Array }> => {
    const bytes = gdEntries * 4
    // QEMU shifts the sector offset into a signed 64-bit byte offset (it wraps); a negative one, or one whose
    // directory would end past the block layer's largest offset, fails its read ("Could not read l1 table")
    const offsetBig = (offsetSectors << 9n) & U64_MASK
    if (offsetBig + BigInt(bytes) > BDRV_MAX_LENGTH) {
      throw corrupt(file, 'header', ho + fieldAt, `the ${what} offset (sector ${offsetSectors}) is not a byte offset that can be read`)
    }
    if (offsetBig === 0n && gdEntries > 0) {
      // QEMU reads the header as the directory; imgtool does too, read-only (never writes through it)
      zeros(corrupt(file, 'header', ho + fieldAt, `the ${what} offset is 0 (the header is read as the directory)`))
    }
    const raw = new Uint8Array(bytes)
    const offset = offsetBig <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(offsetBig) : Number.MAX_SAFE_INTEGER
    if (offsetBig + BigInt(bytes) > BigInt(device.size)) {
      // QEMU reads zeros past the end of the file
      zeros(corrupt(file, what, offset, `${gdEntries} entries (${bytes} bytes) extend past the end of the file (size ${hex(device.size)})`))
    }
    if (offsetBig < BigInt(device.size)) {
      raw.set(await device.read(offset, Math.min(bytes, device.size - offset), 'l1'))
    }
    const dv = new DataView(raw.buffer)
    const table = new Uint32Array(gdEntries)
    for (let i = 0; i < gdEntries; i++) table[i] = dv.getUint32(i * 4, true)
    return { offset, table }
  }
  const gd = await readDir(header.gdOffset, 'grain directory', 56)
  let rgd: { offset: number; table: Uint32Array } | undefined
  // QEMU: a redundant directory offset of 0 is no redundant directory, whatever the flag says
  if (header.flags & FLAG_RGD && header.rgdOffset !== 0n) rgd = await readDir(header.rgdOffset, 'redundant grain directory', 48)
  return {
    kind: 'sparse',
    device,
    file,
    start,
    length,
    type,
    line,
    header,
    headerOffset,
    grainSize: grainSectors * SECTOR,
    gtes: header.numGTEsPerGT,
    gdOffset: gd.offset,
    gd: gd.table,
    rgdOffset: rgd?.offset,
    rgd: rgd?.table,
    compressed,
    markers: (header.flags & FLAG_MARKERS) !== 0,
    zeroGrain: (header.flags & FLAG_ZERO_GRAIN) !== 0,
    footerOffset,
    overhead,
  }
}
