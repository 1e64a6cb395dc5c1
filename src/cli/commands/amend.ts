import type { CommandModule } from '../command.js'
import { accumulateOptions, parseKeyValues } from '../common.js'

/** imgtool amend [-f qcow2] [-p] [-q] -o OPTIONS IMAGE (qemu-img amend) */
const amend: CommandModule = {
  name: 'amend',
  description: 'change the format options of an image (qemu-img amend)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'image format (only qcow2 can be amended); probed when absent')
      .option(
        '-o, --options <opts>',
        'options to change: compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=N, size=SIZE, data_file=NAME, data_file_raw=off; may be repeated',
        accumulateOptions,
      )
      .option('-p, --progress', 'show progress')
      .option('-q, --quiet', 'print nothing')
      .argument('[image]')
  },
  async run(args, opts, io) {
    const { UsageError, amend, amendOptionHelp, isFormatName } = await import('../../index.js')
    const path = args[0]
    if (opts['options'] === undefined) throw new UsageError('Must specify options (-o)')
    const options = parseKeyValues(opts['options'] as string)
    const f = opts['format']
    const wantsHelp = 'help' in options || '?' in options
    // -f FMT -o help needs no image (qemu-img's order: the help, then the image name)
    if (wantsHelp && typeof f === 'string') return printHelp(io, f, await amendOptionHelp(f))
    if (!path || args.length !== 1) throw new UsageError('Expecting one image file name')
    if (f !== undefined && (typeof f !== 'string' || !isFormatName(f))) throw new UsageError(`Unknown file format '${String(f)}'`)
    if (wantsHelp) {
      const r = await amend(path, { options, ...(typeof f === 'string' && isFormatName(f) ? { format: f } : {}) })
      return printHelp(io, 'qcow2', r.help ?? [])
    }
    const { startProgress } = await import('../progress.js')
    const progress = await startProgress(io, 'amending', {
      requested: Boolean(opts['progress']),
      quiet: Boolean(opts['quiet']),
      unit: 'items',
      itemName: 'steps',
    })
    let ok = false
    try {
      await amend(path, {
        options,
        ...(typeof f === 'string' && isFormatName(f) ? { format: f } : {}),
        onNotice: (n) => void io.stderr.write(`imgtool: ${n}\n`),
        onProgress: progress.update,
      })
      ok = true
    } finally {
      progress.stop(ok)
    }
    return 0
  },
}
export default amend

/** qemu's option help: `  name=<type>`, padded to 24 columns, ` - help` */
function printHelp(io: { stdout: NodeJS.WritableStream }, format: string, list: Array<{ name: string; type: string; help: string }>): number {
  io.stdout.write(`Amend options for '${format}':\n`)
  for (const o of list) io.stdout.write(`${`  ${o.name}=<${o.type}>`.padEnd(24)} - ${o.help}\n`)
  return 0
}
