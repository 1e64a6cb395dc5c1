import type { CommandModule } from '../command.js'
import { addImageOptions, oneImageArg, parseImageOptions } from '../common.js'

const cat: CommandModule = {
  name: 'cat',
  description: 'write the guest bytes of an image to stdout',
  configure(cmd) {
    addImageOptions(cmd)
      .option('--offset <n>', 'first guest byte (sizes like 1M accepted)')
      .option('--length <n>', 'how many bytes (default: to the end)')
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const path = oneImageArg(args)
    const { format, options } = parseImageOptions(opts)
    const { exportImage } = await import('../../index.js')
    // a closed pipe (outputClosed) ends cat quietly, as a successful copy
    await exportImage(path, io.stdout, {
      ...(format !== undefined ? { format } : {}),
      options,
      forceShare: opts['forceShare'] === true,
      ...(opts['offset'] !== undefined ? { offset: String(opts['offset']) } : {}),
      ...(opts['length'] !== undefined ? { length: String(opts['length']) } : {}),
    })
    return 0
  },
}
export default cat
