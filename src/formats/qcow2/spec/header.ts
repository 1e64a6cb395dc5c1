/**
 * The qcow2 header (v2 and v3, every field) and its extensions, validated in
 * the order QEMU validates them so the first error named is the one qemu-img names.
 */
import { CorruptImageError, UnsupportedFeatureError, WrongFormatError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { toSafeNumber, u32be, u64be, u8 } from '../../../util/bytes.js'
import { cString, escapeBytes, strictUtf8 } from '../../../util/text.js'
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
  /** the exact l1_table_offset when it is above 2^53 (l1TableOffset then holds the nearest double) */
  l1TableOffsetExact?: bigint
  /** the exact refcount_table_offset when it is above 2^53 (as l1TableOffsetExact) */
  refcountTableOffsetExact?: bigint
  /** the exact snapshots_offset when it is above 2^53 (as l1TableOffsetExact) */
  snapshotsOffsetExact?: bigint
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
  /** the size field as read (`size` is it rounded down to 512 bytes, as QEMU uses it) */
  sizeField?: number
  /**
   * Parsed extensions. Names end at the first NUL, as QEMU's C strings do; a
   * name that is not valid UTF-8 is kept with U+FFFD for display (as qemu-img
   * info's JSON has it) and `backingFileError`/`dataFileError` say why it
   * cannot be opened.
   */
  backingFile?: string
  backingFileError?: string
  backingFormat?: string
  dataFile?: string
  dataFileError?: string
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
  /**
   * the header alone, for info (qemu-img info opens with BDRV_O_NO_IO): the data file is not opened, so a
   * missing data-file name or data-file-raw without a data file does not stop the open
   */
  infoOnly?: boolean
}

