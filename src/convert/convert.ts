/**
 * convert over the DiskImage interface only: copies the guest bytes of a
 * source into a freshly created target, skipping unallocated and zero ranges
 * (the target stays sparse), detecting zero blocks inside data (-S, default
 * 4 KiB like qemu-img), optionally compressing whole clusters (-c), with
 * several reads in flight and writes issued in guest order.
 */
import { UsageError, checkAborted } from '../errors.js'
import type { DiskImage, Extent } from '../image/disk-image.js'
import { mergeExtents } from '../image/range.js'
import { isAllZero } from '../util/bytes.js'
import { RateLimiter } from '../util/rate.js'
import { CopyOffload, type CopyRange } from './copy-offload.js'
import { SparseCopier, type CopySparse } from './sparse-copy.js'
import { BufferPool, HostFiles, readGuest, sourceOf, type Source } from './host-reads.js'
import { Turns } from '../util/turns.js'

/** A target that can store compressed clusters (qcow2), found by capability, not by format. */
export interface CompressedTarget {
  clusterSize: number
  writeCompressed(offset: number, compressed: Uint8Array): Promise<void>
  /** optional: several clusters in one metadata update */
  writeCompressedBatch?(items: Array<{ offset: number; data: Uint8Array }>): Promise<void>
  /** optional: called once after the last compressed write (qcow2: the file's end aligned to 512 bytes, as qemu-img) */
  finishCompressed?(): Promise<void>
}

export function isCompressedTarget(d: unknown): d is CompressedTarget {
  return typeof (d as CompressedTarget).writeCompressed === 'function' && typeof (d as CompressedTarget).clusterSize === 'number'
}

export interface ConvertOptions {
  /** -S: zero runs of at least this many bytes (aligned) are not written; 0 writes every data byte. Default 4096. */
  minSparse?: number
  /** -c: compress whole clusters with this codec (undefined result: store uncompressed) */
  compress?: (cluster: Uint8Array) => Promise<Uint8Array | undefined>
  /** -c, optional: compress the whole clusters at `offsets` of `buf` in one go (same results as `compress`) */
  compressMany?: (buf: Uint8Array, offsets: readonly number[]) => Promise<Array<Uint8Array | undefined>>
  /**
   * -B: the target has a backing file holding the source's backing content:
   * skip what the source takes from its backing chain, write zeros the source
   * has at depth 0.
   */
  targetHasBacking?: boolean
  /**
   * convert -n without --target-is-zero: the target already holds data, so every guest range the source
   * does not fill with data (unallocated, zero, zero runs inside data) is written as zeros, as qemu-img
   * does; a fresh target (the default) reads as zeros and those ranges are left alone.
   */
  targetDirty?: boolean
  /**
   * bytes per read and per target write request (default 2 MiB, qemu-img's IO_BUF_SIZE; rounded to the target's
   * cluster size). 8 MiB chunks (the default until 2026-12-05) kept 48 MiB of buffers cycling: the kernel's copies
   * into and out of buffers no cache held cost 30 % more CPU for raw -> qcow2 (bench/README-write.md, 2026-12-05)
   */
  chunkSize?: number
  /** reads in flight (default 4) */
  inFlight?: number
  /** chunks whose writes are submitted and not finished (default 2) */
  writesInFlight?: number
  /**
   * read ranges that extents map 1:1 to a host file straight from that file
   * into reused buffers (host-reads.ts); for sources opened from files (the CLI)
   */
  hostFiles?: boolean
  onProgress?: (done: number, total: number) => void
  /** stops the conversion between chunks (the target is left partial: the caller removes what it created) */
  signal?: AbortSignal
  /**
   * --salvage: a read error of the source is not fatal. As qemu-img, a failed read is retried sector by
   * sector (512 bytes) and every sector that still fails becomes zeros; a failed allocation-status query
   * is retried on shorter ranges down to one sector, which is then read as data. Each failed sector is
   * reported here, in guest order within a chunk (qemu-img: one warning line each).
   */
  salvage?: (event: SalvageEvent) => void
  /** -r: at most this many bytes of the source read per second (QEMU's rate limit); absent or 0: no limit */
  rateLimit?: number
  /**
   * -W: out-of-order writes, as qemu-img convert -W: a chunk is written as soon as it has been read, whatever
   * chunks before it are still being read; at most `inFlight` chunks are read or written at once. The target
   * gets the same guest bytes; its layout (qcow2: which host cluster holds which guest cluster) may differ
   * from an in-order convert's.
   */
  outOfOrder?: boolean
  /**
   * -C: copy offloading as qemu-img -C (copy-offload.ts): data chunks go whole through copy_file_range (raw
   * targets) or the target's write path, until the first one that cannot; `true` uses the native addon, a
   * function stands in for copy_file_range (tests). Not with `compress`.
   */
  copyRange?: true | CopyRange
  /**
   * Data chunks that are one host range go into a target that stores them in place (raw, fixed vpc, flat
   * vmdk) through the addon's copySparse (read, zero scan and write on a libuv thread; see sparse-copy.ts):
   * true for the addon's, or a stand-in (tests). Not with -c, -S 0, -C, --salvage, or into a target that
   * holds data.
   */
  sparseCopy?: true | CopySparse
}

