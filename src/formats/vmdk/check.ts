/**
 * Check a VMDK: a diff of what the metadata implies against what the files
 * hold. The counts and the exit code are qemu-img's (vmdk_co_check, 7.2): it
 * walks the guest grain by grain through the *primary* grain directory (a
 * table past the end of the file reads as zeros), and the first grain (or
 * flat extent start) at or past the end of its file ends the walk: one
 * corruption and "Check failed" (exit 1). Nothing else is counted; qemu-img
 * never says 2 for a VMDK.
 *
 * Beyond qemu-img, listed as warnings (severity 'warning': no count, no change
 * to the exit code), for every sparse extent:
 *
 *  - the grain directory, its redundant copy and every grain table inside the
 *    file; the redundant directory's tables equal to the primary's;
 *  - no grain-table entry past the capacity, no grain cut by the end of the file;
 *  - no overlaps between header, embedded descriptor, directories, tables,
 *    grains and the footer;
 *  - compressed grains: the marker names the grain's sector, and the bytes
 *    inflate to the grain (the last grain of an extent may be shorter);
 *  - a stream's footer agrees with its header on the geometry.
 *
 * Notices: leaked grains (past the metadata, reached by no table entry: a
 * crash between writing a grain and its table entry, or QEMU's own
 * zeroed-grain write over an allocated grain), a redundant table behind its
 * primary (an interrupted write).
 */
import { CorruptImageError, hex } from '../../errors.js'
import { emptyReport, type CheckReport, type Finding, type Notice } from '../../check/types.js'
import { GrainMap } from './grains.js'
import type { FlatExtent, SparseExtent, VmdkLayout } from './open.js'
import { SECTOR, decodeGrainEntry, decodeHeader } from './spec.js'

/** Findings of one kind past this many are counted, not listed (bounded memory on absurd damage). */
const MAX_LISTED = 1000

interface Region {
  start: number
  end: number
  what: string
}

class Report {
  readonly report: CheckReport
  /** qemu-img's walk has ended (its first grain past the end of a file) */
  stopped = false
  private listed = new Map<string, number>()
  constructor(filename: string) {
    this.report = emptyReport(filename, 'vmdk')
  }
  add(f: Finding): void {
    const n = (this.listed.get(f.kind) ?? 0) + 1
    this.listed.set(f.kind, n)
    if (f.severity === 'corruption') this.report.corruptions++
    else if (f.severity === 'leak') this.report.leaks += f.cluster ?? 1
    if (n <= MAX_LISTED) this.report.findings.push(f)
  }
  notice(n: Notice): void {
    ;(this.report.notices ??= []).push(n)
  }
}

function corruption(structure: string, kind: string, message: string, hostOffset?: number): Finding {
  return { kind, severity: 'corruption', structure, message, ...(hostOffset !== undefined ? { hostOffset } : {}) }
}

/** damage qemu-img check does not count */
function warning(structure: string, kind: string, message: string, hostOffset?: number): Finding {
  return { kind, severity: 'warning', structure, message, ...(hostOffset !== undefined ? { hostOffset } : {}) }
}

/** qemu-img's one rule: the first hit ends its walk (a corruption and a check error); later ones are warnings */
function pastEof(r: Report, structure: string, kind: string, message: string, hostOffset: number): void {
  if (r.stopped) {
    r.add(warning(structure, kind, message, hostOffset))
    return
  }
  r.stopped = true
  r.add(corruption(structure, kind, message, hostOffset))
  r.report.checkErrors = 1
}

export async function checkVmdk(filename: string, layout: VmdkLayout): Promise<CheckReport> {
  const r = new Report(filename)
  for (const p of layout.problems) {
    const off = typeof p.details.offset === 'number' ? p.details.offset : undefined
    const structure = String(p.details.structure ?? 'header')
    // what a check-open let through (directories past the end of the file, a descriptor size that is not
    // the header's): qemu-img reads zeros there, or uses the header, and counts nothing
    r.add(warning(structure, `${structure.replace(/ /g, '-')}-range`, p.message, off))
  }
  for (const e of layout.extents) {
    if (e.kind === 'flat') checkFlat(e, r)
    else await checkSparse(e, r)
  }
  return r.report
}

