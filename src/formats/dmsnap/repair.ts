/**
 * Repair: plan, then apply steps each of which is one chunk copy or one 512-byte sector
 * write of the metadata, each followed by a flush, so a crash at any point leaves a
 * loadable store; the record steps are planned on a model of the table (planRecords) so
 * that at every step there are no more corruptions and no more leaks than a check found
 * before the repair, and every surviving record serves the same data:
 *  - `leaks`: drop exact duplicate records; compaction moves data chunks from the top
 *    down into holes (copy, flush, repoint the record, flush);
 *  - `all`: also drops records that point nowhere valid and shadowed or unreachable
 *    ones (keeping the one the kernel reads: the first), gives every later user of a
 *    shared data chunk a private copy (the kernel serves the shared bytes for each of
 *    them), zeroes garbage after the terminator, normalises the header, extends a
 *    truncated COW;
 *  - an invalidated store (valid=0) is left alone unless flags.forceValid and every
 *    record checks out.
 */
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage } from '../../image/disk-image.js'
import type { CheckOptions, RepairAction, RepairMode, RepairResult } from '../../check/types.js'
import { RECORD_BYTES, SECTOR_BYTES, SNAP_MAGIC, SNAPSHOT_DISK_VERSION, type StoreLayout } from './constants.js'
import { analyzeStore, type StoreAnalysis } from './check.js'
import { encodeRecord, type ExceptionRecord } from './exceptions.js'
import { encodeHeader, type StoreHeader } from './header.js'
import { UndoJournal } from './journal.js'
import { OverlayDevice } from '../../io/overlay-device.js'
import { TableModel, type ModelRecord, type Role } from './table-model.js'

export interface RepairStoreOptions extends CheckOptions {
  repair: RepairMode
  originSize?: number
  origin?: DiskImage
  /** where to save the old bytes before each overwrite (the CLI opens journalPath) */
  journal?: BlockDevice
}

type Step =
  | { type: 'header'; header: StoreHeader }
  | { type: 'extend'; size: number; zeroChunk: number }
  | { type: 'zero-slots'; area: number; slots: number[] }
  | { type: 'set-record'; index: number; old: number; new: number }
  | { type: 'clear-record'; index: number }
  | { type: 'copy-chunk'; from: number; to: number }
  /** record writes that all fall in one 512-byte sector, done as one (atomic) sector write; old=new=0 clears */
  | { type: 'sector'; records: { index: number; old: number; new: number }[] }

interface Planned {
  steps: Step[]
  actions: RepairAction[]
  /** header/extension steps change what the table walk sees: plan again after them */
  replan: boolean
}

export function forceValidFlag(o: CheckOptions): boolean {
  return Boolean(o.flags?.forceValid ?? o.flags?.['force-valid'] ?? o.flags?.force_valid)
}

export async function repairStore(dev: BlockDevice, options: RepairStoreOptions): Promise<RepairResult> {
  if (options.dryRun) {
    // a dry run performs every round on an overlay that keeps the writes in memory: the plan and the
    // predicted result are the repair's own, and the store is not touched
    const overlay = new OverlayDevice(dev)
    try {
      const { journal: _journal, journalPath: _journalPath, ...rest } = options
      return { ...(await repairStore(overlay, { ...rest, dryRun: false })), dryRun: true }
    } finally {
      await overlay.close()
    }
  }
  const aOpts = { originSize: options.originSize, origin: options.origin }
  const first = await analyzeStore(dev, aOpts)
  const before = first.report
  const actions: RepairAction[] = []
  const journal = options.journal ? new UndoJournal(options.journal) : undefined
  if (journal) await journal.start()
  let a: StoreAnalysis = first
  for (let round = 0; round < 3; round++) {
    const p = plan(a, options)
    actions.push(...p.actions)
    if (p.steps.length === 0) break
    for (const s of p.steps) await apply(dev, a.layout!, s, journal)
    a = await analyzeStore(dev, aOpts)
    if (!p.replan) break
  }
  if (journal) await journal.seal(dev, SECTOR_BYTES, options.journalIdentity) // the repair has finished: tie the journal to what it left
  const after = a.report
  before.leaksFixed = Math.max(0, before.leaks - after.leaks)
  before.corruptionsFixed = Math.max(0, before.corruptions - after.corruptions)
  const result: RepairResult = { before, after, actions, dryRun: false }
  if (options.journalPath && journal && journal.entries > 0) result.journalPath = options.journalPath
  return result
}

