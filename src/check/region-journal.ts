/**
 * The region undo journal of the VHD and VMDK repairs (each with its own magic). Before a repair step changes the
 * image, the
 * bytes it will overwrite (and, before a truncate, the bytes it will cut and
 * the file's size) are appended to the journal and flushed. When the repair
 * has finished, a seal (src/check/undo.ts) ties the journal to the image and
 * to the state the repair left, so undo refuses another image or one that
 * changed since.
 *
 * Layout: a 16-byte magic ("IMGTOOL-VHDUNDO1", "IMGTOOL-VMKUNDO1"), then records
 * { u64 LE offset, u32 LE length, u32 LE kind, `length` bytes }:
 *   kind 0: the `length` (> 0) bytes that were at `offset`;
 *   kind 1: the file was `offset` bytes long (length 0);
 *   kind 2: the seal (offset 0), always last.
 * A record that does not parse (a torn last append) ends the journal. Undo
 * applies the records newest first and never holds more than a bounded window
 * of the journal; every length it reads is bounded by the journal's size.
 */
import type { BlockDevice } from '../io/block-device.js'
import { hex } from '../errors.js'
import { putU32le, putU64le, u32le, u64le } from '../util/bytes.js'
import {
  JournalReader,
  UNDO_CHUNK,
  checkUndo,
  encodeSeal,
  equalBytes,
  parseSeal,
  visitNewestFirst,
  type JournalIdentity,
  type JournalItem,
  type Seal,
  type UndoOptions,
  type UndoRegion,
} from './undo.js'

const BYTES = 0
const SIZE = 1
const SEAL = 2
const HEAD = 16

/** The 16 bytes a journal of one format starts with, and the prefix of its error messages ("vpc", "vmdk"). */
export interface JournalKind {
  magic: string
  format: string
}

export class RegionJournal {
  private pos = 0
  /** records written (the seal not counted) */
  records = 0
  private readonly regions: UndoRegion[] = []
  private readonly magic: Uint8Array
  constructor(
    readonly dev: BlockDevice,
    kind: JournalKind,
  ) {
    this.magic = new TextEncoder().encode(kind.magic)
  }

  /** Save the bytes of [offset, offset+length) of `image` that lie inside it, in pieces of at most 1 MiB. */
  async save(image: BlockDevice, offset: number, length: number): Promise<void> {
    const end = Math.min(image.size, offset + length)
    for (let at = offset; at < end; at += UNDO_CHUNK) {
      const n = Math.min(UNDO_CHUNK, end - at)
      await this.append(at, BYTES, await image.read(at, n, 'journal'))
      this.regions.push({ offset: at, length: n })
    }
  }

  /** Save `image`'s size before a truncate or an extension. */
  async saveSize(image: BlockDevice): Promise<void> {
    await this.append(image.size, SIZE, new Uint8Array(0))
  }

  /** The repair has finished: record the image and what the repair left, durably. */
  async seal(image: BlockDevice, headerBytes: number, identity: JournalIdentity | undefined): Promise<void> {
    if (this.records === 0) return
    await this.append(0, SEAL, await encodeSeal(image, this.regions, headerBytes, identity))
    this.records--
  }

  private async append(offset: number, kind: number, bytes: Uint8Array): Promise<void> {
    if (this.pos === 0) {
      await this.dev.write(0, this.magic, 'journal')
      this.pos = this.magic.byteLength
    }
    const rec = new Uint8Array(HEAD + bytes.byteLength)
    putU64le(rec, 0, offset)
    putU32le(rec, 8, bytes.byteLength)
    putU32le(rec, 12, kind)
    rec.set(bytes, HEAD)
    await this.dev.write(this.pos, rec, 'journal')
    this.pos += rec.byteLength
    this.records++
    await this.dev.flush() // durable before the change it protects
  }
}

interface Record {
  kind: number
  offset: number
  length: number
  end: number
}

interface Scan {
  version: number
  records: number
  seal: Seal | undefined
  tornAt?: number
}

/**
 * Put `image` back as the repair that wrote `journal` found it; returns the
 * records applied. Refuses garbage and (unless options.force) a journal that
 * cannot be checked against `image` or whose checks fail.
 */
export async function applyRegionUndo(kind: JournalKind, journal: BlockDevice, image: BlockDevice, options: UndoOptions = {}): Promise<number> {
  const r = new JournalReader(journal, `${kind.format}: ${journal.name}`)
  const magic = new TextEncoder().encode(kind.magic)
  const s = await scan(r, magic, kind.magic)
  await checkUndo(r, s, image, () => items(r, s, magic.byteLength), options)
  await visitNewestFirst(
    magic.byteLength,
    s.records,
    async (pos) => (await recordAt(r, pos))!.end,
    async (pos) => {
      const e = (await recordAt(r, pos))!
      if (e.kind === SIZE) {
        if (image.size !== e.offset) await image.truncate(e.offset)
      } else await r.each(pos + HEAD, e.length, (piece, done) => image.write(e.offset + done, piece, 'journal'))
    },
  )
  await image.flush()
  return s.records
}

async function scan(r: JournalReader, magic: Uint8Array, name: string): Promise<Scan> {
  const head = await r.bytes(0, magic.byteLength)
  if (!head || !equalBytes(head, magic)) r.bad(`it does not start with ${name}`)
  const s: Scan = { version: 2, records: 0, seal: undefined }
  let pos = magic.byteLength
  while (pos < r.size) {
    const e = await recordAt(r, pos)
    if (!e) {
      s.tornAt = pos
      break
    }
    if (e.kind === SEAL) {
      const seal = await parseSeal(r, pos + HEAD)
      if (!seal || seal.end !== e.end) {
        s.tornAt = pos
        break
      }
      if (e.end !== r.size) r.bad(`${r.size - e.end} bytes of garbage after its seal (at ${hex(e.end)})`)
      if (s.records === 0) r.bad(`a seal at ${hex(pos)} with no record before it`)
      s.seal = seal
      break
    }
    s.records++
    pos = e.end
  }
  if (s.records === 0) r.bad('no complete record (the journal was not completely written, so the image was not changed)')
  return s
}

async function recordAt(r: JournalReader, pos: number): Promise<Record | undefined> {
  const h = await r.bytes(pos, HEAD)
  if (!h) return undefined
  const offset = u64le(h, 0)
  const length = u32le(h, 8)
  const kind = u32le(h, 12)
  const end = pos + HEAD + length
  if (offset > BigInt(Number.MAX_SAFE_INTEGER) || end > r.size || kind > SEAL) return undefined
  if ((kind === BYTES) !== length > 0 && kind !== SEAL) return undefined
  if (kind === SEAL && offset !== 0n) return undefined
  return { kind, offset: Number(offset), length, end }
}

async function* items(r: JournalReader, s: Scan, first: number): AsyncGenerator<JournalItem> {
  let pos = first
  for (let k = 0; k < s.records; k++) {
    const e = (await recordAt(r, pos))!
    if (e.kind === SIZE) yield { type: 'size', size: e.offset }
    else yield { type: 'region', offset: e.offset, length: e.length, dataAt: pos + HEAD }
    pos = e.end
  }
}
