/**
 * CrashGroup: several CrashDevice-like files that lose power together (an
 * image and its external data file). One log orders the writes, truncates and
 * flushes of every member; a flush makes durable only its own member's
 * earlier writes. A crash image of the group is every member's durable state
 * plus some of the events pending on any member at the crash point, chosen
 * by the engine in crash-states.ts (CrashDevice, a one-member group, uses it
 * too): prefixes in log order,
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
import {
  Image,
  crashCuts,
  crashImages,
  type CrashCut,
  type CrashStateInfo,
  type CrashStateOptions,
  type CrashVoice,
  type GroupEvent,
  type GroupPendingEvent,
  type RawCrashState,
} from './crash-states.js'

export type { GroupEvent } from './crash-states.js'
type WithoutSeq<T> = T extends unknown ? Omit<T, 'seq'> : never

export interface GroupCrashState extends CrashStateInfo {
  /** a fresh device per member (in `add` order), holding this crash image */
  devices: MemoryDevice[]
}

export class CrashGroup {
  private readonly log: GroupEvent[] = []
  private readonly bases: Uint8Array[] = []
  private readonly current: Image[] = []
  /** each member's durable image: its base plus its events before its last flush */
  private readonly durable: Image[] = []
  /** each member's writes and truncates since its last flush */
  private readonly unflushed: GroupPendingEvent[][] = []
  readonly names: string[] = []
  private flushes = 0

  /** A new member file starting from `base` (durable). */
  add(name: string, base: Uint8Array | MemoryDevice | number = 0): CrashMember {
    return new CrashMember(this, this.addMember(name, base), name)
  }

  /** @internal a new member's index (add() without the device) */
  addMember(name: string, base: Uint8Array | MemoryDevice | number = 0): number {
    const bytes = typeof base === 'number' ? new Uint8Array(base) : base instanceof MemoryDevice ? base.snapshot() : base.slice()
    this.bases.push(bytes)
    this.current.push(new Image(bytes.slice()))
    this.durable.push(new Image(bytes.slice()))
    this.unflushed.push([])
    this.names.push(name)
    return this.names.length - 1
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
    return this.current[member]!.read(offset, length)
  }
  /** @internal */
  readInto(member: number, offset: number, buf: Uint8Array): void {
    this.current[member]!.readInto(offset, buf)
  }
  /** @internal */
  record(e: WithoutSeq<GroupEvent>): void {
    const ev = { ...e, seq: this.log.length } as GroupEvent
    if (ev.kind === 'flush') {
      for (const p of this.unflushed[ev.member]!) this.durable[ev.member]!.apply(p)
      this.unflushed[ev.member] = []
      this.flushes++
    } else {
      this.current[ev.member]!.apply(ev)
      this.unflushed[ev.member]!.push(ev)
    }
    this.log.push(ev)
  }

  /** @internal a member's writes and truncates since its last flush, in order */
  pendingOf(member: number): GroupPendingEvent[] {
    return [...this.unflushed[member]!]
  }

  /** @internal a member's durable image now (live: clone it to change it) */
  durableImage(member: number): Image {
    return this.durable[member]!
  }

  /** @internal a member's image as a reader sees it now (live) */
  currentImage(member: number): Image {
    return this.current[member]!
  }

  /** @internal every crash image for a power cut after the first `point` events */
  *imagesAt(point: number, options: CrashStateOptions, voice: CrashVoice): Generator<RawCrashState> {
    let last: CrashCut | undefined
    for (const cut of crashCuts(this.log, this.bases, point)) last = cut
    yield* crashImages(last!, options, voice)
  }

  /**
   * @internal every crash image over the whole log: the states of the last
   * point before every flush (of any member) and of the end of the log; with
   * `skipRepeatedEmpty`, prefix 0 only for the first of them.
   */
  *imagesOverLog(options: CrashStateOptions, voice: CrashVoice, skipRepeatedEmpty: boolean): Generator<RawCrashState> {
    for (const cut of crashCuts(this.log, this.bases)) yield* crashImages(cut, options, voice, skipRepeatedEmpty && cut.flushes > 0)
  }

  /** Every distinct crash image of the group over the whole log. */
  *allCrashStates(options: CrashStateOptions = {}): Generator<GroupCrashState> {
    const seen = new Set<string>()
    for (const s of this.imagesOverLog(options, this.voice, false)) {
      // the same bytes after another flush may owe more flushed data: those are checked again
      const key = `${this.key(s.images)}:${s.flushes}`
      if (seen.has(key)) continue
      seen.add(key)
      const { description, kind, point, flushes, applied, pending } = s
      const devices = s.images.map((b, i) => b.toDevice(`${this.names[i]}@${point}.${s.index + 1}`))
      yield { devices, description, kind, point, flushes, applied, pending }
    }
  }

  private readonly voice: CrashVoice = {
    describe: (e) =>
      `#${e.seq} ${this.names[e.member]} ` +
      (e.kind === 'write'
        ? `write${e.tag === undefined ? '' : ` ${e.tag}`} ${hex(e.offset)}+${hex(e.data.byteLength)}`
        : e.kind === 'truncate'
          ? `truncate to ${hex(e.size)}`
          : 'flush'),
    prefixZero: (n) => `prefix 0/${n}`,
  }

  private key(images: Image[]): string {
    const h = createHash('sha1')
    for (const b of images) {
      h.update(String(b.len))
      h.update(b.buf.subarray(0, b.len))
    }
    return h.digest('hex')
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
  /** read() into the caller's buffer: a copy of what a reader sees now, zeros past the end */
  async readInto(offset: number, buf: Uint8Array, _tag?: IoTag): Promise<void> {
    this.assertOpen()
    this.group.readInto(this.index, offset, buf)
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
