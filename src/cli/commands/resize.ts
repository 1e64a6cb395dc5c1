import type { CommandModule } from '../command.js'
import { addImageOptions, parseImageOptions } from '../common.js'

/** imgtool resize [-f FMT] [--shrink] IMAGE [+|-]SIZE */
const resize: CommandModule = {
  name: 'resize',
  description: 'change the virtual size of an image (qemu-img resize)',
  configure(cmd) {
    addImageOptions(cmd)
      .option('--shrink', 'allow shrinking (only unallocated space past the new end may be cut)')
      .option('--preallocation <mode>', 'growing only: off, falloc or full for raw images; off, metadata, falloc or full for qcow2')
      .option('-q, --quiet', 'print nothing')
      .argument('<image>')
      .argument('<size>', 'new size, or +SIZE / -SIZE')
  },
  async run(args, opts, io) {
    const { UsageError, resize } = await import('../../index.js')
    const [path, sizeText] = args
    if (!path || sizeText === undefined) throw new UsageError('Expecting image file name and size')
    const { format, options } = parseImageOptions(opts)
    await resize(path, sizeText, {
      ...(format !== undefined ? { format } : {}),
      options,
      shrink: Boolean(opts['shrink']),
      ...(typeof opts['preallocation'] === 'string' ? { preallocation: opts['preallocation'] } : {}),
      onNotice: (n) => void io.stderr.write(`imgtool: ${n}\n`),
    })
    if (!opts['quiet']) io.stdout.write('Image resized.\n')
    return 0
  },
}
export default resize
