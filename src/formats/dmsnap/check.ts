/**
 * Check is a diff: walk the header and the areas as the kernel loads them,
 * build the chunk-usage picture, and report what differs from a store a
 * correct writer leaves (findings as data, each with chunk numbers).
 */
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage } from '../../image/disk-image.js'
import { emptyReport, type CheckReport, type Finding, type Notice } from '../../check/types.js'
import { hex } from '../../errors.js'
import { isAllZero } from '../../util/bytes.js'
import { CHUNK_NUMBER_LIMIT, RECORD_BYTES, SNAPSHOT_DISK_VERSION, StoreLayout, exact, isValidChunkSectors } from './constants.js'
import { decodeRecord, loadTable, type ExceptionRecord, type LoadedTable } from './exceptions.js'
import { HEADER_BYTES, decodeHeader, headerProblem, type HeaderProblem, type StoreHeader } from './header.js'
import { SECTOR_BYTES } from './constants.js'

export type RecordFault =
  | 'new-chunk-header'
  | 'new-chunk-high-bits'
  | 'new-chunk-in-metadata'
  | 'new-chunk-beyond-end'
  | 'duplicate-old-chunk'
  | 'duplicate-new-chunk'
  | 'duplicate-record'
  | 'old-chunk-beyond-origin'

export interface StoreAnalysis {
  header: StoreHeader
  headerProblem?: HeaderProblem
  layout?: StoreLayout
  table?: LoadedTable
  /** record index → what is wrong with it (the first fault found) */
  recordFaults: Map<number, RecordFault>
  /** slots after the terminator, in the last area, that are not zero */
  garbageSlots: number[]
  /** data chunks below next_free referenced by no record */
  leakedChunks: number[]
  findings: Finding[]
  notices: Notice[]
  report: CheckReport
}

export interface AnalyzeOptions {
  originSize?: number
  origin?: DiskImage
  onProgress?: (done: number, total: number) => void
}

export async function checkStore(dev: BlockDevice, options: AnalyzeOptions = {}): Promise<CheckReport> {
  return (await analyzeStore(dev, options)).report
}

