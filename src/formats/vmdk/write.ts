/**
 * Guest writes into an uncompressed hosted sparse extent (monolithicSparse):
 * a write into an allocated grain goes in place; a write into an unallocated
 * or zeroed grain allocates a whole grain at the end of the file (QEMU's
 * next_cluster_sector: the file's size rounded up to a grain), the bytes
 * around the write zero (no backing file: the grain read as zeros before).
 *
 * Commit order (the crash laws), per batch of new grains:
 *   1. the grains, in allocation order, then a flush;
 *   2. the primary grain table sectors that map them, then a flush;
 *   3. the redundant grain table sectors, then a flush.
 * A crash before 2 leaves unlinked grains past the metadata (check: leaked
 * space); between 2 and 3 a redundant table whose entries lag the primary's
 * (check: a notice; QEMU reads only the primary). A grain write that fails is
 * undone (the file cut back to where the batch began); a table write that
 * fails stops the writer: later writes are refused.
 *
 * Writes are serialized (one batch at a time); writes queued while a batch
 * commits are taken together into the next one, so concurrent writers
 * (convert keeps several in flight) share flushes.
 */
import { CorruptImageError, ImgtoolError, UnsupportedFeatureError, hex } from '../../errors.js'
import type { GrainMap } from './grains.js'
import type { SparseExtent } from './open.js'
import { SECTOR } from './spec.js'

/** grain table entries per sector */
const PER_SECTOR = SECTOR / 4

interface Pending {
  rel: number
  data: Uint8Array
  done: (e?: unknown) => void
}

interface NewGrain {
  grain: number
  /** the bytes written into it, at their offsets in the grain (the rest is zeros) */
  pieces: Array<{ at: number; data: Uint8Array }>
  /** where it was written (set once the write is durable) */
  sector: number
}

export class SparseWriter {
  private end: number
  private queue: Pending[] = []
  private running = false
  private broken: Error | undefined

  constructor(
    readonly extent: SparseExtent,
    readonly map: GrainMap,
  ) {
    const gs = extent.grainSize
    this.end = Math.max(Math.ceil(extent.device.size / gs) * gs, Math.ceil(extent.overhead / gs) * gs)
  }

