/**
 * The export pipeline (imgtool cat): an image's guest bytes, or a range of
 * them, written to a Node stream, as fast as the host allows. Reads go into
 * reused buffers that are not zeroed first; a regular file as the output is
 * written by position, several chunks at once, with copy_file_range for data
 * stored as is in the image file; anything else (a pipe, a terminal) gets the
 * bytes in order with backpressure.
 */
import { AsyncLocalStorage } from 'node:async_hooks'
import { fstatSync, ftruncate, write } from 'node:fs'
import type { FileHandle } from 'node:fs/promises'
import { AbortedError, UsageError, checkAborted } from '../errors.js'
import type { DiskImage, Extent } from '../image/disk-image.js'
import type { FormatName } from '../image/probe.js'
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import type { CopyRange, FileOffset } from '../io/seek-hole.js'
import { openImage } from '../open.js'
import { formatOption } from '../api/image.js'
import { parseSize } from '../util/size.js'
import { Turns } from '../util/turns.js'

/**
 * Bytes per read, and reads in flight. 1 MiB reads still coalesce host ranges
 * and stay in the CPU cache between the read and the write (8 MiB reads were
 * 1.5x slower); one read in flight beside the write keeps both I/O paths busy
 * (four in flight were slower on two cores). Memory in flight: about 3 MiB.
 */
const CHUNK = 1024 * 1024
const AHEAD = 2

/**
 * stdout a file cat may write by position (positionedOutput): bytes per chunk, a
 * multiple of CHUNK (a failed one is redone CHUNK by CHUNK), and chunks copied at
 * once, as qemu-img convert does (2 MiB requests, several in flight). 2 or 8 in
 * flight were slower than 4 on two cores. Memory in flight: 8 MiB at most.
 */
const PLACED_CHUNK = 2 * CHUNK
const PLACED_INFLIGHT = 4

export interface ExportOptions {
  /** the format; probed from the first bytes when absent */
  format?: FormatName
  /** format-specific open options (qemu-img's -o spelling, e.g. origin=PATH) */
  options?: Record<string, string>
  /** dm-snapshot: the origin the COW store snapshots (same as options.origin) */
  origin?: string
  /** qemu-img's -U: take and test no image locks */
  forceShare?: boolean
  /** first guest byte, in bytes or as qemu-img sizes ('1M'); default 0 */
  offset?: number | string
  /** how many bytes, in bytes or as qemu-img sizes; default to the end of the image */
  length?: number | string
  /** bytes written so far, and the bytes to write */
  onProgress?: (done: number, total: number) => void
  /** stops the export between chunks (AbortedError); what was written stays written */
  signal?: AbortSignal
}

export interface ExportResult {
  /** the first guest byte exported */
  offset: number
  /** the bytes asked for */
  length: number
  /** true when the output was closed before every byte was written (a reader of a pipe went away, EPIPE) */
  outputClosed: boolean
}

/**
 * Write the guest bytes of the image at `path` ([offset, offset + length), by
 * default all of them) to `output`. The image's allocation map is walked
 * first, so a damaged table fails before a byte is written. A regular file as
 * `output` (not opened for appending, nothing at or after its offset) is
 * written by position and its offset left after the bytes, as sequential
 * writes would leave it; after a failure it holds the bytes before the failed
 * chunk, as a sequential copy would. A closed pipe ends the export quietly
 * (`outputClosed`).
 */
