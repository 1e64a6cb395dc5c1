/**
 * imgtool commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] IMAGE: a qcow2
 * overlay into its backing chain (qemu-img commit), or a dm-snapshot store
 * into its origin (--origin ORIGIN, as merge). The image's format decides.
 */
import type { CommandModule } from '../command.js'
import { addImageOptions, addOutputOption, oneImageArg, parseImageOptions, parseOutput, parseRateLimit, printJson } from '../common.js'

const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe']

const commit: CommandModule = {
  name: 'commit',
  description: 'commit a qcow2 overlay into its backing file, or a dm-snapshot store into its origin (qemu-img commit)',
  configure(cmd) {
    addOutputOption(addImageOptions(cmd))
      .option('-t, --cache <mode>', `cache mode of the images written (${CACHE_MODES.join(', ')}); every mode flushes before the overlay is emptied`)
      .option('-b, --base <file>', 'commit into this image of the backing chain (implies -d)')
      .option('-d, --keep', "keep the overlay's data (do not empty it)")
      .option('-p, --progress', 'show progress')
      .option('-q, --quiet', 'print nothing')
      .option('-r, --rate-limit <rate>', 'copy at most RATE bytes per second (qemu suffixes: k, M, G...)')
      .argument('<image>')
  },
  async run(args, opts, io) {
    const { UsageError, isFormatName, commit: commitImage } = await import('../../index.js')
    const path = oneImageArg(args)
    const { format, options } = parseImageOptions(opts)
    const rateLimit = parseRateLimit(opts['rateLimit'])
    const cache = opts['cache']
    if (cache !== undefined && !CACHE_MODES.includes(String(cache))) throw new UsageError(`Invalid cache option: ${String(cache)}`)
    const originFormat = options['origin_format']
    if (originFormat !== undefined && !isFormatName(originFormat)) throw new UsageError(`commit: unknown origin format '${originFormat}'`)
    const output = parseOutput(opts)
    const { startProgress } = await import('../progress.js')
    const progress = await startProgress(io, 'committing', {
      requested: Boolean(opts['progress']),
      quiet: Boolean(opts['quiet']),
      dataOnStdout: output === 'json',
    })
    let ok = false
    let r: Awaited<ReturnType<typeof commitImage>>
    try {
      r = await commitImage(path, {
        ...(format !== undefined ? { format } : {}),
        ...(typeof opts['base'] === 'string' ? { base: opts['base'] } : {}),
        keepOverlay: Boolean(opts['keep']),
        ...(rateLimit ? { rateLimit } : {}),
        ...(options['origin'] !== undefined ? { origin: options['origin'] } : {}),
        ...(originFormat !== undefined ? { originFormat } : {}),
        onProgress: progress.update,
      })
      ok = true
    } finally {
      progress.stop(ok)
    }
    if (output === 'json') {
      const m = r.merge
      printJson(
        io.stdout,
        m
          ? { 'merged-exceptions': m.merged, 'chunks-copied': m.chunksCopied, 'chunk-size': m.chunkSize }
          : { 'bytes-committed': r.bytesCommitted, base: r.base, emptied: r.emptied },
      )
    } else if (!opts['quiet']) io.stdout.write(r.format === 'dmsnap' ? `${r.merge!.summary}\n` : 'Image committed.\n')
    return 0
  },
}
export default commit
