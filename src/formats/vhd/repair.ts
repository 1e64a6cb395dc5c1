/**
 * VHD repair: what can be put right without guessing, each step journalled
 * (every byte it overwrites or cuts, and the file's size, saved and flushed
 * before its first change), applied and flushed, then checked again.
 *
 *   F. (-r all) a footer at 0 whose cookie, checksum or disk type is bad, when the copy
 *      that ends the file is valid (cookie, checksum, disk type 3 or 4) and
 *      names a dynamic header: the copy is written at 0 (one sector).
 *   H. (-r all) a dynamic header whose checksum is wrong but which is
 *      otherwise plausible (cookie, version 1.0, a power-of-two block size,
 *      a BAT inside the file, aligned and covering the virtual size): the
 *      checksum is rewritten (4 bytes in one sector).
 *   E. the end of the file. Leaks (-r leaks and -r all): bytes between the
 *      last thing the metadata reaches and the footer copy. The copy is
 *      written where the metadata ends (flush), then the file is cut after it
 *      (flush): a crash between the two leaves the leak as it was, never a
 *      file without a footer copy. With -r all, a footer copy that is missing
 *      or differs from the (valid) footer at 0 is rewritten from it at the
 *      same place; with -r leaks the copy that is there is the one moved.
 *
 *   R. (-r all) both footers damaged: rebuilt from the two when they leave no
 *      doubt (rebuildFooter); else a note says why.
 *   B. (-r all) BAT entries mapping a block over the footer, header, BAT or
 *      locator data: cleared (planBat).
 *
 * Nothing else is changed: BAT entries whose blocks overlap each other are
 * not guessed at (the check names them). Every step's write is one sector, or an
 * append past everything the metadata reaches, so no crash state is worse
 * than the image before: the guest reads what it read.
 */
