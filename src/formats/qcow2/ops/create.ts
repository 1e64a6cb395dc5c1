/**
 * Creating a qcow2 image with every option qemu-img create knows (except
 * encryption): the same layout QEMU makes (header, refcount table, refcount
 * block, L1 table, then preallocated metadata; for falloc/full the layout of
 * prealloc-data.ts), written so that a crash leaves
 * either no image (the header is written last) or a complete one.
 */
import { UsageError } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { CreateImageOptions, OpenContext } from '../../../image/context.js'
import { alignUp, putU32be, putU64be } from '../../../util/bytes.js'
import * as C from '../spec/constants.js'
import { encodeL1 } from '../spec/entries.js'
import { l1EntriesNeeded, type Qcow2Header } from '../spec/header.js'
import { combinePath } from '../spec/paths.js'
import { RefcountWriter } from '../write/refcount-writer.js'
import { preallocateData } from './prealloc-data.js'
import { createRawFile } from '../../../io/prealloc.js'
import { setRefcountEntry } from '../spec/refcount-codec.js'

export { parseCreateOptions, type Preallocation, type Qcow2CreateOptions } from './create-options.js'
import { parseCreateOptions, type Qcow2CreateOptions } from './create-options.js'

export const FEATURES: Array<[number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
]

/** The header cluster: fields, extensions in QEMU's order, then the backing file name. */
export function buildHeaderCluster(h: Qcow2Header, o: Qcow2CreateOptions): Uint8Array {
  const cs = h.clusterSize
  const b = new Uint8Array(cs)
  putU32be(b, 0, C.QCOW2_MAGIC)
  putU32be(b, 4, h.version)
  putU32be(b, 20, h.clusterBits)
  putU64be(b, 24, h.size)
  putU32be(b, 36, h.l1Size)
  putU64be(b, 40, h.l1TableOffset)
  putU64be(b, 48, h.refcountTableOffset)
  putU32be(b, 56, h.refcountTableClusters)
  let pos = C.HEADER_V2_LENGTH
  if (h.version === 3) {
    putU64be(b, 72, h.incompatibleFeatures)
    putU64be(b, 80, h.compatibleFeatures)
    putU64be(b, 88, h.autoclearFeatures)
    putU32be(b, 96, h.refcountOrder)
    putU32be(b, 100, 112)
    b[104] = h.compressionType
    pos = 112
  }
  const enc = new TextEncoder()
  const ext = (magic: number, data: Uint8Array) => {
    putU32be(b, pos, magic)
    putU32be(b, pos + 4, data.byteLength)
    b.set(data, pos + 8)
    pos += 8 + alignUp(data.byteLength, 8)
  }
  if (o.backingFormat !== undefined) ext(C.EXT_BACKING_FORMAT, enc.encode(o.backingFormat))
  if (o.dataFile !== undefined) ext(C.EXT_DATA_FILE, enc.encode(o.dataFile))
  // qemu-img 7.2 writes the feature name table only with clusters of 8 KiB and more
  // (checked for 512 B..64 KiB, with and without backing and data files)
  if (h.version === 3 && h.clusterSize >= 8192) {
    const t = new Uint8Array(FEATURES.length * 48)
    FEATURES.forEach(([type, bit, name], i) => {
      t[i * 48] = type
      t[i * 48 + 1] = bit
      t.set(enc.encode(name), i * 48 + 2)
    })
    ext(C.EXT_FEATURE_TABLE, t)
  }
  pos += 8 // end marker (zeros)
  if (o.backingFile !== undefined) {
    const name = enc.encode(o.backingFile)
    if (pos + name.byteLength > cs) throw new UsageError('Backing file name too long for the header cluster')
    putU64be(b, 8, pos)
    putU32be(b, 16, name.byteLength)
    b.set(name, pos)
  }
  return b
}

