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
 *   prefixes always, subsets and torn writes as options (crash-states.ts says
 *   which and in what order).
 * - A crash device is a one-member CrashGroup (crash-group.ts): the group keeps
 *   the log and the durable image, and both enumerate with the same engine.
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
import { MemoryDevice } from '../../src/io/memory-device.js'
import { hex } from '../../src/errors.js'
import { CrashGroup, CrashMember } from './crash-group.js'
import type { CrashEvent, CrashStateInfo, CrashStateOptions, CrashVoice, PendingEvent, RawCrashState, TornRange } from './crash-states.js'

export { Image, tornCuts } from './crash-states.js'
export type { CrashEvent, CrashFlushEvent, CrashStateOptions, CrashTruncateEvent, CrashWriteEvent, PendingEvent } from './crash-states.js'

export interface CrashState extends CrashStateInfo {
  /** A fresh device holding this crash image (yours to modify). */
  device: MemoryDevice
  /** For torn states: the write that was cut and the absolute byte range of it that landed. */
  torn?: TornRange
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

const deviceVoice: CrashVoice = {
  describe: describeEvent,
  prefixZero: (n) => `prefix 0/${n} (no pending event landed)`,
}

/** A group holding one member, `name`, that starts from `base`. */
function oneMemberGroup(name: string, base: Uint8Array | MemoryDevice | number): CrashGroup {
  const group = new CrashGroup()
  group.addMember(name, base)
  return group
}

/** The device (read/write/truncate/allocate/flush/close, the page-cache view) is its group's only member. */
export class CrashDevice extends CrashMember {
  constructor(base: Uint8Array | MemoryDevice | number = 0, options: { name?: string } = {}) {
    const name = options.name ?? 'crash'
    super(oneMemberGroup(name, base), 0, name)
  }

  /** Every logged event, in order (event.seq === index). */
  get events(): readonly CrashEvent[] {
    return this.group.events
  }

  /** Flushes completed so far. */
  get flushCount(): number {
    return this.group.flushCount
  }

  /** Writes and truncates since the last flush, in order. */
  pendingWrites(): PendingEvent[] {
    return this.group.pendingOf(0)
  }

  /** The durable bytes (what survives any crash now). */
  durableSnapshot(): Uint8Array {
    return this.group.durableImage(0).bytes()
  }

  /** The bytes a reader sees now (durable + all pending). */
  snapshot(): Uint8Array {
    return this.group.currentImage(0).bytes()
  }

  /** A device holding the durable state plus the first k pending events (0 <= k <= pending). */
  crashAt(k: number): MemoryDevice {
    const pending = this.pendingWrites()
    if (!Number.isInteger(k) || k < 0 || k > pending.length) {
      throw new Error(`CrashDevice.crashAt: k must be 0..${pending.length}, got ${k}`)
    }
    const img = this.group.durableImage(0).clone()
    for (let i = 0; i < k; i++) img.apply(pending[i]!)
    return img.toDevice(`${this.name}@crashAt(${k})`)
  }

  /** Every crash image if the power were cut now. */
  crashStates(options: CrashStateOptions = {}): Generator<CrashState> {
    return this.statesAt(this.events.length, options)
  }

  /** Every crash image for a power cut after the first `point` events (0..events.length). */
  *statesAt(point: number, options: CrashStateOptions = {}): Generator<CrashState> {
    const n = this.events.length
    if (!Number.isInteger(point) || point < 0 || point > n) {
      throw new Error(`CrashDevice.statesAt: point must be 0..${n}, got ${point}`)
    }
    for (const s of this.group.imagesAt(point, options, deviceVoice)) yield this.state(s)
  }

  /**
   * Every distinct crash image over the whole log: for each flush epoch, the
   * states of its last point (just before the flush that ends it, or now).
   */
  *allCrashStates(options: CrashStateOptions = {}): Generator<CrashState> {
    for (const s of this.group.imagesOverLog(options, deviceVoice, true)) yield this.state(s)
  }

  /** The crash points whose states allCrashStates expands (the last point of each epoch). */
  epochEnds(): number[] {
    const out: number[] = []
    this.events.forEach((e, i) => {
      if (e.kind === 'flush') out.push(i)
    })
    out.push(this.events.length)
    return out
  }

  private state(s: RawCrashState): CrashState {
    const { description, kind, point, flushes, applied, pending, torn } = s
    const state: CrashState = { device: s.images[0]!.toDevice(`${this.name}@${point}.${s.index}`), description, kind, point, flushes, applied, pending }
    if (torn) state.torn = torn
    return state
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