function checkFlat(e: FlatExtent, r: Report): void {
  const size = e.device.size
  if (e.hostStart >= size) {
    // qemu-img: "cluster offset for sector N points after EOF" and Check failed
    pastEof(
      r,
      'flat extent',
      'extent-past-eof',
      `vmdk: ${e.file}: flat extent starts at ${hex(e.hostStart)}, at or past the end of its file (size ${hex(size)})`,
      e.hostStart,
    )
  } else if (e.hostStart + e.length > size) {
    r.notice({
      kind: 'flat-extent-short',
      structure: 'flat extent',
      message: `vmdk: ${e.file}: flat extent of ${e.length} bytes from ${hex(e.hostStart)} ends past the end of its file (size ${hex(size)}); the rest reads as zeros`,
    })
  }
}

async function checkSparse(e: SparseExtent, r: Report): Promise<void> {
  const file = e.file
  const size = e.device.size
  const map = new GrainMap(e)
  const regions: Region[] = [{ start: 0, end: SECTOR, what: 'header' }]
  const h = e.header
  if (h.descriptorOffset > 0n && h.descriptorSize > 0n) {
    const at = Number(h.descriptorOffset) * SECTOR
    regions.push({ start: at, end: at + Number(h.descriptorSize) * SECTOR, what: 'embedded descriptor' })
  }
  if (e.footerOffset !== undefined) regions.push({ start: e.footerOffset, end: e.footerOffset + 3 * SECTOR, what: 'footer' })
  const dirBytes = e.gd.length * 4
  regions.push({ start: e.gdOffset, end: e.gdOffset + dirBytes, what: 'grain directory' })
  if (e.rgdOffset !== undefined) regions.push({ start: e.rgdOffset, end: e.rgdOffset + dirBytes, what: 'redundant grain directory' })
  if (e.footerOffset !== undefined) await checkFooter(e, r)

  const gtBytes = e.gtes * 4
  /** true when the table lies whole inside the file; one past it reads as zeros there (as in qemu-img) */
  const tableInFile = (sector: number, i: number, which: string): boolean => {
    if (sector === 0) return false
    const at = sector * SECTOR
    if (at + gtBytes > size) {
      r.add(
        warning(
          'grain table',
          'gt-past-eof',
          `vmdk: ${file}: ${which} entry ${i} names a grain table at ${hex(at)} that extends past the end of the file (size ${hex(size)}); it reads as zeros there`,
          at,
        ),
      )
      return false
    }
    regions.push({ start: at, end: at + gtBytes, what: `grain table ${i}${which.startsWith('redundant') ? ' (redundant)' : ''}` })
    return true
  }
  const grains: Region[] = []
  for (let i = 0; i < e.gd.length; i++) {
    tableInFile(e.gd[i]!, i, 'grain directory')
    const redundant = e.rgd ? tableInFile(e.rgd[i]!, i, 'redundant grain directory') : false
    // qemu-img's walk reads the primary table wherever it is (zeros past the end of the file)
    const t = await map.table(i)
    if (e.rgd) await compareRedundant(e, i, t, redundant, r)
    if (!t) continue
    for (let j = 0; j < e.gtes; j++) {
      const guestGrain = i * e.gtes + j
      if (guestGrain * e.grainSize >= e.length) {
        if (t[j] !== 0)
          r.add(
            warning(
              'grain table',
              'entry-past-capacity',
              `vmdk: ${file}: grain table ${i} entry ${j} maps a grain past the capacity`,
              e.gd[i]! * SECTOR + j * 4,
            ),
          )
        continue
      }
      const g = decodeGrainEntry(t[j]!, e.zeroGrain, e.compressed)
      if (g.kind !== 'normal' && g.kind !== 'compressed') continue
      const at = g.sector * SECTOR
      if (at >= size) {
        pastEof(
          r,
          'grain',
          'grain-past-eof',
          `vmdk: ${file}: grain table ${i} entry ${j} (guest sector ${(guestGrain * e.grainSize) / SECTOR}) points at ${hex(at)}, past the end of the file (size ${hex(size)})`,
          at,
        )
        continue
      }
      if (g.kind === 'normal') {
        if (at + e.grainSize > size)
          r.add(
            warning(
              'grain',
              'grain-past-eof',
              `vmdk: ${file}: grain at ${hex(at)} (grain table ${i} entry ${j}) ends past the end of the file (size ${hex(size)}); the rest reads as zeros`,
              at,
            ),
          )
        grains.push({ start: at, end: at + e.grainSize, what: `grain of table ${i} entry ${j}` })
      } else {
        const n = await checkCompressed(e, map, g.sector, guestGrain, i, j, r)
        if (n > 0) grains.push({ start: at, end: at + n, what: `compressed grain of table ${i} entry ${j}` })
      }
    }
  }
  checkOverlaps(file, [...regions, ...grains], r)
  if (!e.compressed) checkLeaks(e, grains, regions, r)
}

