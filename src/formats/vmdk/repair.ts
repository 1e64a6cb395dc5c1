/**
 * VMDK repair, where it is safe (qemu-img has none for vmdk: `check -r` only
 * checks). Only hosted sparse extents (header at 0, no compressed grains, no
 * footer) are written: a monolithicSparse file, or each extent file of a
 * twoGbMaxExtentSparse image (repairSplit: one undo journal per extent, the
 * descriptor never written), and only when its primary metadata is sound:
 * the primary grain directory and every primary grain table inside the file,
 * every grain inside the file and below the capacity, and no two of header,
 * embedded descriptor, primary directory, primary tables and grains
 * overlapping. Each step is journalled (the bytes it overwrites or cuts, and
 * the file's size, saved and flushed before its first change), applied and
 * flushed, then the image is checked again.
 *
 *   E. (-r leaks and -r all) the end of the file: bytes past everything the
 *      metadata reaches (leaked grains: a crash between a grain and its table
 *      entry) are cut away. Nothing maps them, so the cut changes no guest
 *      byte; leaked grains in the middle of the file stay (the check names
 *      them).
 *   R. (-r all) the redundant grain directory and tables made equal to the
 *      primary: a redundant table is rewritten in place when its offset is
 *      usable (inside the file, clear of every primary structure, grain and
 *      other redundant table), otherwise a new one is appended; all tables are
 *      flushed before the redundant directory that names them is written (in
 *      place when its own offset is usable; otherwise appended, flushed, and
 *      only then the header's rgdOffset switched to it, one sector).
 *
 * No step writes a byte the primary directory, a primary table or a grain
 * uses, and QEMU reads the primary only: the guest reads what it read at
 * every crash state. Everything else (a primary table outside the file,
 * overlapping grains, a stream, a flat descriptor file's extents) is reported as
 * not repaired, and the exit code is the check's.
 */
