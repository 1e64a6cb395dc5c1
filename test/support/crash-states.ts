/**
 * The crash-state engine behind CrashGroup and CrashDevice (a crash device is a
 * one-member group): given the durable image of every member and the events
 * pending at a crash point, it enumerates the images a power cut could leave.
 *
 *   prefixes  always: the first k pending events, k = 0..n, in log order (a
 *             disk that keeps order);
 *   torn      option: prefix k-1 plus the k-th write cut at a sector boundary
 *             (absolute offsets multiple of `sectorSize`, default 512): only the
 *             sectors before the cut landed (and, with `tornTail`, also: only
 *             the sectors after it). At most `maxTornPerWrite` (default 8)
 *             evenly spread cuts per write;
 *   subsets   option: any subset that is not a prefix (reordering in a write
 *             cache). All of them when n <= exhaustiveLimit (default 10);
 *             otherwise every "all but one" plus `randomSubsets` (default 32)
 *             random ones from a seeded PRNG.
 *
 * Order: prefix 0, then for k = 1..n the torn versions of the k-th event and
 * prefix k, then the subsets. The crash sweeps depend on this set not
 * shrinking; test/unit/support/crash-enumeration.test.ts pins it.
 */
import type { IoTag } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { hex } from '../../src/errors.js'
import { Prng } from './prng.js'

export interface CrashWriteEvent {
  seq: number
  kind: 'write'
  offset: number
  data: Uint8Array
  tag: IoTag | undefined
}
export interface CrashTruncateEvent {
  seq: number
  kind: 'truncate'
  size: number
}
export interface CrashFlushEvent {
  seq: number
  kind: 'flush'
}
export type CrashEvent = CrashWriteEvent | CrashTruncateEvent | CrashFlushEvent
/** A write or truncate not yet made durable by a flush. */
export type PendingEvent = CrashWriteEvent | CrashTruncateEvent

/** An event of a group's log: `member` is the file it happened on (in `add` order). */
export type GroupEvent = CrashEvent & { member: number }
export type GroupPendingEvent = PendingEvent & { member: number }

export interface CrashStateOptions {
  /** Also yield subsets of the pending events (default false). */
  subsets?: boolean
  /** Also yield torn versions of each prefix's last write (default false). */
  torn?: boolean
  /** Enumerate all subsets up to this many pending events (default 10; at most 20 is honoured). */
  exhaustiveLimit?: number
  /** Above exhaustiveLimit: how many random subsets to add (default 32). */
  randomSubsets?: number
  /** PRNG seed for random subsets (default 1). */
  seed?: number
  /** Torn-write granularity in bytes (default 512). */
  sectorSize?: number
  /** Most cuts per torn write (default 8); first and last cut always included. */
  maxTornPerWrite?: number
  /** Torn: also yield the image where only the part after the cut landed (default false). */
  tornTail?: boolean
}

/** A growable byte image (synchronous), with MemoryDevice semantics. */
export class Image {
  buf: Uint8Array
  len: number
  constructor(buf: Uint8Array, len = buf.byteLength) {
    this.buf = buf
    this.len = len
  }
  clone(): Image {
    return new Image(this.buf.slice(0, this.len))
  }
  write(offset: number, data: Uint8Array): void {
    const end = offset + data.byteLength
    this.ensure(end)
    this.buf.set(data, offset)
    if (end > this.len) this.len = end
  }
  truncate(size: number): void {
    if (size < this.len) this.buf.fill(0, size, this.len)
    this.ensure(size)
    this.len = size
  }
  apply(e: PendingEvent): void {
    if (e.kind === 'write') this.write(e.offset, e.data)
    else this.truncate(e.size)
  }
  /** What a read sees: a copy, zeros past the end. */
  read(offset: number, length: number): Uint8Array {
    const out = new Uint8Array(length)
    if (offset < this.len) out.set(this.buf.subarray(offset, Math.min(this.len, offset + length)))
    return out
  }
  /** read() into the caller's buffer. */
  readInto(offset: number, buf: Uint8Array): void {
    const n = offset < this.len ? Math.min(this.len - offset, buf.byteLength) : 0
    if (n > 0) buf.set(this.buf.subarray(offset, offset + n))
    if (n < buf.byteLength) buf.fill(0, n)
  }
  bytes(): Uint8Array {
    return this.buf.slice(0, this.len)
  }
  toDevice(name: string): MemoryDevice {
    return new MemoryDevice(this.buf.subarray(0, this.len), { name }) // MemoryDevice copies
  }
  private ensure(n: number): void {
    if (n <= this.buf.byteLength) return
    const next = new Uint8Array(Math.max(n, this.buf.byteLength * 2))
    next.set(this.buf.subarray(0, this.len))
    this.buf = next
  }
}

