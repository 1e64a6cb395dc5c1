/**
 * What the writer's helper modules (plan, commit, pipeline, zeroes,
 * compressed) need from the writer, and the work records they pass around.
 * Declared here, apart from write.ts, so that the writer imports its helpers
 * and they import only this: no import cycle inside the room.
 */
import type { BlockDevice } from '../../../io/block-device.js'
import type { L2Entry } from '../spec/entries.js'
import type { EntryWriter } from '../spec/l2-meta.js'
import type { Qcow2Header } from '../spec/header.js'
import type { Mutex } from '../read/mutex.js'
import type { Qcow2State } from '../read/state.js'
import type { OverlapGuard } from './overlap.js'
import type { RefcountWriter } from './refcount-writer.js'

export interface Range {
  offset: number
  length: number
}

/** The work on one L2 table within one request. */
export interface TableWork {
  l1Index: number
  /** table the entries are read from (0: none yet) */
  oldL2: number
  /** table the entries are written to */
  l2: number
  mode: 'inplace' | 'new' | 'cow'
  table: Uint8Array
  lo: number
  hi: number
  /** clusters allocated for this table's entries (data, compressed bytes): freed if never linked */
  allocated: Range[]
  /** references dropped once the link is durable */
  frees: Range[]
  linked: boolean
  /** a link write for this table was issued (it may have reached the disk) */
  attempted: boolean
}

/** A queued data write: parts written as one at `offset` of `device`. */
export interface DataWrite {
  device: BlockDevice
  offset: number
  parts: Uint8Array[]
  length: number
}

/** The writer as its helper modules see it (Qcow2Writer implements it). */
export interface WriterCore {
  /** the open image's state (read/state.ts) */
  readonly state: Qcow2State
  readonly mutex: Mutex
  readonly guard: OverlapGuard
  readonly header: Qcow2Header
  readonly clusterSize: number
  readonly entryWriter: EntryWriter
  readonly subclusterSize: number
  readonly refcounts: RefcountWriter
  /** byte cursor for packing compressed clusters (compressed.ts) */
  compressedCursor: number
  readonly l2Entries: number
  assertUsable(): void
  flushDevices(): Promise<void>
  guardedWrite(dev: BlockDevice, offset: number, data: Uint8Array, tag: string, allowed?: 'l1' | 'l2'): Promise<void>
  entry(t: Uint8Array, i: number): L2Entry
  oldGuest(offset: number, length: number): Promise<Uint8Array>
  refcount(host: number): Promise<number>
  alloc(n: number, w: TableWork | undefined): Promise<number>
  touch(w: TableWork, i: number): void
  dropRef(e: L2Entry): Range | undefined
  ensureDirty(): Promise<void>
}
