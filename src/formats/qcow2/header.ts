/**
 * The qcow2 header (v2 and v3, every field) and its extensions, validated in
 * the order QEMU validates them so the first error named is the one qemu-img names.
 */
import { CorruptImageError, UnsupportedFeatureError, WrongFormatError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { toSafeNumber, u32be, u64be, u8 } from '../../util/bytes.js'
import * as C from './constants.js'

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear' | number
  bit: number
  name: string
}

export interface HeaderExtension {
  magic: number
  offset: number
  data: Uint8Array
}

export interface BitmapsExtension {
  nbBitmaps: number
  directorySize: number
  directoryOffset: number
}

export interface Qcow2Header {
  version: 2 | 3
  backingFileOffset: number
  backingFileSize: number
  clusterBits: number
  clusterSize: number
  size: number
  cryptMethod: number
  l1Size: number
  l1TableOffset: number
  refcountTableOffset: number
  refcountTableClusters: number
  nbSnapshots: number
  snapshotsOffset: number
  incompatibleFeatures: bigint
  compatibleFeatures: bigint
  autoclearFeatures: bigint
  refcountOrder: number
  headerLength: number
  compressionType: number
  /** parsed extensions */
  backingFile?: string
  backingFormat?: string
  dataFile?: string
  featureNames: FeatureName[]
  bitmaps?: BitmapsExtension
  crypto?: { offset: number; length: number }
  /** every extension as found, unknown ones included */
  extensions: HeaderExtension[]
}

export const isDirty = (h: Qcow2Header): boolean => (h.incompatibleFeatures & BigInt(C.INCOMPAT_DIRTY)) !== 0n
export const isCorrupt = (h: Qcow2Header): boolean => (h.incompatibleFeatures & BigInt(C.INCOMPAT_CORRUPT)) !== 0n
export const hasDataFile = (h: Qcow2Header): boolean => (h.incompatibleFeatures & BigInt(C.INCOMPAT_DATA_FILE)) !== 0n
export const hasExtendedL2 = (h: Qcow2Header): boolean => (h.incompatibleFeatures & BigInt(C.INCOMPAT_EXTL2)) !== 0n
export const hasLazyRefcounts = (h: Qcow2Header): boolean => (h.compatibleFeatures & BigInt(C.COMPAT_LAZY_REFCOUNTS)) !== 0n
export const bitmapsValid = (h: Qcow2Header): boolean => (h.autoclearFeatures & BigInt(C.AUTOCLEAR_BITMAPS)) !== 0n
export const dataFileRaw = (h: Qcow2Header): boolean => (h.autoclearFeatures & BigInt(C.AUTOCLEAR_DATA_FILE_RAW)) !== 0n
/** bytes per L2 entry: 16 with extended L2 */
export const l2EntrySize = (h: Qcow2Header): number => (hasExtendedL2(h) ? 16 : 8)
export const l2Entries = (h: Qcow2Header): number => h.clusterSize / l2EntrySize(h)

export interface ParseHeaderOptions {
  file: string
  readOnly: boolean
  forCheck: boolean
}

