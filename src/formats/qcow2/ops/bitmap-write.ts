/**
 * Persistent dirty bitmaps on an image open for writing, as QEMU 7.2 keeps
 * them (block/qcow2-bitmap.c):
 *
 * - attach (read-write open): every bitmap's table and data are loaded; a
 *   bitmap already flagged IN_USE is inconsistent and left alone (its entry
 *   and clusters are kept as they are). The others get IN_USE set in a new
 *   directory that is durable before attach returns, so before any guest
 *   write: a crash from then on leaves them flagged IN_USE (inconsistent, the
 *   state QEMU designed for it), never a stale bitmap that looks valid.
 * - guest writes: `note()` sets the bits of every enabled (AUTO) bitmap; a
 *   disabled one is not changed by writes.
 * - plain flush: nothing (QEMU stores bitmaps only on close/inactivate).
 * - close: `store()` writes new data clusters (an all-zero cluster of bitmap
 *   data is table entry 0, as QEMU writes it), new tables and a new directory
 *   with IN_USE cleared, each in its own buffer; flushes them and their
 *   refcounts; switches the header's directory offset with one 8-byte write
 *   and a flush; only then frees the old directory, tables and data.
 *
 * Every directory switch writes a new directory (the old one stays intact
 * until the header no longer points at it): a crash at any point leaves the
 * previous directory in charge plus at most leaked clusters. Each switch keeps
 * the directory size and bitmap count, so the header write is only the 8-byte
 * directory offset (8-aligned, never torn by a 512-byte sector).
 */
import { CorruptImageError, ImgtoolError, UnsupportedFeatureError, hex } from '../../../errors.js'
import { putU64be } from '../../../util/bytes.js'
import {
  BME_FLAG_AUTO,
  BME_FLAG_IN_USE,
  bitmapGeometry,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
  readBitmapDirectory,
  validateBitmapDirectory,
  type Qcow2Bitmap,
} from '../spec/bitmap-directory.js'
import { EXT_BITMAPS } from '../spec/constants.js'
import { bitmapsValid } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { PersistentBitmapHook, Qcow2Writer } from '../write/write.js'

/** One bitmap of the directory and, when it is consistent, its bits in memory. */
interface TrackedBitmap {
  entry: Qcow2Bitmap
  /** IN_USE when the image was opened: not loaded, never rewritten */
  inconsistent: boolean
  /** AUTO: guest writes set its bits */
  enabled: boolean
  /** one bit per granularity chunk, bit i at byte i>>3, bit i&7 (LSB first); undefined when inconsistent */
  bits: Uint8Array | undefined
  /** number of valid bits */
  nbits: number
  /** data clusters its current on-disk table references */
  dataClusters: number[]
}

interface Range {
  offset: number
  length: number
}

export class PersistentBitmaps implements PersistentBitmapHook {
  /** the enabled, consistent bitmaps (what `note()` walks) */
  private readonly tracking: TrackedBitmap[]
  /** the virtual size the bits were sized for */
  private size: number

  private constructor(
    private readonly state: Qcow2State,
    readonly list: TrackedBitmap[],
  ) {
    this.size = state.header.size
    this.tracking = list.filter((b) => b.enabled && !b.inconsistent)
  }

