/**
 * What every undo journal (qcow2's, dm-snapshot's) shares: bounded, streamed
 * reading; the seal that ties a journal to the image it was written for and to
 * the state the repair left; the checks undo makes before it writes anything.
 *
 * The seal is written once the repair has finished (a journal without one
 * belongs to a repair that did not finish). Layout, little endian:
 *   "IMGTOOL-UNDOSEAL"                                  16
 *   u32 version (1), u32 identity length L              8
 *   u64 image size after the repair                     8
 *   u32 header length H, u32 0                          8
 *   u64 region count N                                  8
 *   SHA-256 of bytes [0, H) after the repair, the bytes
 *     of any region below H counted as zeros           32
 *   identity: L bytes of JSON {path, absolutePath, dev, ino}
 *   N × { u64 offset, u64 length, SHA-256 of the region's bytes after the repair }
 *   u32 CRC-32 of everything before it, "IMGTOOL-SEALEND!"
 * The N regions are the journal's regions, in journal order.
 */
import { createHash } from 'node:crypto'
import { crc32 as zlibCrc32 } from 'node:zlib'
import { CorruptImageError, UsageError, hex } from '../errors.js'
import type { BlockDevice } from '../io/block-device.js'
import { putU32le, putU64le, u32le, u64le } from '../util/bytes.js'

/** the most bytes undo holds of a journal or an image at once */
export const UNDO_CHUNK = 1 << 20
/** a header longer than this (qcow2's largest cluster) is not one a repair sealed */
const MAX_HEADER_BYTES = 2 << 20
const MAX_IDENTITY_BYTES = 64 << 10

const SEAL_MAGIC = new TextEncoder().encode('IMGTOOL-UNDOSEAL')
const SEAL_END = new TextEncoder().encode('IMGTOOL-SEALEND!')
const SEAL_HEAD = 80
const SEAL_ENTRY = 48
const SEAL_TAIL = 4 + SEAL_END.byteLength

/** Which image a journal was written for, as the caller (the CLI) knows it. */
export interface JournalIdentity {
  /** the image path as given to repair */
  path: string
  absolutePath?: string
  /** st_dev and st_ino, decimal */
  dev?: string
  ino?: string
}

export interface UndoOptions {
  /**
   * apply a journal that cannot be checked (format 1, no seal) or whose image is another file
   * (a copy, say); the content checks of a sealed journal are never skipped
   */
  force?: boolean
  /** apply a journal without a seal (a repair cut short by a crash or an error); a sealed one is still checked */
  allowUnsealed?: boolean
  /** the caller's check of the image's identity against the sealed one: a reason to refuse, or undefined */
  checkIdentity?: (sealed: JournalIdentity) => string | undefined
}

export interface UndoRegion {
  offset: number
  length: number
}

/** An item of a journal in journal order, for the checks: a saved region, or a size the image had. */
export type JournalItem = { type: 'region'; offset: number; length: number; dataAt: number } | { type: 'size'; size: number }

export function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && a.every((x, i) => x === b[i])
}

/** Reads a journal device within its size, small reads served from one window of UNDO_CHUNK bytes. */
export class JournalReader {
  private winAt = 0
  private win: Uint8Array = new Uint8Array(0)
  constructor(
    readonly dev: BlockDevice,
    /** "qcow2: path" — the start of every message */
    readonly label: string,
  ) {}

  get size(): number {
    return this.dev.size
  }

  bad(why: string): never {
    throw new CorruptImageError(`${this.label}: not a usable undo journal: ${why}`, { file: this.dev.name, structure: 'journal' })
  }

  /** `n` bytes at `pos` (n ≤ UNDO_CHUNK), or undefined when they run past the end of the journal */
  async bytes(pos: number, n: number): Promise<Uint8Array | undefined> {
    if (n > UNDO_CHUNK) throw new RangeError(`journal read of ${n} bytes`)
    if (pos < 0 || n < 0 || pos + n > this.size) return undefined
    if (pos < this.winAt || pos + n > this.winAt + this.win.byteLength) {
      this.winAt = pos
      this.win = await this.dev.read(pos, Math.min(UNDO_CHUNK, this.size - pos), 'journal')
    }
    return this.win.subarray(pos - this.winAt, pos - this.winAt + n)
  }

  /** [pos, pos+length) in pieces of at most UNDO_CHUNK bytes, each a fresh buffer (the caller may keep it) */
  async each(pos: number, length: number, fn: (piece: Uint8Array, done: number) => Promise<void> | void): Promise<void> {
    if (pos + length > this.size) this.bad(`${length} bytes at ${hex(pos)} run past its end (${hex(this.size)})`)
    for (let done = 0; done < length;) {
      const n = Math.min(UNDO_CHUNK, length - done)
      await fn(await this.dev.read(pos + done, n, 'journal'), done)
      done += n
    }
  }

  /** SHA-256 of [pos, pos+length) of the journal */
  async hash(pos: number, length: number): Promise<Uint8Array> {
    const h = createHash('sha256')
    await this.each(pos, length, (p) => void h.update(p))
    return new Uint8Array(h.digest())
  }
}