/** Read and validate the header cluster's fixed part and extensions. */
export async function readHeader(dev: BlockDevice, opts: ParseHeaderOptions): Promise<Qcow2Header> {
  const file = opts.file
  const fail = (msg: string, offset: number, structure = 'header'): never => {
    throw new CorruptImageError(`qcow2: ${file}: ${msg} (${structure} at ${hex(offset)})`, { file, structure, offset })
  }
  const num = (v: bigint, what: string, offset: number): number => {
    try {
      return toSafeNumber(v, what)
    } catch {
      return fail(`${what} ${hex(v)} is too large`, offset)
    }
  }

  const fileSize = dev.size
  const head = await dev.read(0, 512, 'header')
  if (fileSize < 4 || u32be(head, 0) !== C.QCOW2_MAGIC) {
    throw new WrongFormatError(`qcow2: ${file}: Image is not in qcow2 format (no QFI\\xfb magic at offset 0x0)`, {
      file,
      structure: 'header',
      offset: 0,
    })
  }
  if (fileSize < 8) fail(`header is truncated: the file is ${fileSize} bytes, a qcow2 header needs at least ${C.HEADER_V2_LENGTH}`, 0)
  const version = u32be(head, 4)
  if (version !== 2 && version !== 3) {
    throw new UnsupportedFeatureError(`qcow2: ${file}: Unsupported qcow2 version ${version} (header field version at 0x4)`, {
      file,
      structure: 'header',
      offset: 4,
    })
  }
  const minLen = version === 2 ? C.HEADER_V2_LENGTH : C.HEADER_V3_MIN_LENGTH
  if (fileSize < minLen) {
    fail(`header is truncated: the file is ${fileSize} bytes, a v${version} header needs ${minLen}`, 0)
  }
  const clusterBits = u32be(head, 20)
  if (clusterBits < C.MIN_CLUSTER_BITS || clusterBits > C.MAX_CLUSTER_BITS) {
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: Unsupported cluster size: 2^${clusterBits} (cluster_bits at 0x14; supported 2^9 to 2^21)`,
      { file, structure: 'header', offset: 0x14 },
    )
  }
  const clusterSize = 2 ** clusterBits

  let incompatibleFeatures = 0n
  let compatibleFeatures = 0n
  let autoclearFeatures = 0n
  let refcountOrder = 4
  let headerLength: number = C.HEADER_V2_LENGTH
  let compressionType = C.COMPRESSION_ZLIB
  if (version === 3) {
    incompatibleFeatures = u64be(head, 72)
    compatibleFeatures = u64be(head, 80)
    autoclearFeatures = u64be(head, 88)
    refcountOrder = u32be(head, 96)
    headerLength = u32be(head, 100)
    if (headerLength < C.HEADER_V3_MIN_LENGTH) fail(`qcow2 header too short: header_length ${headerLength} < 104`, 100)
  }
  if (headerLength > clusterSize) fail(`qcow2 header exceeds cluster size: header_length ${headerLength} > ${clusterSize}`, 100)

  const h: Qcow2Header = {
    version,
    backingFileOffset: num(u64be(head, 8), 'backing_file_offset', 8),
    backingFileSize: u32be(head, 16),
    clusterBits,
    clusterSize,
    size: num(u64be(head, 24), 'size', 24),
    cryptMethod: u32be(head, 32),
    l1Size: u32be(head, 36),
    l1TableOffset: num(u64be(head, 40), 'l1_table_offset', 40),
    refcountTableOffset: num(u64be(head, 48), 'refcount_table_offset', 48),
    refcountTableClusters: u32be(head, 56),
    nbSnapshots: u32be(head, 60),
    snapshotsOffset: num(u64be(head, 64), 'snapshots_offset', 64),
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    featureNames: [],
    extensions: [],
  }
  if (h.backingFileOffset > clusterSize) fail(`Invalid backing file offset ${hex(h.backingFileOffset)}: beyond the header cluster`, 8)

  // Extensions come before the feature checks so unknown bits can be named.
  const headerCluster = await dev.read(0, clusterSize, 'header')
  if (headerLength > C.HEADER_V3_MIN_LENGTH) h.compressionType = u8(headerCluster, 104)
  const extEnd = h.backingFileOffset > 0 ? h.backingFileOffset : clusterSize
  parseExtensions(h, headerCluster, headerLength, extEnd, fail)

  if (h.compressionType !== C.COMPRESSION_ZLIB && h.compressionType !== C.COMPRESSION_ZSTD) {
    throw new UnsupportedFeatureError(`qcow2: ${file}: unknown compression type: ${h.compressionType} (header byte 0x68)`, {
      file,
      structure: 'header',
      offset: 104,
    })
  }
  const compressionBit = (incompatibleFeatures & BigInt(C.INCOMPAT_COMPRESSION)) !== 0n
  if (h.compressionType === C.COMPRESSION_ZLIB && compressionBit) {
    fail('Compression type incompatible feature bit must not be set with zlib compression', 72)
  }
  if (h.compressionType !== C.COMPRESSION_ZLIB && !compressionBit) {
    fail('Compression type incompatible feature bit must be set for non-zlib compression', 72)
  }

  const unknown = incompatibleFeatures & ~BigInt(C.INCOMPAT_KNOWN)
  if (unknown !== 0n) {
    const names: string[] = []
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const named = h.featureNames.find((f) => f.type === 'incompatible' && f.bit === bit)
        names.push(named ? `${named.name} (bit ${bit})` : `Unknown incompatible feature: bit ${bit}`)
      }
    }
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: Unsupported qcow2 feature(s): ${names.join(', ')} (incompatible_features ${hex(incompatibleFeatures)} at 0x48)`,
      { file, structure: 'header', offset: 72 },
    )
  }
  if (isCorrupt(h) && !opts.readOnly && !opts.forCheck) {
    fail('Image is corrupt; cannot be opened read/write (run imgtool check -r all)', 72)
  }
  if (refcountOrder > 6) {
    fail(`Reference count entry width too large; may not exceed 64 bits (refcount_order ${refcountOrder})`, 96)
  }
  if (h.cryptMethod > C.CRYPT_LUKS) {
    throw new UnsupportedFeatureError(`qcow2: ${file}: Unsupported encryption method ${h.cryptMethod} (crypt_method at 0x20)`, {
      file,
      structure: 'header',
      offset: 32,
    })
  }
  if (hasExtendedL2(h) && clusterSize / C.SUBCLUSTERS_PER_CLUSTER < 512) {
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: Unsupported subcluster size: ${clusterSize / C.SUBCLUSTERS_PER_CLUSTER} (extended L2 needs clusters of at least 16 KiB)`,
      { file, structure: 'header', offset: 72 },
    )
  }
  if (h.refcountTableClusters === 0 && !opts.forCheck) {
    fail('Image does not contain a reference count table (refcount_table_clusters is 0)', 56)
  }
  if (h.refcountTableClusters * clusterSize > C.MAX_REFTABLE_BYTES) {
    fail(`Reference count table too large: ${h.refcountTableClusters} clusters (limit 8 MiB)`, 56)
  }
  if (h.refcountTableOffset % clusterSize !== 0) {
    fail(`Reference count table offset invalid: ${hex(h.refcountTableOffset)} is not aligned to cluster size ${hex(clusterSize)}`, 48)
  }
  if (!opts.forCheck) {
    if (h.nbSnapshots > C.MAX_SNAPSHOTS) fail(`Snapshot table too large: ${h.nbSnapshots} snapshots (limit 65536)`, 60)
    if (h.nbSnapshots > 0 && h.snapshotsOffset % clusterSize !== 0) {
      fail(`Snapshot table offset invalid: ${hex(h.snapshotsOffset)} is not aligned to cluster size ${hex(clusterSize)}`, 64)
    }
  }
  if (h.l1Size * 8 > C.MAX_L1_BYTES) fail(`Active L1 table too large: l1_size ${h.l1Size} (limit 32 MiB)`, 36)
  if (h.l1Size > 0 && h.l1TableOffset % clusterSize !== 0) {
    fail(`Active L1 table offset invalid: ${hex(h.l1TableOffset)} is not aligned to cluster size ${hex(clusterSize)}`, 40)
  }
  const needed = l1EntriesNeeded(h)
  if (needed > 0x7fffffff) fail(`Image is too big: ${h.size} bytes need ${needed} L1 entries`, 24)
  if (h.l1Size < needed) fail(`L1 table is too small: l1_size ${h.l1Size}, the virtual size ${h.size} needs ${needed}`, 36)
  if (hasDataFile(h) && h.dataFile === undefined) {
    fail("'data-file' is required for this image: the external data file bit is set but no data file name extension exists", 72)
  }

  if (h.backingFileOffset > 0 && h.backingFileSize > 0) {
    const maxLen = Math.min(C.MAX_BACKING_FILE_NAME, clusterSize - h.backingFileOffset)
    if (h.backingFileSize > maxLen) fail(`Backing file name too long: ${h.backingFileSize} bytes`, 16)
    h.backingFile = new TextDecoder().decode(headerCluster.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize))
  }
  return h
}

export function l1EntriesNeeded(h: Pick<Qcow2Header, 'size' | 'clusterBits' | 'incompatibleFeatures'>): number {
  const entrySize = (h.incompatibleFeatures & BigInt(C.INCOMPAT_EXTL2)) !== 0n ? 16 : 8
  const l2Coverage = (2 ** h.clusterBits / entrySize) * 2 ** h.clusterBits
  return Math.ceil(h.size / l2Coverage)
}

function parseExtensions(
  h: Qcow2Header,
  buf: Uint8Array,
  start: number,
  end: number,
  fail: (msg: string, offset: number, structure?: string) => never,
): void {
  let off = start
  const text = (b: Uint8Array) => new TextDecoder().decode(b)
  while (off + 8 <= end) {
    const magic = u32be(buf, off)
    const len = u32be(buf, off + 4)
    if (magic === C.EXT_END) return
    const dataOff = off + 8
    if (len > end - dataOff) fail(`Header extension too large: extension ${hex(magic)} claims ${len} bytes`, off, 'header extension')
    const data = buf.slice(dataOff, dataOff + len)
    h.extensions.push({ magic, offset: off, data })
    switch (magic) {
      case C.EXT_BACKING_FORMAT:
        h.backingFormat = text(data)
        break
      case C.EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const t = u8(data, i)
          const nameBytes = data.subarray(i + 2, i + 48)
          const z = nameBytes.indexOf(0)
          h.featureNames.push({
            type: t === 0 ? 'incompatible' : t === 1 ? 'compatible' : t === 2 ? 'autoclear' : t,
            bit: u8(data, i + 1),
            name: text(z >= 0 ? nameBytes.subarray(0, z) : nameBytes),
          })
        }
        break
      case C.EXT_BITMAPS:
        if (len < 24) fail(`bitmaps extension too short: ${len} bytes, expected 24`, off, 'header extension')
        h.bitmaps = {
          nbBitmaps: u32be(data, 0),
          directorySize: Number(u64be(data, 8)),
          directoryOffset: Number(u64be(data, 16)),
        }
        break
      case C.EXT_CRYPTO:
        if (len < 16) fail(`crypto header extension too short: ${len} bytes`, off, 'header extension')
        h.crypto = { offset: Number(u64be(data, 0)), length: Number(u64be(data, 8)) }
        break
      case C.EXT_DATA_FILE:
        h.dataFile = text(data)
        break
      default:
        break // unknown extensions are kept in h.extensions
    }
    off = dataOff + Math.ceil(len / 8) * 8
  }
}