  /** The image's bitmaps, loaded and checked as QEMU loads them; undefined when it has none. */
  static async load(state: Qcow2State): Promise<PersistentBitmaps | undefined> {
    const h = state.header
    const file = state.filename
    const ext = h.bitmaps
    if (!ext || !bitmapsValid(h) || ext.nbBitmaps === 0) return undefined
    const field = headerField(state)
    if (Math.floor(field / 512) !== Math.floor((field + 7) / 512)) {
      throw new UnsupportedFeatureError(
        `qcow2: ${file}: the bitmaps extension's directory offset at ${hex(field)} crosses a sector boundary; it cannot be updated atomically`,
      )
    }
    const entries = await readBitmapDirectory(state.device, file, ext)
    validateBitmapDirectory(entries, ext, h.size, h.clusterSize, file)
    const list: TrackedBitmap[] = []
    for (const entry of entries) {
      const inconsistent = (entry.flags & BME_FLAG_IN_USE) !== 0
      const enabled = (entry.flags & BME_FLAG_AUTO) !== 0
      const g = bitmapGeometry(h.size, entry.granularityBits, h.clusterSize)
      const table = await state.device.read(entry.tableOffset, entry.tableSize * 8, 'bitmap')
      const dataClusters: number[] = []
      let bits: Uint8Array | undefined
      if (!inconsistent) {
        if (entry.tableSize !== g.tableSize) {
          throw new CorruptImageError(
            `qcow2: ${file}: Could not read bitmap '${entry.name}' from image: its table has ${entry.tableSize} entries, a virtual size of ${h.size} bytes at granularity ${2 ** entry.granularityBits} needs ${g.tableSize} (bitmap table at ${hex(entry.tableOffset)})`,
            { file, structure: 'bitmap', offset: entry.tableOffset },
          )
        }
        bits = new Uint8Array(g.bytes)
      }
      for (let i = 0; i < entry.tableSize; i++) {
        const e = decodeBitmapTableEntry(table, i, h.clusterSize)
        if (!e) {
          if (inconsistent) continue // QEMU does not read an IN_USE bitmap's table
          throw new CorruptImageError(
            `qcow2: ${file}: Could not read bitmap_table table from image for bitmap '${entry.name}': entry ${i} is invalid (bitmap table at ${hex(entry.tableOffset)})`,
            {
              file,
              structure: 'bitmap',
              offset: entry.tableOffset + i * 8,
            },
          )
        }
        if (e.offset !== 0) dataClusters.push(e.offset)
        if (!bits) continue
        const start = i * h.clusterSize
        const n = Math.min(h.clusterSize, bits.byteLength - start)
        if (e.offset !== 0) bits.set((await state.device.read(e.offset, h.clusterSize, 'bitmap')).subarray(0, n), start)
        else if (e.allOnes) bits.fill(0xff, start, start + n)
      }
      if (bits) clearTail(bits, g.bits)
      list.push({ entry, inconsistent, enabled, bits, nbits: g.bits, dataClusters })
    }
    return new PersistentBitmaps(state, list)
  }

  /** Every cluster holding bitmap metadata, for the overlap guard. */
  guardRanges(): Array<Range & { kind: 'bitmap-directory' | 'bitmap-table' | 'bitmap-data' }> {
    const ext = this.state.header.bitmaps!
    const cs = this.state.header.clusterSize
    const out: Array<Range & { kind: 'bitmap-directory' | 'bitmap-table' | 'bitmap-data' }> = [
      { offset: ext.directoryOffset, length: ext.directorySize, kind: 'bitmap-directory' },
    ]
    for (const b of this.list) {
      out.push({ offset: b.entry.tableOffset, length: b.entry.tableSize * 8, kind: 'bitmap-table' })
      for (const d of b.dataClusters) out.push({ offset: d, length: cs, kind: 'bitmap-data' })
    }
    return out
  }

  /** Guest bytes [offset, offset+length) changed: set the bits of every enabled bitmap. */
  note(offset: number, length: number): void {
    if (length <= 0) return
    for (const b of this.tracking) {
      const g = 2 ** b.entry.granularityBits
      const first = Math.floor(offset / g)
      const last = Math.min(b.nbits - 1, Math.floor((offset + length - 1) / g))
      if (first <= last) setBits(b.bits!, first, last)
    }
  }

  /** QEMU refuses to resize an image with an inconsistent bitmap (qcow2_truncate_bitmaps_check). */
  checkResizable(): void {
    const bad = this.list.find((b) => b.inconsistent)
    if (bad) {
      throw new UnsupportedFeatureError(
        `qcow2: ${this.state.filename}: Bitmap '${bad.entry.name}' is inconsistent and cannot be used (remove it with qemu-img bitmap --remove)`,
      )
    }
  }

  /** QEMU refuses to apply an internal snapshot while the image has any bitmap (bdrv_snapshot_goto). */
  checkSnapshotApply(name: string): void {
    if (this.list.length > 0) {
      throw new UnsupportedFeatureError(`qcow2: ${this.state.filename}: Could not apply snapshot '${name}': Device has active dirty bitmaps`)
    }
  }

