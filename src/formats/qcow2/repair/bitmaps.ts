/**
 * qcow2 repair, phase M (-r all): persistent bitmaps qemu-img refuses to load
 * (it then refuses to open the image) or cannot use are dropped:
 * - the whole directory when it cannot be read or breaks bitmap_list_load's
 *   rules (size, alignment, entries that overrun it);
 * - an IN_USE bitmap (inconsistent: QEMU crashed while it was in use);
 * - an entry that breaks check_dir_entry, or has extra data;
 * - a bitmap whose table cannot be loaded (wrong size, an invalid entry, a
 *   table or data cluster past the end of the file).
 * The bitmaps left are written as a new directory past the end of the file
 * with its refcount set in the refcount block that covers it (durable first);
 * then the bitmaps extension's count, size and offset are switched with one
 * write inside one sector. With no bitmap left, the extension is ended (the
 * end-of-extensions marker written over its header) and the autoclear bit
 * cleared in the same first-sector write. The dropped bitmaps' clusters are
 * leaks from then on: phase B frees them.
 */
import { CorruptImageError, hex } from '../../../errors.js'
import type { BlockDevice } from '../../../io/block-device.js'
import type { RepairAction } from '../../../check/types.js'
import { putU32be, putU64be, u32be, u64be } from '../../../util/bytes.js'
import {
  BME_FLAG_IN_USE,
  bitmapEntryBroken,
  bitmapGeometry,
  decodeBitmapTableEntry,
  encodeBitmapDirectory,
  readBitmapDirectory,
  validateBitmapDirectory,
  type Qcow2Bitmap,
} from '../spec/bitmap-directory.js'
import * as C from '../spec/constants.js'
import { bitmapsValid, readHeader } from '../spec/header.js'
import { refcountsPerBlock, setRefcountEntry } from '../spec/refcount-codec.js'
import type { Phase } from './phase.js'

/** A bitmap the repair drops, and why. */
export interface DroppedBitmap {
  name: string
  reason: string
}