function plan(a: StoreAnalysis, options: RepairStoreOptions): Planned {
  const out: Planned = { steps: [], actions: [], replan: false }
  const all = options.repair === 'all'
  const layout = a.layout
  const t = a.table
  const act = (kind: string, structure: string, message: string, hostOffset?: number): void => {
    const x: RepairAction = { kind, structure, message }
    if (hostOffset !== undefined) x.hostOffset = hostOffset
    out.actions.push(x)
  }
  if (!layout || !t) return out
  // repair writes only where check finds something: notices alone (valid ≠ 1, bytes after the header) change nothing
  if (a.findings.length === 0) return out
  const recordsClean = a.recordFaults.size === 0 && a.garbageSlots.length === 0 && t.truncatedArea === undefined
  const h = { ...a.header }
  let headerChanged = false
  if (a.headerProblem) {
    if (!all || !recordsClean) return out
    h.magic = SNAP_MAGIC
    h.version = SNAPSHOT_DISK_VERSION
    headerChanged = true
    act('rewrite-header', 'cow-header', `rewrite the header (magic SnAp, version 1): the areas parse cleanly with chunk size ${h.chunkSectors}`, 0)
  }
  if (h.valid === 0) {
    // content undefined: never flip valid back by default (a header rewrite for a finding keeps valid=0)
    if (forceValidFlag(options) && recordsClean) {
      h.valid = 1
      headerChanged = true
      act('force-valid', 'cow-header', 're-validate the invalidated store (valid=1): every record checks out (forced)', 4)
    } else if (!headerChanged) return out
  } else if (all && h.valid !== 1 && headerChanged) {
    // the header is rewritten for a finding anyway: with the kernel's valid value
    h.valid = 1
    act('normalise-valid', 'cow-header', `valid ${a.header.valid} → 1`, 4)
  }
  if (headerChanged && a.notices.some((n) => n.kind === 'header-tail-garbage')) {
    act('zero-header-tail', 'cow-header', 'zero chunk 0 after the 16 header bytes (the header rewrite writes the whole chunk)', 16)
  }
  if (headerChanged) {
    out.steps.push({ type: 'header', header: h })
    out.replan = true
    return out
  }
  if (t.truncatedArea !== undefined) {
    if (!all) return out
    const loc = layout.areaLocation(t.truncatedArea)
    out.steps.push({ type: 'extend', size: (loc + 1) * layout.chunkBytes, zeroChunk: loc })
    act(
      'extend-cow',
      'cow-area',
      `extend the COW to ${(loc + 1) * layout.chunkBytes} bytes and zero area ${t.truncatedArea} (chunk ${loc})`,
      layout.offset(loc),
    )
    out.replan = true
    return out
  }
  if (all && a.garbageSlots.length > 0) {
    out.steps.push({ type: 'zero-slots', area: t.currentArea, slots: a.garbageSlots })
    act(
      'zero-garbage',
      'cow-area',
      `zero ${a.garbageSlots.length} slot(s) after the terminator in area ${t.currentArea}`,
      layout.offset(layout.areaLocation(t.currentArea)),
    )
  }
  // A terminator with a non-zero old_chunk is harmless where it is, but once records are dropped it lies after the
  // new terminator: garbage. Zero it first (with -r all always, with -r leaks when an exact duplicate is dropped).
  if (a.notices.some((n) => n.kind === 'terminator-old-chunk') && (all || [...a.recordFaults.values()].includes('duplicate-record'))) {
    out.steps.push({ type: 'zero-slots', area: t.currentArea, slots: [t.currentCommitted] })
    act(
      'zero-terminator',
      'cow-area',
      `zero the old_chunk of the terminator (area ${t.currentArea} slot ${t.currentCommitted})`,
      layout.offset(layout.areaLocation(t.currentArea)) + t.currentCommitted * RECORD_BYTES,
    )
  }
  const recordSteps: Step[] = []
  planRecords(a, layout, options, recordSteps, act)
  out.steps.push(...coalesce(recordSteps, layout, t.records, options.originSize))
  return out
}