  /** Set IN_USE on every consistent bitmap, durably (attach, before any guest write). */
  async markInUse(w: Qcow2Writer): Promise<void> {
    if (!this.list.some((b) => !b.inconsistent)) return
    const entries = this.list.map((b) => ({ ...b.entry, flags: b.inconsistent ? b.entry.flags : b.entry.flags | BME_FLAG_IN_USE }))
    await this.switchDirectory(w, entries, [])
  }

  /**
   * Store the consistent bitmaps (close): new data, tables and directory,
   * durable before the header points at them; old ones freed after.
   */
  async store(w: Qcow2Writer): Promise<void> {
    if (!this.list.some((b) => !b.inconsistent)) return
    const h = this.state.header
    const cs = h.clusterSize
    const dev = this.state.device
    if (h.size !== this.size) this.resizeBits(h.size)
    const allocated: Range[] = []
    const entries: Qcow2Bitmap[] = []
    const newData: number[][] = []
    try {
      for (const b of this.list) {
        if (b.inconsistent) {
          entries.push(b.entry)
          newData.push(b.dataClusters)
          continue
        }
        const bits = b.bits!
        const g = bitmapGeometry(h.size, b.entry.granularityBits, cs)
        const table = new Uint8Array(g.tableSize * 8)
        const data: number[] = []
        for (let i = 0; i < g.tableSize; i++) {
          const part = bits.subarray(i * cs, Math.min(bits.byteLength, (i + 1) * cs))
          if (isZero(part)) continue
          const buf = new Uint8Array(cs)
          buf.set(part)
          const off = await w.allocClusters(1)
          allocated.push({ offset: off, length: cs })
          await dev.write(off, buf, 'bitmap')
          w.guard.setRange(off, cs, 'bitmap-data')
          putU64be(table, i * 8, off)
          data.push(off)
        }
        const tableOffset = await w.allocClusters(Math.ceil(table.byteLength / cs))
        allocated.push({ offset: tableOffset, length: table.byteLength })
        await dev.write(tableOffset, table, 'bitmap')
        w.guard.setRange(tableOffset, table.byteLength, 'bitmap-table')
        entries.push({ ...b.entry, tableOffset, tableSize: g.tableSize, flags: b.enabled ? BME_FLAG_AUTO : 0 })
        newData.push(data)
      }
    } catch (e) {
      await this.undo(w, allocated)
      throw e
    }
    const old: Range[] = []
    for (const b of this.list) {
      if (b.inconsistent) continue
      old.push({ offset: b.entry.tableOffset, length: b.entry.tableSize * 8 })
      for (const d of b.dataClusters) old.push({ offset: d, length: cs })
    }
    await this.switchDirectory(w, entries, allocated, old)
    this.list.forEach((b, i) => {
      b.entry = entries[i]!
      b.dataClusters = newData[i]!
    })
  }

  /**
   * Write `entries` as a new directory, make it (and `allocated`, already
   * written) durable with its refcounts, point the header at it, then free the
   * old directory and `old`. Before the header write, a failure gives back
   * everything allocated; from the header write on, nothing is given back
   * unless the switch is known durable (a leak at worst).
   */
  private async switchDirectory(w: Qcow2Writer, entries: Qcow2Bitmap[], allocated: Range[], old: Range[] = []): Promise<void> {
    // ordered refcount writes even with lazy_refcounts: a dirty image with bitmaps cannot be rebuilt on open
    const lazy = w.refcounts.lazy
    w.refcounts.lazy = false
    try {
      await this.switchDirectoryOrdered(w, entries, allocated, old)
    } finally {
      w.refcounts.lazy = lazy
    }
  }