type Fail = (msg: string, offset: number, structure?: string) => never

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
    throw new UnsupportedFeatureError(`qcow2: ${file}: Unsupported cluster size: 2^${clusterBits} (cluster_bits at 0x14; supported 2^9 to 2^21)`, {
      file,
      structure: 'header',
      offset: 0x14,
    })
  }
  const clusterSize = 2 ** clusterBits

  let incompatibleFeatures = 0n
  let compatibleFeatures = 0n
  let autoclearFeatures = 0n
  let refcountOrder = 4
  let headerLength: number = C.HEADER_V2_LENGTH
  const compressionType = C.COMPRESSION_ZLIB
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
    backingFileOffset: 0,
    backingFileSize: u32be(head, 16),
    clusterBits,
    clusterSize,
    size: 0,
    sizeField: num(u64be(head, 24), 'size', 24),
    cryptMethod: u32be(head, 32),
    l1Size: u32be(head, 36),
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: u32be(head, 56),
    nbSnapshots: u32be(head, 60),
    snapshotsOffset: 0,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    featureNames: [],
    extensions: [],
  }
  const backingFileOffset = u64be(head, 8)
  if (backingFileOffset > BigInt(clusterSize)) fail(`Invalid backing file offset ${hex(backingFileOffset)}: beyond the header cluster`, 8)
  h.backingFileOffset = Number(backingFileOffset)

  // Extensions are read first so unknown bits can be named; an extension
  // error is reported where QEMU reports it (after the table checks).
  const headerCluster = await dev.read(0, clusterSize, 'header')
  if (headerLength > C.HEADER_V3_MIN_LENGTH) h.compressionType = u8(headerCluster, 104)
  const extEnd = h.backingFileOffset > 0 ? h.backingFileOffset : clusterSize
  const extError = parseExtensions(h, headerCluster, headerLength, extEnd)

  checkCompressionType(h, file, fail)

  refuseUnknownIncompatible(h, file)
  if (isCorrupt(h) && !opts.readOnly && !opts.forCheck) {
    fail('Image is corrupt; cannot be opened read/write (run imgtool check -r all)', 72)
  }
  if (hasExtendedL2(h) && clusterSize / C.SUBCLUSTERS_PER_CLUSTER < 512) {
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: Unsupported subcluster size: ${clusterSize / C.SUBCLUSTERS_PER_CLUSTER} (extended L2 needs clusters of at least 16 KiB)`,
      { file, structure: 'header', offset: 72 },
    )
  }
  if (refcountOrder > 6) {
    fail(`Reference count entry width too large; may not exceed 64 bits (refcount_order ${refcountOrder})`, 96)
  }
  if (h.refcountTableClusters === 0 && !opts.forCheck) {
    fail('Image does not contain a reference count table (refcount_table_clusters is 0)', 56)
  }
  readTableOffsets(h, head, opts.forCheck, fail)
  const sizeField = h.sizeField!
  const needed = l1EntriesNeeded({ size: sizeField, clusterBits, incompatibleFeatures })
  if (needed > 0x7fffffff) fail(`Image is too big: ${sizeField} bytes need ${needed} L1 entries`, 24)
  if (h.l1Size < needed) fail(`L1 table is too small: l1_size ${h.l1Size}, the virtual size ${sizeField} needs ${needed}`, 36)
  // QEMU keeps the size in 512-byte sectors, rounded down (bs->total_sectors)
  h.size = Math.floor(sizeField / 512) * 512
  if (h.cryptMethod > C.CRYPT_LUKS) {
    throw new UnsupportedFeatureError(`qcow2: ${file}: Unsupported encryption method ${h.cryptMethod} (crypt_method at 0x20)`, {
      file,
      structure: 'header',
      offset: 32,
    })
  }
  if (extError) fail(extError.message, extError.offset, 'header extension')
  if (hasDataFile(h) && h.dataFile === undefined && opts.infoOnly !== true) {
    fail("'data-file' is required for this image: the external data file bit is set but no data file name extension exists", 72)
  }
  if (!hasDataFile(h) && dataFileRaw(h) && opts.infoOnly !== true) {
    fail('data-file-raw requires a data file: autoclear bit 1 is set but the external data file bit is not', 88)
  }
  if (h.cryptMethod === C.CRYPT_LUKS && h.crypto === undefined) {
    fail(`Missing CRYPTO header for crypt method ${h.cryptMethod}: no crypto header extension`, 32)
  }

  readBackingFileName(h, headerCluster, fail)
  return h
}

/** The compression type byte and the incompatible bit that goes with it agree (as QEMU validates them). */
function checkCompressionType(h: Qcow2Header, file: string, fail: Fail): void {
  if (h.compressionType !== C.COMPRESSION_ZLIB && h.compressionType !== C.COMPRESSION_ZSTD) {
    throw new UnsupportedFeatureError(`qcow2: ${file}: unknown compression type: ${h.compressionType} (header byte 0x68)`, {
      file,
      structure: 'header',
      offset: 104,
    })
  }
  const compressionBit = (h.incompatibleFeatures & BigInt(C.INCOMPAT_COMPRESSION)) !== 0n
  if (h.compressionType === C.COMPRESSION_ZLIB && compressionBit) {
    fail('Compression type incompatible feature bit must not be set with zlib compression', 72)
  }
  if (h.compressionType !== C.COMPRESSION_ZLIB && !compressionBit) {
    fail('Compression type incompatible feature bit must be set for non-zlib compression', 72)
  }
}

/** Refuse incompatible feature bits imgtool does not know, named from the feature name table when it has them. */
function refuseUnknownIncompatible(h: Qcow2Header, file: string): void {
  const unknown = h.incompatibleFeatures & ~BigInt(C.INCOMPAT_KNOWN)
  if (unknown !== 0n) {
    const names: string[] = []
    for (let bit = 0; bit < 64; bit++) {
      if ((unknown >> BigInt(bit)) & 1n) {
        const named = h.featureNames.find((f) => f.type === 'incompatible' && f.bit === bit)
        names.push(named ? `${named.name} (bit ${bit})` : `Unknown incompatible feature: bit ${bit}`)
      }
    }
    throw new UnsupportedFeatureError(
      `qcow2: ${file}: Unsupported qcow2 feature(s): ${names.join(', ')} (incompatible_features ${hex(h.incompatibleFeatures)} at 0x48)`,
      { file, structure: 'header', offset: 72 },
    )
  }
}

/** The refcount table, snapshot table and active L1 table offsets, validated as qcow2_validate_table does. */
function readTableOffsets(h: Qcow2Header, head: Uint8Array, forCheck: boolean, fail: Fail): void {
  const clusterSize = h.clusterSize
  // qcow2_validate_table: the size first, then the offset (aligned, and the
  // table's end below 2^63) whether or not the table has entries
  const tableOffset = (what: string, name: string, at: number, entries: number, entryLen: number): number => {
    const raw = u64be(head, at)
    if (raw % BigInt(clusterSize) !== 0n) fail(`${what} offset invalid: ${hex(raw)} is not aligned to cluster size ${hex(clusterSize)}`, at)
    if (raw > (1n << 63n) - 1n - BigInt(entries) * BigInt(entryLen)) fail(`${what} offset invalid: ${hex(raw)}: the table would end past 2^63`, at)
    if (raw <= BigInt(Number.MAX_SAFE_INTEGER)) return Number(raw)
    // an empty table's offset is never used (QEMU opens such images): keep 0
    if (entries === 0) return 0
    // an active L1 table above 2^53 lies past the end of any file: qemu reads it as zeros (every guest
    // cluster unallocated); the nearest double stands for it, the exact value is kept for messages
    if (name === 'l1_table_offset') {
      h.l1TableOffsetExact = raw
      return Number(raw)
    }
    // the same for the refcount table (every refcount reads 0) and the snapshot table (entries of zeros):
    // qemu opens such images; check counts the table as past the end of the file
    if (name === 'refcount_table_offset') {
      h.refcountTableOffsetExact = raw
      return Number(raw)
    }
    if (name === 'snapshots_offset') {
      h.snapshotsOffsetExact = raw
      return Number(raw)
    }
    return fail(`${name} ${hex(raw)} is too large (above 2^53; the table has ${entries} entries)`, at)
  }
  if (h.refcountTableClusters * clusterSize > C.MAX_REFTABLE_BYTES) {
    fail(`Reference count table too large: ${h.refcountTableClusters} clusters (limit 8 MiB)`, 56)
  }
  h.refcountTableOffset = tableOffset('Reference count table', 'refcount_table_offset', 48, h.refcountTableClusters, clusterSize)
  if (!forCheck) {
    if (h.nbSnapshots > C.MAX_SNAPSHOTS) fail(`Snapshot table too large: ${h.nbSnapshots} snapshots (limit 65536)`, 60)
    h.snapshotsOffset = tableOffset('Snapshot table', 'snapshots_offset', 64, h.nbSnapshots, 40)
  } else {
    const raw = u64be(head, 64)
    // check re-reads and validates the table's place itself (readSnapshotsForCheck), as qemu-img check does
    h.snapshotsOffset = raw <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(raw) : h.nbSnapshots === 0 ? 0 : Number(raw)
    if (raw > BigInt(Number.MAX_SAFE_INTEGER) && h.nbSnapshots !== 0) h.snapshotsOffsetExact = raw
  }
  if (h.l1Size * 8 > C.MAX_L1_BYTES) fail(`Active L1 table too large: l1_size ${h.l1Size} (limit 32 MiB)`, 36)
  h.l1TableOffset = tableOffset('Active L1 table', 'l1_table_offset', 40, h.l1Size, 8)
}

/** The backing file name the header points at; bytes past the end of the file read as zeros. */
function readBackingFileName(h: Qcow2Header, headerCluster: Uint8Array, fail: Fail): void {
  if (h.backingFileOffset > 0) {
    const maxLen = Math.min(C.MAX_BACKING_FILE_NAME, h.clusterSize - h.backingFileOffset)
    if (h.backingFileSize > maxLen) fail(`Backing file name too long: ${h.backingFileSize} bytes`, 16)
    // bytes past the end of the file read as zeros (a truncated header): no name, no backing file
    const name = decodeName(headerCluster.subarray(h.backingFileOffset, h.backingFileOffset + h.backingFileSize))
    if (name.text !== '') {
      h.backingFile = name.text
      if (name.invalid) h.backingFileError = `backing file name "${name.escaped}" is not valid UTF-8`
    }
  }
}

export function l1EntriesNeeded(h: Pick<Qcow2Header, 'size' | 'clusterBits' | 'incompatibleFeatures'>): number {
  const entrySize = (h.incompatibleFeatures & BigInt(C.INCOMPAT_EXTL2)) !== 0n ? 16 : 8
  const l2Coverage = (2 ** h.clusterBits / entrySize) * 2 ** h.clusterBits
  return Math.ceil(h.size / l2Coverage)
}

/** "Header extension too large" and the other refusals QEMU makes while reading extensions */
interface ExtensionError {
  message: string
  offset: number
}

function parseExtensions(h: Qcow2Header, buf: Uint8Array, start: number, end: number): ExtensionError | undefined {
  let off = start
  const text = (b: Uint8Array) => new TextDecoder().decode(cString(b))
  while (off < end) {
    // qcow2_read_extensions: the 8-byte extension header and its data must fit before `end`, the end marker included
    if (off + 8 > end) return { message: `Header extension too large: the extension header at ${hex(off)} runs past ${hex(end)}`, offset: off }
    const magic = u32be(buf, off)
    const len = u32be(buf, off + 4)
    const dataOff = off + 8
    if (len > end - dataOff) return { message: `Header extension too large: extension ${hex(magic)} claims ${len} bytes`, offset: off }
    if (magic === C.EXT_END) return undefined
    const data = buf.slice(dataOff, dataOff + len)
    h.extensions.push({ magic, offset: off, data })
    switch (magic) {
      case C.EXT_BACKING_FORMAT:
        if (len >= 16) return { message: `ext_backing_format: len=${len} too large (>=16)`, offset: off }
        h.backingFormat = text(data)
        break
      case C.EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= len; i += 48) {
          const t = u8(data, i)
          h.featureNames.push({
            type: t === 0 ? 'incompatible' : t === 1 ? 'compatible' : t === 2 ? 'autoclear' : t,
            bit: u8(data, i + 1),
            name: text(data.subarray(i + 2, i + 48)),
          })
        }
        break
      case C.EXT_BITMAPS: {
        if (len !== 24) return { message: `bitmaps_ext: Invalid extension length ${len}, expected 24`, offset: off }
        const nbBitmaps = u32be(data, 0)
        const directorySize = u64be(data, 8)
        const directoryOffset = u64be(data, 16)
        if (!bitmapsValid(h)) {
          // without the autoclear bit the extension is stale and not validated (QEMU drops it on its next write)
          h.bitmaps = { nbBitmaps, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) }
          break
        }
        if (u32be(data, 4) !== 0) return { message: 'bitmaps_ext: Reserved field is not zero', offset: off }
        if (nbBitmaps > C.MAX_BITMAPS)
          return { message: `bitmaps_ext: Image has ${nbBitmaps} bitmaps, exceeding the QEMU supported maximum of ${C.MAX_BITMAPS}`, offset: off }
        if (nbBitmaps === 0) return { message: 'found bitmaps extension with zero bitmaps', offset: off }
        if (directoryOffset % BigInt(h.clusterSize) !== 0n)
          return { message: `bitmaps_ext: invalid bitmap directory offset ${hex(directoryOffset)}`, offset: off }
        if (directorySize > BigInt(C.MAX_BITMAP_DIRECTORY_SIZE)) {
          return {
            message: `bitmaps_ext: bitmap directory size (${directorySize}) exceeds the maximum supported size (${C.MAX_BITMAP_DIRECTORY_SIZE})`,
            offset: off,
          }
        }
        if (directoryOffset > BigInt(Number.MAX_SAFE_INTEGER))
          return { message: `bitmaps_ext: bitmap directory offset ${hex(directoryOffset)} is too large (above 2^53)`, offset: off }
        h.bitmaps = { nbBitmaps, directorySize: Number(directorySize), directoryOffset: Number(directoryOffset) }
        break
      }
      case C.EXT_CRYPTO: {
        if (h.cryptMethod !== C.CRYPT_LUKS) return { message: 'CRYPTO header extension only expected with LUKS encryption method', offset: off }
        if (len !== 16) return { message: `CRYPTO header extension size ${len}, but expected size 16`, offset: off }
        const cOffset = u64be(data, 0)
        const cLength = u64be(data, 8)
        if (cOffset % BigInt(h.clusterSize) !== 0n) {
          return { message: `Encryption header offset '${cOffset}' is not a multiple of cluster size '${h.clusterSize}'`, offset: off }
        }
        if (cOffset > BigInt(Number.MAX_SAFE_INTEGER) || cLength > BigInt(Number.MAX_SAFE_INTEGER)) {
          return { message: `Encryption header at ${hex(cOffset)} of ${cLength} bytes is too large (above 2^53)`, offset: off }
        }
        h.crypto = { offset: Number(cOffset), length: Number(cLength) }
        break
      }
      case C.EXT_DATA_FILE: {
        const name = decodeName(data)
        h.dataFile = name.text
        if (name.invalid) h.dataFileError = `data file name "${name.escaped}" is not valid UTF-8`
        break
      }
      default:
        break // unknown extensions are kept in h.extensions
    }
    off = dataOff + Math.ceil(len / 8) * 8
  }
  return undefined
}

/** A file name from the header: a C string (ends at the first NUL), checked to be UTF-8. */
function decodeName(bytes: Uint8Array): { text: string; invalid: boolean; escaped: string } {
  const b = cString(bytes)
  const strict = strictUtf8(b)
  if (strict !== undefined) return { text: strict, invalid: false, escaped: escapeBytes(b) }
  return { text: new TextDecoder().decode(b), invalid: true, escaped: escapeBytes(b) }
}
