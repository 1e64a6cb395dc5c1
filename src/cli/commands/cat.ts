import { fstatSync, write } from 'node:fs'
import type { FileHandle } from 'node:fs/promises'
import type { BlockDevice, DeviceOpener } from '../../io/block-device.js'
import type { CommandModule } from '../command.js'
import { addImageOptions, oneImageArg, parseImageOptions } from '../common.js'
import { PipeClosed, writeOut } from '../stream.js'

/**
 * Bytes per read, and reads in flight. 1 MiB reads still coalesce host ranges
 * and stay in the CPU cache between the read and the write (8 MiB reads were
 * 1.5x slower); one read in flight beside the write keeps both I/O paths busy
 * (four in flight were slower on two cores). Memory in flight: about 3 MiB.
 */
const CHUNK = 1024 * 1024
const AHEAD = 2

const cat: CommandModule = {
  name: 'cat',
  description: 'write the guest bytes of an image to stdout',
  configure(cmd) {
    addImageOptions(cmd)
      .option('--offset <n>', 'first guest byte (sizes like 1M accepted)')
      .option('--length <n>', 'how many bytes (default: to the end)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const path = oneImageArg(args)
    const { format, options } = parseImageOptions(opts)
    const { parseSize } = await import('../../util/size.js')
    const { UsageError } = await import('../../errors.js')
    const { openImage } = await import('../../open.js')
    const pool = new ReadBuffers()
    const image = await openImage(path, { format, readOnly: true, options, openDevice: await unzeroedReadOpener(pool) })
    try {
      const size = image.virtualSize
      const offset = opts['offset'] !== undefined ? parseSize(String(opts['offset']), 'offset') : 0
      if (offset > size) throw new UsageError(`${path}: offset ${offset} is beyond the virtual size ${size}`)
      const length = opts['length'] !== undefined ? parseSize(String(opts['length']), 'length') : size - offset
      if (offset + length > size) throw new UsageError(`${path}: ${offset}+${length} is beyond the virtual size ${size}`)
      const end = offset + length
      // Walk the allocation map of the range first: a damaged table fails here, before
      // a byte is written (metadata only; cheap next to copying the data).
      for await (const _ of image.extents(offset, length)) void _
      // Read the next chunks while this one is being written; write in order.
      const queue: Array<Promise<Uint8Array>> = []
      let readPos = offset
      const fill = (): void => {
        while (queue.length < AHEAD && readPos < end) {
          const n = Math.min(CHUNK, end - readPos)
          const p = image.read(readPos, n)
          p.catch(() => undefined) // reported when its turn comes
          queue.push(p)
          readPos += n
        }
      }
      fill()
      // stdout redirected to a file: positional-free writes on the I/O threads (fs.write
      // at the file's current offset, one at a time, so in order) instead of the
      // synchronous writes process.stdout makes to files, which would leave the main
      // thread copying while the reads wait for it.
      const fd = regularFileFd(io.stdout)
      while (queue.length > 0) {
        const data = await queue.shift()!
        fill()
        if (fd !== undefined) {
          await writeFd(fd, data)
          pool.giveBack(data) // the kernel has the bytes now
          continue
        }
        try {
          await writeOut(io.stdout, data)
        } catch (e) {
          if (e instanceof PipeClosed) {
            await Promise.allSettled(queue)
            return 0
          }
          throw e
        }
      }
    } finally {
      await image.close()
    }
    return 0
  },
}
/**
 * Files opened for cat: the file device, except that large reads land in
 * buffers that are not zeroed first (every byte is then written by the read,
 * or zeroed past the end of the file). Zeroing 4 GiB of buffers was a quarter
 * of cat's time. Small reads (metadata) and everything else go to the file device.
 */
/**
 * Buffers for 'data' reads that cat hands back once the kernel has copied them
 * (writes to a file only): qcow2 and raw never keep a 'data' read, so a buffer
 * image.read returned as is can be reused for the next read of the same size.
 */
class ReadBuffers {
  private readonly free = new Map<number, Uint8Array[]>()
  private readonly lent = new Set<Uint8Array>()
  take(length: number): Uint8Array {
    const b = this.free.get(length)?.pop() ?? new Uint8Array(Buffer.allocUnsafeSlow(length).buffer, 0, length)
    this.lent.add(b)
    return b
  }
  /** Give back a buffer image.read returned, if it is one of ours (else a no-op). */
  giveBack(b: Uint8Array): void {
    if (!this.lent.delete(b)) return
    const list = this.free.get(b.byteLength) ?? []
    if (list.length < 8) list.push(b)
    this.free.set(b.byteLength, list)
  }
}

async function unzeroedReadOpener(pool: ReadBuffers): Promise<DeviceOpener> {
  const { openFileDevice, fsError } = await import('../../io/file-device.js')
  const { open } = await import('node:fs/promises')
  const { hex } = await import('../../errors.js')
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
        await fh.close().catch(() => undefined)
        await inner.close()
      },
    }
    if (inner.hostStatus) dev.hostStatus = inner.hostStatus.bind(inner)
    if (inner.allocatedSize) dev.allocatedSize = inner.allocatedSize.bind(inner)
    return dev
  }
}

/** The descriptor of a stream writing to a regular file (process.stdout redirected to one), else undefined. */
function regularFileFd(stream: NodeJS.WritableStream): number | undefined {
  const fd = (stream as { fd?: unknown }).fd
  if (typeof fd !== 'number') return undefined
  try {
    return fstatSync(fd).isFile() ? fd : undefined
  } catch {
    return undefined
  }
}

function writeFd(fd: number, data: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0
    const step = (): void =>
      write(fd, data, done, data.byteLength - done, null, (err, n) => {
        if (err) return reject(err)
        done += n
        if (done < data.byteLength) step()
        else resolve()
      })
    step()
  })
}

export default cat