/**
 * Consecutive record writes into the same 512-byte sector become one sector write (a sector
 * is written atomically; every record write relies on that already), with the chunk copies
 * among them done first when nobody reads their target chunk in the table as it is on disk
 * at that point. This only removes intermediate states of the plan: a crash sees the table
 * before or after the whole group. It is what lets a move (record into the dropped slot,
 * last slot cleared) never show its transient duplicate when both slots share a sector.
 */
function coalesce(steps: Step[], layout: StoreLayout, records: readonly ExceptionRecord[], originSize: number | undefined): Step[] {
  const table = records.map((r) => ({ old: r.rawOld, new: r.rawNew }))
  const perSector = SECTOR_BYTES / RECORD_BYTES
  const sectorOf = (index: number): number => {
    const { area, slot } = layout.slotOf(index)
    return area * (layout.perArea / perSector) + Math.floor(slot / perSector)
  }
  /** the kernel reads this chunk for some origin chunk: a record uses it and is the first for its origin chunk, inside the origin */
  const read = (chunk: number): boolean => {
    const first = new Set<bigint>()
    for (const r of table) {
      if (r.new === 0n) break
      const winner = !first.has(r.old)
      first.add(r.old)
      if (r.new === BigInt(chunk) && winner && (originSize === undefined || r.old * BigInt(layout.chunkBytes) < BigInt(originSize))) return true
    }
    return false
  }
  const apply = (w: { index: number; old: number; new: number }): void => {
    while (table.length <= w.index) table.push({ old: 0n, new: 0n })
    table[w.index] = { old: BigInt(w.old), new: BigInt(w.new) }
  }
  const out: Step[] = []
  let k = 0
  while (k < steps.length) {
    const copies: Step[] = []
    const writes: { index: number; old: number; new: number }[] = []
    let sector: number | undefined
    let end = k // steps[k, end) form the group
    for (let j = k; j < steps.length; j++) {
      const x = steps[j]!
      if (x.type === 'copy-chunk') {
        if (read(x.to)) break
        copies.push(x)
        continue
      }
      if (x.type !== 'set-record' && x.type !== 'clear-record') break
      const sec = sectorOf(x.index)
      if (sector !== undefined && sec !== sector) break
      sector = sec
      writes.push(x.type === 'set-record' ? { index: x.index, old: x.old, new: x.new } : { index: x.index, old: 0, new: 0 })
      end = j + 1
    }
    if (writes.length === 0) {
      // a copy whose target is still read, or a step of another kind: as planned
      const x = steps[k]!
      if (x.type === 'set-record' || x.type === 'clear-record') throw new Error('unreachable')
      out.push(x)
      k++
      continue
    }
    out.push(...copies.slice(0, steps.slice(k, end).filter((x) => x.type === 'copy-chunk').length))
    out.push({ type: 'sector', records: writes })
    for (const w of writes) apply(w)
    k = end
  }
  return out
}

