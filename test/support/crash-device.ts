/**
 * CrashDevice: an in-memory BlockDevice that remembers what is durable, so a test
 * can materialise the disk as it could be after a power cut at any point.
 *
 * Model
 * - The device starts from a base image; the base is durable.
 * - Every write, truncate and flush is logged as an event; event `seq` is its
 *   index in `events` (0-based). Reads are not logged (they change nothing).
 *   Zero-length writes are ignored.
 * - Reads see everything written so far (durable + pending), like a page cache.
 * - `flush()` makes every earlier write and truncate durable.
 * - Writes and truncates since the last flush are *pending*. A truncate is treated
 *   like a write: durable only after a flush, and in a crash image it may or may
 *   not have happened, independently of the writes around it.
 * - A crash image is: the durable state, plus some of the pending events applied
 *   in log order (a later write over an earlier one wins if both are applied):
 *     prefixes  always: the first k pending events, k = 0..n (what a disk that
 *               keeps order would leave);
 *     subsets   option: any subset (reordering in a write cache). All 2^n when
 *               n <= exhaustiveLimit (default 10); otherwise every "all but one"
 *               plus `randomSubsets` (default 32) random ones from a seeded PRNG;
 *     torn      option: prefix k-1 plus the k-th write cut at a sector boundary
 *               (absolute offsets multiple of `sectorSize`, default 512): only the
 *               sectors before the cut landed (and, with `tornTail`, also: only the
 *               sectors after it). At most `maxTornPerWrite` (default 8) evenly
 *               spread cuts per write.
 *
 * Crash points: point p (0..events.length) is a power cut after the first p events
 * were issued. `statesAt(p)` yields every crash image for it. Images for earlier
 * points in the same flush epoch are included in those of the epoch's last point
 * (prefixes/subsets of a prefix), so `allCrashStates()` — every image of a whole
 * workload — only expands each epoch's last point, and skips each later epoch's
 * "nothing pending applied" image (the same bytes as the previous epoch's "all").
 *
 * Usage (see also sweepCrashes):
 *   const dev = new CrashDevice(baseImageBytes)
 *   await workload(dev)
 *   for (const s of dev.allCrashStates({ subsets: true, torn: true })) {
 *     const report = await check(s.device)        // fresh MemoryDevice per state
 *     expect(report.corruptions, s.description).toEqual([])
 *   }
 *
 * `flushes` in a CrashState counts the flushes that completed before the crash:
 * a test can note `dev.flushCount` after each of its own durability points and
 * then know what must read back in each state.
 *
 * Memory: every written buffer is copied into the log (tests use small images);
 * each state is a full copy of the image, built lazily as the iterator advances.
 */
import type { BlockDevice, IoTag } from '../../src/io/block-device.js'
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

export interface CrashState {
  /** A fresh device holding this crash image (yours to modify). */
  device: MemoryDevice
  /** For failure messages: point, flushes, which pending events landed, how. */
  description: string
  kind: 'prefix' | 'subset' | 'torn'
  /** The crash point: number of events (writes, truncates, flushes) issued before the cut. */
  point: number
  /** Flushes completed before the crash: everything up to flush #flushes is in the image. */
  flushes: number
  /** seqs of the pending events that were applied in full. */
  applied: number[]
  /** seqs of all events that were pending at the crash point. */
  pending: number[]
  /** For torn states: the write that was cut and the absolute byte range of it that landed. */
  torn?: { seq: number; from: number; to: number }
}

/** A growable byte image (synchronous), with MemoryDevice semantics (crash-group.ts uses it too). */
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

export function describeEvent(e: CrashEvent): string {
  switch (e.kind) {
    case 'write':
      return `#${e.seq} write${e.tag === undefined ? '' : ` ${e.tag}`} ${hex(e.offset)}+${hex(e.data.byteLength)}`
    case 'truncate':
      return `#${e.seq} truncate to ${hex(e.size)}`
    case 'flush':
      return `#${e.seq} flush`
  }
}

export class CrashDevice implements BlockDevice {
  readonly readOnly = false
  readonly name: string
  private readonly base: Uint8Array
  private readonly log: CrashEvent[] = []
  private current: Image
  private durable: Image
  private lastFlush = -1 // index in log of the last flush
  private flushes = 0
  private closed = false

  constructor(base: Uint8Array | MemoryDevice | number = 0, options: { name?: string } = {}) {
    this.base = typeof base === 'number' ? new Uint8Array(base) : base instanceof MemoryDevice ? base.snapshot() : base.slice()
    this.name = options.name ?? 'crash'
    this.current = new Image(this.base.slice())
    this.durable = new Image(this.base.slice())
  }

  get size(): number {
    return this.current.len
  }

  /** Every logged event, in order (event.seq === index). */
  get events(): readonly CrashEvent[] {
    return this.log
  }

