/**
 * qemu-img bitmap on a qcow2 image: add, remove, clear, enable, disable and
 * merge persistent dirty bitmaps, applied in order as qemu-img applies them
 * (block/qcow2-bitmap.c, blockdev's block-dirty-bitmap-* commands), with
 * qemu's refusals and words. As in qemu-img, the operations before a failed
 * one are kept: their state is written, then the failure is reported.
 *
 * The image is opened without the writer's bitmap tracking (no IN_USE
 * marking): the edit is one switch from the old bitmap state to the new one.
 * New data clusters, tables and directory are written in their own buffers
 * and made durable with their refcounts; the header (through rewriteHeader:
 * the bitmaps extension and the autoclear bit, one 512-byte sector write) is
 * the switch; only then are the old directory, tables and data freed. A crash
 * at any point leaves the old or the new bitmaps plus at most leaks; a failed
 * write before the switch gives back what it allocated.
 */
import { ImgtoolError, UnsupportedFeatureError } from '../../../errors.js'
import { putU32be, putU64be } from '../../../util/bytes.js'
import {
  BME_FLAG_AUTO,
  BME_MAX_GRANULARITY_BITS,
  BME_MAX_NAME_SIZE,
  BME_MAX_PHYS_SIZE,
  BME_MIN_GRANULARITY_BITS,
  bitmapGeometry,
  decodeBitmapTableEntry,
  directoryEntrySize,
  encodeBitmapDirectory,
  type Qcow2Bitmap,
} from '../spec/bitmap-directory.js'
import * as C from '../spec/constants.js'
import { bitmapsValid, readHeader, type Qcow2Header } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { rewriteHeader } from './amend-header.js'
import { PersistentBitmaps, setBits } from './bitmap-write.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'

/** One bitmap with its bits, as read from an image (a merge source, or for comparing contents). */
export interface Qcow2BitmapContents {
  name: string
  granularity: number
  /** qemu-img info's flags: in-use, auto */
  flags: string[]
  /** IN_USE on disk: inconsistent, no bits */
  inconsistent: boolean
  /** one bit per granularity chunk, LSB first; undefined when inconsistent */
  bits: Uint8Array | undefined
}

/** The bitmaps of another image, for --merge with -b. */
export interface BitmapSourceImage {
  /** the virtual size of that image */
  size: number
  bitmaps: Qcow2BitmapContents[]
}

export type BitmapEditOp =
  | { op: 'add'; /** bytes, already reduced to 32 bits as qemu-img passes it (0 is then refused); absent: the default */ granularity?: number }
  | { op: 'remove' }
  | { op: 'clear' }
  | { op: 'enable' }
  | { op: 'disable' }
  | { op: 'merge'; source: string; /** absent: the bitmap is in the image itself */ from?: BitmapSourceImage }

export interface BitmapEditResult {
  /** operations done (all of them unless `error`) */
  done: number
  /** qemu's message for the operation that failed; the ones before it are written */
  error?: string
}

interface Model {
  name: string
  nameBytes: Uint8Array
  granularityBits: number
  enabled: boolean
  inconsistent: boolean
  bits: Uint8Array | undefined
  /** the on-disk bitmap this one was read from (undefined: added) */
  disk: PersistentBitmaps['list'][number] | undefined
}

/** The bitmaps of an open qcow2 image with their bits (QEMU's constraints checked as on a read-write open). */
export async function readQcow2Bitmaps(img: Qcow2OpenImage): Promise<Qcow2BitmapContents[]> {
  const pb = await PersistentBitmaps.load(img.state)
  if (!pb) return []
  return pb.list.map((b) => ({
    name: b.entry.name,
    granularity: 2 ** b.entry.granularityBits,
    flags: [...(b.inconsistent ? ['in-use'] : []), ...(b.enabled ? ['auto'] : [])],
    inconsistent: b.inconsistent,
    bits: b.bits?.slice(),
  }))
}

/** qemu's default granularity for a new bitmap: the cluster size within [4 KiB, 64 KiB] (bdrv_get_default_bitmap_granularity). */
export function defaultBitmapGranularity(clusterSize: number): number {
  return Math.min(65536, Math.max(4096, clusterSize))
}