/**
 * The record steps, planned on a model of the table (TableModel) so that every step is
 * known to keep the store loadable, the view of every surviving record unchanged, and
 * to add no corruption and no leak to what a check reported before the repair:
 *
 *  - Records whose new_chunk lies beyond the COW go first: they push next_free past the
 *    end, so while they exist every chunk a drop frees would count as leaked.
 *  - A record is dropped by moving the last record L into its slot, then clearing the
 *    last slot. When the dropped record D is a corruption, L's data is first copied into
 *    a chunk nobody reads (D's own chunk when only D uses it and nobody reads it, else a
 *    leaked chunk) and D's slot gets L pointing at the copy: the L left at the end is then
 *    a shadowed duplicate old chunk (D's corruption, moved), not an exact duplicate (a new
 *    leak). Without such a chunk L is moved as is.
 *  - Before the last slot is cleared, when its chunk would become a leak (it is not the
 *    top chunk), the top chunk's data is moved into it, so next_free recedes instead.
 *  - A shared data chunk (duplicate new_chunk) keeps the view the kernel serves: the first
 *    user keeps it, every later one gets a private copy in a free chunk (a leaked chunk,
 *    else the writer's next chunk — sequential, skipping metadata areas — while the COW
 *    has room). With no free chunk left the record is dropped (its origin chunk falls
 *    back to the origin), and the action says so.
 *  - Compaction then moves the highest data chunks down into the remaining holes.
 *
 * Every copy is flushed before the one-sector record write that points at it.
 * What cannot be helped: with no free chunk at all, a move passes through an exact
 * duplicate record (one leak finding, gone at the next step).
 */