import { CorruptImageError, ImgtoolError, ReadOnlyError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { OverlayDevice } from '../../io/overlay-device.js'
import type { CheckOptions, CheckReport, Notice, RepairAction, RepairMode, RepairResult } from '../../check/types.js'
import type { JournalIdentity } from '../../check/undo.js'
import { putU32le, putU64le } from '../../util/bytes.js'
import { checkVmdk } from './check.js'
import { VmdkJournal } from './journal.js'
import { readSparse, type SparseExtent, type VmdkLayout } from './open.js'
import { FLAG_RGD, HEADER_SIZE, SECTOR, decodeGrainEntry } from './spec.js'

/** One step: its writes (in place, or appended past the end), one flush, then an optional cut and a flush. */
interface Step {
  action: RepairAction
  writes: Array<{ offset: number; data: Uint8Array; tag: 'l1' | 'l2' | 'header' }>
  truncate?: number
}

interface Region {
  start: number
  end: number
}

/** The hosted sparse extent as it is on the device now, with what makes its primary metadata unsound. */
interface Model {
  e: SparseExtent
  size: number
  /** header, descriptor, primary directory and primary tables, sorted, disjoint when `unsound` is unset */
  meta: Region[]
  /** the grains' host offsets (each one grain long), sorted, disjoint from each other and `meta` when `unsound` is unset */
  grains: Float64Array
  /** the end of everything the metadata names (redundant structures inside the file included) */
  reach: number
  unsound?: string
}

const roundUp = (n: number, to: number) => Math.ceil(n / to) * to

export async function repairVmdk(device: BlockDevice, layout: VmdkLayout, options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
  const file = device.name
  if (device.readOnly && !options.dryRun) throw new ReadOnlyError(`vmdk: ${file}: open the image read-write to repair it`, { file })
  const dryRun = options.dryRun ?? false
  const e = layout.extents[0]
  const hosted = layout.extents.length === 1 && e?.kind === 'sparse' && e.device === device ? e : undefined
  const split = hosted ? undefined : splitExtents(device, layout)
  if (split && 'extents' in split) return repairSplit(device, layout, split.extents, options)
  if (!hosted || hosted.compressed || hosted.markers || hosted.footerOffset !== undefined || hosted.headerOffset !== 0) {
    // nothing written: a stream's metadata (its footer is the header in force) and other descriptor files' extents
    const why = hosted
      ? hosted.footerOffset !== undefined
        ? 'a stream-optimized extent whose footer is the header in force (imgtool does not rewrite a stream: no change to it is provably safe)'
        : 'a stream-optimized extent (compressed grains: imgtool does not rewrite a stream)'
      : split!.why
    const report = await checkVmdk(file, layout)
    const after = withNotice(report, notRepaired(report, file, why))
    return { before: after, after, actions: [], dryRun }
  }
  if (dryRun) {
    // the real steps on an overlay that keeps its writes in memory: the plan and the prediction are the repair's own
    const overlay = new OverlayDevice(device)
    try {
      const r = await repairSteps(overlay, layout, hosted, options.repair, async () => undefined, { wrote: false })
      // a dry run reports the check before: with what the repair would leave alone said there too
      const left = (r.after.notices ?? []).find((n) => n.kind === 'not-repaired')
      return { before: withNotice(r.before, left), after: r.after, actions: r.actions, dryRun: true }
    } finally {
      await overlay.close()
    }
  }
  const journal = options.journal ? new VmdkJournal(options.journal) : undefined
  const state = { wrote: false }
  let result: RepairResult
  try {
    const r = await repairSteps(device, layout, hosted, options.repair, async () => journal, state)
    result = { before: r.before, after: r.after, actions: r.actions, dryRun: false }
  } catch (err) {
    throw failure(err, file, state.wrote, journal && journal.records > 0 ? options.journalPath : undefined)
  }
  if (journal && journal.records > 0) {
    await journal.seal(device, HEADER_SIZE, options.journalIdentity) // the repair has finished: tie the journal to what it left
    if (options.journalPath) result.journalPath = options.journalPath
  }
  return result
}

/** The extent files of a twoGbMaxExtentSparse image the repair may write: each a hosted sparse file of its own, opened (and confined) as check opened it. */
function splitExtents(device: BlockDevice, layout: VmdkLayout): { extents: SparseExtent[] } | { why: string } {
  const whyNot = `a ${layout.createType} descriptor file (imgtool repairs hosted monolithicSparse files and the extent files of a twoGbMaxExtentSparse image)`
  if (layout.createType !== 'twoGbMaxExtentSparse' || layout.extents.length === 0) return { why: whyNot }
  const out: SparseExtent[] = []
  const seen = new Set<BlockDevice>()
  for (const e of layout.extents) {
    if (e.kind !== 'sparse' || e.device === device) return { why: whyNot }
    if (seen.has(e.device)) return { why: `the extent file ${e.file} is named by more than one descriptor line (imgtool repairs each extent file once)` }
    if (e.compressed || e.markers || e.footerOffset !== undefined || e.headerOffset !== 0)
      return { why: `the extent file ${e.file} is stream-optimized (imgtool does not rewrite a stream)` }
    seen.add(e.device)
    out.push(e)
  }
  return { extents: out }
}

/**
 * A twoGbMaxExtentSparse image: each extent file repaired as a hosted monolithicSparse file is (its
 * leaked end, its redundant directory and tables), one after the other, each with its own undo journal
 * (`extentJournal`, made on the extent's first change and sealed to that file when its repair ends).
 * The descriptor file is never written: no plan needs it.
 */
async function repairSplit(
  device: BlockDevice,
  layout: VmdkLayout,
  extents: SparseExtent[],
  options: CheckOptions & { repair: RepairMode },
): Promise<RepairResult> {
  const file = device.name
  const dryRun = options.dryRun ?? false
  const before = await checkVmdk(file, layout)
  if (!dryRun && options.journal && !options.extentJournal) {
    const after = withNotice(before, notRepaired(before, file, 'no undo journal can be made for its extent files'))
    return { before: after, after, actions: [], dryRun }
  }
  const actions: RepairAction[] = []
  const reloaded: SparseExtent[] = []
  const extentFiles = new Set(extents.map((e) => e.file))
  // the problems of the check-open not of an extent's metadata (each extent's own are read again after its repair)
  const problems = layout.problems.filter((p) => !extentFiles.has(String(p.details.file ?? '')))
  const left: Notice[] = []
  let leaksFixed = 0
  // a dry run: each extent's steps on an overlay, kept until the prediction (the check after) is made
  const overlays: OverlayDevice[] = []
  try {
    for (const e of extents) {
      const overlay = dryRun ? new OverlayDevice(e.device) : undefined
      if (overlay) overlays.push(overlay)
      const dev = overlay ?? e.device
      let created: { device: BlockDevice; path: string; identity?: JournalIdentity } | undefined
      let journal: VmdkJournal | undefined
      const journalFor = async (): Promise<VmdkJournal | undefined> => {
        if (dryRun || !options.extentJournal) return undefined
        if (!journal) {
          created = await options.extentJournal(e.file)
          journal = new VmdkJournal(created.device)
        }
        return journal
      }
      const state = { wrote: false }
      try {
        const r = await repairSteps(dev, layout, e, options.repair, journalFor, state)
        for (const a of r.actions) actions.push({ ...a, message: `${e.file}: ${a.message}` })
        reloaded.push(r.extent)
        problems.push(...r.problems)
        leaksFixed += r.before.leaksFixed
        const n = (r.after.notices ?? []).find((x) => x.kind === 'not-repaired')
        if (n) left.push(n)
      } catch (err) {
        const path = journal && journal.records > 0 ? created?.path : undefined
        const f = failure(err, e.file, state.wrote, undefined)
        if (!state.wrote || !path) throw f
        throw new ImgtoolError(
          f.code,
          `${f.message.replace(/; no undo journal was kept$/, '')}; to put it back: imgtool repair --undo ${path} --force ${e.file}`,
          {
            file: e.file,
            journal: path,
          },
        )
      }
      if (journal && journal.records > 0 && created) {
        await journal.seal(e.device, HEADER_SIZE, created.identity) // this extent's repair has finished: tie its journal to what it left
        actions.push({
          kind: 'undo-journal',
          structure: 'journal',
          message: `undo journal of ${e.file} written to ${created.path} (restore with: imgtool repair --undo ${created.path} ${e.file})`,
        })
      }
    }
    let after = await checkVmdk(file, { ...layout, extents: reloaded, problems })
    for (const n of left) after = withNotice(after, n)
    const corruptionsFixed = Math.max(0, before.corruptions - after.corruptions)
    const b = { ...before, leaksFixed, corruptionsFixed }
    if (!dryRun) return { before: b, after, actions, dryRun }
    // a dry run reports the check before, with what the repair would leave alone said there too
    let shown: CheckReport = b
    for (const n of left) shown = withNotice(shown, n)
    return { before: shown, after, actions, dryRun }
  } finally {
    for (const o of overlays) await o.close()
  }
}

function failure(e: unknown, file: string, wrote: boolean, journalPath: string | undefined): ImgtoolError {
  const msg = e instanceof Error ? e.message : String(e)
  if (!wrote) return e instanceof ImgtoolError ? e : new ImgtoolError('INTERNAL', `vmdk: ${file}: repair failed before writing anything: ${msg}`, { file })
  const undo = journalPath ? `the undo journal ${journalPath} restores the image` : 'no undo journal was kept'
  return new ImgtoolError(e instanceof ImgtoolError ? e.code : 'INTERNAL', `vmdk: ${file}: repair failed after it had written to the image: ${msg}; ${undo}`, {
    file,
    journal: journalPath,
  })
}

function withNotice(r: CheckReport, n: Notice | undefined): CheckReport {
  return n ? { ...r, notices: [...(r.notices ?? []), n] } : r
}

/**
 * What the repair does about a finding or notice, by its kind and whatever its severity (a VMDK check
 * counts as qemu-img's: the redundant copy's damage and leaked grains are warnings and notices, exit 0):
 * 'tail' (-r leaks and -r all) the leaked grains at the end; 'redundant' (-r all) the redundant grain
 * directory and tables made equal to the primary; undefined: nothing (reported as not repaired).
 */
export type VmdkFix = 'tail' | 'redundant'

export function fixFor(f: { kind: string; structure: string; message: string }): VmdkFix | undefined {
  switch (f.kind) {
    case 'leaked-grain':
      return 'tail'
    case 'rgd-differs':
    case 'rgt-differs':
    case 'rgt-behind':
    case 'redundant-grain-directory-range':
      return 'redundant'
    case 'gt-past-eof':
      return /: redundant grain directory entry /.test(f.message) ? 'redundant' : undefined
    case 'overlap':
      // an overlap that only a redundant structure takes part in (the primary ones and the grains stay where they are)
      return /^vmdk: .*: (grain table \d+ \(redundant\)|redundant grain directory) at /.test(f.message) ||
        / overlaps (grain table \d+ \(redundant\)|redundant grain directory) \(/.test(f.message)
        ? 'redundant'
        : undefined
    default:
      return undefined
  }
}

/** Everything a check reports, findings of every severity and the notices the repair acts on, with what fixes it. */
function items(r: CheckReport): Array<{ kind: string; fix: VmdkFix | undefined }> {
  const notices = (r.notices ?? []).filter((n) => n.kind === 'leaked-grain' || n.kind === 'rgt-behind')
  return [...r.findings, ...notices.map((n) => ({ ...n, severity: 'warning' as const }))].map((f) => ({ kind: f.kind, fix: fixFor(f) }))
}

/** A notice naming what a check still reports (any severity), when there is any: the repair left it. */
function notRepaired(r: CheckReport, file: string, why: string): Notice | undefined {
  const kinds = [...new Set(items(r).map((x) => x.kind))]
  if (r.corruptions + r.checkErrors === 0 && kinds.length === 0) return undefined
  return {
    kind: 'not-repaired',
    structure: 'image',
    message: `vmdk: ${file}: not repaired${kinds.length > 0 ? ` (${kinds.join(', ')})` : ''}: ${why}; nothing was written for ${kinds.length === 1 ? 'it' : 'them'}`,
  }
}

/** Why what a repair leaves (its after-check) is left, by the kinds of what is left. */
function whyLeft(r: CheckReport, mode: RepairMode): string {
  const left = items(r)
  const why: string[] = []
  if (left.some((x) => x.fix === undefined)) why.push('imgtool repairs only the redundant grain directory and tables and the leaked end of the file')
  if (mode === 'leaks' && left.some((x) => x.fix === 'redundant')) why.push("the redundant copy is repaired by --mode all, not 'leaks'")
  if (left.some((x) => x.fix === 'tail')) why.push('leaked grains before the last grain a table reaches stay (only the end of the file is cut)')
  if (left.some((x) => x.fix === 'redundant') && mode === 'all') why.push('the redundant copy could not be made equal to the primary')
  return why.join('; ')
}

const leakedGrains = (r: CheckReport) => (r.notices ?? []).filter((n) => n.kind === 'leaked-grain').reduce((s, n) => s + (n.cluster ?? 0), 0)

/** The hosted extent read again from `dev` (the repair changes it), with the problems a check-open lets through. */
async function load(dev: BlockDevice, base: SparseExtent): Promise<{ e: SparseExtent; problems: CorruptImageError[] }> {
  const problems: CorruptImageError[] = []
  // what QEMU reads as zeros (a directory past the end of the file) is a problem too: the repair never writes there
  const e = await readSparse(dev, base.file, base.start, base.type, base.line, (p) => problems.push(p), false, problems)
  return { e, problems }
}

async function checkOn(dev: BlockDevice, layout: VmdkLayout, base: SparseExtent): Promise<CheckReport> {
  const { e, problems } = await load(dev, base)
  return checkVmdk(dev.name, { ...layout, extents: [e], problems })
}

async function repairSteps(
  dev: BlockDevice,
  layout: VmdkLayout,
  base: SparseExtent,
  mode: RepairMode,
  journalFor: () => Promise<VmdkJournal | undefined>,
  state: { wrote: boolean },
): Promise<{ before: CheckReport; after: CheckReport; actions: RepairAction[]; extent: SparseExtent; problems: CorruptImageError[] }> {
  const before = await checkOn(dev, layout, base)
  const actions: RepairAction[] = []
  const apply = async (step: Step): Promise<void> => {
    actions.push(step.action)
    const journal = await journalFor()
    if (journal) {
      if (step.truncate !== undefined || step.writes.some((w) => w.offset + w.data.byteLength > dev.size)) await journal.saveSize(dev)
      for (const w of step.writes) await journal.save(dev, w.offset, w.data.byteLength)
      if (step.truncate !== undefined && step.truncate < dev.size) await journal.save(dev, step.truncate, dev.size - step.truncate)
    }
    state.wrote = true
    for (const w of step.writes) await dev.write(w.offset, w.data, w.tag)
    await dev.flush()
    if (step.truncate !== undefined && step.truncate < dev.size) {
      await dev.truncate(step.truncate)
      await dev.flush()
    }
  }
  // the plan follows the kinds the check reports, whatever their severity (a VMDK check counts as qemu-img's:
  // the redundant copy's damage and the leaked end are warnings and notices there, exit 0)
  const wanted = new Set(items(before).map((x) => x.fix))
  const redundant = mode === 'all' && wanted.has('redundant')
  let model = await readModel(dev, base)
  const unsound = wanted.has('tail') || redundant ? model.unsound : undefined
  if ((wanted.has('tail') || redundant) && !unsound) {
    // the cut takes only bytes nothing reaches: the leaked end, or what a redundant table in a leaked grain left of it
    const cut = planCut(model)
    if (cut) {
      await apply(cut)
      model = await readModel(dev, base)
    }
    if (redundant) for (const step of await planRedundant(dev, model)) await apply(step)
  }
  const now = await load(dev, base)
  let after = await checkVmdk(dev.name, { ...layout, extents: [now.e], problems: now.problems })
  if (unsound) {
    const why = `${unsound.replace(/^vmdk: [^:]*: /, '')} (imgtool repairs the redundant metadata and the end of the file only from a sound primary)`
    after = withNotice(after, notRepaired(after, dev.name, why))
  } else {
    after = withNotice(after, notRepaired(after, dev.name, whyLeft(after, mode)))
  }
  const leaksFixed = Math.max(0, leakedGrains(before) - leakedGrains(after))
  const corruptionsFixed = Math.max(0, before.corruptions - after.corruptions)
  return { before: { ...before, leaksFixed, corruptionsFixed }, after, actions, extent: now.e, problems: now.problems }
}

/** Read the extent's primary metadata and judge it. Memory: one grain table at a time, 16 bytes per allocated grain at most. */
async function readModel(dev: BlockDevice, base: SparseExtent): Promise<Model> {
  const { e, problems } = await load(dev, base)
  const size = dev.size
  const used: Region[] = [{ start: 0, end: HEADER_SIZE }]
  const grainAt: number[] = []
  let reach = HEADER_SIZE
  const model: Model = { e, size, meta: used, grains: new Float64Array(0), reach }
  const bad = (why: string): Model => ((model.unsound ??= why), model)
  const primaryProblem = problems.find((p) => p.details['structure'] !== 'redundant grain directory')
  if (primaryProblem) return bad(primaryProblem.message)
  const h = e.header
  if (h.descriptorOffset > 0n && h.descriptorSize > 0n) {
    const at = Number(h.descriptorOffset) * SECTOR
    used.push({ start: at, end: at + Number(h.descriptorSize) * SECTOR })
  }
  const gdBytes = e.gd.length * 4
  const gtBytes = e.gtes * 4
  used.push({ start: e.gdOffset, end: e.gdOffset + gdBytes })
  for (let i = 0; i < e.gd.length; i++) {
    const s = e.gd[i]!
    if (s === 0) continue
    const at = s * SECTOR
    if (at + gtBytes > size) return bad(`vmdk: ${e.file}: primary grain table ${i} at ${hex(at)} extends past the end of the file (size ${hex(size)})`)
    used.push({ start: at, end: at + gtBytes })
    const t = await dev.read(at, gtBytes, 'l2')
    const dv = new DataView(t.buffer, t.byteOffset, t.byteLength)
    for (let j = 0; j < e.gtes; j++) {
      const v = dv.getUint32(j * 4, true)
      if (v === 0) continue
      if ((i * e.gtes + j) * e.grainSize >= e.length) return bad(`vmdk: ${e.file}: grain table ${i} entry ${j} maps a grain past the capacity`)
      const g = decodeGrainEntry(v, e.zeroGrain, e.compressed)
      if (g.kind !== 'normal') continue
      const gAt = g.sector * SECTOR
      if (gAt + e.grainSize > size)
        return bad(`vmdk: ${e.file}: grain at ${hex(gAt)} (grain table ${i} entry ${j}) ends past the end of the file (size ${hex(size)})`)
      grainAt.push(gAt)
    }
  }
  const overlap = (at: number) => bad(`vmdk: ${e.file}: the primary metadata and grains overlap at ${hex(at)} (overlapping grains or tables)`)
  used.sort((a, b) => a.start - b.start || a.end - b.end)
  for (let k = 0; k < used.length; k++) {
    const x = used[k]!
    if (k > 0 && x.start < used[k - 1]!.end) return overlap(x.start)
    reach = Math.max(reach, x.end)
  }
  const grains = Float64Array.from(grainAt).sort()
  grainAt.length = 0
  model.grains = grains
  for (let k = 0; k < grains.length; k++) {
    if (k > 0 && grains[k]! < grains[k - 1]! + e.grainSize) return overlap(grains[k]!)
    reach = Math.max(reach, grains[k]! + e.grainSize)
  }
  for (const x of used) if (!clearOfGrains(grains, e.grainSize, x.start, x.end - x.start)) return overlap(x.start)
  // no byte of a redundant structure that starts inside the file is cut
  const keep = (start: number, len: number) => {
    if (start < size) reach = Math.max(reach, Math.min(size, start + len))
  }
  if (e.rgd && e.rgdOffset !== undefined) {
    keep(e.rgdOffset, gdBytes)
    for (const s of e.rgd) if (s !== 0) keep(s * SECTOR, gtBytes)
  }
  model.reach = reach
  return model
}

/** E: the file cut where the metadata ends (never below the first grain's offset). */
function planCut(m: Model): Step | undefined {
  const end = roundUp(Math.max(m.reach, m.e.overhead), SECTOR)
  if (end >= m.size) return undefined
  const freed = m.size - end
  const grains = Math.floor(m.size / m.e.grainSize) - Math.ceil(end / m.e.grainSize)
  return {
    action: {
      kind: 'leak-freed',
      structure: 'grain',
      hostOffset: end,
      message: `${freed} bytes at ${hex(end)} that no grain table entry reaches${grains > 0 ? ` (${grains} leaked grain(s))` : ''} cut off the end of the file`,
    },
    writes: [],
    truncate: end,
  }
}

/** Is [start, start+len) clear of the sorted disjoint grains (each `grainSize` long)? */
function clearOfGrains(starts: Float64Array, grainSize: number, start: number, len: number): boolean {
  let lo = 0
  let hi = starts.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (starts[mid]! + grainSize <= start) lo = mid + 1
    else hi = mid
  }
  return lo >= starts.length || starts[lo]! >= start + len
}

/** Is [start, start+len) clear of the sorted disjoint regions? */
function clearOf(sorted: Region[], start: number, len: number): boolean {
  let lo = 0
  let hi = sorted.length
  while (lo < hi) {
    const mid = (lo + hi) >> 1
    if (sorted[mid]!.end <= start) lo = mid + 1
    else hi = mid
  }
  return lo >= sorted.length || sorted[lo]!.start >= start + len
}

/** R: the redundant tables, then the redundant directory, then (when it moved) the header's rgdOffset. */
async function planRedundant(dev: BlockDevice, m: Model): Promise<Step[]> {
  const e = m.e
  if (!(e.header.flags & FLAG_RGD) || !e.rgd || e.rgdOffset === undefined) return []
  const size = m.size
  const n = e.gd.length
  const gdBytes = n * 4
  const gtBytes = e.gtes * 4
  const gtSpan = roundUp(gtBytes, SECTOR)
  /** sectors already taken by a redundant structure this plan keeps, and the old directory's (read until the switch) */
  const claimed = new Set<number>()
  const claim = (start: number, len: number) => {
    for (let s = Math.floor(start / SECTOR); s < Math.ceil((start + len) / SECTOR); s++) claimed.add(s)
  }
  const unclaimed = (start: number, len: number) => {
    for (let s = Math.floor(start / SECTOR); s < Math.ceil((start + len) / SECTOR); s++) if (claimed.has(s)) return false
    return true
  }
  const usable = (start: number, len: number) =>
    start >= HEADER_SIZE && start % SECTOR === 0 && start + len <= size && clearOf(m.meta, start, len) && clearOfGrains(m.grains, e.grainSize, start, len)
  const rgdUsable = usable(e.rgdOffset, gdBytes)
  if (e.rgdOffset + gdBytes <= size) claim(e.rgdOffset, gdBytes)
  let alloc = roundUp(size, SECTOR)
  const newR = new Uint32Array(n)
  const writes: Step['writes'] = []
  let inPlace = 0
  let appended = 0
  for (let i = 0; i < n; i++) {
    const ps = e.gd[i]!
    if (ps === 0) continue
    const primary = await dev.read(ps * SECTOR, gtBytes, 'l2')
    const rs = e.rgd[i]!
    const at = rs * SECTOR
    if (rs !== 0 && usable(at, gtBytes) && unclaimed(at, gtBytes)) {
      claim(at, gtBytes)
      newR[i] = rs
      const cur = await dev.read(at, gtBytes, 'l2')
      if (!Buffer.from(cur).equals(Buffer.from(primary))) {
        writes.push({ offset: at, data: primary, tag: 'l2' })
        inPlace++
      }
    } else {
      const table = new Uint8Array(gtSpan)
      table.set(primary)
      writes.push({ offset: alloc, data: table, tag: 'l2' })
      newR[i] = alloc / SECTOR
      alloc += gtSpan
      appended++
    }
  }
  const dir = new Uint8Array(gdBytes)
  for (let i = 0; i < n; i++) putU32le(dir, i * 4, newR[i]!)
  const steps: Step[] = []
  if (writes.length > 0) {
    const where = [inPlace > 0 ? `${inPlace} in place` : '', appended > 0 ? `${appended} new at ${hex(roundUp(size, SECTOR))}` : ''].filter(Boolean).join(', ')
    steps.push({
      action: {
        kind: 'rgt-rewritten',
        structure: 'redundant grain table',
        hostOffset: writes[0]!.offset,
        message: `${writes.length} redundant grain table(s) rewritten from the primary (${where})`,
      },
      writes,
    })
  }
  if (rgdUsable) {
    const cur = await dev.read(e.rgdOffset, gdBytes, 'l1')
    if (!Buffer.from(cur).equals(Buffer.from(dir))) {
      steps.push({
        action: {
          kind: 'rgd-rewritten',
          structure: 'redundant grain directory',
          hostOffset: e.rgdOffset,
          message: `redundant grain directory at ${hex(e.rgdOffset)} rewritten to name the redundant tables`,
        },
        writes: [{ offset: e.rgdOffset, data: dir, tag: 'l1' }],
      })
    }
    return steps
  }
  const at = alloc
  const padded = new Uint8Array(roundUp(gdBytes, SECTOR))
  padded.set(dir)
  steps.push({
    action: {
      kind: 'rgd-rewritten',
      structure: 'redundant grain directory',
      hostOffset: at,
      message: `redundant grain directory (its offset ${hex(e.rgdOffset)} is unusable: outside the file or over the primary metadata or grains) written anew at ${hex(at)}`,
    },
    writes: [{ offset: at, data: padded, tag: 'l1' }],
  })
  const field = new Uint8Array(8)
  putU64le(field, 0, at / SECTOR)
  steps.push({
    action: { kind: 'rgd-moved', structure: 'header', hostOffset: 48, message: `header's rgdOffset switched from ${hex(e.rgdOffset)} to ${hex(at)}` },
    writes: [{ offset: 48, data: field, tag: 'header' }],
  })
  return steps
}