/** How a front end words its states: CrashDevice and CrashGroup name events differently. */
export interface CrashVoice {
  describe(e: GroupEvent): string
  /** the "what" of prefix 0 when something is pending */
  prefixZero(n: number): string
}

/** What CrashDevice's and CrashGroup's states say about themselves. */
export interface CrashStateInfo {
  /** For failure messages: point, flushes, which pending events landed, how. */
  description: string
  kind: 'prefix' | 'subset' | 'torn'
  /** The crash point: number of events (writes, truncates, flushes; of all members) issued before the cut. */
  point: number
  /** Flushes (of any member) completed before the crash. */
  flushes: number
  /** seqs of the pending events that were applied in full. */
  applied: number[]
  /** seqs of all events that were pending at the crash point. */
  pending: number[]
}

/** The write that was cut and the absolute byte range of it that landed. */
export type TornRange = { seq: number; from: number; to: number }

/** One crash image of every member, before the front end wraps it in devices. */
export interface RawCrashState extends CrashStateInfo {
  /** the image of each member (yours: not shared with other states) */
  images: Image[]
  torn?: TornRange
  /** 0-based number of this state among those made for its point (skipped ones not counted) */
  index: number
}

/** A crash point and what is durable and pending at it. */
export interface CrashCut {
  point: number
  flushes: number
  durable: Image[]
  pending: GroupPendingEvent[]
}

/**
 * Walks `log` up to `until` (exclusive) and yields a cut at every flush (of
 * any member; the point just before it) and at `until`. A flush makes durable
 * its own member's pending events. The cut's `durable` images are live: use
 * them before resuming the walk.
 */
export function* crashCuts(log: readonly GroupEvent[], bases: readonly Uint8Array[], until = log.length): Generator<CrashCut> {
  const durable = bases.map((b) => new Image(b.slice()))
  let pending: GroupPendingEvent[] = []
  let flushes = 0
  for (let i = 0; i <= until; i++) {
    const e = i === until ? undefined : log[i]!
    if (e === undefined || e.kind === 'flush') {
      yield { point: i, flushes, durable, pending }
      if (e === undefined) return
      for (const p of pending) if (p.member === e.member) durable[e.member]!.apply(p)
      pending = pending.filter((p) => p.member !== e.member)
      flushes++
    } else {
      pending.push(e)
    }
  }
}

const cloneAll = (images: Image[]): Image[] => images.map((b) => b.clone())

/**
 * Every crash image at one cut, in the engine's order. `skipEmpty` leaves out
 * prefix 0 (nothing pending landed; CrashDevice skips it after the first
 * epoch: the same bytes as the previous epoch's last prefix).
 */
