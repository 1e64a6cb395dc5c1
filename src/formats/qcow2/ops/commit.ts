/**
 * Commit (qemu-img commit): write what a qcow2 image and the layers between
 * it and a base allocate into the base, through the base's own writer (any
 * format), flush the base, then (unless the overlay is kept) make every
 * cluster of the overlay unallocated so it reads the base again.
 *
 * A crash during the copy leaves the overlay as it was and the base holding,
 * per piece, its old or its committed bytes; a crash while the overlay is
 * emptied leaves each L2 table either as it was or emptied, and an emptied
 * cluster reads the committed bytes from the flushed base.
 */
import { UsageError, checkAborted } from '../../../errors.js'
import type { DiskImage } from '../../../image/disk-image.js'
import { setBitmap, setStandard } from '../spec/l2-meta.js'
import { RateLimiter } from '../../../util/rate.js'
import { commit, prepareTable, undo, type TableWork } from '../write/commit.js'
import type { Qcow2Writer } from '../write/write.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'

export interface CommitQcow2Options {
  /** keep the overlay's data (qemu-img commit -d; implied by -b) */
  keepOverlay: boolean
  /** qemu-img commit -r: at most this many bytes copied per second */
  rateLimit?: number
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

export interface CommitQcow2Result {
  /** guest bytes written into the base */
  bytesCommitted: number
}

/** The largest piece read and written at once. */
const CHUNK = 4 * 1024 * 1024

/**
 * Commit `top` (and the layers above `baseDepth` in its chain) into `base`,
 * which is the layer `baseDepth` levels below `top`, open for writing on its
 * own. The copy reads only what is allocated above the base, so it never
 * reads the base through `top`'s chain.
 */
export async function commitQcow2(top: Qcow2OpenImage & DiskImage, base: DiskImage, baseDepth: number, o: CommitQcow2Options): Promise<CommitQcow2Result> {
  if (!base.write) throw new UsageError(`${base.format}: ${base.filename}: the base image is not open for writing`)
  if (top.virtualSize > base.virtualSize) {
    throw new UsageError(
      `${base.format}: ${base.filename}: the base (${base.virtualSize} bytes) is smaller than ${top.filename} (${top.virtualSize} bytes); resize the base first`,
    )
  }
  const size = top.virtualSize
  const limiter = o.rateLimit ? new RateLimiter(o.rateLimit) : undefined
  let committed = 0
  for await (const e of top.extents(0, size)) {
    checkAborted(o.signal, 'commit')
    if (e.depth >= baseDepth) continue
    for (let p = e.start; p < e.start + e.length; p += CHUNK) {
      const n = Math.min(CHUNK, e.start + e.length - p)
      if (e.zero && !e.data) {
        if (base.writeZeroes) await base.writeZeroes(p, n)
        else await base.write(p, new Uint8Array(n))
      } else {
        await limiter?.take(n)
        await base.write(p, await top.read(p, n))
      }
      committed += n
    }
    o.onProgress?.(e.start + e.length, size)
  }
  // rule 2: the committed data is durable in the base before the overlay lets go of it
  await base.flush()
  if (!o.keepOverlay) await emptyOverlay(top)
  return { bytesCommitted: committed }
}

/**
 * Make every cluster of the image unallocated (QEMU's make_empty), one L2
 * table at a time through the writer's commit protocol: the table is written
 * and flushed before the clusters it mapped are given back.
 */
export async function emptyOverlay(img: Qcow2OpenImage): Promise<void> {
  const w = writerOf(img)
  const l1Size = img.state.header.l1Size
  for (let i = 0; i < l1Size; i++) {
    await w.mutex.run(async () => {
      w.assertUsable()
      if (img.state.l1Entry(i).l2Offset === 0) return
      await emptyTable(w, i)
    })
  }
  await w.flush()
}

async function emptyTable(w: Qcow2Writer, l1Index: number): Promise<void> {
  const works: TableWork[] = []
  try {
    const t = await prepareTable(w, l1Index, false)
    if (!t) return
    works.push(t)
    let changed = false
    for (let idx = 0; idx < w.l2Entries; idx++) {
      const e = w.entry(t.table, idx)
      const extended = w.entryWriter.extended
      if (e.type === 'unallocated' && !extended) continue
      if (e.type === 'unallocated' && extended && isClear(t.table, idx)) continue
      const d = w.dropRef(e)
      if (d) t.frees.push(d)
      setStandard(t.table, w.entryWriter, idx, { hostOffset: 0, copied: false })
      if (extended) setBitmap(t.table, idx, { alloc: 0, zero: 0 })
      w.touch(t, idx)
      changed = true
    }
    if (!changed) {
      await undo(w, works)
      return
    }
    await commit(w, works, [], t.mode !== 'inplace')
  } catch (e) {
    await undo(w, works)
    throw e
  }
}

/** An extended L2 entry's subcluster bitmap is all clear. */
function isClear(table: Uint8Array, idx: number): boolean {
  for (let k = idx * 16 + 8; k < idx * 16 + 16; k++) if (table[k] !== 0) return false
  return true
}
