import type { CommandModule } from '../command.js'
import { addImageOptions, oneImageArg, parseImageOptions } from '../common.js'
import { PipeClosed, writeOut } from '../stream.js'

/** Bytes per read: large enough to coalesce host reads, small enough to keep memory flat. */
const CHUNK = 8 * 1024 * 1024

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
      // Read the next chunk while the previous one is being written.
      let pos = offset
      let next = pos < end ? image.read(pos, Math.min(CHUNK, end - pos)) : undefined
      while (next) {
        const data = await next
        pos += data.byteLength
        next = pos < end ? image.read(pos, Math.min(CHUNK, end - pos)) : undefined
        try {
          await writeOut(io.stdout, data)
        } catch (e) {
          if (e instanceof PipeClosed) {
            await next?.catch(() => undefined)
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
export default cat