/** One sector convert --salvage could not read (kind 'read') or whose allocation status failed ('status'). */
export interface SalvageEvent {
  kind: 'read' | 'status'
  offset: number
  error: unknown
}

const SECTOR = 512

/**
 * The source's extents over [0, size); with `salvage`, an extents failure at `pos` is retried as qemu-img
 * convert retries block status (on a range a quarter as long, down to one sector), and a sector whose
 * status cannot be read is reported and taken as data (its read then fails or not on its own).
 */
export async function* salvagedExtents(src: DiskImage, salvage: ((e: SalvageEvent) => void) | undefined): AsyncGenerator<Extent> {
  const size = src.virtualSize
  if (!salvage) {
    yield* src.extents(0, size)
    return
  }
  let pos = 0
  while (pos < size) {
    try {
      for await (const e of src.extents(pos, size - pos)) {
        yield e
        pos = e.start + e.length
      }
      return
    } catch (error) {
      // shorter ranges from `pos`: the first one that answers is taken whole
      let n = Math.ceil((size - pos) / SECTOR)
      let got: Extent[] | undefined
      let last: unknown = error
      while (n > 1 && !got) {
        n = Math.ceil(n / 4)
        try {
          const list: Extent[] = []
          for await (const e of src.extents(pos, Math.min(n * SECTOR, size - pos))) list.push(e)
          got = list
        } catch (e) {
          last = e
        }
      }
      if (got) {
        for (const e of got) yield e
        pos = got.length > 0 ? got[got.length - 1]!.start + got[got.length - 1]!.length : size
        continue
      }
      salvage({ kind: 'status', offset: pos, error: last })
      const length = Math.min(SECTOR, size - pos)
      yield { start: pos, length, depth: 0, present: true, zero: false, data: true }
      pos += length
    }
  }
}

export interface ConvertResult {
  /** --salvage: sectors that read as zeros because their read failed */
  salvagedSectors?: number
  /** guest bytes copied by the native data path (sparseCopy), never held in a JavaScript buffer */
  nativeBytes?: number
  bytesRead: number
  bytesWritten: number
  compressedClusters: number
}

interface Chunk {
  offset: number
  length: number
}

interface DataChunk extends Chunk {
  source: Source
}

/**
 * The source's extents as work: data chunks to copy, zero ranges to write
 * (backing mode only). With `align` (-c: the target's cluster size) data is
 * taken in whole clusters, as qemu-img convert -c reads it: a cluster that
 * holds any data is read whole (holes in it read as zeros) and compressed
 * whole; the parts of other extents that such a cluster covers are dropped.
 */