export async function analyzeStore(dev: BlockDevice, options: AnalyzeOptions = {}): Promise<StoreAnalysis> {
  const report = emptyReport(dev.name, 'dmsnap')
  const findings: Finding[] = []
  const notices: Notice[] = []
  const a: StoreAnalysis = {
    header: { magic: 0, valid: 0, version: 0, chunkSectors: 0 },
    recordFaults: new Map(),
    garbageSlots: [],
    leakedChunks: [],
    findings,
    notices,
    report,
  }
  const done = (): StoreAnalysis => {
    report.findings = findings
    report.notices = notices
    for (const f of findings) {
      if (f.severity === 'leak') report.leaks++
      else if (f.severity === 'corruption') report.corruptions++
      else report.checkErrors++
    }
    return a
  }
  const corrupt = (f: Omit<Finding, 'severity'>): void => void findings.push({ severity: 'corruption', ...f })
  const cannotStart = (f: Omit<Finding, 'severity'>): void => void findings.push({ severity: 'check-error', ...f })

  a.header = decodeHeader(await dev.read(0, SECTOR_BYTES, 'cow-header'))
  const h = a.header
  const hp = headerProblem(h, dev.size)
  a.headerProblem = hp
  if (hp) {
    const msg: Record<string, string> = {
      'too-small': `COW is ${dev.size} bytes, too small for a header`,
      uninitialised: 'magic is 0: an uninitialised store; the kernel would format it as a new empty store, destroying any table',
      'bad-magic': `bad magic ${hex(h.magic)} (expected 0x70416e53 "SnAp"); the kernel refuses the store (ENXIO)`,
      'bad-chunk-size': `chunk size ${h.chunkSectors} sectors is not a power of two in 1..2^21; the kernel refuses the store (EINVAL)`,
      'bad-version': `version ${h.version} (expected ${SNAPSHOT_DISK_VERSION}); the kernel refuses the store (EINVAL)`,
    }
    // a header the kernel refuses: the check cannot start (exit 1, as qemu-img for a bad qcow2 header)
    cannotStart({ kind: hp.kind === 'too-small' ? 'cow-too-small' : hp.kind, structure: 'cow-header', hostOffset: 0, cluster: 0, message: msg[hp.kind]! })
    // With a valid chunk size, go on parsing: repair may rewrite a bad magic or version when the areas are clean.
    // A chunk size that is not one (0 in every qcow2 file) is never used (D9: it made the area loop endless).
    if ((hp.kind !== 'bad-magic' && hp.kind !== 'bad-version') || !isValidChunkSectors(h.chunkSectors)) return done()
  }
  const layout = new StoreLayout(h.chunkSectors, dev.size)
  a.layout = layout
  report.totalClusters = layout.cowChunks
  if (layout.cowChunks < 2) {
    corrupt({ kind: 'cow-too-small', structure: 'cow-header', cluster: 0, message: `COW holds ${layout.cowChunks} whole chunk(s); header and area 0 need 2` })
    return done()
  }
  if (dev.size % layout.chunkBytes !== 0) {
    notices.push({
      kind: 'cow-size-unaligned',
      structure: 'cow-header',
      message: `COW size ${dev.size} is not a multiple of the chunk size ${layout.chunkBytes}; the tail is never used`,
    })
  }
  if (!hp) {
    if (h.valid === 0) {
      corrupt({
        kind: 'invalidated',
        structure: 'cow-header',
        hostOffset: 4,
        cluster: 0,
        message: 'store is invalidated (valid=0): the kernel reads no exceptions and fails all snapshot I/O; its content is undefined',
      })
    } else if (h.valid !== 1) {
      notices.push({
        kind: 'valid-nonstandard',
        structure: 'cow-header',
        cluster: 0,
        message: `valid is ${h.valid}; the kernel treats any non-zero value as valid (harmless; repair leaves it unless it rewrites the header for another reason)`,
      })
    }
  }
  const head = await dev.read(0, layout.chunkBytes, 'cow-header')
  if (!isAllZero(head.subarray(HEADER_BYTES))) {
    notices.push({
      kind: 'header-tail-garbage',
      structure: 'cow-header',
      cluster: 0,
      message:
        'chunk 0 has non-zero bytes after the 16-byte header (ignored by the kernel; repair leaves them unless it rewrites the header for another reason)',
    })
  }

  const t = await loadTable(dev, layout)
  a.table = t
  const records = t.records
  if (t.truncatedArea !== undefined) {
    const loc = layout.areaLocation(t.truncatedArea)
    corrupt({
      kind: 'truncated-cow',
      structure: 'cow-area',
      cluster: loc,
      chunks: [loc],
      area: t.truncatedArea,
      hostOffset: layout.offset(loc),
      message: `area ${t.truncatedArea - 1} is full, so the kernel reads area ${t.truncatedArea} at chunk ${loc}, which lies beyond the end of the COW (${layout.cowChunks} chunks): activation fails (EIO)`,
    })
  }
  classifyRecords(a, layout, records, options.originSize)
  for (const r of records) {
    const fault = a.recordFaults.get(r.index)
    if (!fault) continue
    findings.push(recordFinding(fault, r, layout, records, options.originSize))
  }

  // garbage after the terminator in the last area: resurrected by the kernel's next append there
  if (t.truncatedArea === undefined) {
    for (let slot = t.currentCommitted + 1; slot < layout.perArea; slot++) {
      const off = slot * RECORD_BYTES
      if (!isAllZero(t.lastArea.subarray(off, off + RECORD_BYTES))) a.garbageSlots.push(slot)
    }
    if (!isAllZero(t.lastArea.subarray(t.currentCommitted * RECORD_BYTES, t.currentCommitted * RECORD_BYTES + 8))) {
      notices.push({
        kind: 'terminator-old-chunk',
        structure: 'cow-area',
        cluster: layout.areaLocation(t.currentArea),
        message: `the terminator (area ${t.currentArea} slot ${t.currentCommitted}) has a non-zero old_chunk; ignored by the kernel`,
      })
    }
    for (const slot of a.garbageSlots) {
      const { rawOld, rawNew } = decodeRecord(t.lastArea, slot)
      const loc = layout.areaLocation(t.currentArea)
      corrupt({
        kind: 'garbage-after-terminator',
        structure: 'cow-area',
        cluster: loc,
        area: t.currentArea,
        slot,
        hostOffset: layout.offset(loc) + slot * RECORD_BYTES,
        message: `area ${t.currentArea} (chunk ${loc}) slot ${slot}, after the terminator at slot ${t.currentCommitted}, holds ${rawOld}→${rawNew}: ignored now, but live after the kernel's next append to this area`,
      })
    }
  }

  // leaks: data chunks in [2, next_free) that no record uses
  const used = new Set<number>()
  for (const r of records) used.add(r.new)
  const limit = Math.min(t.nextFree, layout.cowChunks)
  for (let c = 2; c < limit; c++) {
    if (layout.isMetadata(c) || used.has(c)) continue
    a.leakedChunks.push(c)
    findings.push({
      kind: 'leaked-chunk',
      severity: 'leak',
      structure: 'cow-data',
      cluster: c,
      chunks: [c],
      hostOffset: layout.offset(c),
      message: `chunk ${c} is below the next free chunk ${t.nextFreeRaw} but no record uses it; the kernel never reuses it`,
    })
  }

  // notices: order, fullness
  let fragmented = 0
  for (const r of records) if (r.new !== layout.dataChunk(r.index)) fragmented++
  if (fragmented > 0) {
    notices.push({
      kind: 'non-sequential',
      structure: 'cow-area',
      message: `${fragmented} record(s) are not in allocation order (record i is not the i-th data chunk): written by a pre-3.13 kernel, another tool, or repaired`,
    })
  }
  const full = (t.nextFree + 1) * layout.chunkBytes > layout.cowBytes
  const lastSlotNeedsArea = t.currentCommitted === layout.perArea - 1 && !layout.fits(layout.areaLocation(t.currentArea + 1))
  if (full || lastSlotNeedsArea) {
    const nf = exact(t.nextFreeRaw)
    notices.push({
      kind: 'store-full',
      structure: 'cow-data',
      ...(typeof nf === 'number' ? { cluster: nf } : {}),
      message: `store is full: next free chunk ${t.nextFreeRaw} of ${layout.cowChunks}; the next copy-out overflows (PO) or invalidates the store (P)`,
    })
  }
  report.allocatedClusters = Math.min(t.nextFree, layout.cowChunks)
  report.fragmentedClusters = fragmented
  report.imageEndOffset = exact(t.nextFreeRaw * BigInt(layout.chunkBytes))
  options.onProgress?.(1, 1)
  return done()
}

