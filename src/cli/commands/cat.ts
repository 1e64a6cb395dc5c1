import { fstatSync, write } from 'node:fs'
import type { CommandModule } from '../command.js'
import { addImageOptions, oneImageArg, parseImageOptions } from '../common.js'
import { PipeClosed, writeOut } from '../stream.js'

/**
 * Bytes per read, and reads in flight. 1 MiB reads still coalesce host ranges,
 * and stay in the CPU cache between the read and the write (8 MiB reads were
 * 1.5x slower); four in flight keep the I/O threads busy while the main thread
 * writes. Memory in flight: 4 MiB.
 */
const CHUNK = 1024 * 1024
const AHEAD = 4

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
    const image = await openImage(path, { format, readOnly: true, options })
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