export async function exportImage(path: string, output: NodeJS.WritableStream, o: ExportOptions = {}): Promise<ExportResult> {
  checkAborted(o.signal, 'export')
  const pool = new ReadBuffers()
  const hosts = new Map<string, number>()
  const options = { ...(o.options ?? {}) }
  if (o.origin !== undefined) options['origin'] = o.origin
  const image = await openImage(path, {
    format: formatOption(o.format),
    readOnly: true,
    options,
    forceShare: o.forceShare === true,
    openDevice: await unzeroedReadOpener(pool, hosts),
  })
  try {
    const size = image.virtualSize
    const offset = o.offset === undefined ? 0 : typeof o.offset === 'number' ? o.offset : parseSize(o.offset, 'offset')
    if (offset > size) throw new UsageError(`${path}: offset ${offset} is beyond the virtual size ${size}`)
    const length = o.length === undefined ? size - offset : typeof o.length === 'number' ? o.length : parseSize(o.length, 'length')
    if (offset + length > size) throw new UsageError(`${path}: ${offset}+${length} is beyond the virtual size ${size}`)
    const end = offset + length
    const result = { offset, length, outputClosed: false }
    // Walk the allocation map of the range first: a damaged table fails here, before
    // a byte is written (metadata only; cheap next to copying the data).
    for await (const _ of image.extents(offset, length)) void _
    let done = 0
    const step = (n: number): void => {
      checkAborted(o.signal, 'export')
      if (n === 0) return
      done += n
      o.onProgress?.(done, length)
    }
    // output a regular file whose offset the addon can read and set: positional
    // writes, several in flight, as qemu-img convert does.
    const placed = await positionedOutput(output)
    if (placed) {
      await copyPlaced(image, offset, end, placed, pool, hosts, step)
      return result
    }
    // Read the next chunks while this one is being written; write in order.
    const queue: Array<Promise<Uint8Array>> = []
    let readPos = offset
    const fill = (): void => {
      while (queue.length < AHEAD && readPos < end) {
        const n = Math.min(CHUNK, end - readPos)
        const p = pool.read(image, readPos, n)
        p.catch(() => undefined) // reported when its turn comes
        queue.push(p)
        readPos += n
      }
    }
    fill()
    // output redirected to a file: positional-free writes on the I/O threads (fs.write
    // at the file's current offset, one at a time, so in order) instead of the
    // synchronous writes Node makes to stdout when it is a file, which would leave the main
    // thread copying while the reads wait for it.
    const fd = regularFileFd(output)
    while (queue.length > 0) {
      const data = await queue.shift()!
      fill()
      if (fd !== undefined) {
        await writeFd(fd, data, null)
        pool.giveBack(data) // the kernel has the bytes now
        step(data.byteLength)
        continue
      }
      if (!(await writeStream(output, data))) {
        await Promise.allSettled(queue)
        result.outputClosed = true
        return result
      }
      step(data.byteLength)
    }
    return result
  } finally {
    await image.close()
  }
}

/** Write to a stream with backpressure; false when the reader has gone (EPIPE). */
export function writeStream(stream: NodeJS.WritableStream, chunk: Uint8Array): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const onError = (e: NodeJS.ErrnoException): void => {
      stream.off('error', onError)
      if (e.code === 'EPIPE') resolve(false)
      else reject(e)
    }
    stream.once('error', onError)
    const ok = stream.write(chunk, (err) => {
      if (err) return onError(err as NodeJS.ErrnoException)
    })
    const done = (): void => {
      stream.off('error', onError)
      resolve(true)
    }
    if (ok) done()
    else stream.once('drain', done)
  })
}

/**
 * Buffers for the 'data' reads of the devices cat opens (unzeroedReadOpener), reused
 * instead of allocated anew for every read. A read through read() below hands back,
 * once image.read is done, every buffer it took and did not return: the pieces
 * qcow2 copies into one buffer when a chunk spans several host runs (garbage the
 * collector would otherwise free late: 1 GiB of 64 KiB runs in reverse order
 * peaked at 170 MiB without this, and at 1.2 GiB before buffers were tracked
 * weakly). The buffer image.read returns goes back with giveBack() once the
 * kernel has copied it (writes to a file only). This relies on what qcow2 and raw
 * do: a 'data' read is copied or returned, never kept (compressed clusters, the
 * only cached data, are read with another tag).
 */
class ReadBuffers {
  private readonly free = new Map<number, Uint8Array[]>()
  private freeBytes = 0
  // weak: a buffer that is never given back (an error, a pipe) must not be kept
  private readonly lent = new WeakSet<Uint8Array>()
  private readonly reads = new AsyncLocalStorage<Uint8Array[]>()

  /** image.read, with the buffers it took and did not return given back when it is done. */
  async read(image: DiskImage, offset: number, length: number): Promise<Uint8Array> {
    const taken: Uint8Array[] = []
    const data = await this.reads.run(taken, () => image.read(offset, length))
    for (const b of taken) if (b.buffer !== data.buffer) this.giveBack(b)
    return data
  }