export function* crashImages(cut: CrashCut, o: CrashStateOptions, voice: CrashVoice, skipEmpty = false): Generator<RawCrashState> {
  const { point, flushes, durable, pending } = cut
  const n = pending.length
  const seqs = pending.map((e) => e.seq)
  const head = `crash at point ${point} (${flushes} flush${flushes === 1 ? '' : 'es'} done, ${n} pending event${n === 1 ? '' : 's'}`
  const ctx = `${head}${n === 0 ? '' : `: ${pending.map((e) => voice.describe(e)).join(', ')}`})`
  let index = 0
  const make = (images: Image[], kind: RawCrashState['kind'], applied: number[], what: string, torn?: TornRange): RawCrashState => {
    const state: RawCrashState = { images, kind, point, flushes, applied, pending: seqs, description: `${ctx}; ${what}`, index: index++ }
    if (torn) state.torn = torn
    return state
  }

  // prefixes, with torn variants of each prefix's last write
  const sector = o.sectorSize ?? 512
  const maxTorn = o.maxTornPerWrite ?? 8
  const running = cloneAll(durable)
  if (!skipEmpty) yield make(cloneAll(running), 'prefix', [], n === 0 ? 'durable state' : voice.prefixZero(n))
  for (let k = 1; k <= n; k++) {
    const e = pending[k - 1]!
    if (o.torn && e.kind === 'write') {
      const end = e.offset + e.data.byteLength
      const before = seqs.slice(0, k - 1)
      const what = `prefix ${k - 1}/${n} + ${voice.describe(e)} torn`
      for (const cut of tornCuts(e.offset, e.data.byteLength, sector, maxTorn)) {
        const rel = cut - e.offset
        const head = cloneAll(running)
        head[e.member]!.write(e.offset, e.data.subarray(0, rel))
        yield make(head, 'torn', before, `${what}: ${hex(e.offset)}..${hex(cut)} landed`, { seq: e.seq, from: e.offset, to: cut })
        if (o.tornTail) {
          const tail = cloneAll(running)
          tail[e.member]!.write(cut, e.data.subarray(rel))
          yield make(tail, 'torn', before, `${what}: ${hex(cut)}..${hex(end)} landed`, { seq: e.seq, from: cut, to: end })
        }
      }
    }
    running[e.member]!.apply(e)
    yield make(cloneAll(running), 'prefix', seqs.slice(0, k), `prefix ${k}/${n} (up to ${voice.describe(e)})`)
  }

  // subsets that are not prefixes
  if (o.subsets && n >= 2) {
    for (const mask of subsetMasks(n, o)) {
      const images = cloneAll(durable)
      const applied: number[] = []
      pending.forEach((e, i) => {
        if (!mask[i]) return
        images[e.member]!.apply(e)
        applied.push(e.seq)
      })
      yield make(images, 'subset', applied, `subset: ${applied.length === 0 ? 'none' : applied.map((s) => `#${s}`).join(',')} landed`)
    }
  }
}

/** Absolute cut offsets strictly inside [offset, offset+length) at multiples of `sector`, at most `max` (evenly spread). */
export function tornCuts(offset: number, length: number, sector: number, max: number): number[] {
  const end = offset + length
  const first = Math.floor(offset / sector) * sector + sector
  const all: number[] = []
  for (let c = first; c < end; c += sector) all.push(c)
  if (all.length <= max) return all
  if (max <= 0) return []
  if (max === 1) return [all[0]!]
  const out: number[] = []
  for (let i = 0; i < max; i++) {
    const c = all[Math.round((i * (all.length - 1)) / (max - 1))]!
    if (out[out.length - 1] !== c) out.push(c)
  }
  return out
}

function isPrefix(mask: boolean[]): boolean {
  let k = 0
  while (k < mask.length && mask[k]) k++
  for (let i = k; i < mask.length; i++) if (mask[i]) return false
  return true
}

/** Non-prefix subsets of n events, as inclusion masks (bounded, deterministic). */
function* subsetMasks(n: number, o: CrashStateOptions): Generator<boolean[]> {
  const limit = Math.min(o.exhaustiveLimit ?? 10, 20)
  if (n <= limit) {
    for (let m = 0; m < 2 ** n; m++) {
      const mask = Array.from({ length: n }, (_, i) => ((m >>> i) & 1) === 1)
      if (!isPrefix(mask)) yield mask
    }
    return
  }
  const seen = new Set<string>()
  const key = (mask: boolean[]): string => mask.map((b) => (b ? '1' : '0')).join('')
  // all but one (all but the last is a prefix)
  for (let skip = 0; skip < n - 1; skip++) {
    const mask = Array.from({ length: n }, (_, i) => i !== skip)
    seen.add(key(mask))
    yield mask
  }
  const want = o.randomSubsets ?? 32
  const rng = new Prng((o.seed ?? 1) ^ Math.imul(n, 0x9e3779b1))
  let made = 0
  for (let attempts = 0; made < want && attempts < want * 20; attempts++) {
    const mask = Array.from({ length: n }, () => rng.chance(0.5))
    const k = key(mask)
    if (isPrefix(mask) || seen.has(k)) continue
    seen.add(k)
    made++
    yield mask
  }
}
