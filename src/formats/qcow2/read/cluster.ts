/**
 * Guest -> host mapping: walks L1 and L2 tables for a guest range and yields
 * runs of equal status, merging host-contiguous data clusters so large reads
 * become few device reads.
 */
import { CorruptImageError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import { Lru } from '../../../util/lru.js'
import { decodeL1, decodeL2, readBitmap, subclusterType, type L2DecodeContext, type L2Entry, type SubclusterType } from '../spec/entries.js'
import { hasDataFile, hasExtendedL2, l2EntrySize, type Qcow2Header } from '../spec/header.js'
import { SUBCLUSTERS_PER_CLUSTER } from '../spec/constants.js'

export interface MappingRun {
  guest: number
  length: number
  type: Exclude<SubclusterType, 'invalid'>
  /** host byte offset of `guest` (normal, zero-alloc, unallocated-alloc) */
  hostOffset?: number
  /** compressed cluster: descriptor and the guest offset where its cluster starts */
  compressed?: { hostOffset: number; size: number; clusterGuest: number }
}

const TWO32 = 0x1_0000_0000

/**
 * Merges runs as they come: a run continues the pending one when it has the
 * same type (never compressed), starts where it ends, and its host range (if
 * any) continues the pending one's. Finished runs collect in `done`.
 */
export class RunMerger {
  pending: MappingRun | undefined
  done: MappingRun[] = []

  add(r: MappingRun): void {
    const p = this.pending
    if (
      p &&
      p.type === r.type &&
      !r.compressed &&
      !p.compressed &&
      p.guest + p.length === r.guest &&
      (p.hostOffset === undefined) === (r.hostOffset === undefined) &&
      (r.hostOffset === undefined || p.hostOffset! + p.length === r.hostOffset)
    ) {
      p.length += r.length
      return
    }
    if (p) this.done.push(p)
    this.pending = r
  }

  /** add() for a run given as scalars (host -1: none), allocating only when a new run starts. */
  addScalar(type: 'normal' | 'zero' | 'zero-alloc' | 'unallocated', guest: number, length: number, host: number): void {
    const p = this.pending
    if (
      p &&
      p.type === type &&
      !p.compressed &&
      p.guest + p.length === guest &&
      (host < 0 ? p.hostOffset === undefined : p.hostOffset !== undefined && p.hostOffset + p.length === host)
    ) {
      p.length += length
      return
    }
    if (p) this.done.push(p)
    this.pending = host < 0 ? { guest, length, type } : { guest, length, type, hostOffset: host }
  }
}

/** L2 tables cached by host offset; budget in bytes (QEMU's default is 1 MiB). */
export class L2Cache {
  private readonly lru: Lru<number, Uint8Array>
  constructor(clusterSize: number, budgetBytes = 4 * 1024 * 1024) {
    this.lru = new Lru(Math.max(4, Math.floor(budgetBytes / clusterSize)))
  }
  get(offset: number): Uint8Array | undefined {
    return this.lru.get(offset)
  }
  set(offset: number, table: Uint8Array): void {
    this.lru.set(offset, table)
  }
  delete(offset: number): void {
    this.lru.delete(offset)
  }
  clear(): void {
    this.lru.clear()
  }
}

export class ClusterMapper {
  readonly clusterSize: number
  readonly l2Entries: number
  readonly subclusterSize: number
  private readonly ctx: L2DecodeContext
  private readonly l1View: DataView

  constructor(
    private readonly dev: BlockDevice,
    private readonly header: Qcow2Header,
    private readonly file: string,
    /** the active L1 table bytes (l1Size * 8); writers update it in place */
    readonly l1: Uint8Array,
    readonly l2cache: L2Cache,
  ) {
    this.clusterSize = header.clusterSize
    this.l2Entries = header.clusterSize / l2EntrySize(header)
    this.subclusterSize = hasExtendedL2(header) ? header.clusterSize / SUBCLUSTERS_PER_CLUSTER : header.clusterSize
    this.ctx = { clusterBits: header.clusterBits, extendedL2: hasExtendedL2(header), dataFile: hasDataFile(header) }
    this.l1View = new DataView(l1.buffer, l1.byteOffset, l1.byteLength)
  }

  get decodeContext(): L2DecodeContext {
    return this.ctx
  }

  l1Entry(index: number) {
    return decodeL1(this.l1View, index * 8)
  }

  /** Load the L2 table an L1 entry points at, refusing offsets that cannot be a table. */
  async loadL2(l1Index: number, l2Offset: number): Promise<Uint8Array> {
    const cached = this.l2cache.get(l2Offset)
    if (cached) return cached
    if (l2Offset % this.clusterSize !== 0) {
      throw new CorruptImageError(
        `qcow2: ${this.file}: L2 table offset ${hex(l2Offset)} is not aligned to cluster size ${hex(this.clusterSize)} (L1 entry ${l1Index} at ${hex(this.header.l1TableOffset + l1Index * 8)})`,
        {
          file: this.file,
          structure: 'l1',
          offset: this.header.l1TableOffset + l1Index * 8,
          qemuCorruption: `L2 table offset ${cHex(l2Offset)} unaligned (L1 index: ${cHex(l1Index)})`,
        },
      )
    }
    const eofLimit = Math.ceil(this.dev.size / this.clusterSize) * this.clusterSize
    if (l2Offset + this.clusterSize > eofLimit && this.dev.readOnly) {
      // As qemu-img reads it: a file read past its end gives zeros, so a table
      // wholly or partly past the end reads as unallocated entries there.
      const t = new Uint8Array(this.clusterSize)
      const present = Math.max(0, Math.min(this.clusterSize, this.dev.size - l2Offset))
      if (present > 0) t.set(await this.dev.read(l2Offset, present, 'l2'))
      this.l2cache.set(l2Offset, t)
      return t
    }
    if (l2Offset + this.clusterSize > eofLimit) {
      throw new CorruptImageError(
        `qcow2: ${this.file}: L2 table offset ${hex(l2Offset)} is beyond the end of the file (size ${hex(this.dev.size)}) (L1 entry ${l1Index} at ${hex(this.header.l1TableOffset + l1Index * 8)})`,
        { file: this.file, structure: 'l1', offset: this.header.l1TableOffset + l1Index * 8 },
      )
    }
    const t = await this.dev.read(l2Offset, this.clusterSize, 'l2')
    this.l2cache.set(l2Offset, t)
    return t
  }

  decodeEntry(table: DataView, index: number): L2Entry {
    return decodeL2(table, index * l2EntrySize(this.header), this.ctx)
  }

  /**
   * Runs covering [offset, offset+length) in guest order. Adjacent runs of the
   * same type are merged when their host ranges are contiguous too.
   *
   * Runs are collected per L2 table by synchronous code and yielded afterwards:
   * a 1 TiB image has 16M entries, and a generator (or an object) per entry
   * costs seconds where this costs tens of milliseconds.
   */
  async *map(offset: number, length: number): AsyncGenerator<MappingRun> {
    const end = offset + length
    const clusterSize = this.clusterSize
    const m = new RunMerger()
    // On a read-only image (no writer can change a table meanwhile) the next L2
    // table is read while this one is scanned. A failed read-ahead is reported
    // only if the walk gets there.
    let ahead: { l1Index: number; table: Promise<Uint8Array> } | undefined
    let pos = offset
    while (pos < end) {
      const cluster = Math.floor(pos / clusterSize)
      const l1Index = Math.floor(cluster / this.l2Entries)
      const l2Index = cluster % this.l2Entries
      const tableEnd = Math.min(end, (l1Index + 1) * this.l2Entries * clusterSize)
      const l1e = l1Index < this.header.l1Size ? this.l1Entry(l1Index) : undefined
      if (!l1e || l1e.l2Offset === 0) {
        m.add({ guest: pos, length: tableEnd - pos, type: 'unallocated' })
      } else {
        const raw = ahead?.l1Index === l1Index ? await ahead.table : await this.loadL2(l1Index, l1e.l2Offset)
        ahead = undefined
        if (this.dev.readOnly && tableEnd < end && l1Index + 1 < this.header.l1Size) {
          const next = this.l1Entry(l1Index + 1)
          if (next.l2Offset !== 0) {
            ahead = { l1Index: l1Index + 1, table: this.loadL2(l1Index + 1, next.l2Offset) }
            ahead.table.catch(() => undefined)
          }
        }
        const dv = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
        if (this.ctx.extendedL2) this.scanExtended(m, dv, l1Index, l1e.l2Offset, l2Index, pos, tableEnd)
        else this.scanStandard(m, dv, l1Index, l1e.l2Offset, l2Index, pos, tableEnd)
      }
      pos = tableEnd
      if (m.done.length > 0) {
        const done = m.done
        m.done = []
        yield* done
      }
    }
    if (m.pending) yield m.pending
  }

  /** Standard L2 entries from `l2Index` covering [pos, tableEnd): the common ones decoded inline. */
  private scanStandard(m: RunMerger, dv: DataView, l1Index: number, l2Offset: number, l2Index: number, pos: number, tableEnd: number): void {
    const clusterSize = this.clusterSize
    const v2 = this.header.version < 3
    const dataFile = this.ctx.dataFile
    for (; pos < tableEnd; l2Index++) {
      const clusterStart = Math.floor(pos / clusterSize) * clusterSize
      const clusterEnd = Math.min(tableEnd, clusterStart + clusterSize)
      const hi = dv.getUint32(l2Index * 8, false)
      const lo = dv.getUint32(l2Index * 8 + 4, false)
      // the same classification as decodeL2 + standardRun; anything unusual
      // (compressed, a v2 zero flag, a bad host offset) takes the slow path
      let type: 'normal' | 'zero' | 'zero-alloc' | 'unallocated' | undefined
      let host = -1
      if ((hi & 0x40000000) === 0 && !(v2 && lo & 1)) {
        const off = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
        if (lo & 1) {
          if (off === 0) type = 'zero'
          else {
            type = 'zero-alloc'
            host = off
          }
        } else if (off === 0 && !(dataFile && (hi & 0x80000000) !== 0)) {
          type = 'unallocated'
        } else {
          type = 'normal'
          host = off
        }
        if (host >= 0 && (host % clusterSize !== 0 || (dataFile && host !== clusterStart))) type = undefined
      }
      if (type === undefined) {
        m.add(this.standardRun(this.decodeEntry(dv, l2Index), l1Index, l2Offset, l2Index, pos, clusterStart, clusterEnd))
        pos = clusterEnd
        continue
      }
      m.addScalar(type, pos, clusterEnd - pos, host < 0 ? -1 : host + (pos - clusterStart))
      pos = clusterEnd
      // Whole clusters whose raw entry is this one's with the host offset moved on by
      // a cluster (or unchanged, without a host offset) continue the same run: same
      // type, same flags, contiguous and aligned host ranges. Compare raw words only.
      const step = host < 0 ? 0 : clusterSize
      let eHi = hi
      let eLo = lo
      let k = l2Index + 1
      let q = pos
      while (q + clusterSize <= tableEnd) {
        let nLo = eLo + step
        let nHi = eHi
        if (nLo >= TWO32) {
          nLo -= TWO32
          nHi++
        }
        if (dv.getUint32(k * 8, false) !== nHi || dv.getUint32(k * 8 + 4, false) !== nLo) break
        eHi = nHi
        eLo = nLo
        k++
        q += clusterSize
      }
      if (q > pos) {
        m.pending!.length += q - pos
        l2Index = k - 1
        pos = q
      }
    }
  }

  private scanExtended(m: RunMerger, dv: DataView, l1Index: number, l2Offset: number, l2Index: number, pos: number, tableEnd: number): void {
    const clusterSize = this.clusterSize
    for (; pos < tableEnd; l2Index++) {
      const clusterStart = Math.floor(pos / clusterSize) * clusterSize
      const clusterEnd = Math.min(tableEnd, clusterStart + clusterSize)
      this.extendedRuns(m, this.decodeEntry(dv, l2Index), dv, l2Index, l1Index, l2Offset, pos, clusterStart, clusterEnd)
      pos = clusterEnd
    }
  }

  private standardRun(e: L2Entry, l1Index: number, l2Offset: number, l2Index: number, pos: number, clusterStart: number, clusterEnd: number): MappingRun {
    const length = clusterEnd - pos
    switch (e.type) {
      case 'unallocated':
        return { guest: pos, length, type: 'unallocated' }
      case 'compressed':
        return { guest: pos, length, type: 'compressed', compressed: { hostOffset: e.hostOffset, size: e.size, clusterGuest: clusterStart } }
      case 'zero':
        if (this.header.version < 3) {
          throw new CorruptImageError(
            `qcow2: ${this.file}: zero cluster entry for guest ${hex(clusterStart)} found in a v2 image (L2 entry ${l2Index} at ${hex(l2Offset + l2Index * 8)})`,
            { file: this.file, structure: 'l2', offset: l2Offset + l2Index * 8 },
          )
        }
        if (e.hostOffset === 0) return { guest: pos, length, type: 'zero' }
        this.checkHost(e.hostOffset, l1Index, l2Offset, l2Index, clusterStart)
        return { guest: pos, length, type: 'zero-alloc', hostOffset: e.hostOffset + (pos - clusterStart) }
      case 'normal':
        this.checkHost(e.hostOffset, l1Index, l2Offset, l2Index, clusterStart)
        return { guest: pos, length, type: 'normal', hostOffset: e.hostOffset + (pos - clusterStart) }
    }
  }

  private extendedRuns(
    m: RunMerger,
    e: L2Entry,
    dv: DataView,
    l2Index: number,
    l1Index: number,
    l2Offset: number,
    pos: number,
    clusterStart: number,
    clusterEnd: number,
  ): void {
    if (e.type === 'compressed') {
      m.add({ guest: pos, length: clusterEnd - pos, type: 'compressed', compressed: { hostOffset: e.hostOffset, size: e.size, clusterGuest: clusterStart } })
      return
    }
    if (e.type === 'normal') this.checkHost(e.hostOffset, l1Index, l2Offset, l2Index, clusterStart)
    const bm = readBitmap(dv, l2Index * 16)
    const subclusterSize = this.subclusterSize
    let p = pos
    while (p < clusterEnd) {
      const i = Math.floor((p - clusterStart) / subclusterSize)
      const scEnd = Math.min(clusterEnd, clusterStart + (i + 1) * subclusterSize)
      const t = subclusterType(e, bm, i)
      if (t === 'invalid') {
        throw new CorruptImageError(
          `qcow2: ${this.file}: invalid extended L2 bitmap 0x${bm.zero.toString(16).padStart(8, '0')}${bm.alloc.toString(16).padStart(8, '0')} at subcluster ${i} of guest ${hex(clusterStart)} (L2 entry ${l2Index} at ${hex(l2Offset + l2Index * 16)})`,
          { file: this.file, structure: 'l2', offset: l2Offset + l2Index * 16 },
        )
      }
      const host = e.type === 'normal' ? e.hostOffset + (p - clusterStart) : undefined
      if (t === 'normal' || t === 'zero-alloc' || t === 'unallocated-alloc') {
        m.add({ guest: p, length: scEnd - p, type: t, hostOffset: host! })
      } else if (t !== 'compressed') {
        m.add({ guest: p, length: scEnd - p, type: t })
      }
      p = scEnd
    }
  }

  private checkHost(host: number, l1Index: number, l2Offset: number, l2Index: number, clusterStart: number): void {
    if (host % this.clusterSize !== 0) {
      throw new CorruptImageError(
        `qcow2: ${this.file}: data cluster offset ${hex(host)} for guest ${hex(clusterStart)} is not aligned to cluster size ${hex(this.clusterSize)} (L2 entry ${l2Index} at ${hex(l2Offset + l2Index * l2EntrySize(this.header))})`,
        {
          file: this.file,
          structure: 'l2',
          offset: l2Offset + l2Index * l2EntrySize(this.header),
          qemuCorruption: `Cluster allocation offset ${cHex(host)} unaligned (L2 offset: ${cHex(l2Offset)}, L2 index: ${cHex(l2Index)})`,
        },
      )
    }
    if (this.ctx.dataFile && host !== clusterStart) {
      throw new CorruptImageError(
        `qcow2: ${this.file}: external data file cluster offset ${hex(host)} does not match guest offset ${hex(clusterStart)} (L2 entry ${l2Index} at ${hex(l2Offset + l2Index * l2EntrySize(this.header))})`,
        { file: this.file, structure: 'l2', offset: l2Offset + l2Index * l2EntrySize(this.header) },
      )
    }
  }
}

/**
 * printf("%#x"), as qemu's qcow2_signal_corruption() words its events (0 prints as "0"); the text goes in an
 * error's `qemuCorruption` detail so that a caller that reports as qemu-img (convert --salvage) can print it.
 */
function cHex(n: number): string {
  return n === 0 ? '0' : hex(n)
}