function planRecords(
  a: StoreAnalysis,
  layout: StoreLayout,
  options: RepairStoreOptions,
  steps: Step[],
  act: (kind: string, structure: string, message: string, hostOffset?: number) => void,
): void {
  const t = a.table!
  const all = options.repair === 'all'
  const initial: ModelRecord[] = t.records.map((r) => {
    const fault = a.recordFaults.get(r.index)
    const role: Role = fault === 'duplicate-record' || (all && fault !== undefined && fault !== 'duplicate-new-chunk') ? 'drop' : 'keep'
    const x: ModelRecord = { orig: r.index, old: r.old, rawOld: r.rawOld, new: r.new, rawNew: r.rawNew, role }
    if (fault) x.fault = fault
    return x
  })
  const why = new Map<number, string>()
  for (const r of initial) if (r.role === 'drop') why.set(r.orig, r.fault!)

  // shared chunks: which later users can get a private copy (a free data chunk once the drops are done)
  if (all) {
    const owners = new Set<number>()
    const shared: ModelRecord[] = []
    for (const r of initial) {
      if (r.role === 'drop' || r.rawNew >= 1n << 53n || !layout.fits(r.new) || layout.isMetadata(r.new)) continue
      if (owners.has(r.new)) shared.push(r)
      else owners.add(r.new)
    }
    let free = 0
    for (let c = 2; c < layout.cowChunks && free < shared.length; c++) if (!layout.isMetadata(c) && !owners.has(c)) free++
    for (const [k, r] of shared.entries()) {
      if (k < free) {
        r.role = 'split'
        continue
      }
      r.role = 'drop'
      why.set(
        r.orig,
        `duplicate-new-chunk: no free chunk left in the COW (${layout.cowChunks} chunks) for a private copy of chunk ${r.new}, so origin chunk ${r.rawOld} falls back to the origin: its snapshot data is lost`,
      )
    }
  }
  for (const [orig, reason] of [...why].sort((x, y) => x[0] - y[0])) {
    const r = t.records[orig]!
    act(
      'drop-record',
      'cow-area',
      `drop record ${orig} (${r.rawOld}→${r.rawNew}): ${reason}`,
      layout.offset(layout.areaLocation(r.area)) + r.slot * RECORD_BYTES,
    )
  }

  const m = new TableModel(layout, initial)
  const recs = m.recs
  /** nobody reads the data of the to-be-dropped record at slot k: an earlier slot maps its origin chunk, or it lies beyond the origin */
  const unread = (k: number): boolean => {
    const r = recs[k]!
    return (r.role === 'drop' || r.role === 'shadow') && (m.winner(r.rawOld) < k || r.fault === 'old-chunk-beyond-origin')
  }
  const copy = (from: number, to: number): void => void steps.push({ type: 'copy-chunk', from, to })
  const setSlot = (i: number, r: ModelRecord): void => {
    m.set(i, r)
    steps.push({ type: 'set-record', index: i, old: r.old, new: r.new })
  }
  let moves = 0
  const split = (r: ModelRecord, to: number): void =>
    act(
      'split-shared-chunk',
      'cow-data',
      `copy COW chunk ${r.new} (shared: the kernel serves it for more than one origin chunk) into free chunk ${to} and repoint record ${r.orig} (origin chunk ${r.rawOld}) to it: every origin chunk keeps the data the kernel serves`,
      layout.offset(to),
    )
  const isDropping = (r: ModelRecord): boolean => r.role === 'drop' || r.role === 'shadow'
  /** new_chunk beyond the COW: next_free past the end, so every free chunk counts as leaked */
  const inflates = (r: ModelRecord): boolean => r.rawNew >= BigInt(layout.cowChunks)

  // 1. drops, from the end of the table (records beyond the COW first)
  while (m.dropping.size > 0) {
    const e = recs.length - 1
    const y = recs[e]!
    let infl = -1
    for (const j of m.dropping) if (j < e && j > infl && recs[j]!.role === 'drop' && inflates(recs[j]!) && !m.shadowedAfter(j)) infl = j
    if (infl >= 0 && isDropping(y) && m.inData(y) && m.usersOf(y.new) === 1) {
      // clearing y would free a chunk, a leak while a record beyond the COW remains: move y as it is over that record
      // first, as long as the copy does not become the record the kernel reads for y's origin chunk with other data
      const w = m.winner(y.rawOld)
      if (w === e || recs[w]!.rawNew === y.rawNew || w < infl || y.fault === 'old-chunk-beyond-origin') {
        setSlot(infl, { ...y })
        m.setRole(e, 'shadow')
        continue
      }
      // the record the kernel reads for y's origin chunk comes after: it takes that slot instead, with its data
      // copied into a leaked chunk, and the copy it leaves behind is dropped later
      const W = recs[w]!
      const h = m.hole()
      if (W.role === 'keep' && m.inData(W) && h !== undefined) {
        copy(W.new, h)
        setSlot(infl, { ...W, new: h, rawNew: BigInt(h) })
        m.setRole(w, 'shadow')
        moves++
        continue
      }
    }
    if (isDropping(y)) {
      // Clearing y frees its chunk, a leak unless it is the top chunk. Give it away first: to a record waiting for
      // a private copy of a shared chunk (its split), else the top chunk's data moves into it (next_free recedes).
      // Never to a record of y's origin chunk: that would leave an exact duplicate behind.
      const top = m.top()
      if (m.inData(y) && m.usersOf(y.new) === 1 && unread(e) && BigInt(y.new) < top) {
        let si = -1
        for (const j of m.splitting) if (j < e && recs[j]!.rawOld !== y.rawOld && (si < 0 || j < si)) si = j
        const holders = m.holdersOf(top)
        const ti = holders[0]!
        const T = recs[ti]!
        if (si >= 0) {
          const S = recs[si]!
          copy(S.new, y.new)
          split(S, y.new)
          setSlot(si, { ...S, new: y.new, rawNew: BigInt(y.new), role: 'keep' })
        } else if (holders.length === 1 && T.role === 'keep' && m.inData(T) && ti < e && T.rawOld !== y.rawOld) {
          copy(T.new, y.new)
          setSlot(ti, { ...T, new: y.new, rawNew: BigInt(y.new) })
          moves++
        }
      }
      m.pop()
      steps.push({ type: 'clear-record', index: e })
      continue
    }
    let i = infl
    if (i < 0) for (const j of m.dropping) i = Math.max(i, j)
    const d = recs[i]!
    if (!all && y.fault) {
      act(
        'keep-record',
        'cow-area',
        `record ${d.orig} (an exact duplicate) is kept: dropping it means moving record ${y.orig}, which is itself faulty (${y.fault}); run repair -r all`,
      )
      break
    }
    // a corrupt d: give y a copy in a chunk nobody reads, so the record left behind is a shadowed duplicate (d's corruption, moved)
    let x: number | undefined
    if (d.fault !== 'duplicate-record' || y.role === 'split') {
      if (m.inData(d) && m.usersOf(d.new) === 1 && unread(i) && BigInt(d.new) !== m.top()) x = d.new
      else x = m.hole() ?? (y.role === 'split' ? m.room() : undefined)
    }
    if (x !== undefined) {
      copy(y.new, x)
      if (y.role === 'split') split(y, x)
      setSlot(i, { ...y, new: x, rawNew: BigInt(x), role: 'keep' })
    } else {
      setSlot(i, { ...y })
    }
    m.setRole(e, 'shadow')
  }

  // 2. the remaining shared chunks: a private copy for every later user
  for (const [i, r] of recs.entries()) {
    if (r.role !== 'split') continue
    const x = m.hole() ?? m.room()
    if (x === undefined) continue // counted above: cannot happen
    copy(r.new, x)
    split(r, x)
    setSlot(i, { ...r, new: x, rawNew: BigInt(x), role: 'keep' })
  }

  // 3. compaction: move the highest data chunks down into holes
  const movable = recs
    .map((r, index) => ({ r, index }))
    .filter(({ r }) => m.inData(r) && m.usersOf(r.new) === 1)
    .sort((p, q) => q.r.new - p.r.new)
  for (const { r, index } of movable) {
    const h = m.hole()
    if (h === undefined || h > r.new) break
    copy(r.new, h)
    setSlot(index, { ...r, new: h, rawNew: BigInt(h) })
    moves++
  }
  if (moves > 0) act('compact', 'cow-data', `move ${moves} data chunk(s) down into leaked chunks and repoint their records`)
}