/** SHA-256 of [offset, offset+length) of `dev`, read in pieces (past the end: zeros) */
export async function hashRange(dev: BlockDevice, offset: number, length: number, mask?: Uint8Array): Promise<Uint8Array> {
  const h = createHash('sha256')
  for (let done = 0; done < length;) {
    const n = Math.min(UNDO_CHUNK, length - done)
    const piece = await dev.read(offset + done, n, 'journal')
    if (mask) for (let i = 0; i < n; i++) if (mask[done + i]) piece[i] = 0
    h.update(piece)
    done += n
  }
  return new Uint8Array(h.digest())
}

/** Bytes [0, headerBytes) covered by some region: they are counted as zeros in the header hash. */
function headerMask(headerBytes: number): { mask: Uint8Array; add: (offset: number, length: number) => void } {
  const mask = new Uint8Array(headerBytes)
  return {
    mask,
    add(offset, length) {
      if (offset < headerBytes) mask.fill(1, offset, Math.min(headerBytes, offset + length))
    },
  }
}

/** The seal for a journal whose regions are `regions` (in journal order), from `image` as the repair left it. */
export async function encodeSeal(
  image: BlockDevice,
  regions: readonly UndoRegion[],
  headerBytes: number,
  identity: JournalIdentity | undefined,
): Promise<Uint8Array> {
  const id = new TextEncoder().encode(JSON.stringify(identity ?? {}))
  const h = Math.min(headerBytes, MAX_HEADER_BYTES)
  const m = headerMask(h)
  for (const r of regions) m.add(r.offset, r.length)
  const buf = new Uint8Array(SEAL_HEAD + id.byteLength + SEAL_ENTRY * regions.length + SEAL_TAIL)
  buf.set(SEAL_MAGIC, 0)
  putU32le(buf, 16, 1)
  putU32le(buf, 20, id.byteLength)
  putU64le(buf, 24, image.size)
  putU32le(buf, 32, h)
  putU64le(buf, 40, regions.length)
  buf.set(await hashRange(image, 0, h, m.mask), 48)
  buf.set(id, SEAL_HEAD)
  let pos = SEAL_HEAD + id.byteLength
  for (const r of regions) {
    putU64le(buf, pos, r.offset)
    putU64le(buf, pos + 8, r.length)
    buf.set(await hashRange(image, r.offset, r.length), pos + 16)
    pos += SEAL_ENTRY
  }
  putU32le(buf, pos, crc32(buf.subarray(0, pos)))
  buf.set(SEAL_END, pos + 4)
  return buf
}

export interface Seal {
  /** where the seal starts and ends in the journal */
  pos: number
  end: number
  identity: JournalIdentity
  size: number
  headerBytes: number
  headerHash: Uint8Array
  count: number
  entriesAt: number
}

export function isSealAt(head: Uint8Array | undefined): boolean {
  return head !== undefined && equalBytes(head.subarray(0, SEAL_MAGIC.byteLength), SEAL_MAGIC)
}

/** The seal at `pos`, checked (bounds, CRC, end mark), or undefined when it is incomplete or not one. */
export async function parseSeal(r: JournalReader, pos: number): Promise<Seal | undefined> {
  const head = await r.bytes(pos, SEAL_HEAD)
  if (!head || !isSealAt(head) || u32le(head, 16) !== 1) return undefined
  const idLen = u32le(head, 20)
  const size = u64le(head, 24)
  const headerBytes = u32le(head, 32)
  const count = u64le(head, 40)
  const room = r.size - pos - SEAL_HEAD - SEAL_TAIL
  if (idLen > MAX_IDENTITY_BYTES || idLen > room || size > BigInt(Number.MAX_SAFE_INTEGER) || headerBytes > MAX_HEADER_BYTES) return undefined
  if (count > BigInt(Math.floor((room - idLen) / SEAL_ENTRY))) return undefined
  const n = Number(count)
  const entriesAt = pos + SEAL_HEAD + idLen
  const end = entriesAt + n * SEAL_ENTRY + SEAL_TAIL
  let crc = 0
  const body = end - SEAL_TAIL - pos
  for (let done = 0; done < body;) {
    const k = Math.min(UNDO_CHUNK, body - done)
    crc = crc32((await r.bytes(pos + done, k))!, crc)
    done += k
  }
  const tail = await r.bytes(end - SEAL_TAIL, SEAL_TAIL)
  if (!tail || u32le(tail, 0) !== crc || !equalBytes(tail.subarray(4), SEAL_END)) return undefined
  let identity: JournalIdentity
  try {
    const parsed = JSON.parse(new TextDecoder().decode((await r.bytes(pos + SEAL_HEAD, idLen))!)) as Record<string, unknown>
    identity = { path: typeof parsed['path'] === 'string' ? parsed['path'] : '' }
    for (const k of ['absolutePath', 'dev', 'ino'] as const) if (typeof parsed[k] === 'string') identity[k] = parsed[k]
  } catch {
    return undefined
  }
  return { pos, end, identity, size: Number(size), headerBytes, headerHash: head.slice(48, 80), count: n, entriesAt }
}