const inconsistentText = (name: string) => `Bitmap '${name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk`

/**
 * Apply `ops` to bitmap `name` of the image, in order, and write the result.
 * The image must have been opened read-write with its bitmaps left to the
 * caller (open option `bitmapsByCaller`). Closes the image whatever happens.
 */
export async function editQcow2Bitmaps(img: Qcow2OpenImage, name: string, ops: BitmapEditOp[]): Promise<BitmapEditResult> {
  try {
    const w = writerOf(img)
    if (w.bitmaps) throw new ImgtoolError('INTERNAL', `qcow2: ${img.state.filename}: the writer tracks the bitmaps; open with bitmapsByCaller`)
    const state = img.state
    const pb = await PersistentBitmaps.load(state)
    const models: Model[] = (pb?.list ?? []).map((b) => ({
      name: b.entry.name,
      nameBytes: b.entry.nameBytes,
      granularityBits: b.entry.granularityBits,
      enabled: b.enabled,
      inconsistent: b.inconsistent,
      bits: b.bits,
      disk: b,
    }))
    let done = 0
    let error: string | undefined
    let changed = false
    for (const op of ops) {
      const fail = applyOp(state, models, name, op)
      if (fail !== undefined) {
        error = `Operation ${op.op} on bitmap ${name} failed: ${fail}`
        break
      }
      changed = true
      done++
    }
    if (changed) await w.mutex.run(() => writeBitmaps(state, w, models, pb))
    await img.close()
    return { done, ...(error !== undefined ? { error } : {}) }
  } catch (e) {
    await img.close().catch(() => undefined)
    throw e
  }

  function applyOp(state: Qcow2State, models: Model[], target: string, op: BitmapEditOp): string | undefined {
    const h = state.header
    const find = (n: string) => models.find((m) => m.name === n)
    const notFound = (n: string) => `Dirty bitmap '${n}' not found`
    if (op.op === 'add') {
      if (target === '') return 'Bitmap name cannot be empty'
      if (find(target)) return `Bitmap already exists: ${target}`
      const g = op.granularity !== undefined ? op.granularity : defaultBitmapGranularity(h.clusterSize)
      if (g < 512 || (g & (g - 1)) !== 0) return 'Granularity must be power of 2 and at least 512'
      const persist = (why: string) => `Can't make bitmap '${target}' persistent in '${state.filename}': ${why}`
      if (h.version < 3) return persist('Cannot store dirty bitmaps in qcow2 v2 files')
      const nameBytes = new TextEncoder().encode(target)
      if (nameBytes.byteLength > BME_MAX_NAME_SIZE) return persist(`Name length exceeds maximum (${BME_MAX_NAME_SIZE} characters)`)
      const bits = Math.log2(g)
      if (bits > BME_MAX_GRANULARITY_BITS) return persist(`Granularity exceeds maximum (${2 ** BME_MAX_GRANULARITY_BITS} bytes)`)
      if (bits < BME_MIN_GRANULARITY_BITS) return persist(`Granularity is under minimum (${2 ** BME_MIN_GRANULARITY_BITS} bytes)`)
      const geo = bitmapGeometry(h.size, bits, h.clusterSize)
      if (geo.tableSize * h.clusterSize > BME_MAX_PHYS_SIZE) return persist('Too much space will be occupied by the bitmap. Use larger granularity')
      if (models.length >= 65535) return persist('Maximum number of persistent bitmaps is already reached')
      const dirBytes = models.reduce((s, m) => s + directoryEntrySize(m.nameBytes.byteLength, 0), 0) + directoryEntrySize(nameBytes.byteLength, 0)
      if (dirBytes > 65535 * 1024) return persist('Not enough space in the bitmap directory')
      models.push({ name: target, nameBytes, granularityBits: bits, enabled: true, inconsistent: false, bits: new Uint8Array(geo.bytes), disk: undefined })
      return undefined
    }
    const dst = find(target)
    if (!dst) return notFound(target)
    if (op.op === 'remove') {
      models.splice(models.indexOf(dst), 1)
      return undefined
    }
    if (dst.inconsistent) return inconsistentText(target)
    if (op.op === 'clear') dst.bits!.fill(0)
    else if (op.op === 'enable') dst.enabled = true
    else if (op.op === 'disable') dst.enabled = false
    else {
      const srcList: Array<{ name: string; granularityBits: number; inconsistent: boolean; bits: Uint8Array | undefined }> = op.from
        ? op.from.bitmaps.map((b) => ({ name: b.name, granularityBits: Math.log2(b.granularity), inconsistent: b.inconsistent, bits: b.bits }))
        : models
      const src = srcList.find((b) => b.name === op.source)
      if (!src) return notFound(op.source)
      if (src.inconsistent) return inconsistentText(op.source)
      const srcSize = op.from ? op.from.size : h.size
      if (srcSize !== h.size) return `Bitmaps are of different sizes (destination size is ${h.size}, source size is ${srcSize}) and can't be merged`
      mergeBits(dst.bits!, dst.granularityBits, src.bits!, src.granularityBits, h.size)
    }
    return undefined
  }
}

