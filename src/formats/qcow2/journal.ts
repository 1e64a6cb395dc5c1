/**
 * Undo journal for qcow2 repair. Before a repair phase changes the first byte
 * of the image, the old content of every region that phase will overwrite, and
 * the file's size, are written to the journal in one write and flushed. A crash while the
 * journal is written leaves an incomplete journal (refused by undo) and an
 * untouched image; a crash after it leaves a journal that restores the image
 * whatever the repair had done (regions put back, file cut to its old size).
 *
 * Layout (little endian), one segment per repair phase:
 *   "IMGTOOL-QC2UNDO1"   16 bytes
 *   u64 original file size, u32 region count, u32 0
 *   per region: u64 offset, u32 length, u32 0, then `length` bytes
 *   u32 checksum (CRC-32 of everything before it), "IMGTOOL-QC2DONE!"
 */
import { CorruptImageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { putU32le, putU64le, toSafeNumber, u32le, u64le } from '../../util/bytes.js'

const MAGIC = new TextEncoder().encode('IMGTOOL-QC2UNDO1')
const DONE = new TextEncoder().encode('IMGTOOL-QC2DONE!')

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
  constructor(readonly dev: BlockDevice) {}

  /** Save the current bytes of `regions` of `image` (and its size), durably. */
  async save(image: BlockDevice, regions: JournalRegion[]): Promise<number> {
    const merged = mergeRegions(regions)
    let total = 32 + 4 + DONE.byteLength
    for (const r of merged) total += 16 + r.length
    const buf = new Uint8Array(total)
    buf.set(MAGIC, 0)
    putU64le(buf, 16, image.size)
    putU32le(buf, 24, merged.length)
    let pos = 32
    for (const r of merged) {
      putU64le(buf, pos, r.offset)
      putU32le(buf, pos + 8, r.length)
      buf.set(await image.read(r.offset, r.length, 'journal'), pos + 16)
      pos += 16 + r.length
    }
    putU32le(buf, pos, crc32(buf.subarray(0, pos)))
    buf.set(DONE, pos + 4)
    if (this.pos === 0) await this.dev.truncate(0)
    await this.dev.write(this.pos, buf, 'journal')
    await this.dev.flush()
    this.pos += buf.byteLength
    this.segments++
    return merged.length
  }
}

export interface UndoResult {
  regions: number
  segments: number
  originalSize: number
}

/** Put `image` back as the journal saw it. Refuses a journal without one complete segment. */
export async function applyQcow2Undo(journal: BlockDevice, image: BlockDevice): Promise<UndoResult> {
  const buf = await journal.read(0, journal.size, 'journal')
  const bad = (why: string): never => {
    throw new CorruptImageError(`qcow2: ${journal.name}: not a usable undo journal: ${why}`, { file: journal.name, structure: 'journal' })
  }
  const segments: Array<{ size: number; regions: { offset: number; data: Uint8Array }[] }> = []
  let pos = 0
  for (;;) {
    const seg = parseSegment(buf, pos)
    if (!seg) break
    segments.push(seg)
    pos = seg.end
  }
  if (segments.length === 0) bad('no complete segment (the journal was not completely written, so the image was not changed)')
  let regions = 0
  for (const seg of [...segments].reverse()) {
    for (const r of seg.regions) {
      await image.write(r.offset, r.data, 'journal')
      regions++
    }
  }
  const originalSize = segments[0]!.size
  if (image.size !== originalSize) await image.truncate(originalSize)
  await image.flush()
  return { regions, segments: segments.length, originalSize }
}

function parseSegment(buf: Uint8Array, start: number): { size: number; regions: { offset: number; data: Uint8Array }[]; end: number } | undefined {
  if (buf.byteLength < start + 32 + 4 + DONE.byteLength || !MAGIC.every((b, i) => buf[start + i] === b)) return undefined
  const size = toSafeNumber(u64le(buf, start + 16), 'journal file size')
  const count = u32le(buf, start + 24)
  const regions: { offset: number; data: Uint8Array }[] = []
  let pos = start + 32
  for (let i = 0; i < count; i++) {
    if (pos + 16 > buf.byteLength) return undefined
    const offset = toSafeNumber(u64le(buf, pos), 'journal region offset')
    const length = u32le(buf, pos + 8)
    if (pos + 16 + length > buf.byteLength) return undefined
    regions.push({ offset, data: buf.subarray(pos + 16, pos + 16 + length) })
    pos += 16 + length
  }
  if (pos + 4 + DONE.byteLength > buf.byteLength || !DONE.every((b, i) => buf[pos + 4 + i] === b)) return undefined
  if (u32le(buf, pos) !== crc32(buf.subarray(start, pos))) return undefined
  return { size, regions, end: pos + 4 + DONE.byteLength }
}

let table: Uint32Array | undefined
function crc32(data: Uint8Array): number {
  if (!table) {
    table = new Uint32Array(256)
    for (let n = 0; n < 256; n++) {
      let c = n
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1
      table[n] = c >>> 0
    }
  }
  let c = 0xffffffff
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)
  return (c ^ 0xffffffff) >>> 0
}