async function* plan(
  src: DiskImage,
  o: Required<Pick<ConvertOptions, 'chunkSize'>> & ConvertOptions,
  align = 0,
): AsyncGenerator<{ kind: 'zero'; c: Chunk } | { kind: 'skip'; c: Chunk } | { kind: 'data'; c: DataChunk }> {
  let covered = 0 // the end of the last data chunk (align mode)
  for await (const e of mergeExtents(salvagedExtents(src, o.salvage)) as AsyncIterable<Extent>) {
    const fromBacking = e.depth > 0 || !e.present
    let kind: 'data' | 'zero' | 'skip'
    if (e.data && !(o.targetHasBacking && e.depth > 0)) kind = 'data'
    else if (o.targetHasBacking && !fromBacking && e.zero) kind = 'zero'
    else if (o.targetDirty && !(o.targetHasBacking && fromBacking)) kind = 'zero'
    else kind = 'skip'
    const eEnd = e.start + e.length
    if (kind !== 'data') {
      const start = Math.max(e.start, covered)
      if (start < eEnd) yield { kind, c: { offset: start, length: eEnd - start } }
      continue
    }
    let pos = align > 0 ? Math.max(covered, Math.floor(e.start / align) * align) : e.start
    const end = align > 0 ? Math.min(src.virtualSize, Math.ceil(eEnd / align) * align) : eEnd
    while (pos < end) {
      const next = Math.min(end, (Math.floor(pos / o.chunkSize) + 1) * o.chunkSize)
      // a chunk reaching past the extent (whole clusters) is read through the image
      const source = pos >= e.start && next <= eEnd ? sourceOf(e, pos, o.hostFiles ?? false) : ({ kind: 'image' } as const)
      yield { kind, c: { offset: pos, length: next - pos, source } }
      pos = next
    }
    covered = Math.max(covered, end)
  }
}

const ZEROS = Buffer.alloc(1024 * 1024)
let zeroChunk = new Uint8Array(0)
/** a shared all-zero buffer of `n` bytes (only ever read: written as data by -S 0) */
function zeroBuffer(n: number): Uint8Array {
  if (zeroChunk.byteLength < n) zeroChunk = new Uint8Array(n)
  return zeroChunk.subarray(0, n)
}

/** Runs of [offset, length) holding non-zero `block`-aligned blocks (the rest is sparse). */
export function dataRuns(buf: Uint8Array, offset: number, block: number): Chunk[] {
  if (block <= 0) return [{ offset, length: buf.byteLength }]
  const runs: Chunk[] = []
  const n = buf.byteLength
  // one Buffer view of the chunk: each block is compared with the zero buffer by range (memcmp), no view per block
  const view = Buffer.from(buf.buffer, buf.byteOffset, n)
  const zeros = block <= ZEROS.byteLength ? ZEROS : undefined
  let runStart = -1
  let i = 0
  while (i < n) {
    const next = Math.min(n, i + block - ((offset + i) % block))
    // most data blocks start with a non-zero byte: no memcmp for those
    const zero = view[i] === 0 && view[next - 1] === 0 && (zeros ? view.compare(zeros, 0, next - i, i, next) === 0 : isAllZero(view.subarray(i, next)))
    if (zero) {
      if (runStart >= 0) runs.push({ offset: offset + runStart, length: i - runStart })
      runStart = -1
    } else if (runStart < 0) runStart = i
    i = next
  }
  if (runStart >= 0) runs.push({ offset: offset + runStart, length: n - runStart })
  return runs
}