/** dst |= src, across granularities: every destination chunk that overlaps a dirty source chunk becomes dirty. */
export function mergeBits(dst: Uint8Array, dstBits: number, src: Uint8Array, srcBits: number, size: number): void {
  if (dstBits === srcBits) {
    for (let i = 0; i < dst.byteLength && i < src.byteLength; i++) dst[i]! |= src[i]!
    return
  }
  const gs = 2 ** srcBits
  const gd = 2 ** dstBits
  const nd = Math.ceil(size / gd)
  for (let byte = 0; byte < src.byteLength; byte++) {
    const v = src[byte]!
    if (v === 0) continue
    for (let k = 0; k < 8; k++) {
      if ((v & (1 << k)) === 0) continue
      const i = byte * 8 + k
      const start = i * gs
      if (start >= size) break
      const end = Math.min(size, start + gs)
      setBits(dst, Math.floor(start / gd), Math.min(nd - 1, Math.floor((end - 1) / gd)))
    }
  }
}

interface Range {
  offset: number
  length: number
}

/** Write `models` as the image's bitmaps: new data, tables, directory; the header switch; then free the old ones. */
async function writeBitmaps(state: Qcow2State, w: Qcow2Writer, models: Model[], pb: PersistentBitmaps | undefined): Promise<void> {
  const lazy = w.refcounts.lazy
  w.refcounts.lazy = false
  try {
    await writeBitmapsOrdered(state, w, models, pb)
  } finally {
    w.refcounts.lazy = lazy
  }
}