/** Write a new qcow2 image onto `device` (which should be empty). */
export async function createQcow2(device: BlockDevice, context: OpenContext, options: CreateImageOptions): Promise<void> {
  const o = parseCreateOptions(options)
  const cs = o.clusterSize
  const clusterBits = Math.log2(cs)
  let incompat = 0
  if (o.dataFile !== undefined) incompat |= C.INCOMPAT_DATA_FILE
  if (o.compressionType === 'zstd') incompat |= C.INCOMPAT_COMPRESSION
  if (o.extendedL2) incompat |= C.INCOMPAT_EXTL2
  const h: Qcow2Header = {
    version: o.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    clusterSize: cs,
    size: o.size,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: cs,
    refcountTableClusters: 1,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: BigInt(incompat),
    compatibleFeatures: BigInt(o.lazyRefcounts ? C.COMPAT_LAZY_REFCOUNTS : 0),
    autoclearFeatures: BigInt(o.dataFileRaw ? C.AUTOCLEAR_DATA_FILE_RAW : 0),
    refcountOrder: Math.log2(o.refcountBits),
    headerLength: o.version === 3 ? 112 : 72,
    compressionType: o.compressionType === 'zstd' ? C.COMPRESSION_ZSTD : C.COMPRESSION_ZLIB,
    featureNames: [],
    extensions: [],
  }
  h.l1Size = l1EntriesNeeded(h)
  if (device.size > 0) await device.truncate(0)

  // reftable (cluster 1) and the first refcount block (cluster 2) counting clusters 0..2
  const table = new Uint8Array(cs)
  putU64be(table, 0, 2 * cs)
  const block = new Uint8Array(cs)
  for (let c = 0; c < 3; c++) setRefcountEntry(block, c, h.refcountOrder, 1)
  await device.write(cs, table.slice(), 'reftable')
  await device.write(2 * cs, block, 'refblock')
  const rc = new RefcountWriter(device, h, device.name, table)
  rc.lazy = true // nothing points anywhere until the header is written last

  const l1 = new Uint8Array(h.l1Size * 8)
  if (h.l1Size > 0) h.l1TableOffset = await rc.alloc(Math.ceil((h.l1Size * 8) / cs))

  let dataDev: BlockDevice | undefined
  try {
    if (o.dataFile !== undefined) {
      dataDev = await context.openDevice(combinePath(device.name, o.dataFile), { readOnly: false, create: true })
      // qemu-img creates the data file as a raw file of the virtual size, passing falloc/full on (metadata is off for it)
      await createRawFile(dataDev, o.size, o.preallocation === 'falloc' || o.preallocation === 'full' ? o.preallocation : 'off')
    }
    const prealloc = o.preallocation !== 'off' || o.dataFileRaw
    let end = 0
    if (!dataDev && (o.preallocation === 'falloc' || o.preallocation === 'full')) {
      // falloc/full in the image file itself: qemu's layout (new refcount area, then the data, then the
      // L2 tables); even for size 0, where qemu still moves the refcount table
      end = await preallocateData(device, h, o.extendedL2, o.preallocation, rc, l1)
    } else if (prealloc && o.size > 0) {
      end = await preallocate(device, dataDev, h, o, rc, l1)
    }
    await rc.persist()
    if (h.l1Size > 0) await device.write(h.l1TableOffset, l1, 'l1')
    if (end > device.size) await device.truncate(end)
    if (dataDev) await dataDev.flush()
    await device.flush()
    await device.write(0, buildHeaderCluster(h, o), 'header')
    await device.flush()
  } finally {
    if (dataDev) await dataDev.close()
  }
}

/**
 * preallocation=metadata (and falloc/full with an external data file, whose
 * data qemu leaves to the data file's own creation): L2 tables and data
 * clusters for the whole virtual size, nothing written into the data clusters;
 * returns the file end.
 */
async function preallocate(
  device: BlockDevice,
  dataDev: BlockDevice | undefined,
  h: Qcow2Header,
  o: Qcow2CreateOptions,
  rc: RefcountWriter,
  l1: Uint8Array,
): Promise<number> {
  const cs = h.clusterSize
  const es = o.extendedL2 ? 16 : 8
  const perL2 = cs / es
  const clusters = Math.ceil(h.size / cs)
  let end = 0
  for (let i = 0; i * perL2 < clusters; i++) {
    const n = Math.min(perL2, clusters - i * perL2)
    const l2 = await rc.alloc(1)
    const t = new Uint8Array(cs)
    let host = 0
    if (!dataDev) host = await rc.alloc(n)
    const dv = new DataView(t.buffer)
    for (let j = 0; j < n; j++) {
      const off = dataDev ? (i * perL2 + j) * cs : host + j * cs
      // normal entry with COPIED: bit 63 | offset (no BigInt in this hot loop)
      dv.setUint32(j * es, (0x80000000 | Math.floor(off / 0x1_0000_0000)) >>> 0, false)
      dv.setUint32(j * es + 4, off >>> 0, false)
      // extended L2: the subclusters stay unallocated (they read as zeros or from the backing file), as QEMU does
    }
    await device.write(l2, t, 'l2')
    putU64be(l1, i * 8, encodeL1({ l2Offset: l2, copied: true }))
    if (!dataDev) end = Math.max(end, host + n * cs)
    // keep memory flat on huge images: write refcount blocks as we go
    if (i % 64 === 63) await rc.persist()
  }
  return end
}
