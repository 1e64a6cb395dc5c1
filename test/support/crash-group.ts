/**
 * CrashGroup: several CrashDevice-like files that lose power together (an
 * image and its external data file). One log orders the writes, truncates and
 * flushes of every member; a flush makes durable only its own member's
 * earlier writes. A crash image of the group is every member's durable state
 * plus some of the events pending on any member at the crash point, chosen
 * as CrashDevice chooses them (see crash-device.ts): prefixes in log order,
 * torn versions of each prefix's last write, subsets (all of them up to
 * `exhaustiveLimit` pending events, else every "all but one" and
 * `randomSubsets` random ones).
 *
 * allCrashStates() expands the last point before every flush of any member
 * and the end of the log: earlier points of the same stretch give prefixes or
 * subsets of the same pending events. Identical group images with the same
 * number of completed flushes are yielded once.
 *
 *   const g = new CrashGroup()
 *   const img = g.add('img.qcow2', imageBytes)
 *   const data = g.add('img.data', dataBytes)
 *   await workload(img, data)
 *   for (const s of g.allCrashStates({ subsets: true, torn: true })) check(s.devices[0], s.devices[1])
 */
import { createHash } from 'node:crypto'
import type { BlockDevice, IoTag } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { hex } from '../../src/errors.js'
import { Image as Bytes, tornCuts, type CrashStateOptions } from './crash-device.js'
import { Prng } from './prng.js'

export type GroupEvent =
  | { seq: number; member: number; kind: 'write'; offset: number; data: Uint8Array; tag: IoTag | undefined }
  | { seq: number; member: number; kind: 'truncate'; size: number }
  | { seq: number; member: number; kind: 'flush' }
type Pending = Exclude<GroupEvent, { kind: 'flush' }>
type WithoutSeq<T> = T extends unknown ? Omit<T, 'seq'> : never

export interface GroupCrashState {
  /** a fresh device per member (in `add` order), holding this crash image */
  devices: MemoryDevice[]
  description: string
  kind: 'prefix' | 'subset' | 'torn'
  /** events (of all members) issued before the cut */
  point: number
  /** flushes (of any member) completed before the cut */
  flushes: number
  /** seqs of the pending events applied in full */
  applied: number[]
  pending: number[]
}

const cloneAll = (w: Bytes[]): Bytes[] => w.map((b) => b.clone())
function apply(w: Bytes[], e: Pending): void {
  if (e.kind === 'write') w[e.member]!.write(e.offset, e.data)
  else w[e.member]!.truncate(e.size)
}

export class CrashGroup {
  private readonly log: GroupEvent[] = []
  private readonly bases: Uint8Array[] = []
  private readonly current: Bytes[] = []
  readonly names: string[] = []
  private flushes = 0

  /** A new member file starting from `base` (durable). */
  add(name: string, base: Uint8Array | MemoryDevice | number = 0): CrashMember {
    const bytes = typeof base === 'number' ? new Uint8Array(base) : base instanceof MemoryDevice ? base.snapshot() : base.slice()
    this.bases.push(bytes)
    this.current.push(new Bytes(bytes.slice()))
    this.names.push(name)
    return new CrashMember(this, this.names.length - 1, name)
  }

  /** Flushes (of any member) so far. */
  get flushCount(): number {
    return this.flushes
  }

  get events(): readonly GroupEvent[] {
    return this.log
  }

  /** @internal */
  size(member: number): number {
    return this.current[member]!.len
  }
  /** @internal */
  read(member: number, offset: number, length: number): Uint8Array {
    const c = this.current[member]!
    const out = new Uint8Array(length)
    if (offset < c.len) out.set(c.buf.subarray(offset, Math.min(c.len, offset + length)))
    return out
  }
  /** @internal */
  record(e: WithoutSeq<GroupEvent>): void {
    const ev = { ...e, seq: this.log.length } as GroupEvent
    this.log.push(ev)
    if (ev.kind === 'flush') this.flushes++
    else apply(this.current, ev)
  }

  /** Every distinct crash image of the group over the whole log. */
  *allCrashStates(options: CrashStateOptions = {}): Generator<GroupCrashState> {
    const durable = this.bases.map((b) => new Bytes(b.slice()))
    const seen = new Set<string>()
    let pending: Pending[] = []
    let flushes = 0
    for (let i = 0; i <= this.log.length; i++) {
      const e = this.log[i]
      if (e === undefined || e.kind === 'flush') {
        for (const s of this.generate(durable, pending, i, flushes, options)) {
          // the same bytes after another flush may owe more flushed data: those are checked again
          const key = `${this.key(s.devices)}:${s.flushes}`
          if (seen.has(key)) continue
          seen.add(key)
          yield s
        }
        if (e === undefined) return
        for (const p of pending) if (p.member === e.member) apply(durable, p)
        pending = pending.filter((p) => p.member !== e.member)
        flushes++
      } else {
        pending.push(e)
      }
    }
  }

  private key(devices: MemoryDevice[]): string {
    const h = createHash('sha1')
    for (const d of devices) {
      const b = d.snapshot()
      h.update(String(b.byteLength))
      h.update(b)
    }
    return h.digest('hex')
  }

