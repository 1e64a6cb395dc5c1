/**
 * Undo journal for repair: before any byte of the COW is overwritten, its old
 * content is appended to the journal device and flushed. `applyUndoJournal`
 * puts the COW back as it was, newest entry first.
 *
 * A COW that repair extended (truncated-cow) keeps its new length after an undo.
 *
 * Layout: 16-byte magic "IMGTOOL-DMSUNDO1", then entries
 * { u64 LE offset, u32 LE length, u32 LE 0, bytes }.
 */
import { CorruptImageError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { putU32le, putU64le, u32le, u64le, toSafeNumber } from '../../util/bytes.js'

const MAGIC = new TextEncoder().encode('IMGTOOL-DMSUNDO1')

export class UndoJournal {
  private pos = 0
  constructor(readonly dev: BlockDevice) {}

  /** Nothing is written until the first save: a repair with nothing to do leaves an empty journal. */
  async start(): Promise<void> {}

  /** Save what is at [offset, offset+length) on `target` before it changes. */
  async save(target: BlockDevice, offset: number, length: number): Promise<void> {
    if (this.pos === 0) {
      await this.dev.write(0, MAGIC, 'journal')
      this.pos = MAGIC.byteLength
    }
    const old = await target.read(offset, length, 'journal')
    const e = new Uint8Array(16 + length)
    putU64le(e, 0, offset)
    putU32le(e, 8, length)
    e.set(old, 16)
    await this.dev.write(this.pos, e, 'journal')
    this.pos += e.byteLength
    await this.dev.flush()
  }
}

export async function applyUndoJournal(journal: BlockDevice, target: BlockDevice): Promise<number> {
  const head = await journal.read(0, MAGIC.byteLength, 'journal')
  if (!head.every((b, i) => b === MAGIC[i])) throw new CorruptImageError(`dmsnap: ${journal.name} is not a dmsnap undo journal`, { file: journal.name })
  const entries: { offset: number; data: Uint8Array }[] = []
  let pos = MAGIC.byteLength
  while (pos + 16 <= journal.size) {
    const h = await journal.read(pos, 16, 'journal')
    const length = u32le(h, 8)
    if (pos + 16 + length > journal.size) break // a torn last entry: its write never happened
    entries.push({ offset: toSafeNumber(u64le(h, 0), 'journal offset'), data: await journal.read(pos + 16, length, 'journal') })
    pos += 16 + length
  }
  for (const e of entries.reverse()) await target.write(e.offset, e.data, 'journal')
  await target.flush()
  return entries.length
}