  /** Flushes completed so far. */
  get flushCount(): number {
    return this.flushes
  }

  async read(offset: number, length: number, _tag?: IoTag): Promise<Uint8Array> {
    this.assertOpen()
    const out = new Uint8Array(length)
    const c = this.current
    if (offset < c.len) out.set(c.buf.subarray(offset, Math.min(c.len, offset + length)))
    return out
  }

  /** read() into the caller's buffer: a copy of what a reader sees now, zeros past the end */
  async readInto(offset: number, buf: Uint8Array, _tag?: IoTag): Promise<void> {
    this.assertOpen()
    const c = this.current
    const n = offset < c.len ? Math.min(c.len - offset, buf.byteLength) : 0
    if (n > 0) buf.set(c.buf.subarray(offset, offset + n))
    if (n < buf.byteLength) buf.fill(0, n)
  }

  async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    this.assertOpen()
    if (data.byteLength === 0) return
    const copy = data.slice()
    this.log.push({ seq: this.log.length, kind: 'write', offset, data: copy, tag })
    this.current.write(offset, copy)
  }

  async truncate(size: number): Promise<void> {
    this.assertOpen()
    this.log.push({ seq: this.log.length, kind: 'truncate', size })
    this.current.truncate(size)
  }

  /**
   * posix_fallocate: the file grows to offset+length (zeros), logged as a
   * truncate that extends it, so a crash before the next flush may lose it.
   */
  async allocate(offset: number, length: number): Promise<void> {
    this.assertOpen()
    if (offset + length > this.current.len) await this.truncate(offset + length)
  }

  async flush(): Promise<void> {
    this.assertOpen()
    for (const e of this.pendingWrites()) this.durable.apply(e)
    this.log.push({ seq: this.log.length, kind: 'flush' })
    this.lastFlush = this.log.length - 1
    this.flushes++
  }

  async close(): Promise<void> {
    this.closed = true
  }

  /** Writes and truncates since the last flush, in order. */
  pendingWrites(): PendingEvent[] {
    return this.pendingIn(this.lastFlush, this.log.length)
  }

  /** The durable bytes (what survives any crash now). */
  durableSnapshot(): Uint8Array {
    return this.durable.bytes()
  }

  /** The bytes a reader sees now (durable + all pending). */
  snapshot(): Uint8Array {
    return this.current.bytes()
  }

  /** A device holding the durable state plus the first k pending events (0 <= k <= pending). */
  crashAt(k: number): MemoryDevice {
    const pending = this.pendingWrites()
    if (!Number.isInteger(k) || k < 0 || k > pending.length) {
      throw new Error(`CrashDevice.crashAt: k must be 0..${pending.length}, got ${k}`)
    }
    const img = this.durable.clone()
    for (let i = 0; i < k; i++) img.apply(pending[i]!)
    return img.toDevice(`${this.name}@crashAt(${k})`)
  }

  /** Every crash image if the power were cut now. */
  crashStates(options: CrashStateOptions = {}): Generator<CrashState> {
    return this.statesAt(this.log.length, options)
  }

  /** Every crash image for a power cut after the first `point` events (0..events.length). */
  *statesAt(point: number, options: CrashStateOptions = {}): Generator<CrashState> {
    if (!Number.isInteger(point) || point < 0 || point > this.log.length) {
      throw new Error(`CrashDevice.statesAt: point must be 0..${this.log.length}, got ${point}`)
    }
    let f = -1
    let flushes = 0
    for (let i = 0; i < point; i++) {
      if (this.log[i]!.kind === 'flush') {
        f = i
        flushes++
      }
    }
    const durable = f === this.lastFlush ? this.durable : this.replay(f)
    yield* this.generate(durable, this.pendingIn(f, point), point, flushes, false, options)
  }

  /**
   * Every distinct crash image over the whole log: for each flush epoch, the
   * states of its last point (just before the flush that ends it, or now).
   */
  *allCrashStates(options: CrashStateOptions = {}): Generator<CrashState> {
    const durable = new Image(this.base.slice())
    let start = -1 // index of the flush opening this epoch
    let flushes = 0
    for (;;) {
      let end = start + 1
      while (end < this.log.length && this.log[end]!.kind !== 'flush') end++
      const pending = this.pendingIn(start, end)
      yield* this.generate(durable, pending, end, flushes, flushes > 0, options)
      if (end >= this.log.length) return
      for (const e of pending) durable.apply(e)
      start = end
      flushes++
    }
  }

  /** The crash points whose states allCrashStates expands (the last point of each epoch). */
  epochEnds(): number[] {
    const out: number[] = []
    this.log.forEach((e, i) => {
      if (e.kind === 'flush') out.push(i)
    })
    out.push(this.log.length)
    return out
  }

  private pendingIn(flushIndex: number, point: number): PendingEvent[] {
    const out: PendingEvent[] = []
    for (let i = flushIndex + 1; i < point; i++) {
      const e = this.log[i]!
      if (e.kind !== 'flush') out.push(e)
    }
    return out
  }

  /** Base plus every write/truncate before log index `flushIndex`. */
  private replay(flushIndex: number): Image {
    const img = new Image(this.base.slice())
    for (let i = 0; i < flushIndex; i++) {
      const e = this.log[i]!
      if (e.kind !== 'flush') img.apply(e)
    }
    return img
  }

  private *generate(durable: Image, pending: PendingEvent[], point: number, flushes: number, skipEmpty: boolean, o: CrashStateOptions): Generator<CrashState> {
    const n = pending.length
    const seqs = pending.map((e) => e.seq)
    const head = `crash at point ${point} (${flushes} flush${flushes === 1 ? '' : 'es'} done, ${n} pending event${n === 1 ? '' : 's'}`
    const pendingText = n === 0 ? '' : `: ${pending.map(describeEvent).join(', ')}`
    const ctx = `${head}${pendingText})`
    let counter = 0
    const make = (img: Image, kind: CrashState['kind'], applied: number[], what: string, torn?: CrashState['torn']): CrashState => {
      const state: CrashState = {
        device: img.toDevice(`${this.name}@${point}.${counter++}`),
        description: `${ctx}; ${what}`,
        kind,
        point,
        flushes,
        applied,
        pending: seqs,
      }
      if (torn) state.torn = torn
      return state
    }

    // prefixes, with torn variants of each prefix's last write
    const sector = o.sectorSize ?? 512
    const maxTorn = o.maxTornPerWrite ?? 8
    const running = durable.clone()
    if (!skipEmpty) yield make(running.clone(), 'prefix', [], n === 0 ? 'durable state' : `prefix 0/${n} (no pending event landed)`)
    for (let k = 1; k <= n; k++) {
      const e = pending[k - 1]!
      if (o.torn && e.kind === 'write') {
        for (const cut of tornCuts(e.offset, e.data.byteLength, sector, maxTorn)) {
          const rel = cut - e.offset
          const before = seqs.slice(0, k - 1)
          const img = running.clone()
          img.write(e.offset, e.data.subarray(0, rel))
          yield make(img, 'torn', before, `prefix ${k - 1}/${n} + ${describeEvent(e)} torn: ${hex(e.offset)}..${hex(cut)} landed`, {
            seq: e.seq,
            from: e.offset,
            to: cut,
          })
          if (o.tornTail) {
            const end = e.offset + e.data.byteLength
            const tail = running.clone()
            tail.write(cut, e.data.subarray(rel))
            yield make(tail, 'torn', before, `prefix ${k - 1}/${n} + ${describeEvent(e)} torn: ${hex(cut)}..${hex(end)} landed`, {
              seq: e.seq,
              from: cut,
              to: end,
            })
          }
        }
      }
      running.apply(e)
      yield make(running.clone(), 'prefix', seqs.slice(0, k), `prefix ${k}/${n} (up to ${describeEvent(e)})`)
    }

    // subsets that are not prefixes
    if (o.subsets && n >= 2) {
      for (const mask of subsetMasks(n, o)) {
        const img = durable.clone()
        const applied: number[] = []
        for (let i = 0; i < n; i++) {
          if (mask[i]) {
            img.apply(pending[i]!)
            applied.push(seqs[i]!)
          }
        }
        yield make(img, 'subset', applied, `subset: ${applied.length === 0 ? 'none' : applied.map((s) => `#${s}`).join(',')} landed`)
      }
    }
  }

  private assertOpen(): void {
    if (this.closed) throw new Error(`${this.name}: device is closed`)
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

export interface CrashSweepResult {
  /** How many crash states were checked. */
  states: number
  /** The device the workload ran on (its log, final state...). */
  device: CrashDevice
}

/**
 * Runs `workload` on a CrashDevice over `base`, then calls `check` with every
 * crash image of the whole run (allCrashStates). An error from `check` is
 * rethrown with the state's description in front (original as `cause`).
 */
export async function sweepCrashes(
  base: Uint8Array | MemoryDevice | number,
  workload: (device: CrashDevice) => Promise<void>,
  check: (state: CrashState) => void | Promise<void>,
  options: CrashStateOptions & { name?: string } = {},
): Promise<CrashSweepResult> {
  const device = new CrashDevice(base, options.name === undefined ? {} : { name: options.name })
  await workload(device)
  let states = 0
  for (const state of device.allCrashStates(options)) {
    states++
    try {
      await check(state)
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e)
      throw new Error(`${state.description}:\n${msg}`, { cause: e })
    }
  }
  return { states, device }
}
