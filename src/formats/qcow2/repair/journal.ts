/**
 * Undo journal for qcow2 repair. Before a repair phase changes the first byte
 * of the image, the old content of every region that phase will overwrite, and
 * the file's size, are written to the journal in one write and flushed. A crash while the
 * journal is written leaves an incomplete journal (refused by undo) and an
 * untouched image; a crash after it leaves a journal that restores the image
 * whatever the repair had done (regions put back, file cut to its old size).
 * When the repair has finished, a seal (src/check/undo.ts) records the image's
 * identity and the state the repair left, so undo can refuse another image or
 * one that changed since.
 *
 * Layout (little endian), one segment per repair phase:
 *   "IMGTOOL-QC2UNDO2"   16 bytes ("IMGTOOL-QC2UNDO1": format 1, no seal)
 *   u64 original file size, u32 region count, u32 0
 *   per region: u64 offset, u32 length, u32 0, then `length` bytes
 *   u32 checksum (CRC-32 of everything before it), "IMGTOOL-QC2DONE!"
 * then the seal.
 *
 * Undo streams the journal: it never holds more than a bounded window of it, and
 * every count and length read from it is bounded by the journal's size.
 */
import type { BlockDevice } from '../../../io/block-device.js'
import { hex } from '../../../errors.js'
import { putU32le, putU64le, u32le, u64le } from '../../../util/bytes.js'
import {
  JournalReader,
  checkUndo,
  crc32,
  encodeSeal,
  equalBytes,
  isSealAt,
  parseSeal,
  visitNewestFirst,
  UNDO_CHUNK,
  type JournalIdentity,
  type JournalItem,
  type Seal,
  type UndoOptions,
} from '../../../check/undo.js'

const MAGIC_V1 = new TextEncoder().encode('IMGTOOL-QC2UNDO1')
const MAGIC = new TextEncoder().encode('IMGTOOL-QC2UNDO2')
const DONE = new TextEncoder().encode('IMGTOOL-QC2DONE!')
const SEG_HEAD = 32
const REGION_HEAD = 16
const SEG_TAIL = 4 + DONE.byteLength

export interface JournalRegion {
  offset: number
  length: number
}

/** Merge overlapping/adjacent regions so each byte is saved once. */
export function mergeRegions(regions: JournalRegion[]): JournalRegion[] {
  const sorted = regions.filter((r) => r.length > 0).sort((a, b) => a.offset - b.offset)
  const out: JournalRegion[] = []
  for (const r of sorted) {
    const last = out[out.length - 1]
    if (last && r.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, r.offset + r.length - last.offset)
    } else out.push({ ...r })
  }
  return out
}

/**
 * A journal is a sequence of segments, one per repair phase, each written in
 * one write and flushed before that phase changes anything. Undo restores the
 * complete segments newest first; an incomplete last segment is ignored (its
 * phase changed nothing: the flush of a segment comes before its first change).
 */
export class Qcow2Journal {
  private pos = 0
  segments = 0
  /** every region saved, in journal order (for the seal) */
  private readonly regions: JournalRegion[] = []
  constructor(readonly dev: BlockDevice) {}

  /** Save the current bytes of `regions` of `image` (and its size), durably. */
  async save(image: BlockDevice, regions: JournalRegion[]): Promise<number> {
    const merged = mergeRegions(regions)
    let total = SEG_HEAD + SEG_TAIL
    for (const r of merged) total += REGION_HEAD + r.length
    const buf = new Uint8Array(total)
    buf.set(MAGIC, 0)
    putU64le(buf, 16, image.size)
    putU32le(buf, 24, merged.length)
    let pos = SEG_HEAD
    for (const r of merged) {
      putU64le(buf, pos, r.offset)
      putU32le(buf, pos + 8, r.length)
      buf.set(await image.read(r.offset, r.length, 'journal'), pos + REGION_HEAD)
      pos += REGION_HEAD + r.length
    }
    putU32le(buf, pos, crc32(buf.subarray(0, pos)))
    buf.set(DONE, pos + 4)
    if (this.pos === 0) await this.dev.truncate(0)
    await this.dev.write(this.pos, buf, 'journal')
    await this.dev.flush()
    this.pos += buf.byteLength
    this.segments++
    this.regions.push(...merged.map((r) => ({ ...r })))
    return merged.length
  }

  /**
   * The repair has finished: record which image this is and what the repair
   * left (its size, its first `headerBytes` bytes, every saved region), durably.
   */
  async seal(image: BlockDevice, headerBytes: number, identity: JournalIdentity | undefined): Promise<void> {
    if (this.segments === 0) return
    const buf = await encodeSeal(image, this.regions, headerBytes, identity)
    await this.dev.write(this.pos, buf, 'journal')
    await this.dev.flush()
    this.pos += buf.byteLength
  }
}

export interface UndoResult {
  regions: number
  segments: number
  originalSize: number
  sealed: boolean
}

interface Segment {
  size: number
  count: number
  end: number
}

interface Scan {
  version: number
  segments: number
  originalSize: number
  seal: Seal | undefined
  tornAt?: number
}