async function apply(dev: BlockDevice, layout: StoreLayout, s: Step, journal: UndoJournal | undefined): Promise<void> {
  const write = async (offset: number, data: Uint8Array, tag: string): Promise<void> => {
    if (journal) await journal.save(dev, offset, data.byteLength)
    await dev.write(offset, data, tag)
    await dev.flush()
  }
  const recordSector = async (index: number, fn: (sector: Uint8Array, slotInSector: number) => void): Promise<void> => {
    const { area, slot } = layout.slotOf(index)
    const off = layout.offset(layout.areaLocation(area)) + Math.floor((slot * RECORD_BYTES) / SECTOR_BYTES) * SECTOR_BYTES
    const sector = await dev.read(off, SECTOR_BYTES, 'cow-area')
    fn(sector, slot % (SECTOR_BYTES / RECORD_BYTES))
    await write(off, sector, 'cow-area')
  }
  switch (s.type) {
    case 'header':
      return write(0, encodeHeader(s.header, layout.chunkBytes), 'cow-header')
    case 'extend':
      if (journal) await journal.saveSize(dev) // undo truncates back to the old length
      await dev.truncate(s.size)
      return write(layout.offset(s.zeroChunk), new Uint8Array(layout.chunkBytes), 'cow-area')
    case 'zero-slots':
      for (const slot of [...s.slots].sort((x, y) => y - x)) {
        await recordSector(s.area * layout.perArea + slot, (sec, i) => sec.fill(0, i * RECORD_BYTES, (i + 1) * RECORD_BYTES))
      }
      return
    case 'sector':
      return recordSector(s.records[0]!.index, (sec, first) => {
        const base = s.records[0]!.index - first
        for (const w of s.records) encodeRecord(sec, w.index - base, w.old, w.new)
      })
    case 'set-record':
      return recordSector(s.index, (sec, i) => encodeRecord(sec, i, s.old, s.new))
    case 'clear-record':
      return recordSector(s.index, (sec, i) => sec.fill(0, i * RECORD_BYTES, (i + 1) * RECORD_BYTES))
    case 'copy-chunk': {
      const data = await dev.read(layout.offset(s.from), layout.chunkBytes, 'cow-data')
      return write(layout.offset(s.to), data, 'cow-data')
    }
  }
}
