/**
 * Guest writes with their data writes pipelined: while one request's data is
 * being written, the next request is planned and its data write issued, so a
 * stream of writes (convert) keeps the target busy instead of waiting on
 * metadata bookkeeping between data writes. qemu-img gets the same effect
 * from several coroutines in flight.
 *
 * The writes queued on one image are taken up by a session that holds the
 * image's mutex from its first request until its queue is empty: no other
 * operation (read, zero write, snapshot, flush) ever sees a request that is
 * planned but not committed. Inside the session:
 *   1. plan request N: allocate its clusters (memory), fill its table copies;
 *      its data write is issued at once and not awaited;
 *   2. commit the oldest planned request once its data write is done, with
 *      the ordinary commit protocol (write-commit.ts: refcounts durable,
 *      data flushed, then links in allocation order, then frees);
 *   3. a request planned on top of an uncommitted one (same L2 table) starts
 *      from that one's table copy; commits run strictly in request order.
 * If a request's data write or commit fails, it is undone (its never-linked
 * clusters freed) and every request planned after it fails too and is
 * undone: their table copies were built on the failed one's entries. A
 * request whose planning fails undoes only itself. No cluster that is linked
 * is ever freed, and a failed stream leaves no leaks (seed: L2Meta rollback).
 *
 * Only the common shape is pipelined: every cluster of the request either
 * gets a new host cluster that it fills completely (it was unallocated or a
 * plain zero cluster) or is overwritten in place (an owned cluster, no entry
 * change). Anything else (copy-on-write, a shared L2 table, subcluster
 * allocation, a preallocated zero cluster, an external data file) waits for
 * the pipeline to empty and then takes the ordinary path (write-plan.ts).
 */
import { ImgtoolError, hex } from '../../../errors.js'
import { hasDataFile } from '../spec/header.js'
import { ALL_SUBCLUSTERS, getBitmap, setBitmap, setStandard, subclusterMask } from '../spec/l2-meta.js'
import { commit, joined, prepareTable, undo, type TableWork } from './commit.js'
import { dataWrite, writeLocked, type DataWrite } from './plan.js'
import type { WriterCore } from './core.js'

/** planned requests whose data writes may be in flight at once */
const MAX_PLANNED = 3

interface Job {
  offset: number
  data: Uint8Array
  resolve: () => void
  reject: (e: unknown) => void
}

interface Planned {
  job: Job
  works: TableWork[]
  needFlush: boolean
  /** settles when the request's data writes are done; never rejects (the error is kept) */
  dataDone: Promise<unknown>
}

/** The requests one session takes up: it stops admitting when another operation queues behind it (FIFO). */
interface Session {
  queue: Job[]
  open: boolean
  /** the mutex's call count right after the session's own call */
  ticket: number
}

/** One L2 table a pipelined request touches: guest [from, to) of L1 index `l1Index`. */
interface ShapeTable {
  l1Index: number
  from: number
  to: number
  table: Uint8Array
  /** the request's own table copy still in flight, when there is one */
  shadow: TableWork | undefined
  l2: number
}

export class WritePipeline {
  private current: Session | undefined
  /** table copies of planned, uncommitted requests, by L1 index: what the next plan starts from */
  private readonly shadow = new Map<number, TableWork>()
  /** the data writes of the last planned request (settled, never rejected) */
  private lastData: Promise<unknown> = Promise.resolve()

  constructor(private readonly wr: WriterCore) {}

