/**
 * Undo journal for repair: before any byte of the COW is overwritten, its old
 * content is appended to the journal device and flushed. `applyUndoJournal`
 * puts the COW back as it was, newest entry first.
 *
 * Before repair changes the COW's length (extending a truncated COW) the old
 * length is saved too, so an undo is exact: same bytes, same size.
 *
 * Layout: 16-byte magic "IMGTOOL-DMSUNDO1", then entries
 * { u64 LE offset, u32 LE length, u32 LE kind, bytes }:
 *   kind 0: `length` old bytes that were at `offset`;
 *   kind 1: the COW was `offset` bytes long (length 0, no bytes).
 */
import { CorruptImageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { putU32le, putU64le, u32le, u64le, toSafeNumber } from '../../util/bytes.js'

const MAGIC = new TextEncoder().encode('IMGTOOL-DMSUNDO1')
const KIND_BYTES = 0
const KIND_SIZE = 1

export class UndoJournal {
  private pos = 0
  constructor(readonly dev: BlockDevice) {}

  /** Nothing is written until the first save: a repair with nothing to do leaves an empty journal. */
  async start(): Promise<void> {}

  /** Save what is at [offset, offset+length) on `target` before it changes. */
  async save(target: BlockDevice, offset: number, length: number): Promise<void> {
    const e = new Uint8Array(16 + length)
    putU64le(e, 0, offset)
    putU32le(e, 8, length)
    putU32le(e, 12, KIND_BYTES)
    e.set(await target.read(offset, length, 'journal'), 16)
    await this.append(e)
  }

  /** Save `target`'s length before it changes (undo truncates back to it). */
  async saveSize(target: BlockDevice): Promise<void> {
    const e = new Uint8Array(16)
    putU64le(e, 0, target.size)
    putU32le(e, 12, KIND_SIZE)
    await this.append(e)
  }

  private async append(e: Uint8Array): Promise<void> {
    if (this.pos === 0) {
      await this.dev.write(0, MAGIC, 'journal')
      this.pos = MAGIC.byteLength
    }
    await this.dev.write(this.pos, e, 'journal')
    this.pos += e.byteLength
    await this.dev.flush() // durable before the overwrite it protects
  }
}

/** Put `target` back as it was before the repair that wrote `journal`; returns the entries applied. An empty journal (nothing was changed) applies nothing. */
export async function applyUndoJournal(journal: BlockDevice, target: BlockDevice): Promise<number> {
  if (journal.size === 0) return 0
  const head = await journal.read(0, MAGIC.byteLength, 'journal')
  if (!head.every((b, i) => b === MAGIC[i])) throw new CorruptImageError(`dmsnap: ${journal.name} is not a dmsnap undo journal`, { file: journal.name })
  const entries: { kind: number; offset: number; data: Uint8Array }[] = []
  let pos = MAGIC.byteLength
  while (pos + 16 <= journal.size) {
    const h = await journal.read(pos, 16, 'journal')
    const length = u32le(h, 8)
    const kind = u32le(h, 12)
    if (pos + 16 + length > journal.size) break // a torn last entry: its write never happened
    if (kind !== KIND_BYTES && kind !== KIND_SIZE) throw new CorruptImageError(`dmsnap: ${journal.name}: undo journal entry at ${pos} has unknown kind ${kind}`, { file: journal.name })
    entries.push({ kind, offset: toSafeNumber(u64le(h, 0), 'journal offset'), data: await journal.read(pos + 16, length, 'journal') })
    pos += 16 + length
  }
  // newest first: the bytes of an extension are put back, then the length saved before it is restored
  for (const e of entries.reverse()) {
    if (e.kind === KIND_SIZE) {
      if (target.size !== e.offset) await target.truncate(e.offset)
    } else {
      await target.write(e.offset, e.data, 'journal')
    }
  }
  await target.flush()
  return entries.length
}