  /** Write `data` at extent-relative byte `rel`; resolves once the bytes are linked and durable. */
  write(rel: number, data: Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => {
      this.queue.push({ rel, data, done: (e) => (e === undefined ? resolve() : reject(e as Error)) })
      if (!this.running) void this.drain()
    })
  }

  private async drain(): Promise<void> {
    this.running = true
    try {
      while (this.queue.length > 0) {
        const batch = this.queue
        this.queue = []
        try {
          if (this.broken) throw this.broken
          await this.commit(batch)
          for (const p of batch) p.done()
        } catch (e) {
          for (const p of batch) p.done(e)
        }
      }
    } finally {
      this.running = false
    }
  }

  private async commit(batch: Pending[]): Promise<void> {
    const e = this.extent
    const gs = e.grainSize
    const fresh = new Map<number, NewGrain>()
    const inPlace: Array<{ at: number; data: Uint8Array }> = []
    for (const p of batch) {
      for (let pos = p.rel; pos < p.rel + p.data.byteLength;) {
        const grain = Math.floor(pos / gs)
        const inGrain = pos - grain * gs
        const n = Math.min(gs - inGrain, p.rel + p.data.byteLength - pos)
        const piece = p.data.subarray(pos - p.rel, pos - p.rel + n)
        const pending = fresh.get(grain)
        if (pending) pending.pieces.push({ at: inGrain, data: piece })
        else {
          const entry = await this.map.entry(grain * gs)
          if (entry.kind === 'normal') inPlace.push({ at: entry.sector * SECTOR + inGrain, data: piece })
          else if (entry.kind === 'compressed') throw new UnsupportedFeatureError(`vmdk: ${e.file}: compressed grains cannot be written`, { file: e.file })
          else {
            if ((await this.map.table(Math.floor(grain / e.gtes))) === undefined) {
              const at = e.gdOffset + Math.floor(grain / e.gtes) * 4
              throw new UnsupportedFeatureError(
                `vmdk: ${e.file}: grain directory entry at ${hex(at)} names no grain table; imgtool does not allocate grain tables`,
                {
                  file: e.file,
                  structure: 'grain directory',
                  offset: at,
                },
              )
            }
            fresh.set(grain, { grain, pieces: [{ at: inGrain, data: piece }], sector: 0 })
          }
        }
        pos += n
      }
    }
    // writes into allocated grains: in place, before anything of this batch is linked
    for (const w of inPlace) await e.device.write(w.at, w.data, 'data')
    if (fresh.size === 0) return
    const grains = [...fresh.values()].sort((a, b) => a.grain - b.grain)
    await this.writeGrains(grains)
    await this.link(grains)
  }

  /**
   * Law 1, 2 and 4: the grains at the end of the file in one write, flushed; cut back when it fails.
   * When the batch's grains are whole grains lying one after another in one caller's buffer (convert's
   * usual case), that buffer is written as it is; otherwise the grains are assembled in the writer's own
   * scratch buffer (reused from batch to batch, used for grain data only), pieces in call order (a later
   * write wins) and the rest of a partly written grain zero. One write per batch either way.
   */
  private async writeGrains(grains: NewGrain[]): Promise<void> {
    const e = this.extent
    const gs = e.grainSize
    const start = this.end
    const bytes = contiguous(grains, gs) ?? this.assemble(grains, gs)
    try {
      await e.device.write(start, bytes, 'data')
      await e.device.flush()
    } catch (err) {
      await e.device.truncate(start).catch(() => undefined)
      throw err
    } finally {
      // a scratch buffer larger than the usual batch is not kept
      if (this.scratch && this.scratch.byteLength > SCRATCH_KEEP) this.scratch = undefined
    }
    for (const [i, g] of grains.entries()) g.sector = (start + i * gs) / SECTOR
    this.end = start + grains.length * gs
  }

  private scratch: Uint8Array | undefined

  private assemble(grains: NewGrain[], gs: number): Uint8Array {
    const n = grains.length * gs
    if (!this.scratch || this.scratch.byteLength < n) this.scratch = new Uint8Array(Math.max(n, Math.min(SCRATCH_KEEP, 2 * n)))
    const all = this.scratch.subarray(0, n)
    for (const [i, g] of grains.entries()) {
      const p0 = g.pieces[0]!
      if (g.pieces.length !== 1 || p0.at !== 0 || p0.data.byteLength !== gs) all.fill(0, i * gs, (i + 1) * gs)
      for (const p of g.pieces) all.set(p.data, i * gs + p.at)
    }
    return all
  }

  /** The primary tables, flushed, then the redundant ones, flushed (one write per table each). */
  private async link(grains: NewGrain[]): Promise<void> {
    const e = this.extent
    const byTable = new Map<number, NewGrain[]>()
    for (const g of grains) {
      const t = Math.floor(g.grain / e.gtes)
      const list = byTable.get(t) ?? []
      list.push(g)
      byTable.set(t, list)
    }
    try {
      for (const copy of ['primary', 'redundant'] as const) {
        if (copy === 'redundant' && !e.rgd) break
        for (const [t, list] of byTable) {
          const tableSector = copy === 'primary' ? e.gd[t]! : e.rgd![t]!
          if (tableSector === 0) continue
          const table = (await this.map.table(t))!
          for (const g of list) table[g.grain % e.gtes] = g.sector
          const first = Math.floor((list[0]!.grain % e.gtes) / PER_SECTOR)
          const last = Math.floor((list[list.length - 1]!.grain % e.gtes) / PER_SECTOR)
          // whole sectors of the table (its last sector only up to its last entry)
          const count = Math.min((last - first + 1) * PER_SECTOR, e.gtes - first * PER_SECTOR)
          const bytes = new Uint8Array(count * 4)
          const dv = new DataView(bytes.buffer)
          for (let j = 0; j < count; j++) dv.setUint32(j * 4, table[first * PER_SECTOR + j]!, true)
          await e.device.write(tableSector * SECTOR + first * SECTOR, bytes, 'l2')
        }
        await e.device.flush()
      }
    } catch (err) {
      // the grains may be linked in one copy: nothing is undone, and no further write is taken
      this.map.invalidate()
      this.broken = new CorruptImageError(
        `vmdk: ${e.file}: a grain table write failed (${(err as Error).message}); the image takes no more writes in this session`,
        { file: e.file, structure: 'grain table' },
      )
      throw err instanceof ImgtoolError ? err : this.broken
    }
  }

  async flush(): Promise<void> {
    await this.extent.device.flush()
  }
}

/** the scratch buffer kept between batches: at most this many bytes (convert's batches are 2 to 8 MiB) */
const SCRATCH_KEEP = 8 * 1024 * 1024

/**
 * The batch's bytes without a copy: every grain written whole by one piece, the pieces following each
 * other in one buffer; else undefined.
 */
function contiguous(grains: NewGrain[], gs: number): Uint8Array | undefined {
  let first: Uint8Array | undefined
  for (const [i, g] of grains.entries()) {
    if (g.pieces.length !== 1) return undefined
    const p = g.pieces[0]!
    if (p.at !== 0 || p.data.byteLength !== gs) return undefined
    if (!first) first = p.data
    else if (p.data.buffer !== first.buffer || p.data.byteOffset !== first.byteOffset + i * gs) return undefined
  }
  return first && new Uint8Array(first.buffer, first.byteOffset, grains.length * gs)
}
