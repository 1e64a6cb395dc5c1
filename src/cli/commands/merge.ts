/**
 * imgtool merge -f dmsnap --origin ORIGIN COW: apply a dm-snapshot
 * COW store to its origin (what the kernel's snapshot-merge target does).
 */
import type { CommandModule } from '../command.js'
import { addImageOptions, addOutputOption, oneImageArg, parseImageOptions, parseOutput, printJson } from '../common.js'

const merge: CommandModule = {
  name: 'merge',
  description: 'merge a dm-snapshot COW store into its origin (snapshot-merge); resumable after a crash',
  configure(cmd) {
    addOutputOption(addImageOptions(cmd))
      .option('-q, --quiet', 'no progress output')
      .option('-p, --progress', "show progress (shown on a terminal anyway; otherwise qemu-img's '    (NN.NN/100%)' lines)")
      .argument('<cow>')
  },
  async run(args, opts, io) {
    const { UsageError, isFormatName, merge } = await import('../../index.js')
    const path = oneImageArg(args, 'COW file name')
    const { format, options } = parseImageOptions(opts)
    if (format !== undefined && format !== 'dmsnap') throw new UsageError(`merge: only dm-snapshot COW stores (-f dmsnap) can be merged, not '${format}'`)
    const originPath = options['origin']
    if (!originPath) throw new UsageError('merge: the origin is required (--origin ORIGIN or -o origin=ORIGIN)')
    const output = parseOutput(opts)
    const originFormat = options['origin_format']
    if (originFormat !== undefined && !isFormatName(originFormat)) throw new UsageError(`merge: unknown origin format '${originFormat}'`)
    // -p, or a terminal as before; the plain lines go to stderr when stdout carries JSON
    const { startProgress } = await import('../progress.js')
    const progress = await startProgress(io, 'merging', {
      requested: Boolean(opts['progress']) || (io.isTTY && output !== 'json'),
      quiet: Boolean(opts['quiet']),
      dataOnStdout: output === 'json',
      unit: 'items',
      itemName: 'exceptions',
    })
    let ok = false
    let result: Awaited<ReturnType<typeof merge>>
    try {
      result = await merge(path, originPath, { ...(originFormat ? { originFormat } : {}), onProgress: progress.update })
      ok = true
    } finally {
      progress.stop(ok)
    }
    if (output === 'json') printJson(io.stdout, { 'merged-exceptions': result.merged, 'chunks-copied': result.chunksCopied, 'chunk-size': result.chunkSize })
    else io.stdout.write(`${result.summary}\n`)
    return 0
  },
}
export default merge
