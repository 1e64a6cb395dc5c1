/**
 * Undo journal for repair: before any byte of the COW is overwritten, its old
 * content is appended to the journal device and flushed. `applyUndoJournal`
 * puts the COW back as it was, newest entry first.
 *
 * Before repair changes the COW's length (extending a truncated COW) the old
 * length is saved too, so an undo is exact: same bytes, same size. When the
 * repair has finished, a seal (src/check/undo.ts) records the COW's identity and
 * the state the repair left, so undo can refuse another COW or one that changed.
 *
 * Layout: 16-byte magic "IMGTOOL-DMSUNDO2" ("…DMSUNDO1": format 1, no seal), then
 * entries { u64 LE offset, u32 LE length, u32 LE kind, bytes }:
 *   kind 0: `length` (> 0) old bytes that were at `offset`;
 *   kind 1: the COW was `offset` bytes long (length 0, no bytes);
 *   kind 2: the seal (`length` bytes, offset 0), the last entry.
 * An entry that does not parse (a torn last write) ends the journal.
 *
 * Undo streams the journal with bounded memory; every length read from it is
 * bounded by its size.
 */
import type { BlockDevice } from '../../io/block-device.js'
import { hex } from '../../errors.js'
import { putU32le, putU64le, u32le, u64le } from '../../util/bytes.js'
import {
  JournalReader,
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
} from '../../check/undo.js'

const MAGIC_V1 = new TextEncoder().encode('IMGTOOL-DMSUNDO1')
const MAGIC = new TextEncoder().encode('IMGTOOL-DMSUNDO2')
const KIND_BYTES = 0
const KIND_SIZE = 1
const KIND_SEAL = 2
const ENTRY_HEAD = 16

export class UndoJournal {
  private pos = 0
  /** entries written (the seal not counted) */
  entries = 0
  private readonly regions: UndoRegion[] = []
  constructor(readonly dev: BlockDevice) {}

  /** Nothing is written until the first save: a repair with nothing to do leaves an empty journal. */
  async start(): Promise<void> {}

  /** Save what is at [offset, offset+length) on `target` before it changes. */
  async save(target: BlockDevice, offset: number, length: number): Promise<void> {
    if (length <= 0) return
    const e = new Uint8Array(ENTRY_HEAD + length)
    putU64le(e, 0, offset)
    putU32le(e, 8, length)
    putU32le(e, 12, KIND_BYTES)
    e.set(await target.read(offset, length, 'journal'), ENTRY_HEAD)
    await this.append(e)
    this.regions.push({ offset, length })
  }

  /** Save `target`'s length before it changes (undo truncates back to it). */
  async saveSize(target: BlockDevice): Promise<void> {
    const e = new Uint8Array(ENTRY_HEAD)
    putU64le(e, 0, target.size)
    putU32le(e, 12, KIND_SIZE)
    await this.append(e)
  }

  /** The repair has finished: record which COW this is and what the repair left, durably. */
  async seal(target: BlockDevice, headerBytes: number, identity: JournalIdentity | undefined): Promise<void> {
    if (this.entries === 0) return
    const seal = await encodeSeal(target, this.regions, headerBytes, identity)
    const e = new Uint8Array(ENTRY_HEAD + seal.byteLength)
    putU32le(e, 8, seal.byteLength)
    putU32le(e, 12, KIND_SEAL)
    e.set(seal, ENTRY_HEAD)
    await this.append(e)
    this.entries-- // the seal is not an entry undo applies
  }

  private async append(e: Uint8Array): Promise<void> {
    if (this.pos === 0) {
      await this.dev.write(0, MAGIC, 'journal')
      this.pos = MAGIC.byteLength
    }
    await this.dev.write(this.pos, e, 'journal')
    this.pos += e.byteLength
    this.entries++
    await this.dev.flush() // durable before the overwrite it protects
  }
}

interface Entry {
  kind: number
  offset: number
  length: number
  end: number
}

