import type { CommandModule } from '../command.js'
import { addImageOptions, parseImageOptions } from '../common.js'

/** imgtool resize [-f FMT] [--shrink] IMAGE [+|-]SIZE */
const resize: CommandModule = {
  name: 'resize',
  description: 'change the virtual size of an image (qemu-img resize)',
  configure(cmd) {
    addImageOptions(cmd)
      .option('--shrink', 'allow shrinking (only unallocated space past the new end may be cut)')
      .option('-q, --quiet', 'print nothing')
      .argument('<image>')
      .argument('<size>', 'new size, or +SIZE / -SIZE')
  },
  async run(args, opts, io) {
    const { UsageError } = await import('../../errors.js')
    const { parseSize } = await import('../../util/size.js')
    const [path, sizeText] = args
    if (!path || sizeText === undefined) throw new UsageError('Expecting image file name and size')
    const { format, options } = parseImageOptions(opts)
    const { openImage } = await import('../../open.js')
    const image = await openImage(path, { format, readOnly: false, options })
    let closed = false
    for (const n of (image as { writer?: { notices: string[] } }).writer?.notices ?? []) io.stderr.write(`imgtool: ${n}\n`)
    try {
      const rel = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0
      const n = parseSize(rel ? sizeText.slice(1) : sizeText)
      const size = rel ? image.virtualSize + rel * n : n
      if (size < 0) throw new UsageError('New image size must be positive')
      if (size < image.virtualSize && !opts['shrink']) {
        throw new UsageError('Use the --shrink option to perform a shrink operation.')
      }
      if (image.format === 'qcow2') {
        const { resizeQcow2 } = await import('../../formats/qcow2/ops/resize.js')
        closed = true
        await resizeQcow2(image as import('../../formats/qcow2/image.js').Qcow2Image, size)
      } else {
        throw new UsageError(`${image.format}: resize is supported for qcow2 images`)
      }
    } finally {
      if (!closed) await image.close()
    }
    if (!opts['quiet']) io.stdout.write('Image resized.\n')
    return 0
  },
}
export default resize
