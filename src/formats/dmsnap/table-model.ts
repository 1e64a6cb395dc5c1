/**
 * A model of the exception table as repair's planned steps leave it: which slot holds
 * which record, how many records use each data chunk, the kernel's next_free, the
 * lowest leaked chunk. Repair plans on it so that it knows, before writing anything,
 * what every step does to the findings a check would report.
 */
import type { StoreLayout } from './constants.js'
import type { RecordFault } from './check.js'

/** keep: survives as is; split: survives, needs a private copy of its shared chunk; drop: faulty; shadow: the copy a move leaves at the end */
export type Role = 'keep' | 'split' | 'drop' | 'shadow'

export interface ModelRecord {
  /** index in the table as loaded */
  orig: number
  old: number
  rawOld: bigint
  new: number
  rawNew: bigint
  role: Role
  fault?: RecordFault
}

const SAFE = 1n << 53n

/** max-heap of bigints with lazy deletion (a value is live while its count is positive) */
class MaxHeap {
  private readonly a: bigint[] = []
  push(v: bigint): void {
    const a = this.a
    a.push(v)
    for (let i = a.length - 1; i > 0;) {
      const p = (i - 1) >> 1
      if (a[p]! >= a[i]!) break
      ;[a[p], a[i]] = [a[i]!, a[p]!]
      i = p
    }
  }
  peek(): bigint | undefined {
    return this.a[0]
  }
  pop(): void {
    const a = this.a
    const last = a.pop()!
    if (a.length === 0) return
    a[0] = last
    for (let i = 0; ;) {
      const l = 2 * i + 1
      const r = l + 1
      let m = i
      if (l < a.length && a[l]! > a[m]!) m = l
      if (r < a.length && a[r]! > a[m]!) m = r
      if (m === i) break
      ;[a[m], a[i]] = [a[i]!, a[m]!]
      i = m
    }
  }
}

export class TableModel {
  readonly recs: ModelRecord[]
  private readonly users = new Map<number, number>()
  private readonly rawCount = new Map<bigint, number>()
  private readonly heap = new MaxHeap()
  private readonly slotsByOld = new Map<bigint, Set<number>>()
  private readonly slotsByNew = new Map<bigint, Set<number>>()
  private readonly dropSlots = new Set<number>()
  private readonly splitSlots = new Set<number>()
  /** every data chunk below `cursor` is used, except those in `freedBelow` */
  private cursor = 2
  private readonly freedBelow = new Set<number>()

  constructor(
    readonly layout: StoreLayout,
    records: ModelRecord[],
  ) {
    this.recs = []
    for (const r of records) this.push(r)
  }

  /** the chunk is a whole data chunk inside the COW (not the header, not an area, not beyond the end) */
  inData(r: { new: number; rawNew: bigint }): boolean {
    return r.rawNew < SAFE && this.layout.fits(r.new) && !this.layout.isMetadata(r.new)
  }

  usersOf(chunk: number): number {
    return this.users.get(chunk) ?? 0
  }

  /** max new_chunk over the table (0 when empty) */
  top(): bigint {
    for (;;) {
      const v = this.heap.peek()
      if (v === undefined) return 0n
      if ((this.rawCount.get(v) ?? 0) > 0) return v
      this.heap.pop()
    }
  }

  /** the kernel's next_free for this table (Infinity when a new_chunk is beyond 2^53) */
  nextFree(): number {
    const m = this.top()
    return m >= SAFE ? Infinity : this.layout.skipMetadata(Math.max(2, Number(m) + 1))
  }

  /** the lowest data chunk below next_free that no record uses (a leaked chunk) */
  hole(): number | undefined {
    const end = Math.min(this.nextFree(), this.layout.cowChunks)
    let best: number | undefined
    for (const c of this.freedBelow) {
      if (this.usersOf(c) > 0) this.freedBelow.delete(c)
      else if (c < end && (best === undefined || c < best)) best = c
    }
    if (best !== undefined) return best
    while (this.cursor < end && (this.layout.isMetadata(this.cursor) || this.usersOf(this.cursor) > 0)) this.cursor++
    return this.cursor < end ? this.cursor : undefined
  }

  /** the writer's next chunk, if the COW has room for it */
  room(): number | undefined {
    const nf = this.nextFree()
    return Number.isFinite(nf) && this.layout.fits(nf) ? nf : undefined
  }

  /** the first slot mapping this origin chunk: the record the kernel reads */
  winner(rawOld: bigint): number {
    let w = Infinity
    for (const s of this.slotsByOld.get(rawOld) ?? []) w = Math.min(w, s)
    return w
  }

  /** a record after slot j maps the same origin chunk (dropping j first would expose it) */
  shadowedAfter(j: number): boolean {
    for (const s of this.slotsByOld.get(this.recs[j]!.rawOld) ?? []) if (s > j) return true
    return false
  }

  /** slots still to drop (role drop or shadow) */
  get dropping(): ReadonlySet<number> {
    return this.dropSlots
  }

  /** slots still waiting for a private copy of their shared chunk */
  get splitting(): ReadonlySet<number> {
    return this.splitSlots
  }

  /** the slots whose new_chunk is exactly `raw` */
  holdersOf(raw: bigint): number[] {
    return [...(this.slotsByNew.get(raw) ?? [])]
  }

  set(i: number, r: ModelRecord): void {
    this.unindex(i)
    this.recs[i] = r
    this.index(i)
  }

  /** the role of slot i changes (same record) */
  setRole(i: number, role: Role): void {
    this.set(i, { ...this.recs[i]!, role })
  }

  pop(): ModelRecord {
    const i = this.recs.length - 1
    this.unindex(i)
    return this.recs.pop()!
  }

  private push(r: ModelRecord): void {
    this.recs.push(r)
    this.index(this.recs.length - 1)
  }

  private index(i: number): void {
    const r = this.recs[i]!
    if (this.inData(r)) this.users.set(r.new, this.usersOf(r.new) + 1)
    this.rawCount.set(r.rawNew, (this.rawCount.get(r.rawNew) ?? 0) + 1)
    this.heap.push(r.rawNew)
    for (const [m, k] of [
      [this.slotsByOld, r.rawOld],
      [this.slotsByNew, r.rawNew],
    ] as const) {
      let s = m.get(k)
      if (!s) m.set(k, (s = new Set()))
      s.add(i)
    }
    if (r.role === 'drop' || r.role === 'shadow') this.dropSlots.add(i)
    if (r.role === 'split') this.splitSlots.add(i)
  }

  private unindex(i: number): void {
    const r = this.recs[i]!
    if (this.inData(r)) {
      const n = this.usersOf(r.new) - 1
      this.users.set(r.new, n)
      if (n === 0 && r.new < this.cursor) this.freedBelow.add(r.new)
    }
    this.rawCount.set(r.rawNew, (this.rawCount.get(r.rawNew) ?? 0) - 1)
    this.slotsByOld.get(r.rawOld)!.delete(i)
    this.slotsByNew.get(r.rawNew)!.delete(i)
    this.dropSlots.delete(i)
    this.splitSlots.delete(i)
  }
}
