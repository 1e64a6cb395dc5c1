/**
 * A BlockDevice on a file: positional reads and writes on a node:fs/promises
 * FileHandle, never a whole-file load. Reads past the end return zeros.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { constants as fsConstants } from 'node:fs'
import { ImageIoError, NotFoundError, ReadOnlyError, UsageError, hex } from '../errors.js'
import type { BlockDevice, HostStatus, IoTag, OpenDeviceOptions } from './block-device.js'
import { allocateByWriting } from './prealloc.js'
import { ENOSYS, ENXIO, EOPNOTSUPP, clearNonblock, fallocateAddon, seekHoleAddon } from './seek-hole.js'
import { acquireImageLock, type ImageLock } from './lock.js'
import { constants as osConstants } from 'node:os'
import { Turns } from '../util/turns.js'

export class FileDevice implements BlockDevice {
  private constructor(
    private readonly fh: FileHandle,
    readonly name: string,
    readonly readOnly: boolean,
    private len: number,
    /** the image locks this open holds (src/io/lock.ts); released at close */
    private readonly lock: ImageLock | undefined,
    /** a regular file: its writes go one at a time (see write) */
    private readonly regular: boolean,
  ) {}

  /** a regular file's writes, one at a time */
  private readonly writes = new Turns()

  static async open(path: string, options: OpenDeviceOptions): Promise<FileDevice> {
    if (options.forceShare && !options.readOnly) {
      throw new UsageError(`${path}: force-share=on can only be used with read-only images`, { file: path })
    }
    const exclusive = !options.readOnly && options.create && options.exclusive
    // O_NONBLOCK: open(2) of a FIFO must not wait for a writer (it is refused below).
    // O_CREAT without O_TRUNC: a file is emptied only once it is locked. O_EXCL|O_NOFOLLOW: a new file only.
    const flags =
      fsConstants.O_NONBLOCK |
      (options.readOnly
        ? fsConstants.O_RDONLY
        : exclusive
          ? fsConstants.O_RDWR | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW
          : options.create
            ? fsConstants.O_RDWR | fsConstants.O_CREAT
            : fsConstants.O_RDWR)
    let fh: FileHandle
    try {
      fh = await open(path, flags, exclusive ? 0o600 : 0o644)
    } catch (e) {
      throw fsError(e, path, 'open')
    }
    let lock: ImageLock | undefined
    try {
      const st = await fh.stat({ bigint: true })
      if (st.isDirectory()) throw new ImageIoError(`${path}: is a directory`, 'EISDIR', { file: path })
      if (!st.isFile() && !st.isBlockDevice()) {
        const kind = st.isFIFO() ? 'fifo' : st.isCharacterDevice() ? 'character device' : st.isSocket() ? 'socket' : 'special file'
        throw new ImageIoError(`${path}: not a regular file or block device (${kind})`, 'EFTYPE', { file: path })
      }
      clearNonblock(fh.fd)
      if (!options.forceShare) lock = acquireImageLock(fh.fd, path, `${st.dev}:${st.ino}`, options.readOnly ? 'reader' : 'writer')
      if (options.create && st.isFile() && st.size > 0n) {
        try {
          await fh.truncate(0)
        } catch (e) {
          throw fsError(e, path, 'truncate to 0')
        }
      }
      // the size as it is under the lock: another writer may have grown the file since the stat above
      const locked = lock ? await fh.stat({ bigint: true }) : st
      let size = options.create && st.isFile() ? 0 : Number(locked.size)
      if (st.isBlockDevice()) {
        const { size: bsize } = await blockDeviceSize(fh)
        size = bsize
      }
      return new FileDevice(fh, path, options.readOnly, size, lock, st.isFile())
    } catch (e) {
      lock?.release()
      await fh.close().catch(() => undefined)
      throw e
    }
  }

  get size(): number {
    return this.len
  }

  async read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    const out = new Uint8Array(length)
    await this.fill(offset, out, tag)
    return out
  }

  /** read() into the caller's buffer (every byte of it is written: past the end, zeros) */
  async readInto(offset: number, buf: Uint8Array, tag?: IoTag): Promise<void> {
    const done = await this.fill(offset, buf, tag)
    if (done < buf.byteLength) buf.fill(0, done)
  }

  /** positional reads into `out` up to the end of the file; returns the bytes read */
  private async fill(offset: number, out: Uint8Array, tag?: IoTag): Promise<number> {
    const avail = Math.max(0, Math.min(out.byteLength, this.len - offset))
    let done = 0
    while (done < avail) {
      let n: number
      try {
        ;({ bytesRead: n } = await this.fh.read(out, done, avail - done, offset + done))
      } catch (e) {
        throw fsError(e, this.name, `read ${tag ?? 'data'} at ${hex(offset + done)}`, offset + done, tag)
      }
      if (n === 0) break // file shrank underneath us: the rest reads as zeros
      done += n
    }
    return done
  }

  async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    if (this.readOnly) {
      throw new ReadOnlyError(`${this.name}: image is open read-only (write of ${tag ?? 'data'} at ${hex(offset)} refused)`, {
        file: this.name,
        offset,
        structure: tag,
      })
    }
    // Writes to a regular file go one at a time, in call order. A buffered write holds the file's inode lock
    // in the kernel, so two at once never overlap there: the second waits on a pool thread, spinning
    // (rwsem_spin_on_owner was 22% of all CPU samples of a 4 GiB qcow2 -> raw convert on the JavaScript path,
    // two writes in flight) and keeping that thread from a read it could be doing.
    if (!this.regular) return this.writeAll(offset, data, tag)
    return this.writes.run(() => this.writeAll(offset, data, tag))
  }

  private async writeAll(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    let done = 0
    while (done < data.byteLength) {
      try {
        const { bytesWritten } = await this.fh.write(data, done, data.byteLength - done, offset + done)
        done += bytesWritten
      } catch (e) {
        throw fsError(e, this.name, `write ${tag ?? 'data'} at ${hex(offset + done)}`, offset + done, tag)
      }
    }
    if (offset + data.byteLength > this.len) this.len = offset + data.byteLength
  }

  /** after the writes already submitted (regular files): truncate, allocate and flush keep call order with them */
  private async afterWrites(): Promise<void> {
    if (this.regular) await this.writes.idle()
  }

  async flush(): Promise<void> {
    if (this.readOnly) return
    await this.afterWrites()
    try {
      await this.fh.datasync()
    } catch (e) {
      throw fsError(e, this.name, 'flush')
    }
  }

  async truncate(size: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: image is open read-only (truncate refused)`, { file: this.name })
    await this.afterWrites()
    try {
      await this.fh.truncate(size)
    } catch (e) {
      throw fsError(e, this.name, `truncate to ${size}`)
    }
    this.len = size
  }

  async close(): Promise<void> {
    try {
      await this.afterWrites()
      await this.fh.close()
    } finally {
      this.lock?.release()
    }
  }

  async allocatedSize(): Promise<number> {
    const st = await this.fh.stat()
    return st.blocks * 512
  }

  /**
   * fallocate(2) through the native addon. Where the filesystem cannot
   * (EOPNOTSUPP) or the addon is absent, the blocks are allocated by writing, as
   * glibc's posix_fallocate (what qemu-img 7.2 calls) does then.
   */
  async allocate(offset: number, length: number): Promise<void> {
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: image is open read-only (allocate refused)`, { file: this.name })
    if (length <= 0) return
    await this.afterWrites()
    const fallocate = fallocateAddon()
    const r = fallocate ? await fallocate(this.fh.fd, offset, length) : -ENOSYS
    if (r === -EOPNOTSUPP || r === -ENOSYS) return allocateByWriting(this, offset, length)
    if (r < 0) {
      const code = Object.entries(osConstants.errno).find(([, v]) => v === -r)?.[0] ?? `errno ${-r}`
      throw new ImageIoError(`${this.name}: allocate ${length} bytes at ${hex(offset)} failed: ${code} (fallocate)`, code, { file: this.name, offset })
    }
    if (offset + length > this.len) this.len = offset + length
  }

  /** SEEK_DATA/SEEK_HOLE through the native addon when it was built; else all data. */
  async hostStatus(offset: number, length: number): Promise<HostStatus> {
    if (offset >= this.len) return { data: false, length }
    const addon = seekHoleAddon()
    const limit = Math.min(length, this.len - offset)
    if (!addon) return { data: true, length: limit }
    const fd = this.fh.fd
    const dataAt = addon.seek(fd, offset, 0)
    if (dataAt === -ENXIO) return { data: false, length: limit } // no data after offset
    if (dataAt < 0) return { data: true, length: limit }
    if (dataAt > offset) return { data: false, length: Math.min(limit, dataAt - offset) }
    const holeAt = addon.seek(fd, offset, 1)
    if (holeAt < 0) return { data: true, length: limit }
    return { data: true, length: Math.max(1, Math.min(limit, holeAt - offset)) }
  }
}

async function blockDeviceSize(fh: FileHandle): Promise<{ size: number }> {
  // A block device's stat size is 0; find its end by reading the last bytes we can.
  let lo = 0
  let hi = 2 ** 52
  const probe = new Uint8Array(1)
  while (hi - lo > 512) {
    const mid = Math.floor((lo + hi) / 1024) * 512
    const { bytesRead } = await fh.read(probe, 0, 1, mid)
    if (bytesRead === 1) lo = mid + 1
    else hi = mid
  }
  return { size: Math.ceil(lo / 512) * 512 }
}

export function fsError(e: unknown, file: string, what: string, offset?: number, tag?: IoTag): Error {
  const err = e as NodeJS.ErrnoException
  const code = err?.code ?? 'EIO'
  if (code === 'ENOENT') return new NotFoundError(`${file}: No such file or directory`, { file })
  const reason = err?.message?.replace(/^[A-Z]+: /, '').replace(/, [a-z]+ .*$/, '') ?? String(e)
  return new ImageIoError(`${file}: ${what} failed: ${code} (${reason})`, code, { file, offset, structure: tag }, { cause: e })
}

export async function openFileDevice(path: string, options: OpenDeviceOptions): Promise<BlockDevice> {
  return FileDevice.open(path, options)
}