  private async switchDirectoryOrdered(w: Qcow2Writer, entries: Qcow2Bitmap[], allocated: Range[], old: Range[]): Promise<void> {
    const h = this.state.header
    const ext = h.bitmaps!
    const cs = h.clusterSize
    const dev = this.state.device
    const dir = encodeBitmapDirectory(entries)
    if (dir.byteLength !== ext.directorySize) {
      throw new ImgtoolError('INTERNAL', `qcow2: ${this.state.filename}: new bitmap directory is ${dir.byteLength} bytes, the header says ${ext.directorySize}`)
    }
    const mine = [...allocated]
    let dirOffset: number
    try {
      dirOffset = await w.allocClusters(Math.ceil(dir.byteLength / cs))
      mine.push({ offset: dirOffset, length: dir.byteLength })
      await dev.write(dirOffset, dir, 'bitmap')
      w.guard.setRange(dirOffset, dir.byteLength, 'bitmap-directory')
      await w.refcounts.persist()
      await w.flushDevices()
    } catch (e) {
      await this.undo(w, mine)
      throw e
    }
    const field = new Uint8Array(8)
    putU64be(field, 0, dirOffset)
    await dev.write(headerField(this.state), field, 'header')
    await w.flushDevices()
    const oldDir = { offset: ext.directoryOffset, length: ext.directorySize }
    ext.directoryOffset = dirOffset
    const x = h.extensions.find((e) => e.magic === EXT_BITMAPS)
    if (x && x.data.byteLength >= 24) putU64be(x.data, 16, dirOffset)
    // the old structures are unreachable now that the switch is durable
    for (const r of [oldDir, ...old]) {
      w.guard.setRange(r.offset, r.length, undefined)
      await w.refcounts.update(r.offset, r.length, -1)
    }
    await w.refcounts.persist()
    await w.flushDevices()
    entries.forEach((e, i) => {
      e.entryOffset = dirOffset + entryStart(entries, i)
    })
    this.list.forEach((b, i) => {
      b.entry = entries[i]!
    })
    // what info reports for this open image
    this.state.bitmaps.splice(0, this.state.bitmaps.length, ...entries)
  }

  /** Give back clusters allocated for structures nothing points at (a failure before the header switch). */
  private async undo(w: Qcow2Writer, ranges: Range[]): Promise<void> {
    try {
      for (const r of ranges) {
        w.guard.setRange(r.offset, r.length, undefined)
        await w.refcounts.update(r.offset, r.length, -1)
      }
      await w.refcounts.persist()
    } catch {
      // unreferenced either way: a leak at worst
    }
  }

  /** The disk was resized: bits past the new end are dropped, new ones start clean (QEMU's truncate). */
  private resizeBits(size: number): void {
    const cs = this.state.header.clusterSize
    for (const b of this.list) {
      if (b.inconsistent) continue
      const g = bitmapGeometry(size, b.entry.granularityBits, cs)
      const next = new Uint8Array(g.bytes)
      next.set(b.bits!.subarray(0, Math.min(g.bytes, b.bits!.byteLength)))
      clearTail(next, g.bits)
      b.bits = next
      b.nbits = g.bits
    }
    this.size = size
  }

  /** @internal for tests: a copy of a bitmap's bits */
  bitsOf(name: string): Uint8Array | undefined {
    return this.list.find((b) => b.entry.name === name)?.bits?.slice()
  }
}

/** Byte offset of the directory offset field in the header cluster. */
function headerField(state: Qcow2State): number {
  const x = state.header.extensions.find((e) => e.magic === EXT_BITMAPS)
  if (!x) throw new ImgtoolError('INTERNAL', `qcow2: ${state.filename}: bitmaps extension not found`)
  return x.offset + 8 + 16
}

function entryStart(entries: Qcow2Bitmap[], i: number): number {
  let pos = 0
  for (let k = 0; k < i; k++) pos += Math.ceil((24 + entries[k]!.nameBytes.byteLength) / 8) * 8
  return pos
}

/** Set bits [first, last] (LSB first within a byte). */
export function setBits(b: Uint8Array, first: number, last: number): void {
  let i = first
  while (i <= last && i % 8 !== 0) {
    b[Math.floor(i / 8)]! |= 1 << (i % 8)
    i++
  }
  const fullEnd = last + 1 - ((last + 1) % 8)
  if (i < fullEnd) {
    b.fill(0xff, i / 8, fullEnd / 8)
    i = fullEnd
  }
  while (i <= last) {
    b[Math.floor(i / 8)]! |= 1 << (i % 8)
    i++
  }
}

/** Clear every bit from `nbits` on in the last byte. */
function clearTail(b: Uint8Array, nbits: number): void {
  if (nbits % 8 !== 0 && b.byteLength > 0) b[b.byteLength - 1]! &= (1 << (nbits % 8)) - 1
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.byteLength; i++) if (b[i] !== 0) return false
  return true
}