  submit(offset: number, data: Uint8Array): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const job = { offset, data, resolve, reject }
      const cur = this.current
      // join the session unless another operation was called after it (that one runs first)
      if (cur && cur.open && this.wr.mutex.called === cur.ticket) {
        cur.queue.push(job)
        return
      }
      const s: Session = { queue: [job], open: true, ticket: 0 }
      this.current = s
      // the session's failures are reported to its jobs; nothing escapes
      void this.wr.mutex.run(() => this.session(s)).catch(() => undefined)
      s.ticket = this.wr.mutex.called
    })
  }

  private async session(s: Session): Promise<void> {
    const planned: Planned[] = []
    const queue = s.queue
    try {
      for (;;) {
        while (queue.length > 0 && planned.length < MAX_PLANNED) {
          const job = queue.shift()!
          let p: Planned | undefined
          try {
            this.wr.assertUsable()
            p = await this.plan(job)
          } catch (e) {
            // the plan undid its own allocations and left the table copies alone: the requests
            // planned before it are intact and still commit, as they would have one at a time
            job.reject(e)
            continue
          }
          if (p) {
            planned.push(p)
            continue
          }
          // not a pipelined shape: empty the pipeline, then the ordinary path
          if (!(await this.commitAll(planned))) {
            job.reject(this.abandoned(job))
            continue
          }
          try {
            await writeLocked(this.wr, job.offset, job.data)
            job.resolve()
          } catch (e) {
            job.reject(e)
          }
        }
        if (planned.length === 0) {
          // let callers resolved in this turn queue their next write before the session ends
          if (this.wr.mutex.called === s.ticket) await new Promise<void>((r) => setImmediate(r))
          if (queue.length === 0) return
          continue
        }
        await this.commitOldest(planned)
      }
    } catch (e) {
      await this.failAll(planned, e)
      for (const job of queue.splice(0)) job.reject(e)
    } finally {
      // synchronous with the last look at the queue: a later submit starts a new session
      s.open = false
      if (this.current === s) this.current = undefined
      this.shadow.clear()
      this.lastData = Promise.resolve()
    }
  }

  /** Commit every planned request in order; false if one failed (the rest were failed with it). */
  private async commitAll(planned: Planned[]): Promise<boolean> {
    while (planned.length > 0) if (!(await this.commitOldest(planned))) return false
    return true
  }

  private async commitOldest(planned: Planned[]): Promise<boolean> {
    const p = planned.shift()!
    const err = await p.dataDone
    try {
      if (err !== undefined) throw err
      await commit(this.wr, p.works, [], p.needFlush)
    } catch (e) {
      await undo(this.wr, p.works)
      p.job.reject(e)
      await this.failAll(planned, e)
      return false
    }
    for (const w of p.works) if (this.shadow.get(w.l1Index) === w) this.shadow.delete(w.l1Index)
    p.job.resolve()
    return true
  }

  /** Undo and reject every planned request (newest first): they were built on a failed one. */
  private async failAll(planned: Planned[], cause: unknown): Promise<void> {
    while (planned.length > 0) {
      const p = planned.pop()!
      await p.dataDone
      await undo(this.wr, p.works)
      p.job.reject(this.abandoned(p.job, cause))
    }
    this.shadow.clear()
    this.lastData = Promise.resolve()
  }

  private abandoned(job: Job, cause?: unknown): Error {
    const why = cause instanceof Error ? `: ${cause.message}` : ''
    return new ImgtoolError(
      'IO',
      `qcow2: ${this.wr.state.filename}: write of ${job.data.byteLength} bytes at guest offset ${hex(job.offset)} abandoned: an earlier write in flight failed${why}`,
    )
  }

  /**
   * The tables a request touches, when it has the pipelined shape: every
   * cluster either filled whole (unallocated, or zero without a host cluster)
   * or owned (refcount 1) and written in place; undefined for any other shape.
   */
  private async pipelinedShape(job: Job): Promise<ShapeTable[] | undefined> {
    const wr = this.wr
    const clusterSize = wr.clusterSize
    const coverage = wr.l2Entries * clusterSize
    const end = job.offset + job.data.byteLength
    const tables: ShapeTable[] = []
    for (let pos = job.offset; pos < end;) {
      const l1Index = Math.floor(pos / coverage)
      const to = Math.min(end, (l1Index + 1) * coverage)
      const sh = this.shadow.get(l1Index)
      let table: Uint8Array
      let l2: number
      if (sh) {
        table = sh.table
        l2 = sh.l2
      } else {
        const l1e = wr.state.l1Entry(l1Index)
        l2 = l1e.l2Offset
        if (l2 === 0) table = new Uint8Array(0)
        else {
          if ((await wr.refcount(l2)) !== 1) return undefined // shared table: copy-on-write path
          table = await wr.state.loadL2(l1Index, l2)
        }
      }
      for (let p = pos; p < to;) {
        const guest = Math.floor(p / clusterSize) * clusterSize
        const cEnd = Math.min(to, guest + clusterSize)
        const whole = p === guest && cEnd === guest + clusterSize
        if (table.byteLength === 0) {
          if (!whole) return undefined
        } else {
          const e = wr.entry(table, (guest / clusterSize) % wr.l2Entries)
          const fresh = e.type === 'unallocated' || (e.type === 'zero' && e.hostOffset === 0)
          if (fresh) {
            if (!whole) return undefined
          } else if (e.type === 'normal') {
            if ((await wr.refcount(e.hostOffset)) !== 1) return undefined
            if (wr.entryWriter.extended) {
              const bm = getBitmap(table, (guest / clusterSize) % wr.l2Entries)
              const mask = subclusterMask(Math.floor((p - guest) / wr.subclusterSize), Math.floor((cEnd - guest - 1) / wr.subclusterSize))
              if ((bm.alloc & mask) !== mask) return undefined
            }
          } else {
            return undefined
          }
        }
        p = cEnd
      }
      tables.push({ l1Index, from: pos, to, table, shadow: sh, l2 })
      pos = to
    }
    return tables
  }

  /** Plan a request of the pipelined shape and issue its data write; undefined for any other shape. */
  private async plan(job: Job): Promise<Planned | undefined> {
    const wr = this.wr
    if (job.data.byteLength === 0) return { job, works: [], needFlush: false, dataDone: Promise.resolve(undefined) }
    if (hasDataFile(wr.header)) return undefined
    // shape check first, without allocating: whole clusters to fill, or owned clusters kept as they are
    const tables = await this.pipelinedShape(job)
    if (!tables) return undefined
    const clusterSize = wr.clusterSize
    // the shape fits: allocate, fill the table copies, issue the data writes
    const works: TableWork[] = []
    const writes: DataWrite[] = []
    let needFlush = false
    try {
      for (const t of tables) {
        let w: TableWork
        if (t.shadow) {
          w = {
            l1Index: t.l1Index,
            oldL2: t.l2,
            l2: t.l2,
            mode: 'inplace',
            table: t.table.slice(),
            lo: Infinity,
            hi: -1,
            allocated: [],
            frees: [],
            linked: false,
            attempted: false,
          }
        } else {
          w = (await prepareTable(wr, t.l1Index, true))!
          if (w.mode === 'cow')
            throw new ImgtoolError(
              'INTERNAL',
              `qcow2: ${wr.state.filename}: L2 table of L1 index ${t.l1Index} (at ${hex(t.l2)}) became shared while a write was planned`,
            )
        }
        works.push(w)
        if (w.mode !== 'inplace') needFlush = true
        const fill: Array<{ idx: number; guest: number }> = []
        for (let p = t.from; p < t.to;) {
          const guest = Math.floor(p / clusterSize) * clusterSize
          const cEnd = Math.min(t.to, guest + clusterSize)
          const idx = (guest / clusterSize) % wr.l2Entries
          const e = wr.entry(w.table, idx)
          if (e.type === 'normal') dataWrite(writes, wr.state.dataDevice, e.hostOffset + (p - guest), job.data.subarray(p - job.offset, cEnd - job.offset))
          else fill.push({ idx, guest })
          p = cEnd
        }
        if (fill.length > 0) {
          needFlush = true
          const first = await wr.alloc(fill.length, w)
          for (let k = 0; k < fill.length; k++) {
            const { idx, guest } = fill[k]!
            const host = first + k * clusterSize
            dataWrite(writes, wr.state.device, host, job.data.subarray(guest - job.offset, guest - job.offset + clusterSize))
            setStandard(w.table, wr.entryWriter, idx, { hostOffset: host, copied: true })
            if (wr.entryWriter.extended) setBitmap(w.table, idx, { alloc: ALL_SUBCLUSTERS, zero: 0 })
            wr.touch(w, idx)
          }
        }
      }
    } catch (e) {
      await undo(wr, works)
      throw e
    }
    for (const w of works) this.shadow.set(w.l1Index, w)
    const dataDone = this.queueDataWrites(writes)
    return { job, works, needFlush, dataDone }
  }

  /**
   * Queue a request's data writes behind the earlier requests' ones. Data
   * writes go out one request after the other: a request may overwrite in place a cluster
   * that an earlier one in flight is still writing, and two writes to one place may land in
   * either order. Planning and commits still overlap them; the device gets the next write at once.
   */
  private queueDataWrites(writes: DataWrite[]): Promise<unknown> {
    const wr = this.wr
    const dataDone = this.lastData
      .then(async (earlier) => {
        // after a failed data write nothing more goes out: the requests behind it are abandoned
        if (earlier !== undefined) throw earlier
        for (const d of writes) await wr.guardedWrite(d.device, d.offset, joined(d), 'data')
      })
      .then(
        () => undefined,
        (e: unknown) => e ?? new Error('data write failed'),
      )
    this.lastData = dataDone
    return dataDone
  }
}