  take(length: number): Uint8Array {
    const b = this.free.get(length)?.pop()
    if (b) this.freeBytes -= length
    const out = b ?? new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length)
    this.lent.add(out)
    this.reads.getStore()?.push(out)
    return out
  }

  /** Give back a buffer taken here (else a no-op) that nothing uses any more. */
  giveBack(b: Uint8Array): void {
    if (!this.lent.delete(b)) return
    if (this.freeBytes + b.byteLength > KEEP_FREE) return
    const list = this.free.get(b.byteLength) ?? []
    list.push(b)
    this.free.set(b.byteLength, list)
    this.freeBytes += b.byteLength
  }
}

/** Bytes of unused read buffers kept for reuse. */
const KEEP_FREE = 32 * 1024 * 1024

/**
 * Files opened for cat: the file device, except that large reads land in
 * buffers that are not zeroed first (every byte is then written by the read,
 * or zeroed past the end of the file). Zeroing 4 GiB of buffers was a quarter
 * of cat's time. Small reads (metadata) and everything else go to the file device.
 * `hosts` gets each file's name (the `file` of its extents) and a descriptor
 * open for reading, for copy_file_range (copyPlaced).
 */
async function unzeroedReadOpener(pool: ReadBuffers, hosts: Map<string, number>): Promise<DeviceOpener> {
  const { openFileDevice, fsError } = await import('../io/file-device.js')
  const { open } = await import('node:fs/promises')
  const { hex } = await import('../errors.js')
  const MIN = 64 * 1024
  return async (path, options) => {
    const inner = await openFileDevice(path, options)
    if (!options.readOnly) return inner
    let fh: FileHandle
    try {
      fh = await open(path, 'r')
    } catch (e) {
      await inner.close()
      throw fsError(e, path, 'open')
    }
    const dev: BlockDevice = {
      get size() {
        return inner.size
      },
      readOnly: true,
      name: inner.name,
      async read(offset, length, tag) {
        if (length < MIN) return inner.read(offset, length, tag)
        // a plain Uint8Array (slice() copies), not zeroed first: the read fills it
        const out = tag === 'data' ? pool.take(length) : new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length)
        const avail = Math.max(0, Math.min(length, inner.size - offset))
        let done = 0
        while (done < avail) {
          let n: number
          try {
            ;({ bytesRead: n } = await fh.read(out, done, avail - done, offset + done))
          } catch (e) {
            throw fsError(e, inner.name, `read ${tag ?? 'data'} at ${hex(offset + done)}`, offset + done, tag)
          }
          if (n === 0) break
          done += n
        }
        out.fill(0, done)
        return out
      },
      write: (offset, data, tag) => inner.write(offset, data, tag),
      flush: () => inner.flush(),
      truncate: (size) => inner.truncate(size),
      async close() {
        if (hosts.get(inner.name) === fh.fd) hosts.delete(inner.name)
        await fh.close().catch(() => undefined)
        await inner.close()
      },
    }
    hosts.set(inner.name, fh.fd)
    // No hostStatus and no allocatedSize: cat walks extents() only to meet a damaged
    // table before it writes, and reads bytes with read(), which never asks the host
    // file about holes. With them, qcow2's extents() first counted the refcount of
    // every cluster (metadata preallocation detection: 50 ms of a 120 ms start on
    // 4 GiB) and raw's asked SEEK_DATA/SEEK_HOLE across the file, for answers cat
    // throws away.
    return dev
  }
}

/** The descriptor of a stream writing to a regular file (stdout redirected to one), else undefined. */
function regularFileFd(stream: NodeJS.WritableStream): number | undefined {
  const fd = (stream as { fd?: unknown }).fd
  if (typeof fd !== 'number') return undefined
  try {
    return fstatSync(fd).isFile() ? fd : undefined
  } catch {
    return undefined
  }
}

/** Write all of data at `position` (null: at the file's offset, moving it on). */
function writeFd(fd: number, data: Uint8Array, position: number | null): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0
    const step = (): void =>
      write(fd, data, done, data.byteLength - done, position === null ? null : position + done, (err, n) => {
        if (err) return reject(err)
        done += n
        if (done < data.byteLength) step()
        else resolve()
      })
    step()
  })
}

/** stdout as a file cat may write by position: where its offset stands, and what was there before. */
export interface PlacedOutput {
  fd: number
  /** the file offset when cat started: guest byte `offset` goes here */
  start: number
  /** the file's size then (at most `start`) */
  sizeBefore: number
  offsets: FileOffset
}

