/**
 * qcow2 check, shared state: the CheckState one check run carries through its
 * passes (the in-memory refcount array, the report and its findings, what
 * repair needs to know), the helpers that count a reference (qemu's
 * qcow2_inc_refcounts_imrt) and record a finding, the error that means the
 * check could not complete, and the types the analysis returns.
 */
import { AbortedError, ImgtoolError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { emptyReport, type CheckReport, type Finding, type Severity } from '../../../check/types.js'
import { hasDataFile, hasExtendedL2, type Qcow2Header } from '../spec/header.js'
import type { Imrt } from './imrt.js'
import type { Prefetcher } from './prefetch.js'
import type { CheckSnapshot } from './snapshots.js'

/** Findings kept per report (the counts are always exact). */
export const MAX_FINDINGS = 5000

/** per-problem stderr lines kept per check (qemu-img prints them all; the counts are always exact) */
export const MAX_DIAGNOSTICS = 100_000
/** regions referenced past EOF kept for a refcount rebuild to step over (more: no rebuild) */
export const MAX_UNCOUNTED = 1024

/** A region a structure references that lies a cluster or more past the end of the file (not counted). */
export interface UncountedRegion {
  offset: number
  size: number
  what: string
}

export const TWO32 = 0x1_0000_0000

/** The check could not complete: qemu-img prints "Check failed: <errno text>" and exits 1. */
export class CheckFailedError extends ImgtoolError {
  constructor(
    readonly errno: 'EFBIG' | 'EINVAL' | 'EIO' | 'ENOMEM',
    message: string,
    readonly diagnostics: string[] = [],
  ) {
    super(errno === 'EIO' ? 'IO' : 'CORRUPT', message, { structure: 'check' })
  }
  /** strerror(errno), as qemu-img prints it */
  get strerror(): string {
    return { EFBIG: 'File too large', EINVAL: 'Invalid argument', EIO: 'Input/output error', ENOMEM: 'Cannot allocate memory' }[this.errno]
  }
}

/** A location of an L1/L2 entry, for repair. */
export interface EntryRef {
  /** L2: the table's host offset; L1: the L1 table's offset */
  tableOffset: number
  index: number
  active: boolean
  l1Index: number
  /** byte size of one entry (8, or 16 with extended L2) */
  entrySize: number
}

export interface Mismatch {
  cluster: number
  onDisk: number
  expected: number
}

export interface CopiedError {
  where: 'l1' | 'l2'
  ref: EntryRef
  refcount: number
  /** what the flag should be */
  set: boolean
}

/** an entry whose target lies one cluster or more past the end of the file */
export type PastEof = { ref: EntryRef; kind: 'l2-table' | 'data'; hostOffset: number }

export interface WalkStats {
  allocated: number
  compressed: number
  fragmented: number
}

/** The state of one check run (qemu: the BDRVQcow2State and the refcount_table of check mode). */
export class CheckState {
  readonly clusterSize: number
  readonly cb: number
  readonly extL2: boolean
  readonly dataFile: boolean
  readonly entrySize: number
  readonly l2Count: number
  readonly report: CheckReport & { diagnostics: string[] }
  readonly diagnostics: string[]
  imrt!: Imrt
  fileSize: number
  rebuild = false
  /** a refcount table entry with reserved bits, unaligned, or a refblock shared with something else */
  reftableBroken = false
  truncatedFindings = 0
  readonly zeroAllocUnaligned: EntryRef[] = []
  readonly pastEof: PastEof[] = []
  /** clusters whose counter hit the refcount width's maximum (at most one per cluster of the file) */
  readonly overflowed = new Set<number>()
  /** L1 entries that are not zero but hold no L2 offset (reserved bits or COPIED only) */
  readonly l1ZeroOffset: EntryRef[] = []
  readonly protectedClusters = new Set<number>()
  readonly skippedSnapshots: CheckSnapshot[] = []
  readonly refblocksOutside: number[] = []
  /**
   * OFLAG_COPIED pre-check, so the common clean case needs no second pass over
   * the active L2 tables. An active entry with COPIED set on a cluster of the
   * file (below copiedLimit, the file's clusters; 0: not tracked) is wrong only
   * if that cluster's refcount is not 1: with the on-disk refcounts equal to
   * the counted ones (no mismatch) that means a cluster counted twice or more,
   * which the IMRT remembers (Imrt.shared). So nothing is kept per cluster; the
   * rare other entries (COPIED clear, out of range, unaligned) are listed, and
   * past a limit we just do the second pass.
   */
  copiedLimit = 0
  copiedOdd: number[] = []
  copiedFullPass = false
  /** aligned-down offsets of L2 tables whose L1 entry is unaligned: their data is kept */
  readonly unalignedL2: number[] = []
  corruptSignalled = false
  /** the caller's abort signal: polled before each table read (between L2 tables) */
  signal: AbortSignal | undefined
  /** scratch for a next-contiguous offset that is no small cluster index */
  readonly nextBytes = new Float64Array(1)

  constructor(
    readonly dev: BlockDevice,
    readonly header: Qcow2Header,
    readonly file: string,
  ) {
    this.clusterSize = header.clusterSize
    this.cb = header.clusterBits
    this.extL2 = hasExtendedL2(header)
    this.dataFile = hasDataFile(header)
    this.entrySize = this.extL2 ? 16 : 8
    this.l2Count = this.clusterSize / this.entrySize
    this.report = { ...emptyReport(file, 'qcow2'), diagnostics: [] }
    this.diagnostics = this.report.diagnostics
    this.fileSize = dev.size
  }

  /** no more findings nor diagnostic lines are kept: call sites only count (and build no message) */
  get saturated(): boolean {
    return this.report.findings.length >= MAX_FINDINGS && this.diagnostics.length > MAX_DIAGNOSTICS
  }

  /** a corruption counted when saturated */
  countOnly(): undefined {
    this.report.corruptions++
    this.truncatedFindings++
    return undefined
  }

  finding(severity: Severity, f: Omit<Finding, 'severity'>, diag?: string): Finding | undefined {
    if (severity === 'leak') this.report.leaks++
    else if (severity === 'corruption') this.report.corruptions++
    else this.report.checkErrors++
    if (diag !== undefined) {
      // qemu-img prints every line; we keep the first MAX_DIAGNOSTICS (memory is bounded by the image's
      // real metadata, not by how many garbage entries a damaged table declares) and count the rest
      if (this.diagnostics.length < MAX_DIAGNOSTICS) this.diagnostics.push(diag)
      else if (this.diagnostics.length === MAX_DIAGNOSTICS) this.diagnostics.push('(further diagnostic lines are not kept; the counts include them)')
    }
    if (this.report.findings.length >= MAX_FINDINGS) {
      this.truncatedFindings++
      return undefined
    }
    const full: Finding = { ...f, severity } as Finding
    this.report.findings.push(full)
    return full
  }

  where(ref: EntryRef): string {
    const t = ref.active ? 'active' : 'snapshot'
    return `${t} L1 index ${ref.l1Index}, L2 index ${ref.index}`
  }

  guestRange(ref: EntryRef): { offset: number; length: number }[] | undefined {
    if (!ref.active) return undefined
    return [{ offset: (ref.l1Index * this.l2Count + ref.index) * this.clusterSize, length: this.clusterSize }]
  }

  /**
   * Regions still referenced but not counted for lying past EOF, the refcount
   * structure's own aside (a rebuilt refcount structure must step over them
   * and count them), up to MAX_UNCOUNTED
   */
  uncounted: UncountedRegion[] = []
  uncountedTruncated = false
  /** entries past EOF are kept for repair up to MAX_DIAGNOSTICS (repair goes round again for the rest) */
  pastEofTruncated = false
  addPastEof(p: PastEof): void {
    if (this.pastEof.length < MAX_DIAGNOSTICS) this.pastEof.push(p)
    else this.pastEofTruncated = true
  }

  /** qcow2_inc_refcounts_imrt; false when the region ends a cluster or more past EOF */
  inc(offset: number, size: number, what: string, ref?: EntryRef, offsetHex?: string): boolean {
    if (size <= 0) return true
    if (offset + size - this.fileSize >= this.clusterSize) {
      if (what !== 'refcount table' && what !== 'refcount block') {
        if (this.uncounted.length < MAX_UNCOUNTED) this.uncounted.push({ offset, size, what })
        else this.uncountedTruncated = true
      }
      if (this.saturated) {
        this.countOnly()
        return false
      }
      const f: Omit<Finding, 'severity'> = {
        kind: 'past-eof',
        structure: ref ? (what === 'L2 table' ? 'l1' : 'l2') : what,
        hostOffset: offset,
        cluster: Math.floor(offset / this.clusterSize),
        message: `qcow2: ${what} at ${hex(offset)} (${hex(size)} bytes) lies beyond the end of the file (size ${hex(this.fileSize)})${ref ? ` (${this.where(ref)})` : ''}`,
      }
      if (ref) {
        f.l1Index = ref.l1Index
        if (what !== 'L2 table') f.l2Index = ref.index
        const g = what === 'L2 table' ? undefined : this.guestRange(ref)
        if (g) f.guestRanges = g
      }
      this.finding(
        'corruption',
        f,
        `ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset ${offsetHex ?? hex(offset)} size ${hex(size)}`,
      )
      return false
    }
    const first = Math.floor(offset / this.clusterSize)
    const last = Math.floor((offset + size - 1) / this.clusterSize)
    for (let k = first; k <= last; k++) {
      if (!this.imrt.inc(k)) {
        this.overflowed.add(k)
        this.finding(
          'corruption',
          {
            kind: 'refcount-overflow',
            structure: 'refcount',
            cluster: k,
            hostOffset: k * this.clusterSize,
            message: `qcow2: cluster ${k} (${hex(k * this.clusterSize)}) has more references than a ${2 ** this.header.refcountOrder}-bit refcount can hold (${what})`,
          },
          `ERROR: overflow cluster offset=${hex(k * this.clusterSize)}`,
        )
        this.diagnostics.push(
          'Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing',
        )
      }
    }
    return true
  }

  /** the signal has fired (polled once by the caller: the message is built only now, and the signal not polled again) */
  private stopBefore(tag: string, offset: number): never {
    const why = this.signal?.reason instanceof Error ? this.signal.reason.message : 'aborted'
    throw new AbortedError(`qcow2: ${this.file}: check stopped before the ${tag} table at ${hex(offset)}: ${why}`)
  }

  /** the read-ahead's next table if its read has finished (the abort signal polled as readTable polls it), else undefined */
  readyTable(offset: number, tag: string, prefetch: Prefetcher): Uint8Array | undefined {
    if (this.signal?.aborted) this.stopBefore(tag, offset)
    return prefetch.takeReady()
  }

  /** one table read whole; `polled` when readyTable has just polled the signal for this table (one poll per table) */
  async readTable(offset: number, length: number, tag: string, what: string, pending?: Promise<Uint8Array>, polled = false): Promise<Uint8Array> {
    if (!polled && this.signal?.aborted) this.stopBefore(tag, offset)
    try {
      return await (pending ?? this.dev.read(offset, length, tag))
    } catch (e) {
      this.report.checkErrors++
      this.diagnostics.push(`ERROR: I/O error in ${what}`)
      throw new CheckFailedError('EIO', `qcow2: ${this.file}: cannot read ${tag} at ${hex(offset)}: ${(e as Error).message}`, this.diagnostics)
    }
  }

  /** where an L2 entry is (made only when something is reported: no allocation per entry) */
  l2Ref(l2Offset: number, index: number, active: boolean, l1Index: number): EntryRef {
    return { tableOffset: l2Offset, index, active, l1Index, entrySize: this.entrySize }
  }

  entryFinding(kind: string, ref: EntryRef, hostOffset: number | undefined, what: string): Omit<Finding, 'severity'> {
    const f: Omit<Finding, 'severity'> = {
      kind,
      structure: 'l2',
      l1Index: ref.l1Index,
      l2Index: ref.index,
      message: `qcow2: ${what} (${this.where(ref)}, L2 table at ${hex(ref.tableOffset)})`,
    }
    if (hostOffset !== undefined) {
      f.hostOffset = hostOffset
      f.cluster = Math.floor(hostOffset / this.clusterSize)
    }
    const g = this.guestRange(ref)
    if (g) f.guestRanges = g
    return f
  }
}

/** a 64-bit entry as qemu prints it with %#x / PRIx64 (we add 0x; slice(2) for PRIx64) */
export function entryHex(hi: number, lo: number): string {
  return hex((BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0))
}

/** printf("%#x"): 0 prints as "0" */
export function cHex(n: number): string {
  return n === 0 ? '0' : hex(n)
}
