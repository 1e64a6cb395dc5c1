/**
 * FaultyDevice: wraps any BlockDevice and makes chosen ops fail with an
 * `ImageIoError` (errno EIO or ENOSPC), the way a real disk or a full file
 * system would.
 *
 *   const dev = new FaultyDevice(inner)
 *   dev.failOn({ op: 'write', tag: 'l2', nth: 2, errno: 'ENOSPC' })   // the 2nd L2 write fails
 *
 * Counting: each rule counts the ops it matches (kind, and tag if given) from the
 * moment it is added, from 1. The op numbered `nth` fails; with `persistent`, so
 * does every matching op after it. Several rules may be active; the first that
 * fires wins (each rule counts the op regardless).
 *
 * A failed write does not reach the inner device, unless `tornBytes` is set: then
 * that many leading bytes of it are written first (clamped to the write's length),
 * modelling a torn write that reported an error. A failed truncate does not
 * reach the inner device. A failed read or flush is not passed on either.
 * readInto (when the caller reuses its buffers) is a read: counted and failed
 * by the same 'read' rules.
 *
 * Sweeps: `counts` / `count(op, tag)` tell how many ops the device saw, so a test
 * can run a workload once with no rules to learn N, then re-run it N times with
 * `nth = 1..N`. `sweepFaults()` below does exactly that.
 */
import { readInto, type BlockDevice, type IoTag } from '../../src/io/block-device.js'
import { PassThroughDevice } from '../../src/io/pass-through-device.js'
import { allocate } from '../../src/io/prealloc.js'
import { ImageIoError, hex } from '../../src/errors.js'

export type FaultOp = 'read' | 'write' | 'flush' | 'truncate'
export type FaultErrno = 'EIO' | 'ENOSPC'

export interface FaultRule {
  op: FaultOp
  /** Which matching op fails, counting from 1 since the rule was added. */
  nth: number
  /** Count (and fail) only ops with this tag. Flush and truncate carry no tag. */
  tag?: IoTag
  /** Default 'EIO'. */
  errno?: FaultErrno
  /** false (default): fail once. true: fail the nth and every later matching op. */
  persistent?: boolean
  /** Writes only: apply this many leading bytes of the failing write before throwing. */
  tornBytes?: number
}

export interface FaultRecord {
  op: FaultOp
  tag: IoTag | undefined
  offset: number
  length: number
  errno: FaultErrno
  error: ImageIoError
}

export interface OpCounts {
  read: number
  write: number
  flush: number
  truncate: number
}

interface ActiveRule extends Required<Omit<FaultRule, 'tag'>> {
  tag: IoTag | undefined
  seen: number
}

export interface FaultyOptions {
  /** Name override (default: the inner device's name). */
  name?: string
  /**
   * Simulated free space: a write or truncate that would make the device larger
   * than this fails with ENOSPC (and is not applied).
   */
  sizeLimit?: number
  /** Initial rules. */
  rules?: FaultRule[]
}

/** hostStatus and allocatedSize pass through (never failed) where the inner device has them; close too. */
export class FaultyDevice extends PassThroughDevice {
  /** Ops seen (including failed ones), by kind, since construction or resetCounts(). */
  readonly counts: OpCounts = { read: 0, write: 0, flush: 0, truncate: 0 }
  /** Every fault injected, in order. */
  readonly faults: FaultRecord[] = []
  sizeLimit: number | undefined
  private readonly tagCounts = new Map<string, number>()
  private rules: ActiveRule[] = []

  constructor(inner: BlockDevice, options: FaultyOptions = {}) {
    super(inner, options.name === undefined ? {} : { name: options.name })
    this.sizeLimit = options.sizeLimit
    for (const r of options.rules ?? []) this.failOn(r)
  }

  /** Adds a rule (its counter starts now). Returns this for chaining. */
  failOn(rule: FaultRule): this {
    if (!Number.isInteger(rule.nth) || rule.nth < 1) throw new Error(`FaultyDevice: nth must be an integer >= 1, got ${rule.nth}`)
    this.rules.push({
      op: rule.op,
      nth: rule.nth,
      tag: rule.tag,
      errno: rule.errno ?? 'EIO',
      persistent: rule.persistent ?? false,
      tornBytes: rule.tornBytes ?? 0,
      seen: 0,
    })
    return this
  }

  /** Removes every rule (counters and the fault log stay). */
  clearFaults(): void {
    this.rules = []
  }

  resetCounts(): void {
    this.counts.read = this.counts.write = this.counts.flush = this.counts.truncate = 0
    this.tagCounts.clear()
  }

  /** Ops seen of this kind (all kinds without `op`), only those with `tag` if given. */
  count(op?: FaultOp, tag?: IoTag): number {
    if (op === undefined) {
      if (tag !== undefined) throw new Error('FaultyDevice.count: a tag needs an op')
      return this.counts.read + this.counts.write + this.counts.flush + this.counts.truncate
    }
    return tag === undefined ? this.counts[op] : (this.tagCounts.get(`${op}\0${tag}`) ?? 0)
  }

  /** How many faults have been injected so far. */
  get injected(): number {
    return this.faults.length
  }