export async function planBitmaps(dev: BlockDevice, file: string): Promise<(Phase & { dropped: DroppedBitmap[] }) | undefined> {
  const h = await readHeader(dev, { file, readOnly: true, forCheck: true })
  const ext = h.bitmaps
  if (!ext || !bitmapsValid(h) || h.version < 3) return undefined
  const cs = h.clusterSize
  const x = h.extensions.find((e) => e.magic === C.EXT_BITMAPS)
  if (!x) return undefined
  const fileEnd = dev.size
  const dropped: DroppedBitmap[] = []
  let keep: Qcow2Bitmap[] = []
  let list: Qcow2Bitmap[] | undefined
  try {
    if (ext.nbBitmaps === 0) throw new Error('found bitmaps extension with zero bitmaps')
    if (ext.directoryOffset + ext.directorySize > fileEnd) throw new Error(`the directory at ${hex(ext.directoryOffset)} runs past the end of the file`)
    list = await readBitmapDirectory(dev, file, ext)
    try {
      validateBitmapDirectory(list, ext, h.size, cs, file)
    } catch (e) {
      // per-entry problems are handled below; a directory-wide one drops all
      const msg = (e as Error).message
      if (!/doesn't satisfy the constraints|extra data/.test(msg)) throw e
    }
  } catch (e) {
    const why = (e as Error).message.replace(/^qcow2: [^:]*: (bitmap directory: )?/, '')
    const names = list ? list.map((b) => b.name) : []
    for (const n of names.length ? names : ['(all)']) dropped.push({ name: n, reason: `the bitmap directory is broken: ${why}` })
    list = undefined
  }
  if (list) {
    for (const bm of list) {
      const reason = await whyDrop(dev, bm, h.size, cs, fileEnd)
      if (reason) dropped.push({ name: bm.name, reason })
      else keep.push(bm)
    }
  } else keep = []
  if (dropped.length === 0) return undefined

  const actions: RepairAction[] = dropped.map((d) => ({
    kind: 'drop-bitmap',
    structure: 'bitmap',
    hostOffset: ext.directoryOffset,
    message: d.name === '(all)' ? `drop every bitmap: ${d.reason}` : `drop bitmap '${d.name}': ${d.reason}`,
  }))
  const sector0 = new Uint8Array(await dev.read(0, 512, 'header'))
  if (keep.length === 0) {
    // end the extension list at the bitmaps extension (it must be the last one) and clear the autoclear bit: one sector write
    const last = h.extensions[h.extensions.length - 1]
    if (last !== x || x.offset + 8 > 512) throw refuse(file, x.offset, 'the bitmaps extension is not the last one in the first sector')
    sector0.fill(0, x.offset, x.offset + 8)
    sector0[95] = sector0[95]! & ~C.AUTOCLEAR_BITMAPS
    return { writes: [], then: [{ offset: 0, data: sector0, tag: 'header' }], actions, leaksFixed: 0, corruptionsFixed: dropped.length, dropped }
  }
  // the fields nb_bitmaps, reserved, directory_size, directory_offset: one write inside one sector
  const field = x.offset + 8
  if (Math.floor(field / 512) !== Math.floor((field + 23) / 512)) throw refuse(file, field, 'the bitmaps extension fields cross a sector boundary')
  const dir = encodeBitmapDirectory(keep)
  const dirOffset = Math.ceil(fileEnd / cs) * cs
  const dirBytes = new Uint8Array(Math.ceil(dir.byteLength / cs) * cs)
  dirBytes.set(dir)
  // its refcount, in the refcount block that covers it (the table and block as the header names them)
  const perBlock = refcountsPerBlock(cs, h.refcountOrder)
  const table = await dev.read(h.refcountTableOffset, h.refcountTableClusters * cs, 'reftable')
  const writes: Phase['writes'] = [{ offset: dirOffset, data: dirBytes, tag: 'bitmap-directory' }]
  const blocks = new Map<number, Uint8Array>()
  for (let c = dirOffset / cs; c < (dirOffset + dirBytes.byteLength) / cs; c++) {
    const ti = Math.floor(c / perBlock)
    const block = ti * 8 < table.byteLength ? Number(u64be(table, ti * 8) & 0x00fffffffffffe00n) : 0
    if (block === 0 || block % cs !== 0 || block + cs > fileEnd) throw refuse(file, dirOffset, 'no refcount block covers the end of the file')
    let b = blocks.get(block)
    if (!b) {
      b = new Uint8Array(await dev.read(block, cs, 'refblock'))
      blocks.set(block, b)
    }
    setRefcountEntry(b, c % perBlock, h.refcountOrder, 1)
  }
  for (const [offset, data] of blocks) writes.push({ offset, data, tag: 'refblock' })
  const fields = new Uint8Array(24)
  putU32be(fields, 0, keep.length)
  putU64be(fields, 8, dir.byteLength)
  putU64be(fields, 16, dirOffset)
  return {
    writes,
    then: [{ offset: field, data: fields, tag: 'bitmaps-extension' }],
    actions,
    leaksFixed: 0,
    corruptionsFixed: dropped.length,
    dropped,
  }
}

function refuse(file: string, at: number, why: string): CorruptImageError {
  return new CorruptImageError(`qcow2: ${file}: repair refused to rewrite the bitmap directory: ${why}; nothing written in this phase`, {
    file,
    structure: 'bitmap',
    offset: at,
  })
}

/** Why QEMU would not load this bitmap (or cannot use it); undefined when it is fine. */
async function whyDrop(dev: BlockDevice, bm: Qcow2Bitmap, size: number, cs: number, fileEnd: number): Promise<string | undefined> {
  if (bm.flags & BME_FLAG_IN_USE) return 'it is in use (inconsistent: it was not stored when the image was last closed)'
  if (bm.extraData.byteLength !== 0) return 'its entry has extra data (not supported)'
  if (bitmapEntryBroken(bm, size, cs)) return "its directory entry doesn't satisfy the constraints"
  const g = bitmapGeometry(size, bm.granularityBits, cs)
  if (bm.tableSize !== g.tableSize) return `its table has ${bm.tableSize} entries, the virtual size needs ${g.tableSize}`
  if (bm.tableOffset + bm.tableSize * 8 > fileEnd) return `its table at ${hex(bm.tableOffset)} runs past the end of the file`
  const table = await dev.read(bm.tableOffset, bm.tableSize * 8, 'bitmap')
  for (let i = 0; i < bm.tableSize; i++) {
    const e = decodeBitmapTableEntry(table, i, cs)
    if (!e)
      return `its table entry ${i} (${hex(u32be(table, i * 8))}${u32be(table, i * 8 + 4)
        .toString(16)
        .padStart(8, '0')}) is invalid`
    if (e.offset !== 0 && e.offset + cs > fileEnd) return `its table entry ${i} points past the end of the file (${hex(e.offset)})`
  }
  return undefined
}