/**
 * stdout when positional writes leave exactly the file sequential writes would:
 * a regular file, not in append mode (where Linux puts every write at the end
 * whatever its position), with the addon to read and set its offset, and with
 * nothing at or after the offset (`> out`, `{ a; imgtool cat b; } > out`), so
 * that after a failure the file can be cut back to the bytes before the failed
 * chunk. Anything else (a pipe, a tty, `>>`, `1<>` over existing bytes, no
 * addon): undefined, and cat writes in order at the file's offset.
 */
export async function positionedOutput(stream: NodeJS.WritableStream): Promise<PlacedOutput | undefined> {
  const fd = regularFileFd(stream)
  if (fd === undefined) return undefined
  const { fileOffsetAddon } = await import('../io/seek-hole.js')
  const offsets = fileOffsetAddon()
  if (!offsets || offsets.isAppend(fd) !== false) return undefined
  const start = offsets.tell(fd)
  if (start < 0) return undefined
  let sizeBefore: number
  try {
    sizeBefore = fstatSync(fd).size
  } catch {
    return undefined
  }
  if (sizeBefore > start) return undefined
  return { fd, start, sizeBefore, offsets }
}

/**
 * Guest bytes [offset, end) to out.start.., PLACED_INFLIGHT chunks at once, each
 * copied by the kernel from the image file when it is stored there as is
 * (DirectCopies), else read and written by position; then the file offset set to
 * the end of the bytes written, as sequential writes would have left it. A failed
 * read or write: the chunks before the first failed one are written, anything
 * after it is cut off again, the offset is left after the good bytes, and the
 * error of the first failed chunk is thrown, which is what the sequential path
 * does too.
 */
async function copyPlaced(
  image: DiskImage,
  offset: number,
  end: number,
  out: PlacedOutput,
  pool: ReadBuffers,
  hosts: Map<string, number>,
  step: (n: number) => void,
): Promise<void> {
  const direct = end > offset ? await DirectCopies.open(image, offset, end, hosts) : undefined
  let next = offset
  let failedAt = Infinity
  let failure: unknown
  // the reads run ahead on several workers; the writes go one at a time (two at once only wait on the file's
  // inode lock in the kernel, spinning: see FileDevice.write)
  const writes = new Turns()
  const worker = async (): Promise<void> => {
    while (next < end && next < failedAt) {
      const pos = next
      const n = Math.min(PLACED_CHUNK, end - pos)
      next += n
      try {
        step(0) // refuses to go on once aborted
        if (direct && (await direct.copy(pos, n, out.fd, out.start + (pos - offset)))) {
          step(n)
          continue
        }
        const data = await pool.read(image, pos, n)
        if (pos > failedAt) return
        await writes.run(() => writeFd(out.fd, data, out.start + (pos - offset)))
        pool.giveBack(data) // the kernel has the bytes now
        step(n)
      } catch (e) {
        if (pos < failedAt) {
          failedAt = pos
          failure = e
        }
        return
      }
    }
  }
  await Promise.all(Array.from({ length: PLACED_INFLIGHT }, worker))
  let goodEnd = out.start + (Math.min(failedAt, end) - offset)
  if (failure !== undefined) {
    // The sequential path reads CHUNK bytes at a time: write the CHUNKs of the failed
    // chunk before the one that fails, so that the same bytes are kept and the same
    // error is reported (an abort stops where it is).
    const stop = failure instanceof AbortedError ? failedAt : Math.min(failedAt + PLACED_CHUNK, end)
    for (let at = failedAt; at < stop; at += CHUNK) {
      try {
        const data = await pool.read(image, at, Math.min(CHUNK, stop - at))
        await writeFd(out.fd, data, out.start + (at - offset))
        pool.giveBack(data)
      } catch (e) {
        failure = e
        break
      }
      goodEnd = out.start + (Math.min(at + CHUNK, stop) - offset)
    }
    // what the sequential path leaves: the good bytes and nothing after them
    const keep = goodEnd > out.start ? goodEnd : out.sizeBefore
    try {
      if (fstatSync(out.fd).size > keep) await new Promise<void>((res, rej) => ftruncate(out.fd, keep, (e) => (e ? rej(e) : res())))
    } catch {
      // the error that matters is the one below
    }
    out.offsets.seekTo(out.fd, goodEnd)
    throw failure
  }
  const r = out.offsets.seekTo(out.fd, goodEnd)
  if (r < 0) throw Object.assign(new Error(`cannot set the offset of standard output (errno ${-r})`), { errno: r })
}

