import type { CommandModule } from '../command.js'
import { addImageOptions, addImageOptsOption, imageArg } from '../common.js'

const cat: CommandModule = {
  name: 'cat',
  description: 'write the guest bytes of an image to stdout',
  configure(cmd) {
    addImageOptsOption(addImageOptions(cmd))
      .option('--offset <n>', 'first guest byte (sizes like 1M accepted)')
      .option('--length <n>', 'how many bytes (default: to the end)')
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .option('-p, --progress', "show progress on stderr (a terminal line; otherwise qemu-img's '    (NN.NN/100%)' lines)")
      .argument('<image>')
  },
  async run(args, opts, io) {
    const { path, format, options } = imageArg(args, opts)
    const { exportImage } = await import('../../index.js')
    const { startProgress } = await import('../progress.js')
    const progress = await startProgress(io, 'copying', { requested: Boolean(opts['progress']), dataOnStdout: true })
    let ok = false
    try {
      // a closed pipe (outputClosed) ends cat quietly, as a successful copy
      await exportImage(path, io.stdout, {
        ...(format !== undefined ? { format } : {}),
        options,
        forceShare: opts['forceShare'] === true,
        ...(opts['offset'] !== undefined ? { offset: String(opts['offset']) } : {}),
        ...(opts['length'] !== undefined ? { length: String(opts['length']) } : {}),
        onProgress: progress.update,
      })
      ok = true
    } finally {
      progress.stop(ok)
    }
    return 0
  },
}
export default cat