async function writeBitmapsOrdered(state: Qcow2State, w: Qcow2Writer, models: Model[], pb: PersistentBitmaps | undefined): Promise<void> {
  const h = state.header
  const cs = h.clusterSize
  const dev = state.device
  const allocated: Range[] = []
  const entries: Qcow2Bitmap[] = []
  let dirOffset = 0
  let dir: Uint8Array = new Uint8Array(0)
  try {
    for (const m of models) {
      if (m.inconsistent) {
        // kept as found: entry, table and data untouched
        entries.push(m.disk!.entry)
        continue
      }
      const bits = m.bits!
      const g = bitmapGeometry(h.size, m.granularityBits, cs)
      const table = new Uint8Array(g.tableSize * 8)
      for (let i = 0; i < g.tableSize; i++) {
        const part = bits.subarray(i * cs, Math.min(bits.byteLength, (i + 1) * cs))
        if (isZero(part)) continue
        const buf = new Uint8Array(cs)
        buf.set(part)
        const off = await w.allocClusters(1)
        allocated.push({ offset: off, length: cs })
        await dev.write(off, buf, 'bitmap')
        putU64be(table, i * 8, off)
      }
      const tableOffset = await w.allocClusters(Math.ceil(table.byteLength / cs))
      allocated.push({ offset: tableOffset, length: table.byteLength })
      await dev.write(tableOffset, table, 'bitmap')
      entries.push({
        name: m.name,
        nameBytes: m.nameBytes,
        tableOffset,
        tableSize: g.tableSize,
        flags: m.enabled ? BME_FLAG_AUTO : 0,
        type: 1,
        granularityBits: m.granularityBits,
        extraData: new Uint8Array(0),
        entryOffset: 0,
      })
    }
    if (entries.length > 0) {
      dir = encodeBitmapDirectory(entries)
      dirOffset = await w.allocClusters(Math.ceil(dir.byteLength / cs))
      allocated.push({ offset: dirOffset, length: dir.byteLength })
      await dev.write(dirOffset, dir, 'bitmap')
    }
    await w.refcounts.persist()
    await w.flushNow()
  } catch (e) {
    await undo(w, allocated)
    throw e
  }

  // the switch: the header's bitmaps extension (and autoclear bit) names the new directory
  const next: Qcow2Header = { ...h, extensions: h.extensions.filter((x) => x.magic !== C.EXT_BITMAPS) }
  if (entries.length > 0) {
    const data = new Uint8Array(24)
    putU32be(data, 0, entries.length)
    putU64be(data, 8, dir.byteLength)
    putU64be(data, 16, dirOffset)
    next.extensions = [...next.extensions, { magic: C.EXT_BITMAPS, offset: 0, data }]
    next.autoclearFeatures = h.autoclearFeatures | BigInt(C.AUTOCLEAR_BITMAPS)
  } else {
    next.autoclearFeatures = h.autoclearFeatures & ~BigInt(C.AUTOCLEAR_BITMAPS)
  }
  const oldExt = h.bitmaps && bitmapsValid(h) && h.bitmaps.nbBitmaps > 0 ? { ...h.bitmaps } : undefined
  try {
    await rewriteHeader(state, w, next, h.dataFile)
  } catch (e) {
    // did the switch land? The header on disk says; unknown (it cannot be read): nothing is given back, a leak at worst
    let switched: boolean | undefined
    try {
      const now = await readHeader(dev, { file: state.filename, readOnly: true, forCheck: true })
      const on = now.bitmaps && bitmapsValid(now) && now.bitmaps.nbBitmaps > 0 ? now.bitmaps.directoryOffset : 0
      switched = on === dirOffset
    } catch {
      switched = undefined
    }
    if (switched === false) await undo(w, allocated)
    throw e
  }
  h.bitmaps = entries.length > 0 ? { nbBitmaps: entries.length, directorySize: dir.byteLength, directoryOffset: dirOffset } : undefined

  // the old structures are unreachable now that the switch is durable
  const old: Range[] = []
  if (oldExt) old.push({ offset: oldExt.directoryOffset, length: oldExt.directorySize })
  const kept = new Set(models.filter((m) => m.inconsistent).map((m) => m.disk))
  for (const b of pb?.list ?? []) {
    if (kept.has(b)) continue
    old.push({ offset: b.entry.tableOffset, length: b.entry.tableSize * 8 })
    if (b.inconsistent) {
      // a removed IN_USE bitmap: its table was not loaded; free the entries that are valid (as QEMU's clear_bitmap_table)
      const table = await dev.read(b.entry.tableOffset, b.entry.tableSize * 8, 'bitmap')
      for (let i = 0; i < b.entry.tableSize; i++) {
        const e = decodeBitmapTableEntry(table, i, cs)
        if (e && e.offset !== 0) old.push({ offset: e.offset, length: cs })
      }
    } else {
      for (const d of b.dataClusters) old.push({ offset: d, length: cs })
    }
  }
  for (const r of old) await w.refcounts.update(r.offset, r.length, -1)
  await w.refcounts.persist()
  await w.flushNow()
  let pos = 0
  for (const e of entries) {
    e.entryOffset = dirOffset + pos
    pos += directoryEntrySize(e.nameBytes.byteLength, 0)
  }
  state.bitmaps.splice(0, state.bitmaps.length, ...entries)
}

async function undo(w: Qcow2Writer, ranges: Range[]): Promise<void> {
  try {
    for (const r of ranges) await w.refcounts.update(r.offset, r.length, -1)
    await w.refcounts.persist()
  } catch {
    // unreferenced either way: a leak at worst
  }
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.byteLength; i++) if (b[i] !== 0) return false
  return true
}

/** The refusal for a format that cannot hold persistent bitmaps (qemu: "Can't store persistent bitmaps to ..."). */
export function bitmapsUnsupported(file: string): UnsupportedFeatureError {
  return new UnsupportedFeatureError(`Can't store persistent bitmaps to '${file}': Operation not supported`)
}
