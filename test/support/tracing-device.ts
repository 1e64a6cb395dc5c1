/**
 * TracingDevice: wraps any BlockDevice and records every read, write, flush and
 * truncate, so tests can assert I/O counts and ordering, e.g.
 *
 *   const dev = new TracingDevice(new MemoryDevice(...))
 *   ... run the writer ...
 *   dev.assertFlushedBefore({ op: 'write', tag: 'refblock' }, { op: 'write', tag: 'l2' })
 *
 * Clock: one counter ticks when an op is issued (`seq`) and again when it settles
 * (`done`). With sequential `await`s, op N's `done` is just before op N+1's `seq`;
 * with concurrent ops (Promise.all) the two stamps tell what overlapped. Ordering
 * helpers use them strictly: "A is durable before B" means some flush was issued
 * after A settled and settled before B was issued.
 *
 * readInto is recorded as a read (length = the buffer's). Recorded fields: flush has offset 0, length 0; truncate has offset = the new
 * size, length 0. Failed ops are recorded too (`ok: false`, `error`).
 */
import { readInto, type BlockDevice, type IoTag } from '../../src/io/block-device.js'
import { PassThroughDevice } from '../../src/io/pass-through-device.js'
import { allocate } from '../../src/io/prealloc.js'
import { hex } from '../../src/errors.js'

export type TraceOpKind = 'read' | 'write' | 'flush' | 'truncate' | 'allocate'

export interface TraceOp {
  /** Clock value when the op was issued (monotonic, never reset by clear()). */
  seq: number
  op: TraceOpKind
  offset: number
  length: number
  tag: IoTag | undefined
  /** Clock value when the op settled; undefined while it is in flight. */
  done: number | undefined
  /** false if the op threw (then `error` holds what it threw). Undefined while in flight. */
  ok: boolean | undefined
  error?: unknown
  /** A copy of the written bytes (writes only, with `keepData: true`). */
  data?: Uint8Array
}

/**
 * Selects trace ops:
 * - an op kind: `'flush'`
 * - a pattern, every given field must match: `{ op: 'write', tag: 'l2' }`;
 *   `tag` may be an array (any of); `at` is a byte that the op's range
 *   [offset, offset+length) must contain; `offset`/`length` must be equal;
 *   `ok` must be equal
 * - a predicate
 */
export type OpMatcher = TraceOpKind | OpPattern | ((op: TraceOp) => boolean)

export interface OpPattern {
  op?: TraceOpKind | TraceOpKind[]
  tag?: IoTag | IoTag[] | undefined
  offset?: number
  length?: number
  at?: number
  ok?: boolean
}

export function matches(op: TraceOp, m: OpMatcher): boolean {
  if (typeof m === 'string') return op.op === m
  if (typeof m === 'function') return m(op)
  if (m.op !== undefined && !(Array.isArray(m.op) ? m.op.includes(op.op) : op.op === m.op)) return false
  if ('tag' in m) {
    const t = m.tag
    if (Array.isArray(t) ? !t.includes(op.tag as IoTag) : op.tag !== t) return false
  }
  if (m.offset !== undefined && op.offset !== m.offset) return false
  if (m.length !== undefined && op.length !== m.length) return false
  if (m.at !== undefined && !(m.at >= op.offset && m.at < op.offset + op.length)) return false
  if (m.ok !== undefined && op.ok !== m.ok) return false
  return true
}

/** One-line rendering of an op for messages: `#12 write l2 0x30000+0x200`. */
export function describeOp(op: TraceOp): string {
  const tag = op.tag === undefined ? '' : ` ${op.tag}`
  const where = op.op === 'flush' ? '' : op.op === 'truncate' ? ` to ${hex(op.offset)}` : ` ${hex(op.offset)}+${hex(op.length)}`
  const status = op.ok === false ? ' (failed)' : op.ok === undefined ? ' (in flight)' : ''
  return `#${op.seq} ${op.op}${tag}${where}${status}`
}

export interface TracingOptions {
  /** Keep a copy of every written buffer in `TraceOp.data` (default false). */
  keepData?: boolean
  /** Name override (default: the inner device's name). */
  name?: string
}

/** hostStatus and allocatedSize pass through untraced where the inner device has them; close is not traced. */
export class TracingDevice extends PassThroughDevice {
  /** Every op since construction or the last clear(), in issue order. */
  readonly trace: TraceOp[] = []
  private clock = 0
  private readonly keepData: boolean

  constructor(inner: BlockDevice, options: TracingOptions = {}) {
    super(inner, options.name === undefined ? {} : { name: options.name })
    this.keepData = options.keepData ?? false
  }

