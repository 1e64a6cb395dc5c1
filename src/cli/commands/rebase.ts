/**
 * imgtool rebase [-f FMT] [-F BACKING_FMT] [-u] [-p] [-q] -b BACKING IMAGE:
 * give a qcow2 image another backing file (qemu-img rebase); -b '' removes it.
 */
import type { CommandModule } from '../command.js'
import { oneImageArg } from '../common.js'

const rebase: CommandModule = {
  name: 'rebase',
  description: "change a qcow2 image's backing file, copying what differs unless -u (qemu-img rebase)",
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'the image format (qcow2; probed when absent)')
      .requiredOption('-b, --backing <file>', "the new backing file ('' for none: the image is flattened)")
      .option('-F, --backing-format <fmt>', 'the new backing file format (required with a backing file)')
      .option('-u, --unsafe', 'only change the name in the header; nothing is compared or copied')
      .option('-c, --compress', 'write the copied clusters compressed (qemu-img 8.2; with -u nothing is copied, so it changes nothing)')
      .option('-p, --progress', 'show progress')
      .option('-q, --quiet', 'no progress output')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const { UsageError, isFormatName, rebase: rebaseImage } = await import('../../index.js')
    const path = oneImageArg(args)
    const f = opts['format']
    if (f !== undefined && (typeof f !== 'string' || !isFormatName(f))) throw new UsageError(`Unknown file format '${String(f)}'`)
    const backing = String(opts['backing'])
    const backingFormat = typeof opts['backingFormat'] === 'string' ? opts['backingFormat'] : undefined
    const { startProgress } = await import('../progress.js')
    const progress = await startProgress(io, 'rebasing', { requested: Boolean(opts['progress']), quiet: Boolean(opts['quiet']) })
    let ok = false
    try {
      await rebaseImage(path, backing, {
        ...(f !== undefined ? { format: f } : {}),
        ...(backingFormat !== undefined ? { backingFormat } : {}),
        unsafe: Boolean(opts['unsafe']),
        ...(opts['compress'] === true ? { compress: true } : {}),
        onProgress: progress.update,
      })
      ok = true
    } finally {
      progress.stop(ok)
    }
    return 0
  },
}
export default rebase
