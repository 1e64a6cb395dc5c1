/**
 * Repair: plan, then apply steps each of which leaves a loadable store with no
 * exception lost (every step is one sector-sized metadata write or a chunk copy,
 * each followed by a flush):
 *  - `leaks`: drop exact duplicate records; compaction moves data chunks from the
 *    top down into holes (copy, flush, repoint the record, flush);
 *  - `all`: also drops records that point nowhere valid and duplicates (keeping the
 *    one the kernel reads: the first), zeroes garbage after the terminator, normalises
 *    the header, extends a truncated COW. A record is dropped by moving the last
 *    record into its slot, then clearing the last slot (meanwhile an exact duplicate,
 *    which is harmless).
 *  - an invalidated store (valid=0) is left alone unless flags.forceValid and every
 *    record checks out.
 */
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage } from '../../image/disk-image.js'
import type { CheckOptions, RepairAction, RepairMode, RepairResult } from '../../check/types.js'
import { RECORD_BYTES, SECTOR_BYTES, SNAP_MAGIC, SNAPSHOT_DISK_VERSION, type StoreLayout } from './constants.js'
import { analyzeStore, type StoreAnalysis } from './check.js'
import { encodeRecord } from './exceptions.js'
import { encodeHeader, type StoreHeader } from './header.js'
import { UndoJournal } from './journal.js'

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
  const aOpts = { originSize: options.originSize, origin: options.origin }
  const first = await analyzeStore(dev, aOpts)
  const before = first.report
  const actions: RepairAction[] = []
  const journal = options.journal && !options.dryRun ? new UndoJournal(options.journal) : undefined
  if (journal) await journal.start()
  let a: StoreAnalysis = first
  for (let round = 0; round < 3; round++) {
    const p = plan(a, options)
    actions.push(...p.actions)
    if (options.dryRun || p.steps.length === 0) break
    for (const s of p.steps) await apply(dev, a.layout!, s, journal)
    a = await analyzeStore(dev, aOpts)
    if (!p.replan) break
  }
  const after = options.dryRun ? before : a.report
  before.leaksFixed = Math.max(0, before.leaks - after.leaks)
  before.corruptionsFixed = Math.max(0, before.corruptions - after.corruptions)
  const result: RepairResult = { before, after, actions, dryRun: options.dryRun ?? false }
  if (options.journalPath) result.journalPath = options.journalPath
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
    if (!forceValidFlag(options)) return out // content undefined: never flip valid back by default
    if (!recordsClean) return out
    h.valid = 1
    headerChanged = true
    act('force-valid', 'cow-header', 're-validate the invalidated store (valid=1): every record checks out (forced)', 4)
  } else if (all && h.valid !== 1) {
    h.valid = 1
    headerChanged = true
    act('normalise-valid', 'cow-header', `valid ${a.header.valid} → 1`, 4)
  }
  if (all && a.notices.some((n) => n.kind === 'header-tail-garbage')) {
    headerChanged = true
    act('zero-header-tail', 'cow-header', 'zero chunk 0 after the 16 header bytes', 16)
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
    act('extend-cow', 'cow-area', `extend the COW to ${(loc + 1) * layout.chunkBytes} bytes and zero area ${t.truncatedArea} (chunk ${loc})`, layout.offset(loc))
    out.replan = true
    return out
  }
  if (all && a.garbageSlots.length > 0) {
    out.steps.push({ type: 'zero-slots', area: t.currentArea, slots: a.garbageSlots })
    act('zero-garbage', 'cow-area', `zero ${a.garbageSlots.length} slot(s) after the terminator in area ${t.currentArea}`, layout.offset(layout.areaLocation(t.currentArea)))
  }
  // drop records
  const recs = t.records.map((r) => ({ old: r.old, new: r.new, rawNew: r.rawNew }))
  const drop = new Set<number>()
  for (const [i, f] of a.recordFaults) if (all || f === 'duplicate-record') drop.add(i)
  for (const i of [...drop].sort((x, y) => x - y)) {
    const r = t.records[i]!
    act('drop-record', 'cow-area', `drop record ${i} (${r.rawOld}→${r.rawNew}): ${a.recordFaults.get(i)}`, layout.offset(layout.areaLocation(r.area)) + r.slot * RECORD_BYTES)
  }
  while (drop.size > 0) {
    const e = recs.length - 1
    if (drop.has(e)) {
      out.steps.push({ type: 'clear-record', index: e })
      drop.delete(e)
    } else {
      const i = Math.max(...drop)
      const last = recs[e]!
      out.steps.push({ type: 'set-record', index: i, old: last.old, new: last.new }, { type: 'clear-record', index: e })
      recs[i] = last
      drop.delete(i)
    }
    recs.pop()
  }
  // compaction: move the highest data chunks down into holes
  const inData = (c: number, raw: bigint): boolean => raw < 1n << 53n && layout.fits(c) && !layout.isMetadata(c)
  const used = new Map<number, number>()
  for (const r of recs) if (inData(r.new, r.rawNew)) used.set(r.new, (used.get(r.new) ?? 0) + 1)
  let nextFree = 2
  for (const r of recs) nextFree = Math.max(nextFree, r.new + 1)
  const holes: number[] = []
  for (let c = 2; c < Math.min(nextFree, layout.cowChunks); c++) if (!layout.isMetadata(c) && !used.has(c)) holes.push(c)
  const movable = recs
    .map((r, index) => ({ ...r, index }))
    .filter((r) => inData(r.new, r.rawNew) && used.get(r.new) === 1)
    .sort((x, y) => y.new - x.new)
  let moves = 0
  while (holes.length > 0 && movable.length > 0 && holes[0]! < movable[0]!.new) {
    const hole = holes.shift()!
    const r = movable.shift()!
    out.steps.push({ type: 'copy-chunk', from: r.new, to: hole }, { type: 'set-record', index: r.index, old: r.old, new: hole })
    moves++
  }
  if (moves > 0) act('compact', 'cow-data', `move ${moves} data chunk(s) down into leaked chunks and repoint their records`)
  return out
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