  private *generate(durable: Bytes[], pending: Pending[], point: number, flushes: number, o: CrashStateOptions): Generator<GroupCrashState> {
    const n = pending.length
    const seqs = pending.map((e) => e.seq)
    const desc = (e: GroupEvent): string =>
      `#${e.seq} ${this.names[e.member]} ` +
      (e.kind === 'write'
        ? `write${e.tag === undefined ? '' : ` ${e.tag}`} ${hex(e.offset)}+${hex(e.data.byteLength)}`
        : e.kind === 'truncate'
          ? `truncate to ${hex(e.size)}`
          : 'flush')
    const ctx = `crash at point ${point} (${flushes} flush${flushes === 1 ? '' : 'es'} done, ${n} pending event${n === 1 ? '' : 's'}${n === 0 ? '' : `: ${pending.map(desc).join(', ')}`})`
    let counter = 0
    const make = (w: Bytes[], kind: GroupCrashState['kind'], applied: number[], what: string): GroupCrashState => {
      counter++
      return {
        devices: w.map((b, i) => new MemoryDevice(b.buf.subarray(0, b.len), { name: `${this.names[i]}@${point}.${counter}` })),
        description: `${ctx}; ${what}`,
        kind,
        point,
        flushes,
        applied,
        pending: seqs,
      }
    }
    const sector = o.sectorSize ?? 512
    const maxTorn = o.maxTornPerWrite ?? 8
    const running = cloneAll(durable)
    yield make(cloneAll(running), 'prefix', [], n === 0 ? 'durable state' : `prefix 0/${n}`)
    for (let k = 1; k <= n; k++) {
      const e = pending[k - 1]!
      if (o.torn && e.kind === 'write') {
        for (const cut of tornCuts(e.offset, e.data.byteLength, sector, maxTorn)) {
          const rel = cut - e.offset
          const head = cloneAll(running)
          head[e.member]!.write(e.offset, e.data.subarray(0, rel))
          yield make(head, 'torn', seqs.slice(0, k - 1), `prefix ${k - 1}/${n} + ${desc(e)} torn: ${hex(e.offset)}..${hex(cut)} landed`)
          if (o.tornTail) {
            const tail = cloneAll(running)
            tail[e.member]!.write(cut, e.data.subarray(rel))
            yield make(tail, 'torn', seqs.slice(0, k - 1), `prefix ${k - 1}/${n} + ${desc(e)} torn: ${hex(cut)}..${hex(e.offset + e.data.byteLength)} landed`)
          }
        }
      }
      apply(running, e)
      yield make(cloneAll(running), 'prefix', seqs.slice(0, k), `prefix ${k}/${n} (up to ${desc(e)})`)
    }
    if (o.subsets && n >= 2) {
      for (const mask of subsetMasks(n, o)) {
        const w = cloneAll(durable)
        const applied: number[] = []
        pending.forEach((e, i) => {
          if (!mask[i]) return
          apply(w, e)
          applied.push(e.seq)
        })
        yield make(w, 'subset', applied, `subset: ${applied.length === 0 ? 'none' : applied.map((s) => `#${s}`).join(',')} landed`)
      }
    }
  }
}

/** Non-prefix subsets of n events as inclusion masks (CrashDevice's choice). */
function* subsetMasks(n: number, o: CrashStateOptions): Generator<boolean[]> {
  const isPrefix = (m: boolean[]): boolean => {
    let k = 0
    while (k < m.length && m[k]) k++
    return m.slice(k).every((b) => !b)
  }
  const limit = Math.min(o.exhaustiveLimit ?? 10, 20)
  if (n <= limit) {
    for (let m = 0; m < 2 ** n; m++) {
      const mask = Array.from({ length: n }, (_, i) => ((m >>> i) & 1) === 1)
      if (!isPrefix(mask)) yield mask
    }
    return
  }
  const seen = new Set<string>()
  for (let skip = 0; skip < n - 1; skip++) {
    const mask = Array.from({ length: n }, (_, i) => i !== skip)
    seen.add(mask.join())
    yield mask
  }
  const want = o.randomSubsets ?? 32
  const rng = new Prng((o.seed ?? 1) ^ Math.imul(n, 0x9e3779b1))
  let made = 0
  for (let attempts = 0; made < want && attempts < want * 20; attempts++) {
    const mask = Array.from({ length: n }, () => rng.chance(0.5))
    if (isPrefix(mask) || seen.has(mask.join())) continue
    seen.add(mask.join())
    made++
    yield mask
  }
}

/** One file of a CrashGroup (reads see everything written so far, like a page cache). */
export class CrashMember implements BlockDevice {
  readonly readOnly = false
  private closed = false
  constructor(
    readonly group: CrashGroup,
    readonly index: number,
    readonly name: string,
  ) {}
  get size(): number {
    return this.group.size(this.index)
  }
  async read(offset: number, length: number, _tag?: IoTag): Promise<Uint8Array> {
    this.assertOpen()
    return this.group.read(this.index, offset, length)
  }
  async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    this.assertOpen()
    if (data.byteLength === 0) return
    this.group.record({ member: this.index, kind: 'write', offset, data: data.slice(), tag })
  }
  async truncate(size: number): Promise<void> {
    this.assertOpen()
    this.group.record({ member: this.index, kind: 'truncate', size })
  }

  /** posix_fallocate: the file grows to offset+length, an extending truncate that a crash may lose */
  async allocate(offset: number, length: number): Promise<void> {
    this.assertOpen()
    if (offset + length > this.size) this.group.record({ member: this.index, kind: 'truncate', size: offset + length })
  }
  async flush(): Promise<void> {
    this.assertOpen()
    this.group.record({ member: this.index, kind: 'flush' })
  }
  async close(): Promise<void> {
    this.closed = true
  }
  private assertOpen(): void {
    if (this.closed) throw new Error(`${this.name}: device is closed`)
  }
}