/**
 * Put `image` back as the journal saw it. Refuses a journal without one
 * complete segment, garbage, and (unless options.force) a journal that cannot
 * be checked against `image` or whose checks fail (see checkUndo).
 */
export async function applyQcow2Undo(journal: BlockDevice, image: BlockDevice, options: UndoOptions = {}): Promise<UndoResult> {
  const r = new JournalReader(journal, `qcow2: ${journal.name}`)
  const s = await scan(r)
  await checkUndo(r, s, image, () => items(r, s), options)
  let regions = 0
  await visitNewestFirst(
    0,
    s.segments,
    async (pos) => (await segmentAt(r, pos, false))!.end,
    async (pos) => {
      for await (const it of regionsOf(r, pos)) {
        await r.each(it.dataAt, it.length, (piece, done) => image.write(it.offset + done, piece, 'journal'))
        regions++
      }
    },
  )
  if (image.size !== s.originalSize) await image.truncate(s.originalSize)
  await image.flush()
  return { regions, segments: s.segments, originalSize: s.originalSize, sealed: s.seal !== undefined }
}

/** Walk the whole journal once: its complete segments, its seal, where an incomplete tail starts. */
async function scan(r: JournalReader): Promise<Scan> {
  const first = await r.bytes(0, MAGIC.byteLength)
  const version = first && equalBytes(first, MAGIC) ? 2 : first && equalBytes(first, MAGIC_V1) ? 1 : 0
  if (version === 0) r.bad('it does not start with a qcow2 undo segment (IMGTOOL-QC2UNDO2)')
  const s: Scan = { version, segments: 0, originalSize: 0, seal: undefined }
  let pos = 0
  while (pos < r.size) {
    const head = await r.bytes(pos, MAGIC.byteLength)
    if (version === 2 && isSealAt(head)) {
      const seal = await parseSeal(r, pos)
      if (!seal) {
        s.tornAt = pos
        break
      }
      if (seal.end !== r.size) r.bad(`${r.size - seal.end} bytes of garbage after its seal (at ${hex(seal.end)})`)
      if (s.segments === 0) r.bad(`a seal at ${hex(pos)} with no segment before it`)
      s.seal = seal
      break
    }
    const seg = head && equalBytes(head, version === 2 ? MAGIC : MAGIC_V1) ? await segmentAt(r, pos, true) : undefined
    if (!seg) {
      s.tornAt = pos
      break
    }
    if (s.segments === 0) s.originalSize = seg.size
    s.segments++
    pos = seg.end
  }
  if (s.segments === 0) r.bad('no complete segment (the journal was not completely written, so the image was not changed)')
  return s
}

/** The segment at `pos`, its bounds checked against the journal's size (and its CRC when `verify`), or undefined. */
async function segmentAt(r: JournalReader, pos: number, verify: boolean): Promise<Segment | undefined> {
  const head = await r.bytes(pos, SEG_HEAD)
  if (!head) return undefined
  const size = u64le(head, 16)
  const count = u32le(head, 24)
  if (size > BigInt(Number.MAX_SAFE_INTEGER) || count > (r.size - pos - SEG_HEAD - SEG_TAIL) / REGION_HEAD) return undefined
  let crc = verify ? crc32(head) : 0
  let p = pos + SEG_HEAD
  for (let i = 0; i < count; i++) {
    const rh = await r.bytes(p, REGION_HEAD)
    if (!rh) return undefined
    const length = u32le(rh, 8)
    if (u64le(rh, 0) > BigInt(Number.MAX_SAFE_INTEGER) || p + REGION_HEAD + length + SEG_TAIL > r.size) return undefined
    if (verify) {
      crc = crc32(rh, crc)
      for (let done = 0; done < length;) {
        const n = Math.min(UNDO_CHUNK, length - done)
        crc = crc32((await r.bytes(p + REGION_HEAD + done, n))!, crc)
        done += n
      }
    }
    p += REGION_HEAD + length
  }
  const tail = await r.bytes(p, SEG_TAIL)
  if (!tail || !equalBytes(tail.subarray(4), DONE)) return undefined
  if (verify && u32le(tail, 0) !== crc) return undefined
  return { size: Number(size), count, end: p + SEG_TAIL }
}

/** the regions of the (already checked) segment at `pos` */
async function* regionsOf(r: JournalReader, pos: number): AsyncGenerator<{ offset: number; length: number; dataAt: number }> {
  const head = (await r.bytes(pos, SEG_HEAD))!
  const count = u32le(head, 24)
  let p = pos + SEG_HEAD
  for (let i = 0; i < count; i++) {
    const rh = (await r.bytes(p, REGION_HEAD))!
    const offset = Number(u64le(rh, 0))
    const length = u32le(rh, 8)
    yield { offset, length, dataAt: p + REGION_HEAD }
    p += REGION_HEAD + length
  }
}

/** every segment's size and regions, in journal order (for the seal checks) */
async function* items(r: JournalReader, s: Scan): AsyncGenerator<JournalItem> {
  let pos = 0
  for (let k = 0; k < s.segments; k++) {
    const seg = (await segmentAt(r, pos, false))!
    yield { type: 'size', size: seg.size }
    for await (const it of regionsOf(r, pos)) yield { type: 'region', ...it }
    pos = seg.end
  }
}