async function compareRedundant(e: SparseExtent, i: number, primary: Uint32Array | undefined, redundantOk: boolean, r: Report): Promise<void> {
  const rs = e.rgd![i]!
  const ps = e.gd[i]!
  if ((ps === 0) !== (rs === 0)) {
    r.add(
      warning(
        'redundant grain directory',
        'rgd-differs',
        `vmdk: ${e.file}: grain directory entry ${i} is ${hex(ps)} but its redundant copy is ${hex(rs)}`,
        e.rgdOffset! + i * 4,
      ),
    )
    return
  }
  if (!primary || !redundantOk) return
  const raw = await e.device.read(rs * SECTOR, e.gtes * 4, 'l2')
  const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
  let behind = 0
  for (let j = 0; j < e.gtes; j++) {
    const v = dv.getUint32(j * 4, true)
    // a redundant entry still 0 where the primary maps a grain: a write interrupted between the two
    // copies (the primary is written and flushed first; QEMU reads only the primary). Not a corruption.
    if (v === 0 && primary[j] !== 0) {
      behind++
      continue
    }
    if (v !== primary[j]) {
      r.add(
        warning(
          'redundant grain table',
          'rgt-differs',
          `vmdk: ${e.file}: redundant grain table ${i} entry ${j} at ${hex(rs * SECTOR + j * 4)} is ${hex(v)}, the primary's is ${hex(primary[j]!)}`,
          rs * SECTOR + j * 4,
        ),
      )
      return
    }
  }
  if (behind > 0) {
    r.notice({
      kind: 'rgt-behind',
      structure: 'redundant grain table',
      cluster: behind,
      message: `vmdk: ${e.file}: redundant grain table ${i} (at ${hex(rs * SECTOR)}) lacks ${behind} entr${behind === 1 ? 'y' : 'ies'} its primary has (an interrupted write; the primary is in force)`,
    })
  }
}