export async function convert(src: DiskImage, dst: DiskImage, options: ConvertOptions = {}): Promise<ConvertResult> {
  if (!dst.write) throw new UsageError(`${dst.format}: ${dst.filename}: the target is not writable`)
  if (dst.virtualSize < src.virtualSize) {
    throw new UsageError(`convert: the target (${dst.virtualSize} bytes) is smaller than the source (${src.virtualSize} bytes)`)
  }
  const compress = options.compress
  if (compress && options.targetDirty) throw new UsageError('convert: -c cannot write into a target that holds data (-n without --target-is-zero)')
  if (compress && !isCompressedTarget(dst)) throw new UsageError(`convert: ${dst.format} targets cannot store compressed clusters (-c)`)
  const cs = isCompressedTarget(dst) ? dst.clusterSize : 65536
  const chunkSize = Math.max(cs, Math.floor((options.chunkSize ?? 2 * 1024 * 1024) / cs) * cs)
  const minSparse = options.minSparse ?? 4096
  const inFlight = Math.max(1, options.inFlight ?? 4)
  const writesInFlight = Math.max(1, options.writesInFlight ?? 2)
  const total = src.virtualSize
  const result: ConvertResult = { bytesRead: 0, bytesWritten: 0, compressedClusters: 0 }
  let done = 0
  const progress = (n: number) => {
    done += n
    options.onProgress?.(Math.min(done, total), total)
  }

  // prepared chunks, submitted strictly in guest order; a few chunks' writes are in flight at once
  // (the target orders them: qcow2 plans the next request while the previous one's data is written)
  type Prepared = () => Promise<void>
  const queue: Array<Promise<Prepared>> = []
  const writing: Array<Promise<void>> = []
  const drainOne = async () => {
    const job = queue.shift()!
    const write = await job
    const done = write()
    done.catch(() => undefined) // surfaced when awaited below
    writing.push(done)
    while (writing.length > writesInFlight) await writing.shift()!
  }
  // -W: every chunk read then written on its own; at most inFlight of them at once, the first failure ends the copy
  const running = new Set<Promise<void>>()
  const submit = async (job: Promise<Prepared>): Promise<void> => {
    if (!options.outOfOrder) {
      queue.push(job)
      while (queue.length >= inFlight) await drainOne()
      return
    }
    const run: Promise<void> = job.then((write) => write()).finally(() => running.delete(run))
    run.catch(() => undefined) // surfaced by the race below or the final wait
    running.add(run)
    while (running.size >= inFlight) await Promise.race(running)
  }

  const files = new HostFiles()
  const pool = new BufferPool(chunkSize)
  const zeroes = (offset: number, length: number): Promise<void> =>
    dst.writeZeroes ? dst.writeZeroes(offset, length) : dst.write!(offset, new Uint8Array(length))
  /**
   * A chunk's guest bytes; with --salvage a failed read is read again sector by sector, and the sectors
   * that fail again are zeros (as qemu-img's convert_co_read), each one recorded in `failed`.
   */
  const readSalvaged = async (c: DataChunk, failed: SalvageEvent[]): Promise<Uint8Array> => {
    try {
      return await readGuest(src, c.source.kind === 'zero' ? { kind: 'image' } : c.source, c.offset, c.length, files, pool)
    } catch (e) {
      if (!options.salvage) throw e
    }
    const out = new Uint8Array(c.length)
    for (let at = 0; at < c.length; at += SECTOR) {
      const n = Math.min(SECTOR, c.length - at)
      try {
        out.set(await src.read(c.offset + at, n), at)
      } catch (error) {
        failed.push({ kind: 'read', offset: c.offset + at, error })
      }
    }
    return out
  }
  const limiter = options.rateLimit ? new RateLimiter(options.rateLimit) : undefined
  const offload = options.copyRange && !compress ? CopyOffload.create(src, dst, options.copyRange === true ? undefined : options.copyRange) : undefined
  const sparse =
    options.sparseCopy && !compress && !offload && !options.salvage && !options.targetDirty && minSparse > 0
      ? SparseCopier.for(dst, options.sparseCopy === true ? undefined : options.sparseCopy)
      : undefined
  /** the chunk copied by the native data path (its bytes written), or undefined: copy it as usual */
  const copiedNatively = async (c: DataChunk): Promise<number | undefined> => {
    if (!sparse || c.source.kind !== 'host') return undefined
    await files.probe(src)
    const fd = await files.fd(c.source.file)
    if (fd === undefined) return undefined
    return sparse.copyChunk(fd, c.source.file, c.source.offset, c.offset, c.length, minSparse)
  }
  /**
   * -C: the chunk offered to the kernel when its turn to be written comes. One chunk at a time, from the
   * offer to the submission of its writes, so the target allocates in guest order as qemu-img's does.
   */
  const offloadTurns = new Turns()
  const offloaded = async (c: DataChunk, kernel: CopyOffload): Promise<void> => {
    const r = await offloadTurns.run(async () => {
      const how = await kernel.offer(c.source, c.offset, c.length)
      result.bytesRead += c.length
      if (how === 'copied') {
        result.bytesWritten += c.length
        progress(c.length)
        return undefined
      }
      // offloading is off from now on ('off': zero detection again) or the target writes it ('whole': none)
      const buf = await readSalvaged(c, [])
      const runs = how === 'whole' ? [{ offset: c.offset, length: c.length }] : dataRuns(buf, c.offset, minSparse)
      return { written: writeRuns(c, buf, runs, () => undefined) } // its writes are submitted now
    })
    await r?.written
  }
  /** a chunk's data runs written (and, into a target that holds data, zeros in the gaps between them) */
  const writeRuns = async (c: DataChunk, buf: Uint8Array, runs: Chunk[], report: () => void): Promise<void> => {
    // every run submitted now, in order; the buffer goes back to the pool once all are written
    const submitted = runs.map((r) => dst.write!(r.offset, buf.subarray(r.offset - c.offset, r.offset - c.offset + r.length)))
    // a target that holds data gets zeros in the gaps between the runs (zero blocks -S skipped)
    if (options.targetDirty) {
      let at = c.offset
      for (const r of [...runs, { offset: c.offset + c.length, length: 0 }]) {
        if (r.offset > at) submitted.push(zeroes(at, r.offset - at))
        at = r.offset + r.length
      }
    }
    report()
    const settled = await Promise.allSettled(submitted)
    const rejected = settled.find((x) => x.status === 'rejected')
    if (rejected) throw (rejected as PromiseRejectedResult).reason
    for (const r of runs) result.bytesWritten += r.length
    pool.put(buf)
    progress(c.length)
  }
  const prepareData = async (c: DataChunk): Promise<Prepared> => {
    // zero-flagged data (a host hole under a preallocated cluster) reads as zeros: nothing to
    // write when zero blocks are skipped anyway (-S > 0, or -c)
    if (c.source.kind === 'zero' && (minSparse > 0 || compress)) {
      if (!options.targetDirty) return async () => progress(c.length)
      return async () => {
        await zeroes(c.offset, c.length)
        progress(c.length)
      }
    }
    if (offload?.active) {
      await limiter?.take(c.length)
      return () => offloaded(c, offload)
    }
    const failed: SalvageEvent[] = []
    await limiter?.take(c.length)
    const native = await copiedNatively(c)
    if (native !== undefined) {
      result.bytesRead += c.length
      result.bytesWritten += native
      return async () => progress(c.length)
    }
    const buf = await readSalvaged(c, failed)
    result.bytesRead += c.length
    // reported when the chunk's turn comes: guest order, whatever order the reads finished in
    const report = () => {
      for (const f of failed) options.salvage!(f)
      if (failed.length > 0) result.salvagedSectors = (result.salvagedSectors ?? 0) + failed.filter((f) => f.kind === 'read').length
    }
    if (compress) {
      const target = dst as unknown as CompressedTarget
      // the clusters of the chunk in guest order: skipped (zero), compressed, or stored as they are
      const items: Array<{ offset: number; data: Uint8Array; packed: boolean }> = []
      const whole: number[] = [] // offsets in buf (or in `tail`) of the clusters to compress
      let tail: Uint8Array | undefined // the image's last cluster, cut short by its end: padded with zeros, as QEMU does
      for (let p = 0; p < buf.byteLength;) {
        const abs = c.offset + p
        const cEnd = Math.min(buf.byteLength, (Math.floor(abs / cs) + 1) * cs - c.offset)
        const piece = buf.subarray(p, cEnd)
        const at = p
        p = cEnd
        if (isAllZero(piece)) continue
        const last = abs % cs === 0 && piece.byteLength < cs && abs + piece.byteLength === src.virtualSize && abs + cs > src.virtualSize
        if (last) {
          tail = new Uint8Array(cs)
          tail.set(piece)
        } else if (abs % cs !== 0 || piece.byteLength !== cs) {
          items.push({ offset: abs, data: piece, packed: false })
          continue
        }
        items.push({ offset: abs, data: last ? tail! : piece, packed: true })
        if (!last) whole.push(at)
      }
      const zs = options.compressMany ? await options.compressMany(buf, whole) : await Promise.all(whole.map((at) => compress(buf.subarray(at, at + cs))))
      if (tail) zs.push(options.compressMany ? (await options.compressMany(tail, [0]))[0] : await compress(tail))
      let k = 0
      for (const it of items) {
        if (!it.packed) continue
        const z = zs[k++]
        if (z) it.data = z
        else {
          it.packed = false
          // stored as it is: the real bytes (the tail's padding is not written past the end)
          if (it.data === tail) it.data = buf.subarray(it.offset - c.offset, it.offset - c.offset + (src.virtualSize - it.offset))
        }
      }
      return async () => {
        // every write submitted now, in guest order (the target runs them in call order, so clusters are
        // allocated as qemu-img allocates them); runs of compressed clusters go in one batch each
        const submitted: Array<Promise<void>> = []
        for (let i = 0; i < items.length;) {
          if (!items[i]!.packed) {
            const w = items[i++]!
            submitted.push(dst.write!(w.offset, w.data))
            continue
          }
          let j = i
          while (j < items.length && items[j]!.packed) j++
          const run = items.slice(i, j).map((x) => ({ offset: x.offset, data: x.data }))
          if (target.writeCompressedBatch) submitted.push(target.writeCompressedBatch(run))
          else for (const z of run) submitted.push(target.writeCompressed(z.offset, z.data))
          i = j
        }
        report()
        const settled = await Promise.allSettled(submitted)
        const rejected = settled.find((x) => x.status === 'rejected')
        if (rejected) throw (rejected as PromiseRejectedResult).reason
        for (const it of items) {
          result.bytesWritten += it.data.byteLength
          if (it.packed) result.compressedClusters++
        }
        pool.put(buf)
        progress(c.length)
      }
    }
    const runs = dataRuns(buf, c.offset, minSparse)
    return () => writeRuns(c, buf, runs, report)
  }

  try {
    // -S 0 asks for a fully allocated target, as qemu-img makes it: every range not copied as data
    // (unallocated, zero, or from a backing file the target does not have) is written as zeros
    const allocateAll = minSparse === 0 && !compress && !options.targetHasBacking
    // qemu-img convert first walks the whole source's block status to size its progress: with --salvage,
    // a status failure is reported by that walk and again by the copy
    if (options.salvage) for await (const _ of salvagedExtents(src, options.salvage)) checkAborted(options.signal, 'convert')
    for await (const item of plan(src, { ...options, chunkSize }, compress ? cs : 0)) {
      checkAborted(options.signal, 'convert')
      if (allocateAll && item.kind !== 'data') {
        for (let p = item.c.offset; p < item.c.offset + item.c.length; p += chunkSize) {
          const n = Math.min(chunkSize, item.c.offset + item.c.length - p)
          await submit(
            Promise.resolve(async () => {
              await dst.write!(p, zeroBuffer(n))
              result.bytesWritten += n
              progress(n)
            }),
          )
        }
        continue
      }
      if (item.kind === 'skip') {
        await submit(Promise.resolve(async () => progress(item.c.length)))
      } else if (item.kind === 'zero') {
        await submit(
          Promise.resolve(async () => {
            if (dst.writeZeroes) await dst.writeZeroes(item.c.offset, item.c.length)
            else await dst.write!(item.c.offset, new Uint8Array(item.c.length))
            progress(item.c.length)
          }),
        )
      } else {
        const p = prepareData(item.c)
        p.catch(() => undefined) // surfaced when drained
        await submit(p)
      }
    }
    while (queue.length > 0) {
      checkAborted(options.signal, 'convert')
      await drainOne()
    }
    while (writing.length > 0) await writing.shift()!
    while (running.size > 0) await Promise.race(running)
  } finally {
    await Promise.allSettled(queue)
    await Promise.allSettled(writing)
    await Promise.allSettled(running)
    await files.close()
    await offload?.close()
    await sparse?.close()
  }
  if (sparse && sparse.bytes > 0) result.nativeBytes = sparse.bytes
  const ct = compress ? (dst as unknown as CompressedTarget) : undefined
  if (ct?.finishCompressed) await ct.finishCompressed()
  await dst.flush()
  return result
}

/** Raw bytes of the whole source in order (convert -O raw to stdout): zeros generated, not read. */
export async function* rawStream(src: DiskImage, options: { chunkSize?: number; inFlight?: number } = {}): AsyncGenerator<Uint8Array> {
  const chunk = options.chunkSize ?? 4 * 1024 * 1024
  const inFlight = Math.max(1, options.inFlight ?? 4)
  const queue: Array<Promise<Uint8Array>> = []
  for await (const e of mergeExtents(src.extents(0, src.virtualSize)) as AsyncIterable<Extent>) {
    for (let p = e.start; p < e.start + e.length; p += chunk) {
      const n = Math.min(chunk, e.start + e.length - p)
      queue.push(e.data ? src.read(p, n) : Promise.resolve(new Uint8Array(n)))
      while (queue.length >= inFlight) yield await queue.shift()!
    }
  }
  while (queue.length > 0) yield await queue.shift()!
}