/**
 * The checks undo makes before writing: a journal of format 1 or without a seal
 * cannot be checked (refused unless forced); a sealed one is refused when the
 * image is not the one sealed (the caller's identity check) or has changed since
 * the repair: its size, its header outside the repaired regions, or a repaired
 * region that holds neither what the repair left nor (an undo cut short) what
 * the journal saved. Throws a UsageError naming the first difference.
 */
export async function checkUndo(
  r: JournalReader,
  j: { version: number; seal: Seal | undefined; tornAt?: number },
  image: BlockDevice,
  items: () => AsyncIterable<JournalItem>,
  options: UndoOptions,
): Promise<void> {
  const refuse = (why: string): never => {
    throw new UsageError(`${r.label}: undo refused: ${why}`, { file: r.dev.name, structure: 'journal' })
  }
  const forceHint = '; --force applies it anyway'
  if (j.version === 1 && options.force) return
  if (j.version === 1)
    refuse(
      `written by an older imgtool (journal format 1), it records neither its image nor the state the repair left, so ${image.name} cannot be checked against it${forceHint}`,
    )
  if (!j.seal && (options.allowUnsealed || options.force)) return
  if (!j.seal) {
    const torn = j.tornAt !== undefined ? ` (incomplete from ${hex(j.tornAt)})` : ''
    return refuse(`the journal has no seal${torn}: the repair that wrote it did not finish, so ${image.name} cannot be checked against it${forceHint}`)
  }
  const seal = j.seal
  const id = options.force ? undefined : options.checkIdentity?.(seal.identity)
  if (id) refuse(id + forceHint)
  // from here on nothing is forced: a sealed journal never goes onto bytes that are not what its repair left

  const sealed = new JournalReader(r.dev, r.label) // its own window: the seal's entries are read in step with the journal's regions
  let sizeOk = image.size === seal.size
  const m = headerMask(seal.headerBytes)
  let index = 0
  let regionProblem: string | undefined
  for await (const it of items()) {
    if (it.type === 'size') {
      if (image.size === it.size) sizeOk = true
      continue
    }
    if (index >= seal.count) r.bad(`its seal lists ${seal.count} regions, the journal has more`)
    const e = (await sealed.bytes(seal.entriesAt + index * SEAL_ENTRY, SEAL_ENTRY))!
    index++
    if (u64le(e, 0) !== BigInt(it.offset) || u64le(e, 8) !== BigInt(it.length))
      r.bad(`its seal does not list region ${index - 1} (${it.length} bytes at ${hex(it.offset)}) as the journal has it`)
    m.add(it.offset, it.length)
    if (regionProblem) continue
    const now = await hashRange(image, it.offset, it.length)
    if (equalBytes(now, e.subarray(16, 48))) continue
    if (equalBytes(now, await r.hash(it.dataAt, it.length))) continue // already put back by an undo cut short
    regionProblem = `the ${it.length} bytes at ${hex(it.offset)} of ${image.name} are not what the repair left there: the image changed since the repair, or it is another image`
  }
  if (index !== seal.count) r.bad(`its seal lists ${seal.count} regions, the journal has ${index}`)
  if (!sizeOk) refuse(`${image.name} is ${image.size} bytes, the repair left it ${seal.size}: the image changed since the repair, or it is another image`)
  if (!equalBytes(await hashRange(image, 0, seal.headerBytes, m.mask), seal.headerHash)) {
    refuse(
      `the header (bytes 0..${hex(Math.max(0, seal.headerBytes - 1))}) of ${image.name} is not what the repair left: the image changed since the repair, or it is another image`,
    )
  }
  if (regionProblem) refuse(regionProblem)
}

/**
 * Visit `count` items of a forward-linked sequence (first at `first`, `next`
 * gives the one after) newest first, holding O(count/K + K) positions.
 */
export async function visitNewestFirst(
  first: number,
  count: number,
  next: (pos: number) => Promise<number>,
  visit: (pos: number) => Promise<void>,
): Promise<void> {
  const K = 1024
  const checkpoints: number[] = []
  let pos = first
  for (let i = 0; i < count; i++) {
    if (i % K === 0) checkpoints.push(pos)
    if (i + 1 < count) pos = await next(pos)
  }
  for (let c = checkpoints.length - 1; c >= 0; c--) {
    const group: number[] = []
    let p = checkpoints[c]!
    const n = Math.min(K, count - c * K)
    for (let i = 0; i < n; i++) {
      group.push(p)
      if (i + 1 < n) p = await next(p)
    }
    for (let i = group.length - 1; i >= 0; i--) await visit(group[i]!)
  }
}

/** CRC-32 (IEEE, zlib's); pass the CRC of what came before to continue it */
export function crc32(data: Uint8Array, prev = 0): number {
  return zlibCrc32(data, prev) >>> 0
}
