/**
 * Resizing: grow (a larger L1 table is written and flushed before the header
 * points at it, in one write covering size and L1 fields) or shrink (only when
 * nothing is allocated past the new end). The image is closed afterwards,
 * whether the resize worked or not: reopen it to use the new size.
 */
import { UnsupportedFeatureError, UsageError, hex } from '../../../errors.js'
import { alignUp, putU32be, putU64be } from '../../../util/bytes.js'
import { dataFileRaw, hasDataFile, l1EntriesNeeded } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import type { Qcow2Writer } from '../write/write.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'
import { preallocateGrowth, type GrowPreallocation } from './resize-prealloc.js'

/**
 * `preallocation` (growing only; qemu-img resize --preallocation): metadata, falloc and full map the new
 * range as qemu 7.2 does (resize-prealloc.ts); the header's size is written last.
 */
export async function resizeQcow2(img: Qcow2OpenImage, size: number, preallocation: 'off' | GrowPreallocation = 'off'): Promise<void> {
  const w = writerOf(img)
  const state = img.state
  if (!Number.isSafeInteger(size) || size < 0) throw new UsageError(`qcow2: invalid size ${size}`)
  const newSize = alignUp(size, 512)
  try {
    await w.mutex.run(async () => {
      w.assertUsable()
      // an inconsistent (in use) bitmap cannot be resized: refused as qemu-img resize does
      w.bitmaps?.checkResizable()
      const h = state.header
      // v3 snapshots keep their own disk sizes (QEMU 7.2 resizes such images); v2 ones do not
      if (state.snapshots.length > 0 && h.version < 3) {
        // qemu-img's words, unprefixed (as it prints them: 'qemu-img: Can't resize ...'); the file is in the details
        throw new UnsupportedFeatureError("Can't resize a v2 image which has snapshots", { file: state.filename, structure: 'snapshot table' })
      }
      if (newSize < h.size) await refuseShrinkOverData(state, newSize)
      let mode = preallocation
      // data_file_raw: the new range must be mapped 1:1 too (qemu forces metadata)
      if (mode === 'off' && newSize > h.size && hasDataFile(h) && dataFileRaw(h)) mode = 'metadata'
      if (mode !== 'off' && newSize > h.size) {
        if (h.backingFileOffset !== 0) {
          throw new UnsupportedFeatureError(
            `qcow2: ${state.filename}: resize --preallocation=${mode} of an image with a backing file is not supported by imgtool (qemu would also zero the new range over the backing file's data)`,
          )
        }
        const oldSize = h.size
        await w.refcounts.persist()
        await w.flushNow()
        // the L1 table first (old size kept), then the new range, then the size
        const before = { offset: h.l1TableOffset, size: h.l1Size }
        await switchSize(w, state.l1, newSize, false)
        // qemu's allocation cursor (free_cluster_index): past the new L1 table, back to the old one it freed
        const cs = h.clusterSize
        const cursor =
          h.l1TableOffset !== before.offset
            ? Math.min(Math.ceil((h.l1TableOffset + h.l1Size * 8) / cs), before.size > 0 ? Math.floor(before.offset / cs) : Infinity)
            : 0
        if (state.l1.byteLength < h.l1Size * 8) {
          const grown = new Uint8Array(h.l1Size * 8)
          grown.set(state.l1)
          state.replaceL1(grown)
        }
        await w.flushNow()
        await w.refcounts.persist()
        await w.flushNow()
        await preallocateGrowth(w, state, oldSize, newSize, mode, cursor)
        const b = new Uint8Array(8)
        putU64be(b, 0, newSize)
        await w.writeMetadata(24, b, 'header')
        await w.flushNow()
        h.size = newSize
        await w.refcounts.persist()
        await w.flushNow()
        await w.refcounts.persist()
        await w.flushNow()
        return
      }
      await w.refcounts.persist()
      await w.flushNow()
      await switchSize(w, state.l1, newSize)
      await w.flushNow()
      // the data file follows the new size (qemu truncates it; a plain data file only grows here)
      if (hasDataFile(h) && state.dataDevice !== state.device && (dataFileRaw(h) || newSize > state.dataDevice.size)) {
        await state.dataDevice.truncate(newSize)
      }
      await w.refcounts.persist()
      await w.flushNow()
    })
  } finally {
    // the image is closed either way: reopen it to use the new size
    await img.close()
    w.retire()
  }
}

/** Shrinking cuts only unallocated or zero space: refuse when guest data lies past the new end. */
async function refuseShrinkOverData(state: Qcow2State, newSize: number): Promise<void> {
  const h = state.header
  for await (const run of state.map(newSize, h.size - newSize)) {
    if (run.type !== 'unallocated' && run.type !== 'zero') {
      throw new UnsupportedFeatureError(
        `qcow2: ${state.filename}: cannot shrink to ${newSize} bytes: guest data is allocated at ${hex(run.guest)} (only unallocated or zero space can be cut)`,
      )
    }
  }
}

/**
 * Switch the header to the new size, with a larger L1 table (a copy of
 * `activeL1`, written and flushed first) when the size needs one: one header
 * write covers size and L1 fields. A new table the header never pointed at is
 * given back.
 */
async function switchSize(w: Qcow2Writer, activeL1: Uint8Array, newSize: number, setSize = true): Promise<void> {
  const h = w.header
  const cs = h.clusterSize
  const need = l1EntriesNeeded({ ...h, size: newSize })
  const hdr = new Uint8Array(24) // size (24), crypt_method (32), l1_size (36), l1_table_offset (40)
  putU64be(hdr, 0, setSize ? newSize : h.size)
  putU32be(hdr, 8, h.cryptMethod)
  let l1Size = h.l1Size
  let l1Offset = h.l1TableOffset
  const oldL1 = { offset: h.l1TableOffset, bytes: h.l1Size * 8 }
  let allocated: { offset: number; bytes: number } | undefined
  let switched = false
  try {
    if (need > h.l1Size) {
      const table = new Uint8Array(need * 8)
      table.set(activeL1)
      l1Offset = await w.allocClusters(Math.ceil((need * 8) / cs))
      allocated = { offset: l1Offset, bytes: need * 8 }
      await w.writeMetadata(l1Offset, table, 'l1')
      await w.refcounts.persist()
      await w.flushNow()
      l1Size = need
    }
    putU32be(hdr, 12, l1Size)
    putU64be(hdr, 16, l1Offset)
    await w.writeMetadata(24, hdr, 'header')
    switched = true
  } catch (e) {
    // the header was not written: the new L1 table is unreferenced, give it back
    if (allocated) {
      await w.refcounts.update(allocated.offset, allocated.bytes, -1)
      await w.refcounts.persist().catch(() => undefined)
    }
    throw e
  } finally {
    if (switched) {
      if (setSize) h.size = newSize
      if (l1Offset !== oldL1.offset) {
        w.guard.setRange(oldL1.offset, oldL1.bytes, undefined)
        w.guard.setRange(l1Offset, l1Size * 8, 'l1')
        // the old table stays counted until the header switch is durable
        if (oldL1.bytes > 0) w.deferFree(oldL1.offset, oldL1.bytes)
        h.l1Size = l1Size
        h.l1TableOffset = l1Offset
      }
    }
  }
}