function classifyRecords(a: StoreAnalysis, layout: StoreLayout, records: ExceptionRecord[], originSize: number | undefined): void {
  const firstOld = new Map<bigint, ExceptionRecord>()
  const firstNew = new Map<bigint, ExceptionRecord>()
  for (const r of records) {
    let fault: RecordFault | undefined
    if (r.rawNew >= CHUNK_NUMBER_LIMIT) fault = r.rawNew % CHUNK_NUMBER_LIMIT === 0n ? 'new-chunk-header' : 'new-chunk-high-bits'
    else if (layout.isMetadata(r.new)) fault = 'new-chunk-in-metadata'
    else if (!layout.fits(r.new)) fault = 'new-chunk-beyond-end'
    else if (originSize !== undefined && r.rawOld * BigInt(layout.chunkBytes) >= BigInt(originSize)) fault = 'old-chunk-beyond-origin'
    const po = firstOld.get(r.rawOld)
    const pn = firstNew.get(r.rawNew)
    if (!fault && po && pn && po === pn && !a.recordFaults.has(po.index)) fault = 'duplicate-record'
    else if (!fault && po) fault = 'duplicate-old-chunk'
    else if (!fault && pn) fault = 'duplicate-new-chunk'
    if (!po) firstOld.set(r.rawOld, r)
    if (!pn) firstNew.set(r.rawNew, r)
    if (fault) a.recordFaults.set(r.index, fault)
  }
}