/** Returns the bytes the compressed grain occupies (marker included), 0 when it is unreadable. */
async function checkCompressed(e: SparseExtent, map: GrainMap, sector: number, guestGrain: number, i: number, j: number, r: Report): Promise<number> {
  const at = sector * SECTOR
  if (e.markers) {
    const head = await e.device.read(at, 8, 'compressed')
    const lba = new DataView(head.buffer, head.byteOffset, 8).getBigUint64(0, true)
    const want = BigInt((guestGrain * e.grainSize) / SECTOR)
    if (lba !== want)
      r.add(
        warning(
          'grain marker',
          'grain-marker-lba',
          `vmdk: ${e.file}: grain marker at ${hex(at)} says sector ${lba}, but grain table ${i} entry ${j} maps sector ${want} here (qemu-img reads it as sector ${want})`,
          at,
        ),
      )
  }
  let bytes: Uint8Array
  try {
    bytes = await map.compressedGrain(sector)
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err
    r.add(warning('compressed grain', 'compressed-grain', `${err.message} (grain table ${i} entry ${j})`, at))
    return 0
  }
  const want = Math.min(e.grainSize, e.length - guestGrain * e.grainSize)
  if (bytes.byteLength < want) {
    r.add(
      warning(
        'compressed grain',
        'compressed-grain',
        `vmdk: ${e.file}: compressed grain at ${hex(at)} inflates to ${bytes.byteLength} bytes, not ${want} (grain table ${i} entry ${j})`,
        at,
      ),
    )
  }
  if (!e.markers) return SECTOR
  const head = await e.device.read(at + 8, 4, 'compressed')
  return 12 + new DataView(head.buffer, head.byteOffset, 4).getUint32(0, true)
}

/** A stream's footer is the header in force; the header at 0 must agree with it on the geometry. */
async function checkFooter(e: SparseExtent, r: Report): Promise<void> {
  const first = decodeHeader(await e.device.read(0, SECTOR, 'header'))
  const f = e.header
  const fields: Array<[string, bigint | number, bigint | number, number]> = [
    ['capacity', first.capacity, f.capacity, 12],
    ['grain size', first.grainSize, f.grainSize, 20],
    ['grain table entries', first.numGTEsPerGT, f.numGTEsPerGT, 44],
    ['version', first.version, f.version, 4],
  ]
  for (const [what, a, b, at] of fields) {
    if (a !== b)
      r.add(warning('footer', 'footer-differs', `vmdk: ${e.file}: the footer's ${what} (${b}) differs from the header's (${a})`, e.headerOffset + at))
  }
}

function checkOverlaps(file: string, all: Region[], r: Report): void {
  const sorted = all.filter((x) => x.end > x.start).sort((a, b) => a.start - b.start || a.end - b.end)
  let reach: Region | undefined
  for (const x of sorted) {
    if (reach && x.start < reach.end) {
      r.add(
        warning('overlap', 'overlap', `vmdk: ${file}: ${x.what} at ${hex(x.start)} overlaps ${reach.what} (${hex(reach.start)}..${hex(reach.end)})`, x.start),
      )
    }
    if (!reach || x.end > reach.end) reach = x
  }
}

/** Grains between the end of the metadata and the end of the file that no table entry reaches. */
function checkLeaks(e: SparseExtent, grains: Region[], regions: Region[], r: Report): void {
  const size = e.device.size
  const gs = e.grainSize
  const first = Math.ceil(e.overhead / gs)
  const last = Math.floor(size / gs)
  if (last <= first) return
  const used = new Uint8Array(last - first)
  for (const x of [...grains, ...regions]) {
    const a = Math.max(first, Math.floor(x.start / gs))
    const b = Math.min(last, Math.ceil(x.end / gs))
    for (let k = a; k < b; k++) used[k - first] = 1
  }
  let leaked = 0
  let firstLeak = -1
  for (let k = 0; k < used.length; k++) {
    if (used[k]) continue
    if (firstLeak < 0) firstLeak = first + k
    leaked++
  }
  if (leaked > 0) {
    // a notice, not a leak: qemu-img check has no leak rule for vmdk and says "No errors" (exit 0); QEMU
    // itself leaves such grains behind when a zeroed-grain write replaces an allocated grain
    r.notice({
      kind: 'leaked-grain',
      structure: 'grain',
      cluster: leaked,
      message: `vmdk: ${e.file}: ${leaked} grain(s) from ${hex(firstLeak * gs)} that no grain table entry reaches (leaked space)`,
    })
  }
}
