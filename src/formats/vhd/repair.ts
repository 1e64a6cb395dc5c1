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
 * Nothing else is changed: a BAT entry that points at the wrong place is not
 * guessed at (the check names it). Every step's write is one sector, or an
 * append past everything the metadata reaches, so no crash state is worse
 * than the image before: the guest reads what it read.
 */
import { CorruptImageError, ImgtoolError, ReadOnlyError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { OverlayDevice } from '../../io/overlay-device.js'
import { isPowerOfTwo } from '../../util/bytes.js'
import type { CheckOptions, CheckReport, RepairAction, RepairMode, RepairResult } from '../../check/types.js'
import { checkVhd, reachedEnd } from './check.js'
import { VhdJournal } from './journal.js'
import { footerCookieOk, readLayout, MAX_BAT_BYTES, type VhdLayout } from './open.js'
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
  decodeFooter,
  vhdChecksum,
} from './spec.js'
import { putU32be } from '../../util/bytes.js'

/** One step: its writes (each inside one sector, or an append), then an optional cut. */
interface Step {
  action: RepairAction
  writes: Array<{ offset: number; data: Uint8Array; tag: 'footer' | 'header' }>
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
  if (mode === 'all') {
    const f = await planFooter(dev)
    if (f) await apply(f)
    const h = await planHeader(dev)
    if (h) await apply(h)
  }
  const e = await planEnd(dev, mode)
  if (e) await apply(e)
  const after = await checkVhd(dev)
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

/** F: the footer at 0 restored from the copy at the end. */
async function planFooter(dev: BlockDevice): Promise<Step | undefined> {
  if (dev.size < 2 * FOOTER_SIZE + HEADER_SIZE) return undefined
  const head = await dev.read(0, FOOTER_SIZE, 'footer')
  if (sparseFooterOk(head)) return undefined
  const tailAt = dev.size - FOOTER_SIZE
  const tail = await dev.read(tailAt, FOOTER_SIZE, 'footer')
  if (!sparseFooterOk(tail)) return undefined
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