function recordFinding(fault: RecordFault, r: ExceptionRecord, layout: StoreLayout, records: ExceptionRecord[], originSize: number | undefined): Finding {
  const where = `record ${r.index} (area ${r.area} slot ${r.slot}) ${r.rawOld}→${r.rawNew}`
  const loc = layout.areaLocation(r.area)
  const base = {
    structure: 'cow-area',
    oldChunk: exact(r.rawOld),
    newChunk: exact(r.rawNew),
    area: r.area,
    slot: r.slot,
    hostOffset: layout.offset(loc) + r.slot * RECORD_BYTES,
  }
  /** a chunk number as `cluster`, only when it is one exactly (JSON and messages print the exact value) */
  const at = (chunk: bigint): { cluster?: number; chunks: Array<number | bigint> } => {
    const x = exact(chunk)
    return typeof x === 'number' ? { cluster: x, chunks: [x] } : { chunks: [x] }
  }
  const first = (pred: (x: ExceptionRecord) => boolean): ExceptionRecord | undefined => records.find((x) => x.index < r.index && pred(x))
  switch (fault) {
    case 'new-chunk-header':
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        cluster: 0,
        chunks: [0],
        message: `${where}: new_chunk ${hex(r.rawNew)} has high bits set and its chunk number is 0, the header; the kernel maps it to the header chunk`,
      }
    case 'new-chunk-high-bits':
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew % CHUNK_NUMBER_LIMIT),
        message: `${where}: new_chunk ${hex(r.rawNew)} is ≥ 2^56; the kernel reads the top byte as a run length and maps neighbouring chunks wrongly`,
      }
    case 'new-chunk-in-metadata':
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew),
        message: `${where}: new_chunk ${r.rawNew} is metadata area ${(r.new - 1) / layout.stride}; the view would return metadata as data and a snapshot write would overwrite the table`,
      }
    case 'new-chunk-beyond-end':
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew),
        message: `${where}: new_chunk ${r.rawNew} is beyond the end of the COW (${layout.cowChunks} chunks); reads of origin chunk ${r.rawOld} fail with EIO`,
      }
    case 'old-chunk-beyond-origin':
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew),
        message: `${where}: old_chunk ${r.rawOld} is beyond the origin (${Math.ceil((originSize ?? 0) / layout.chunkBytes)} chunks); unreachable, and a merge would write past the origin's end`,
      }
    case 'duplicate-record': {
      const f = first((x) => x.rawOld === r.rawOld && x.rawNew === r.rawNew)
      return {
        ...base,
        kind: fault,
        severity: 'leak',
        ...at(r.rawNew),
        message: `${where} repeats record ${f?.index} exactly; harmless (same data either way), the slot is wasted`,
      }
    }
    case 'duplicate-old-chunk': {
      const f = first((x) => x.rawOld === r.rawOld)
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew),
        chunks: [f ? exact(f.rawNew) : -1, exact(r.rawNew)],
        message: `${where}: origin chunk ${r.rawOld} is also mapped by record ${f?.index} (→${f?.rawNew}), which the kernel's lookup uses; this record's chunk ${r.rawNew} is shadowed`,
      }
    }
    case 'duplicate-new-chunk': {
      const f = first((x) => x.rawNew === r.rawNew)
      return {
        ...base,
        kind: fault,
        severity: 'corruption',
        ...at(r.rawNew),
        message: `${where}: COW chunk ${r.rawNew} is shared with record ${f?.index} (origin chunk ${f?.rawOld}); a write to one changes the other`,
      }
    }
  }
}
