/**
 * amend's header rewrites (compat, data_file): the header cluster laid out as
 * qemu's qcow2_update_header lays it out, written so that one 512-byte sector
 * write is the switch.
 */
import { UnsupportedFeatureError } from '../../../errors.js'
import { alignUp, putU32be, putU64be } from '../../../util/bytes.js'
import * as C from '../spec/constants.js'
import { hasDataFile, type Qcow2Header } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { FEATURES } from './create.js'

/** End of what a reader uses in the header cluster: fields, extensions and end marker, backing file name. */
function usedBytes(h: Qcow2Header): number {
  let end = (h.version === 3 ? h.headerLength : C.HEADER_V2_LENGTH) + 8
  for (const e of h.extensions) end = Math.max(end, e.offset + 8 + alignUp(e.data.byteLength, 8) + 8)
  if (h.backingFileOffset > 0) end = Math.max(end, h.backingFileOffset + h.backingFileSize)
  return end
}

/** The header cluster as qemu's qcow2_update_header lays it out; `featureTable` false leaves that table out. */
function layoutHeader(
  h: Qcow2Header,
  dataFile: string | undefined,
  backingName: Uint8Array,
  featureTable: boolean,
): { bytes: Uint8Array; used: number; extensions: Qcow2Header['extensions']; backingFileOffset: number } {
  const cs = h.clusterSize
  const b = new Uint8Array(cs)
  const v3 = h.version === 3
  putU32be(b, 0, C.QCOW2_MAGIC)
  putU32be(b, 4, h.version)
  putU32be(b, 20, h.clusterBits)
  putU64be(b, 24, h.size)
  putU32be(b, 32, h.cryptMethod)
  putU32be(b, 36, h.l1Size)
  putU64be(b, 40, h.l1TableOffset)
  putU64be(b, 48, h.refcountTableOffset)
  putU32be(b, 56, h.refcountTableClusters)
  putU32be(b, 60, h.nbSnapshots)
  putU64be(b, 64, h.snapshotsOffset)
  let pos = C.HEADER_V2_LENGTH
  if (v3) {
    putU64be(b, 72, h.incompatibleFeatures)
    putU64be(b, 80, h.compatibleFeatures)
    putU64be(b, 88, h.autoclearFeatures)
    putU32be(b, 96, h.refcountOrder)
    putU32be(b, 100, 112)
    b[104] = h.compressionType
    pos = 112
  }
  const exts: Qcow2Header['extensions'] = []
  const add = (magic: number, data: Uint8Array) => {
    if (pos + 8 + alignUp(data.byteLength, 8) + 8 > cs) throw new UnsupportedFeatureError(`qcow2: header extensions do not fit in the header cluster`)
    putU32be(b, pos, magic)
    putU32be(b, pos + 4, data.byteLength)
    b.set(data, pos + 8)
    exts.push({ magic, offset: pos, data })
    pos += 8 + alignUp(data.byteLength, 8)
  }
  const old = (magic: number) => h.extensions.find((e) => e.magic === magic)
  const bf = old(C.EXT_BACKING_FORMAT)
  if (bf) add(bf.magic, bf.data)
  if (v3 && dataFile !== undefined && hasDataFile(h)) add(C.EXT_DATA_FILE, new TextEncoder().encode(dataFile))
  const crypto = old(C.EXT_CRYPTO)
  if (crypto) add(crypto.magic, crypto.data)
  // qemu-img 7.2 writes the feature name table only with clusters of 8 KiB and more (as create.ts)
  if (v3 && featureTable && cs >= 8192) {
    const t = new Uint8Array(FEATURES.length * 48)
    FEATURES.forEach(([type, bit, name], i) => {
      t[i * 48] = type
      t[i * 48 + 1] = bit
      t.set(new TextEncoder().encode(name), i * 48 + 2)
    })
    add(C.EXT_FEATURE_TABLE, t)
  }
  const bm = old(C.EXT_BITMAPS)
  if (bm && v3) add(bm.magic, bm.data)
  const known = new Set([C.EXT_BACKING_FORMAT, C.EXT_DATA_FILE, C.EXT_CRYPTO, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS])
  for (const e of h.extensions) if (!known.has(e.magic)) add(e.magic, e.data)
  pos += 8 // end marker
  let backingFileOffset = 0
  if (backingName.byteLength > 0) {
    if (pos + backingName.byteLength > cs) throw new UnsupportedFeatureError(`qcow2: backing file name does not fit in the header cluster`)
    backingFileOffset = pos
    putU64be(b, 8, pos)
    putU32be(b, 16, backingName.byteLength)
    b.set(backingName, pos)
    pos += backingName.byteLength
  }
  return { bytes: b, used: pos, extensions: exts, backingFileOffset }
}

/**
 * Rewrite the header cluster for `next` (the header with its new version)
 * so that one 512-byte sector write is the switch:
 * - the new header's used bytes fit in the first sector: write it, then the rest;
 * - the old one's do: write the new rest (unused by the old header) first, then the first sector;
 * - neither: first switch to the new header without its feature name table
 *   (which fits in the first sector), then as above.
 */
export async function rewriteHeader(state: Qcow2State, w: Qcow2Writer, next: Qcow2Header, dataFile: string | undefined): Promise<void> {
  const h = state.header
  const dev = state.device
  const cluster = await dev.read(0, h.clusterSize, 'header')
  const name = h.backingFileOffset > 0 ? cluster.slice(h.backingFileOffset, h.backingFileOffset + h.backingFileSize) : new Uint8Array(0)
  const target: Qcow2Header = { ...next }
  if (next.version === 2) {
    target.incompatibleFeatures = 0n
    target.compatibleFeatures = 0n
    target.autoclearFeatures = 0n
    target.compressionType = C.COMPRESSION_ZLIB
    target.headerLength = C.HEADER_V2_LENGTH
  } else if (h.version === 2) {
    target.incompatibleFeatures = 0n
    target.compatibleFeatures = 0n
    target.autoclearFeatures = 0n
    target.refcountOrder = 4
    target.compressionType = C.COMPRESSION_ZLIB
    target.headerLength = 112
  }
  const full = layoutHeader(target, dataFile, name, true)
  const head = (b: Uint8Array) => w.writeMetadata(0, b.subarray(0, 512), 'header')
  const tail = (b: Uint8Array) => (h.clusterSize > 512 ? w.writeMetadata(512, b.subarray(512), 'header') : Promise.resolve())
  if (full.used <= 512) {
    await head(full.bytes)
    await w.flushNow()
    await tail(full.bytes)
  } else if (usedBytes(h) <= 512) {
    await tail(full.bytes)
    await w.flushNow()
    await head(full.bytes)
  } else {
    const compact = layoutHeader(target, dataFile, name, false)
    if (compact.used > 512) {
      throw new UnsupportedFeatureError(
        `qcow2: ${state.filename}: the header cannot be rewritten crash-safely (more than 512 bytes of extensions and backing file name)`,
      )
    }
    await head(compact.bytes)
    await w.flushNow()
    await tail(full.bytes)
    await w.flushNow()
    await head(full.bytes)
  }
  await w.flushNow()
  // memory follows the disk
  h.version = target.version
  h.incompatibleFeatures = target.incompatibleFeatures
  h.compatibleFeatures = target.compatibleFeatures
  h.autoclearFeatures = target.autoclearFeatures
  h.refcountOrder = target.refcountOrder
  h.compressionType = target.compressionType
  h.headerLength = target.headerLength
  h.extensions = full.extensions
  h.backingFileOffset = full.backingFileOffset
  if (hasDataFile(h)) h.dataFile = dataFile
}
