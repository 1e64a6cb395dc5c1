import type { BlockDevice } from '../io/block-device.js'
import type { JournalIdentity } from './undo.js'

/**
 * Findings are data: what is wrong with an image. Leak or corruption is the
 * first fact of each; it drives repair modes and exit codes. A 'warning' is
 * damage imgtool sees where qemu-img check counts nothing (vmdk: the redundant
 * grain directory, overlaps): listed, never counted, no change to the exit code.
 */
export type Severity = 'leak' | 'corruption' | 'check-error' | 'warning'

export interface GuestRange {
  offset: number
  length: number
}

export interface Finding {
  kind: string
  severity: Severity
  /** the structure the problem is in: 'refcount', 'l1', 'l2', 'data', 'snapshot', 'cow-area'... */
  structure: string
  hostOffset?: number
  cluster?: number
  l1Index?: number
  l2Index?: number
  guestRanges?: GuestRange[]
  /** dm-snapshot: every chunk the finding names (COW chunk indices) */
  chunks?: Array<number | bigint>
  /** dm-snapshot: the record's origin chunk (old_chunk) */
  oldChunk?: number | bigint
  /** dm-snapshot: the record's COW chunk (new_chunk) */
  newChunk?: number | bigint
  /** dm-snapshot: metadata area and slot of the record */
  area?: number
  slot?: number
  message: string
}

/** Something worth telling that is neither a leak nor a corruption (does not change the exit code). */
export interface Notice {
  kind: string
  structure: string
  cluster?: number
  message: string
}

/** Counts with qemu-img check's meaning, plus our findings. */
export interface CheckReport {
  filename: string
  format: string
  checkErrors: number
  corruptions: number
  leaks: number
  corruptionsFixed: number
  leaksFixed: number
  totalClusters: number
  allocatedClusters: number
  fragmentedClusters: number
  compressedClusters: number
  imageEndOffset: number | bigint
  findings: Finding[]
  /** informational observations (e.g. dm-snapshot: store full) */
  notices?: Notice[]
  /** qcow2: the lines qemu-img check prints on stderr for the same problems (for comparison) */
  diagnostics?: string[]
}

export type RepairMode = 'leaks' | 'all'

/** qemu-img check's exit codes. */
export const EXIT_CLEAN = 0
export const EXIT_CHECK_FAILED = 1
export const EXIT_CORRUPT = 2
export const EXIT_LEAKS = 3
export const EXIT_NO_CHECK = 63

export function checkExitCode(r: Pick<CheckReport, 'checkErrors' | 'corruptions' | 'leaks'>): number {
  if (r.checkErrors > 0) return EXIT_CHECK_FAILED
  if (r.corruptions > 0) return EXIT_CORRUPT
  if (r.leaks > 0) return EXIT_LEAKS
  return EXIT_CLEAN
}

export function emptyReport(filename: string, format: string): CheckReport {
  return {
    filename,
    format,
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    fragmentedClusters: 0,
    compressedClusters: 0,
    imageEndOffset: 0,
    findings: [],
  }
}

export interface CheckOptions {
  /** repair mode; absent = check only */
  repair?: RepairMode
  /** with repair: plan only, write nothing */
  dryRun?: boolean
  /** with repair: where to write the undo journal (a device path) */
  journalPath?: string
  /** with repair: the undo journal device, already open (the CLI opens journalPath) */
  journal?: BlockDevice
  /** with repair: the image's identity, recorded in the journal's seal so undo can refuse another image */
  journalIdentity?: JournalIdentity
  /** with repair: a new undo journal for another file the repair writes (vmdk: an extent file), made on its first change */
  extentJournal?: (file: string) => Promise<{ device: BlockDevice; path: string; identity?: JournalIdentity }>
  /** format-specific switches, e.g. dmsnap's forceValid */
  flags?: Record<string, boolean>
  onProgress?: (done: number, total: number) => void
  /** polled between metadata tables: once aborted, the check throws AbortedError */
  signal?: AbortSignal
}

/** A planned or applied repair step, for --dry-run and the report. */
export interface RepairAction {
  kind: string
  structure: string
  hostOffset?: number
  message: string
}

export interface RepairResult {
  /** the first check (with leaksFixed/corruptionsFixed) */
  before: CheckReport
  /** the check after repairing; the exit code comes from this one */
  after: CheckReport
  actions: RepairAction[]
  journalPath?: string
  dryRun: boolean
}

/** Images whose format can be checked implement this. */
export interface Checkable {
  check(options?: CheckOptions): Promise<CheckReport>
  repair?(options: CheckOptions & { repair: RepairMode }): Promise<RepairResult>
}