/**
 * Chunks whose every byte is data stored as is in a file cat opened (qcow2 and
 * raw extents of the image itself, depth 0, not zero, with a host offset:
 * uncompressed clusters), copied from that file by copy_file_range, so the kernel
 * copies the bytes once instead of into a buffer and out again. Anything else
 * (compressed or zero clusters, a backing file's bytes, an error, a short copy at
 * the end of the host file) is left to image.read and a write, which rewrites
 * the whole chunk: the bytes are the same either way, and read()'s errors stay
 * the ones cat reports. Chunks are asked for in order; the extents are walked
 * once, alongside.
 */
class DirectCopies {
  private readonly it: AsyncIterator<Extent>
  private pending: Extent[] = []
  private ended = false
  private readonly walk = new Turns()
  private off = false

  private constructor(
    image: DiskImage,
    offset: number,
    end: number,
    private readonly hosts: Map<string, number>,
    private readonly copyRange: CopyRange,
  ) {
    this.it = image.extents(offset, end - offset)[Symbol.asyncIterator]()
  }

  static async open(image: DiskImage, offset: number, end: number, hosts: Map<string, number>): Promise<DirectCopies | undefined> {
    if (image.format !== 'qcow2' && image.format !== 'raw') return undefined
    const { copyRangeAddon } = await import('../io/seek-hole.js')
    const copyRange = copyRangeAddon()
    if (!copyRange) return undefined
    // what read() refuses for the whole image (an encrypted qcow2) it refuses here,
    // before a byte is copied around it
    await image.read(offset, 0)
    return new DirectCopies(image, offset, end, hosts, copyRange)
  }

  /** Copy guest [pos, pos+n) to outFd at outPos; false when it must be read instead. */
  async copy(pos: number, n: number, outFd: number, outPos: number): Promise<boolean> {
    if (this.off) return false
    const ranges = this.walk.run(() => this.cover(pos, pos + n))
    let plan: Array<{ fd: number; host: number; guest: number; length: number }> | undefined
    try {
      plan = await ranges
    } catch {
      this.off = true // the walk failed: read() will meet whatever it met
      return false
    }
    if (!plan) return false
    for (const r of plan) {
      const done = await this.copyRange(r.fd, r.host, outFd, outPos + (r.guest - pos), r.length)
      if (done === r.length) continue
      // no copy_file_range for these files (ENOSYS, EXDEV, EINVAL, EOPNOTSUPP...): stop
      // trying; a short copy (the host file ends) or EIO: this chunk is read instead
      if (done < 0 && done !== -EIO) this.off = true
      return false
    }
    return true
  }

  /** Host ranges covering guest [from, to), or undefined when some of it is not stored as is. */
  private async cover(from: number, to: number): Promise<Array<{ fd: number; host: number; guest: number; length: number }> | undefined> {
    for (;;) {
      while (this.pending.length > 0 && this.pending[0]!.start + this.pending[0]!.length <= from) this.pending.shift()
      const last = this.pending[this.pending.length - 1]
      if (this.ended || (last && last.start + last.length >= to)) break
      const r = await this.it.next()
      if (r.done) this.ended = true
      else this.pending.push(r.value)
    }
    const out: Array<{ fd: number; host: number; guest: number; length: number }> = []
    let pos = from
    for (const e of this.pending) {
      if (pos >= to) break
      if (e.start + e.length <= pos) continue
      if (e.start > pos) return undefined
      const fd = e.depth === 0 && e.data && !e.zero && e.hostOffset !== undefined && e.file !== undefined ? this.hosts.get(e.file) : undefined
      if (fd === undefined) return undefined
      const n = Math.min(e.start + e.length, to) - pos
      const prev = out[out.length - 1]
      const host = e.hostOffset! + (pos - e.start)
      if (prev && prev.fd === fd && prev.host + prev.length === host) prev.length += n
      else out.push({ fd, host, guest: pos, length: n })
      pos += n
    }
    return pos >= to ? out : undefined
  }
}

const EIO = 5