interface Scan {
  version: number
  entries: number
  seal: Seal | undefined
  tornAt?: number
}

/**
 * Put `target` back as it was before the repair that wrote `journal`; returns the entries applied.
 * An empty journal (nothing was changed) applies nothing. Refuses garbage, and (unless
 * options.force) a journal that cannot be checked against `target` or whose checks fail.
 */
export async function applyUndoJournal(journal: BlockDevice, target: BlockDevice, options: UndoOptions = {}): Promise<number> {
  if (journal.size === 0) return 0
  const r = new JournalReader(journal, `dmsnap: ${journal.name}`)
  const s = await scan(r)
  await checkUndo(r, s, target, () => items(r, s), options)
  // newest first: the bytes of an extension are put back, then the length saved before it is restored
  await visitNewestFirst(
    MAGIC.byteLength,
    s.entries,
    async (pos) => (await entryAt(r, pos, s.version))!.end,
    async (pos) => {
      const e = (await entryAt(r, pos, s.version))!
      if (e.kind === KIND_SIZE) {
        if (target.size !== e.offset) await target.truncate(e.offset)
      } else {
        await r.each(pos + ENTRY_HEAD, e.length, (piece, done) => target.write(e.offset + done, piece, 'journal'))
      }
    },
  )
  await target.flush()
  return s.entries
}

async function scan(r: JournalReader): Promise<Scan> {
  const head = await r.bytes(0, MAGIC.byteLength)
  const version = head && equalBytes(head, MAGIC) ? 2 : head && equalBytes(head, MAGIC_V1) ? 1 : 0
  if (version === 0) r.bad('it does not start with IMGTOOL-DMSUNDO2')
  const s: Scan = { version, entries: 0, seal: undefined }
  let pos = MAGIC.byteLength
  while (pos < r.size) {
    const e = await entryAt(r, pos, version)
    if (!e) {
      s.tornAt = pos
      break
    }
    if (e.kind === KIND_SEAL) {
      const seal = await parseSeal(r, pos + ENTRY_HEAD)
      if (!seal || seal.end !== e.end) {
        s.tornAt = pos
        break
      }
      if (e.end !== r.size) r.bad(`${r.size - e.end} bytes of garbage after its seal (at ${hex(e.end)})`)
      if (s.entries === 0) r.bad(`a seal at ${hex(pos)} with no entry before it`)
      s.seal = seal
      break
    }
    s.entries++
    pos = e.end
  }
  if (s.entries === 0) r.bad('no complete entry (the journal was not completely written, so the COW was not changed)')
  return s
}

/** The entry at `pos` with its lengths bounded by the journal's size, or undefined when it does not parse. */
async function entryAt(r: JournalReader, pos: number, version: number): Promise<Entry | undefined> {
  const h = await r.bytes(pos, ENTRY_HEAD)
  if (!h) return undefined
  const offset = u64le(h, 0)
  const length = u32le(h, 8)
  const kind = u32le(h, 12)
  const end = pos + ENTRY_HEAD + length
  if (offset > BigInt(Number.MAX_SAFE_INTEGER) || end > r.size) return undefined
  if (kind === KIND_BYTES && length === 0) return undefined
  if (kind === KIND_SIZE && length !== 0) return undefined
  if (kind === KIND_SEAL && (version < 2 || offset !== 0n)) return undefined
  if (kind > KIND_SEAL) return undefined
  return { kind, offset: Number(offset), length, end }
}

async function* items(r: JournalReader, s: Scan): AsyncGenerator<JournalItem> {
  let pos = MAGIC.byteLength
  for (let k = 0; k < s.entries; k++) {
    const e = (await entryAt(r, pos, s.version))!
    if (e.kind === KIND_SIZE) yield { type: 'size', size: e.offset }
    else yield { type: 'region', offset: e.offset, length: e.length, dataAt: pos + ENTRY_HEAD }
    pos = e.end
  }
}