  override async read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    const rule = this.see('read', tag)
    if (rule) throw this.fault('read', tag, offset, length, rule.errno)
    return this.inner.read(offset, length, tag)
  }

  /** a read like read(): counted, and failed by the same 'read' rules (the buffer is then left as it was) */
  override async readInto(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void> {
    const rule = this.see('read', tag)
    if (rule) throw this.fault('read', tag, offset, buf.byteLength, rule.errno)
    return readInto(this.inner, offset, buf, tag)
  }

  override async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    const rule = this.see('write', tag)
    if (rule) {
      const torn = Math.min(Math.max(0, rule.tornBytes), data.byteLength)
      if (torn > 0) await this.inner.write(offset, data.subarray(0, torn), tag)
      throw this.fault('write', tag, offset, data.byteLength, rule.errno, torn)
    }
    if (this.sizeLimit !== undefined && offset + data.byteLength > Math.max(this.sizeLimit, this.inner.size)) {
      throw this.fault('write', tag, offset, data.byteLength, 'ENOSPC')
    }
    return this.inner.write(offset, data, tag)
  }

  /** posix_fallocate: counted and failed as a write (no tag); ENOSPC past sizeLimit */
  override async allocate(offset: number, length: number): Promise<void> {
    const rule = this.see('write', undefined)
    if (rule) throw this.fault('write', undefined, offset, length, rule.errno)
    if (this.sizeLimit !== undefined && offset + length > Math.max(this.sizeLimit, this.inner.size)) {
      throw this.fault('write', undefined, offset, length, 'ENOSPC')
    }
    return allocate(this.inner, offset, length)
  }

  override async flush(): Promise<void> {
    const rule = this.see('flush', undefined)
    if (rule) throw this.fault('flush', undefined, 0, 0, rule.errno)
    return this.inner.flush()
  }

  override async truncate(size: number): Promise<void> {
    const rule = this.see('truncate', undefined)
    if (rule) throw this.fault('truncate', undefined, size, 0, rule.errno)
    if (this.sizeLimit !== undefined && size > Math.max(this.sizeLimit, this.inner.size)) {
      throw this.fault('truncate', undefined, size, 0, 'ENOSPC')
    }
    return this.inner.truncate(size)
  }

  /** Counts the op; returns the rule that makes it fail, if any. */
  private see(op: FaultOp, tag: IoTag | undefined): ActiveRule | undefined {
    this.counts[op]++
    if (tag !== undefined) {
      const key = `${op}\0${tag}`
      this.tagCounts.set(key, (this.tagCounts.get(key) ?? 0) + 1)
    }
    let firing: ActiveRule | undefined
    for (const r of this.rules) {
      if (r.op !== op || (r.tag !== undefined && r.tag !== tag)) continue
      r.seen++
      const fires = r.persistent ? r.seen >= r.nth : r.seen === r.nth
      if (fires && !firing) firing = r
    }
    return firing
  }

  private fault(op: FaultOp, tag: IoTag | undefined, offset: number, length: number, errno: FaultErrno, tornBytes = 0): ImageIoError {
    const what = op === 'flush' ? 'flush' : op === 'truncate' ? `truncate to ${hex(offset)}` : `${op} of ${hex(length)} bytes at offset ${hex(offset)}`
    const torn = tornBytes > 0 ? ` (${hex(tornBytes)} bytes written before the failure)` : ''
    const error = new ImageIoError(`${this.name}: ${what}${tag === undefined ? '' : ` (tag ${tag})`} failed: ${errno} (injected)${torn}`, errno, {
      file: this.name,
      offset,
      op,
      tag,
      length,
      injected: true,
    })
    this.faults.push({ op, tag, offset, length, errno, error })
    return error
  }
}

export interface FaultPoint {
  /** The op number that was made to fail (1-based, among ops matching op/tag). */
  nth: number
  /** How many matching ops the dry run saw. */
  total: number
  /** The faulty device the workload ran on (its `inner` is the device from makeDevice). */
  device: FaultyDevice
  /** What the workload threw (undefined if it completed, e.g. it handled the error). */
  error: unknown
  /** Whether the fault was actually injected (the workload may take another path). */
  triggered: boolean
  /** e.g. "write l2 #3 of 7 failed with EIO" for failure messages. */
  description: string
}

export interface SweepFaultsOptions {
  op: FaultOp
  tag?: IoTag
  errno?: FaultErrno
  persistent?: boolean
  tornBytes?: number
}

/**
 * Runs `workload` once on a fresh device (from `makeDevice`) to count the ops
 * matching `op`/`tag`, then once more per op, on a fresh device each time, with
 * that op failing; `check` inspects each outcome (it should reopen
 * `point.device.inner`, or whatever makeDevice wraps). Errors thrown by
 * `check` are rethrown prefixed with the point's description.
 * Returns the number of points swept.
 */
export async function sweepFaults(
  options: SweepFaultsOptions,
  makeDevice: () => BlockDevice | Promise<BlockDevice>,
  workload: (device: FaultyDevice) => Promise<void>,
  check: (point: FaultPoint) => void | Promise<void>,
): Promise<number> {
  const dry = new FaultyDevice(await makeDevice())
  await workload(dry)
  const total = dry.count(options.op, options.tag)
  for (let nth = 1; nth <= total; nth++) {
    const device = new FaultyDevice(await makeDevice())
    const rule: FaultRule = { op: options.op, nth }
    if (options.tag !== undefined) rule.tag = options.tag
    if (options.errno !== undefined) rule.errno = options.errno
    if (options.persistent !== undefined) rule.persistent = options.persistent
    if (options.tornBytes !== undefined) rule.tornBytes = options.tornBytes
    device.failOn(rule)
    let error: unknown
    try {
      await workload(device)
    } catch (e) {
      error = e
    }
    const errno = options.errno ?? 'EIO'
    const description =
      `${options.op}${options.tag === undefined ? '' : ` ${options.tag}`} #${nth} of ${total} failed with ${errno}` +
      (options.persistent ? ' (persistently)' : '')
    try {
      await check({ nth, total, device, error, triggered: device.injected > 0, description })
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e)
      throw new Error(`fault sweep, ${description}: ${msg}`, { cause: e })
    }
  }
  return total
}