import { CorruptImageError, ImgtoolError, ReadOnlyError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { OverlayDevice } from '../../io/overlay-device.js'
import { isPowerOfTwo } from '../../util/bytes.js'
import type { CheckOptions, CheckReport, Notice, RepairAction, RepairMode, RepairResult } from '../../check/types.js'
import { checkVhd, metadataSpans, reachedEnd } from './check.js'
import { VhdJournal } from './journal.js'
import { footerCookieOk, readLayout, MAX_BAT_BYTES, MIN_BLOCK_SIZE, type VhdLayout } from './open.js'
import {
  FOOTER_CHECKSUM_AT,
  FOOTER_SIZE,
  HEADER_CHECKSUM_AT,
  HEADER_COOKIE,
  HEADER_SIZE,
  MAX_SECTORS,
  SECTOR,
  TYPE_DIFFERENCING,
  TYPE_DYNAMIC,
  BAT_UNUSED,
  bitmapSize,
  decodeFooter,
  decodeHeader,
  footerVirtualSize,
  vhdChecksum,
} from './spec.js'
import { putU32be } from '../../util/bytes.js'

/** One step: its writes (each inside one sector, or an append), then an optional cut. */
interface Step {
  action: RepairAction
  writes: Array<{ offset: number; data: Uint8Array; tag: 'footer' | 'header' | 'bat' }>
  truncate?: number
}

export async function repairVhd(device: BlockDevice, options: CheckOptions & { repair: RepairMode }): Promise<RepairResult> {
  const file = device.name
  if (device.readOnly && !options.dryRun) throw new ReadOnlyError(`vpc: ${file}: open the image read-write to repair it`, { file })
  if (options.dryRun) {
    // the real steps on an overlay that keeps its writes in memory: the plan and the prediction are the repair's own
    const overlay = new OverlayDevice(device)
    try {
      return { ...(await repairSteps(overlay, options.repair, undefined, { wrote: false })), dryRun: true }
    } finally {
      await overlay.close()
    }
  }
  const journal = options.journal ? new VhdJournal(options.journal) : undefined
  const state = { wrote: false }
  let result: RepairResult
  try {
    result = await repairSteps(device, options.repair, journal, state)
  } catch (e) {
    throw failure(e, file, state.wrote, journal && journal.records > 0 ? options.journalPath : undefined)
  }
  if (journal && journal.records > 0) {
    await journal.seal(device, FOOTER_SIZE, options.journalIdentity) // the repair has finished: tie the journal to what it left
    if (options.journalPath) result.journalPath = options.journalPath
  }
  return result
}

function failure(e: unknown, file: string, wrote: boolean, journalPath: string | undefined): ImgtoolError {
  const msg = e instanceof Error ? e.message : String(e)
  if (!wrote) return e instanceof ImgtoolError ? e : new ImgtoolError('INTERNAL', `vpc: ${file}: repair failed before writing anything: ${msg}`, { file })
  const undo = journalPath ? `the undo journal ${journalPath} restores the image` : 'no undo journal was kept'
  return new ImgtoolError(e instanceof ImgtoolError ? e.code : 'INTERNAL', `vpc: ${file}: repair failed after it had written to the image: ${msg}; ${undo}`, {
    file,
    journal: journalPath,
  })
}

async function repairSteps(dev: BlockDevice, mode: RepairMode, journal: VhdJournal | undefined, state: { wrote: boolean }): Promise<RepairResult> {
  const before = await checkVhd(dev)
  const actions: RepairAction[] = []
  const apply = async (step: Step): Promise<void> => {
    actions.push(step.action)
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
  const notices: Notice[] = []
  if (mode === 'all') {
    const f = await planFooter(dev, notices)
    if (f) await apply(f)
    const h = await planHeader(dev)
    if (h) await apply(h)
    // (a header whose checksum this repair rewrote is not proof of where the BAT ends: a bent field may be why it was wrong)
    const b = await planBat(dev, notices, !before.findings.some((f) => f.kind === 'dynamic-header-checksum'))
    if (b) await apply(b)
  }
  const e = await planEnd(dev, mode)
  if (e) await apply(e)
  const after = await checkVhd(dev)
  if (notices.length > 0 && after.corruptions > 0) after.notices = [...(after.notices ?? []), ...notices]
  const fixed = (b: CheckReport, a: CheckReport) => ({
    leaksFixed: Math.max(0, b.leaks - a.leaks),
    corruptionsFixed: Math.max(0, b.corruptions - a.corruptions),
  })
  return { before: { ...before, ...fixed(before, after) }, after, actions, dryRun: false }
}

/** A footer that is whole: the cookie, a matching checksum, a sparse disk type. */
function sparseFooterOk(b: Uint8Array): boolean {
  if (!footerCookieOk(b)) return false
  const f = decodeFooter(b)
  return f.checksum === vhdChecksum(b, FOOTER_CHECKSUM_AT) && (f.diskType === TYPE_DYNAMIC || f.diskType === TYPE_DIFFERENCING)
}

/** F: the footer at 0 restored from the copy at the end (or, both bad, rebuilt from the two). */
async function planFooter(dev: BlockDevice, notices: Notice[]): Promise<Step | undefined> {
  if (dev.size < 2 * FOOTER_SIZE + HEADER_SIZE) return undefined
  const head = await dev.read(0, FOOTER_SIZE, 'footer')
  if (sparseFooterOk(head)) return undefined
  const tailAt = dev.size - FOOTER_SIZE
  const tail = await dev.read(tailAt, FOOTER_SIZE, 'footer')
  if (!sparseFooterOk(tail)) {
    if (!footerCookieOk(head) && !footerCookieOk(tail)) return undefined // no VHD footer to work from at all
    const r = await rebuildFooter(dev, head, tail)
    if (typeof r === 'string') {
      notices.push({ kind: 'footer-not-rebuilt', structure: 'footer', message: `vpc: ${dev.name}: both footers are damaged and not rebuilt: ${r}` })
      return undefined
    }
    return {
      action: { kind: 'footer-rebuilt', structure: 'footer', hostOffset: 0, message: `footer at 0x0 rebuilt from both damaged copies (${r.why})` },
      writes: [{ offset: 0, data: r.bytes, tag: 'footer' }],
    }
  }
  const headerAt = decodeFooter(tail).dataOffset
  if (headerAt < BigInt(FOOTER_SIZE) || headerAt + BigInt(HEADER_SIZE) > BigInt(tailAt)) return undefined
  const header = await dev.read(Number(headerAt), 8, 'header')
  if (String.fromCharCode(...header) !== HEADER_COOKIE) return undefined
  const why = !footerCookieOk(head)
    ? "it has no 'conectix' cookie"
    : decodeFooter(head).checksum !== vhdChecksum(head, FOOTER_CHECKSUM_AT)
      ? 'its checksum is wrong'
      : `its disk type ${decodeFooter(head).diskType} is not ${TYPE_DYNAMIC} or ${TYPE_DIFFERENCING}`
  return {
    action: { kind: 'footer-restored', structure: 'footer', hostOffset: 0, message: `footer at 0x0 (${why}) restored from its copy at ${hex(tailAt)}` },
    writes: [{ offset: 0, data: tail, tag: 'footer' }],
  }
}

/** H: a wrong dynamic header checksum rewritten, when everything else about the header holds up. */
async function planHeader(dev: BlockDevice): Promise<Step | undefined> {
  let layout: VhdLayout
  try {
    layout = await readLayout(dev, true)
  } catch (e) {
    if (e instanceof CorruptImageError) return undefined
    throw e
  }
  const s = layout.sparse
  if (!s) return undefined
  const sum = vhdChecksum(s.headerBytes, HEADER_CHECKSUM_AT)
  if (sum === s.header.checksum || !headerPlausible(layout, dev.size)) return undefined
  const at = s.headerOffset + HEADER_CHECKSUM_AT
  const bytes = new Uint8Array(4)
  putU32be(bytes, 0, sum)
  return {
    action: {
      kind: 'header-checksum-rewritten',
      structure: 'dynamic header',
      hostOffset: s.headerOffset,
      message: `dynamic header at ${hex(s.headerOffset)}: checksum ${hex(s.header.checksum)} rewritten as ${hex(sum)} (the header is otherwise sound)`,
    },
    writes: [{ offset: at, data: bytes, tag: 'header' }],
  }
}

function headerPlausible(layout: VhdLayout, size: number): boolean {
  const s = layout.sparse!
  const h = s.header
  const entries = h.maxTableEntries
  return (
    h.version === 0x00010000 &&
    isPowerOfTwo(h.blockSize) &&
    h.blockSize >= SECTOR &&
    s.headerOffset % SECTOR === 0 &&
    s.batOffset % SECTOR === 0 &&
    s.batOffset >= s.headerOffset + HEADER_SIZE &&
    s.batOffset + entries * 4 <= size &&
    entries * 4 <= MAX_BAT_BYTES &&
    entries <= Math.ceil((MAX_SECTORS * SECTOR) / h.blockSize) &&
    entries * h.blockSize >= layout.virtualSize
  )
}

/** E: the footer copy where the metadata ends, and nothing after it. */
async function planEnd(dev: BlockDevice, mode: RepairMode): Promise<Step | undefined> {
  let layout: VhdLayout
  try {
    layout = await readLayout(dev, true)
  } catch (e) {
    if (e instanceof CorruptImageError) return undefined
    throw e
  }
  const s = layout.sparse
  if (!s) return undefined
  const reached = reachedEnd(dev, s)
  if (reached > dev.size) return undefined // a block past the end of the file: the check names it; nothing here helps
  const tailAt = dev.size - FOOTER_SIZE
  const tail = tailAt >= FOOTER_SIZE ? await dev.read(tailAt, FOOTER_SIZE, 'footer') : new Uint8Array(FOOTER_SIZE)
  const copyThere = tailAt >= reached && footerCookieOk(tail)
  const copyOk = copyThere && tail.every((b, i) => b === layout.footerBytes[i])
  const headOk = sparseFooterOk(layout.footerBytes)
  const leak = copyThere && tailAt > reached
  let source: Uint8Array
  let message: string
  let kind: string
  if (mode === 'all' && !copyOk && headOk) {
    source = layout.footerBytes
    kind = 'footer-copy-rewritten'
    message = copyThere
      ? `footer copy at ${hex(tailAt)} (it differs from the footer at 0x0) rewritten from the footer, at ${hex(reached)}`
      : `footer copy (missing: the last 512 bytes, at ${hex(Math.max(0, tailAt))}, are not one) written from the footer at 0x0, at ${hex(reached)}`
  } else if (leak) {
    source = tail
    kind = 'leak-freed'
    message = ''
  } else return undefined
  const end = reached + FOOTER_SIZE
  if (leak) {
    const freed = tailAt - reached
    const freeing = `${freed} leaked bytes at ${hex(reached)} freed: the footer copy moved from ${hex(tailAt)} to ${hex(reached)} and the file cut to ${hex(end)}`
    message = kind === 'leak-freed' ? freeing : `${message}; ${freeing}`
  }
  const step: Step = { action: { kind, structure: kind === 'leak-freed' ? 'data' : 'footer copy', hostOffset: reached, message }, writes: [] }
  step.writes.push({ offset: reached, data: source.slice(), tag: 'footer' })
  if (dev.size > end) step.truncate = end
  return step
}

/** The footer's fields as byte ranges, the checksum (64..68) left out. */
const FOOTER_FIELDS: ReadonlyArray<readonly [string, number, number]> = [
  ['cookie', 0, 8],
  ['features', 8, 12],
  ['format version', 12, 16],
  ['data offset', 16, 24],
  ['timestamp', 24, 28],
  ['creator application', 28, 32],
  ['creator version', 32, 36],
  ['creator host OS', 36, 40],
  ['original size', 40, 48],
  ['current size', 48, 56],
  ['disk geometry', 56, 60],
  ['disk type', 60, 64],
  ['unique id', 68, 84],
  ['saved state', 84, 85],
  ['reserved', 85, 512],
]

/** The fields that decide how the disk reads (where it is, its type, its size). */
const READING_FIELDS = ['data offset', 'creator application', 'current size', 'disk geometry', 'disk type']

/** At most this many fields may differ between the two copies (2^n candidates are tried). */
const MAX_DIFFERING_FIELDS = 10

/**
 * Both footers fail their checksum (each still has its cookie). A footer is
 * rebuilt only when the two copies leave no doubt:
 *  - they name the same unique id (the disk's identity, which a child names);
 *  - of the footers that mix the two copies field by field, those that are
 *    plausible (disk type 3 or 4, a data offset at a sound dynamic header, a
 *    virtual size the BAT covers within one block, every BAT entry inside the
 *    file) include exactly one whose checksum equals a stored checksum (each
 *    copy's damage lay elsewhere: that mix is the footer as it was written; two
 *    such mixes must read the disk alike: same type, data offset and size); or,
 *    with no such mix, the copies agree on every field that decides how the
 *    disk reads (data offset, creator, current size, geometry, type) and those
 *    fit; the other fields are taken from the copy at 0, the checksum recomputed.
 * Anything else is a string saying why not.
 */
async function rebuildFooter(dev: BlockDevice, head: Uint8Array, tail: Uint8Array): Promise<{ bytes: Uint8Array; why: string } | string> {
  const copies = [head, tail].filter((c) => footerCookieOk(c))
  if (copies.length < 2) return "only one copy has its 'conectix' cookie, and its checksum does not say which field is damaged"
  const differing = FOOTER_FIELDS.filter(([, a, b]) => !head.subarray(a, b).every((x, i) => x === tail[a + i]))
  if (differing.some(([n]) => n === 'unique id')) return 'the two copies name different unique ids'
  if (differing.length > MAX_DIFFERING_FIELDS) return `the two copies differ in ${differing.length} fields`
  const stored = new Set([decodeFooter(head).checksum, decodeFooter(tail).checksum])
  const headerOk = new Map<number, Awaited<ReturnType<typeof soundHeader>>>()
  const proven: Array<{ bytes: Uint8Array; reading: string }> = []
  const plausible: Array<{ bytes: Uint8Array; fromTail: number; reading: string }> = []
  for (let mask = 0; mask < 1 << differing.length; mask++) {
    const c = head.slice()
    let fromTail = 0
    differing.forEach(([, a, b], k) => {
      if (mask & (1 << k)) {
        c.set(tail.subarray(a, b), a)
        fromTail++
      }
    })
    const f = decodeFooter(c)
    if (f.diskType !== TYPE_DYNAMIC && f.diskType !== TYPE_DIFFERENCING) continue
    if (f.dataOffset >= BigInt(dev.size)) continue
    const at = Number(f.dataOffset)
    if (!headerOk.has(at)) headerOk.set(at, await soundHeader(dev, at))
    const h = headerOk.get(at)
    if (!h) continue
    let size: number
    try {
      size = footerVirtualSize(f, dev.name, 0)
    } catch {
      continue
    }
    if (size <= 0 || size > h.entries * h.blockSize || size < (h.entries - 1) * h.blockSize) continue
    const sum = vhdChecksum(c, FOOTER_CHECKSUM_AT)
    putU32be(c, FOOTER_CHECKSUM_AT, sum)
    const reading = `${f.diskType}/${at}/${size}`
    if (stored.has(sum)) proven.push({ bytes: c, reading })
    plausible.push({ bytes: c, fromTail, reading })
  }
  const names = differing.map(([n]) => n).join(', ') || 'none'
  if (proven.length > 0) {
    // (a one's complement sum can match twice: damage that adds in one copy what it takes away in the other)
    if (new Set(proven.map((p) => p.reading)).size > 1)
      return `mixes of the copies (fields that differ: ${names}) that read the disk differently match a stored checksum`
    const n = proven.length > 1 ? `; ${proven.length} mixes match it, all reading the disk alike` : ''
    return { bytes: proven[0]!.bytes, why: `fields that differ: ${names}; the mix taken matches a stored checksum${n}` }
  }
  const deciding = differing.filter(([n]) => READING_FIELDS.includes(n)).map(([n]) => n)
  if (deciding.length > 0) return `the copies differ in ${deciding.join(', ')}, and neither checksum tells which is right`
  if (plausible.length === 0) return `the copies (fields that differ: ${names}) do not fit the dynamic header and BAT`
  plausible.sort((a, b) => a.fromTail - b.fromTail)
  return {
    bytes: plausible[0]!.bytes,
    why: `fields that differ: ${names}; no checksum matches, but the copies agree on every field that decides how the disk reads; checksum recomputed`,
  }
}

/** A dynamic header at `at` that holds up whole (cookie, checksum, version, block size, a BAT inside the file whose entries are), or undefined. */
async function soundHeader(dev: BlockDevice, at: number): Promise<{ entries: number; blockSize: number } | undefined> {
  if (at < FOOTER_SIZE || at % SECTOR !== 0 || at + HEADER_SIZE > dev.size - FOOTER_SIZE) return undefined
  const hb = await dev.read(at, HEADER_SIZE, 'header')
  const h = decodeHeader(hb)
  if (h.cookie !== HEADER_COOKIE || h.checksum !== vhdChecksum(hb, HEADER_CHECKSUM_AT) || h.version !== 0x00010000) return undefined
  if (!isPowerOfTwo(h.blockSize) || h.blockSize < MIN_BLOCK_SIZE) return undefined
  const entries = h.maxTableEntries
  if (entries === 0 || entries * 4 > MAX_BAT_BYTES || entries > Math.ceil((MAX_SECTORS * SECTOR) / h.blockSize)) return undefined
  if (h.tableOffset % BigInt(SECTOR) !== 0n || h.tableOffset + BigInt(entries * 4) > BigInt(dev.size - FOOTER_SIZE)) return undefined
  const batAt = Number(h.tableOffset)
  const raw = await dev.read(batAt, entries * 4, 'bat')
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
  const end = dev.size - FOOTER_SIZE
  const unit = bitmapSize(h.blockSize) + h.blockSize
  for (let i = 0; i < entries; i++) {
    const v = dv.getUint32(i * 4, false)
    if (v !== BAT_UNUSED && v * SECTOR + unit > end) return undefined
  }
  return { entries, blockSize: h.blockSize }
}

/**
 * B: BAT entries whose block overlaps the footer at 0, the dynamic header,
 * or the part of the BAT the virtual size needs. Those structures are where
 * the footer and the header (both whole, the header's checksum holding
 * before the repair began) say they are; a block on top of them holds their
 * bytes, never guest data, and a write through it would overwrite them. The entry is cleared (the block reads as zeros, as
 * an unmapped block does). Entries that overlap only each other are left:
 * a VHD block names no guest offset, so neither the BAT nor the bitmaps can
 * tell which of two entries the bytes belong to (the check names them).
 */
async function planBat(dev: BlockDevice, notices: Notice[], headerWasSound: boolean): Promise<Step | undefined> {
  let layout: VhdLayout
  try {
    layout = await readLayout(dev, true)
  } catch (e) {
    if (e instanceof CorruptImageError) return undefined
    throw e
  }
  const s = layout.sparse
  if (!s) return undefined
  // the footer at 0 and the header are where the footer says; of the BAT only the entries the virtual size needs are
  // beyond doubt (a table longer than that may be a bent entry count); parent locators are not counted here
  const needed = Math.ceil(layout.virtualSize / s.blockSize)
  const spans = metadataSpans(dev, s)
    .filter((m) => !m.what.startsWith('parent locator'))
    .map((m) => (m.what === 'the BAT' ? { ...m, end: Math.min(m.end, s.batOffset + needed * 4) } : m))
  const unit = s.bitmapSize + s.blockSize
  const hits: Array<{ index: number; what: string }> = []
  // (only entries the virtual size uses: those past it may be another structure's bytes read as a longer table)
  for (let i = 0; i < Math.min(needed, s.bat.length); i++) {
    const v = s.bat[i]!
    if (v === BAT_UNUSED) continue
    const start = v * SECTOR
    const m = spans.find((x) => start < x.end && x.start < start + unit)
    if (m) hits.push({ index: i, what: m.what })
  }
  if (hits.length === 0) return undefined
  // and never a BAT sector that another mapped block reaches: that write would change the block's bytes (a guard:
  // with a sector-aligned BAT such a block lies over needed entries and is cleared itself)
  // (the BAT sectors to write, sorted; each other mapped block is looked up among them: n log n, whatever the BAT holds)
  const cleared = new Set(hits.map((h) => h.index))
  const batSectors = [...new Set(hits.map((h) => s.batOffset + h.index * 4 - ((s.batOffset + h.index * 4) % SECTOR)))].sort((a, b) => a - b)
  const firstAtOrAfter = (x: number): number => {
    let lo = 0
    let hi = batSectors.length
    while (lo < hi) {
      const mid = (lo + hi) >> 1
      if (batSectors[mid]! < x) lo = mid + 1
      else hi = mid
    }
    return lo
  }
  let onBlock = false
  for (let i = 0; i < Math.min(needed, s.bat.length) && !onBlock; i++) {
    const v = s.bat[i]!
    if (v === BAT_UNUSED || cleared.has(i)) continue
    const start = v * SECTOR
    const k = firstAtOrAfter(start - SECTOR + 1) // the first sector that ends after the block starts
    onBlock = k < batSectors.length && batSectors[k]! < start + unit
  }
  if (onBlock) {
    notices.push({
      kind: 'bat-not-repaired',
      structure: 'BAT',
      message: `vpc: ${dev.name}: ${hits.length} BAT entries overlap metadata; not cleared: the BAT sector holding them is itself inside a mapped block`,
    })
    return undefined
  }
  if (!headerWasSound || layout.problems.length > 0 || !sparseFooterOk(layout.footerBytes)) {
    notices.push({
      kind: 'bat-not-repaired',
      structure: 'BAT',
      message: `vpc: ${dev.name}: ${hits.length} BAT entries overlap metadata; not cleared: the footer or the dynamic header was itself damaged, so where the metadata ends is not proven`,
    })
    return undefined
  }
  // one write per BAT sector, each the whole sector with its cleared entries: a sector is written whole or not at all
  const sectors = new Map<number, Uint8Array>()
  for (const h of hits) {
    const at = s.batOffset + h.index * 4
    const sector = at - (at % SECTOR)
    if (!sectors.has(sector)) sectors.set(sector, await dev.read(sector, Math.min(SECTOR, dev.size - sector), 'bat'))
    sectors.get(sector)!.fill(0xff, at - sector, at - sector + 4)
  }
  return {
    action: {
      kind: 'bat-entry-cleared',
      structure: 'BAT',
      hostOffset: s.batOffset + hits[0]!.index * 4,
      message:
        hits
          .slice(0, 4)
          .map((h) => `BAT entry ${h.index} (at ${hex(s.batOffset + h.index * 4)}) mapped a block over ${h.what}: cleared`)
          .join('; ') + (hits.length > 4 ? `; and ${hits.length - 4} more such entries` : ''),
    },
    writes: [...sectors].map(([offset, data]) => ({ offset, data, tag: 'bat' as const })),
  }
}