  override read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    return this.run({ op: 'read', offset, length, tag }, () => this.inner.read(offset, length, tag))
  }

  /** recorded as a read; passed to the inner device's readInto (or its read, copied) */
  override readInto(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void> {
    return this.run({ op: 'read', offset, length: buf.byteLength, tag }, () => readInto(this.inner, offset, buf, tag))
  }

  override write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    const rec = this.keepData ? { data: data.slice() } : {}
    return this.run({ op: 'write', offset, length: data.byteLength, tag, ...rec }, () => this.inner.write(offset, data, tag))
  }

  override flush(): Promise<void> {
    return this.run({ op: 'flush', offset: 0, length: 0, tag: undefined }, () => this.inner.flush())
  }

  override truncate(size: number): Promise<void> {
    return this.run({ op: 'truncate', offset: size, length: 0, tag: undefined }, () => this.inner.truncate(size))
  }

  /** posix_fallocate of [offset, offset+length): recorded as 'allocate'; by the inner device's allocate, or by writing */
  override allocate(offset: number, length: number): Promise<void> {
    return this.run({ op: 'allocate', offset, length, tag: undefined }, () => allocate(this.inner, offset, length))
  }

  private async run<T>(fields: Pick<TraceOp, 'op' | 'offset' | 'length' | 'tag'> & { data?: Uint8Array }, fn: () => Promise<T>): Promise<T> {
    const op: TraceOp = { seq: ++this.clock, done: undefined, ok: undefined, ...fields }
    this.trace.push(op)
    try {
      const result = await fn()
      op.ok = true
      return result
    } catch (e) {
      op.ok = false
      op.error = e
      throw e
    } finally {
      op.done = ++this.clock
    }
  }

  // ---- queries ----

  /** Forget the trace so far (the clock keeps running). */
  clear(): void {
    this.trace.length = 0
  }

  /** Ops matching `m` (all ops without it). */
  ops(m?: OpMatcher): TraceOp[] {
    return m === undefined ? [...this.trace] : this.trace.filter((o) => matches(o, m))
  }
  reads(tag?: IoTag): TraceOp[] {
    return this.trace.filter((o) => o.op === 'read' && (tag === undefined || o.tag === tag))
  }
  writes(tag?: IoTag): TraceOp[] {
    return this.trace.filter((o) => o.op === 'write' && (tag === undefined || o.tag === tag))
  }
  flushes(): TraceOp[] {
    return this.trace.filter((o) => o.op === 'flush')
  }
  truncates(): TraceOp[] {
    return this.trace.filter((o) => o.op === 'truncate')
  }
  count(m?: OpMatcher): number {
    return m === undefined ? this.trace.length : this.trace.reduce((n, o) => n + (matches(o, m) ? 1 : 0), 0)
  }
  /** Total bytes read/written by ops matching `m`. */
  bytes(m: OpMatcher): number {
    return this.trace.reduce((n, o) => n + (matches(o, m) ? o.length : 0), 0)
  }

  /** The whole trace, one op a line (for failure messages). */
  dump(m?: OpMatcher): string {
    return this.ops(m).map(describeOp).join('\n')
  }

  /**
   * Is every op matching `a` durable before any later op matching `b`?
   *
   * Precisely: for every op B matching `b` and every op A matching `a` that was
   * issued before B, there is a successful flush F with A.done < F.seq and
   * F.done < B.seq (A settled, then F was issued and settled, then B was issued).
   * A ops issued after B do not matter for that B. Failed A/B ops count (a failed
   * write may have landed partly); failed flushes do not.
   *
   * Typical: `flushedBefore({op:'write', tag:'refblock'}, {op:'write', tag:'l2'})`:
   * "no L2 write is issued while a refblock write is not yet flushed".
   * True when nothing matches (see assertFlushedBefore to reject that).
   */
  flushedBefore(a: OpMatcher, b: OpMatcher): boolean {
    return this.firstUnflushed(a, b) === undefined
  }

  /**
   * Throws, naming the offending ops and dumping the trace, unless
   * flushedBefore(a, b). Also throws if no B op is preceded by an A op (the
   * assertion would say nothing), unless `allowVacuous`.
   */
  assertFlushedBefore(a: OpMatcher, b: OpMatcher, options: { allowVacuous?: boolean } = {}): void {
    const bad = this.firstUnflushed(a, b)
    if (bad) {
      throw new Error(`${this.name}: ${describeOp(bad.b)} was issued while ${describeOp(bad.a)} was not flushed\n` + `trace:\n${this.dump()}`)
    }
    if (!options.allowVacuous) {
      const anyPair = this.trace.some((B) => matches(B, b) && this.trace.some((A) => A.seq < B.seq && A !== B && matches(A, a)))
      if (!anyPair) {
        throw new Error(`${this.name}: assertFlushedBefore is vacuous: no matching B op follows a matching A op\n` + `trace:\n${this.dump()}`)
      }
    }
  }

  private firstUnflushed(a: OpMatcher, b: OpMatcher): { a: TraceOp; b: TraceOp } | undefined {
    // A flush F covers A if A.done < F.seq, and protects B if F.done < B.seq. So for
    // a given B, take the latest-issued flush that settled before B: A is covered iff
    // A settled before that flush was issued.
    const flushes = this.trace.filter((o) => o.op === 'flush' && o.ok === true)
    const aOps = this.trace.filter((o) => matches(o, a))
    for (const B of this.trace) {
      if (!matches(B, b)) continue
      let barrier = -Infinity
      for (const F of flushes) if ((F.done ?? Infinity) < B.seq && F.seq > barrier) barrier = F.seq
      for (const A of aOps) {
        if (A.seq >= B.seq) break
        if (A === B) continue
        if (!((A.done ?? Infinity) < barrier)) return { a: A, b: B }
      }
    }
    return undefined
  }

  /**
   * Is there a subsequence of the trace matching `matchers` in order (by issue
   * order)? E.g. `inOrder({op:'write', tag:'refblock'}, 'flush', {op:'write', tag:'l2'})`.
   */
  inOrder(...matchers: OpMatcher[]): boolean {
    let i = 0
    for (const op of this.trace) {
      const m = matchers[i]
      if (m === undefined) break
      if (matches(op, m)) i++
    }
    return i >= matchers.length
  }

  /** Throws with the trace unless inOrder(...matchers). */
  assertInOrder(...matchers: OpMatcher[]): void {
    if (!this.inOrder(...matchers)) {
      throw new Error(`${this.name}: expected ops in order were not found\ntrace:\n${this.dump()}`)
    }
  }

  /** Index in `trace` of the first op matching `m` at or after index `from`; -1 if none. */
  indexOf(m: OpMatcher, from = 0): number {
    for (let i = from; i < this.trace.length; i++) if (matches(this.trace[i]!, m)) return i
    return -1
  }
}
