import type { CommandModule } from '../command.js'

/** imgtool compare [-f FMT] [-F FMT] [-s] A B: exit 0 identical, 1 different, 2 error (as qemu-img) */
const compare: CommandModule = {
  name: 'compare',
  description: 'check whether two images have the same contents (qemu-img compare)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'format of the first image')
      .option('-F, --second-format <fmt>', 'format of the second image')
      .option('-s, --strict', 'strict mode: sizes and allocation must match too')
      .option('--origin <path>', 'origin of a dm-snapshot image among the two (-f/-F dmsnap)')
      .option('-p, --progress', 'show progress')
      .option('-q, --quiet', 'print nothing')
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .argument('<image1>')
      .argument('<image2>')
  },
  async run(args, opts, io) {
    const { renderError } = await import('../errors.js')
    try {
      const { UsageError } = await import('../../errors.js')
      const { isFormatName } = await import('../../image/probe.js')
      if (args.length !== 2) throw new UsageError('Expecting two image file names')
      const fmt = (v: unknown) => {
        if (v === undefined) return undefined
        if (!isFormatName(String(v))) throw new UsageError(`Unknown file format '${String(v)}'`)
        return String(v) as import('../../image/probe.js').FormatName
      }
      const { openImage } = await import('../../open.js')
      const { compareImages } = await import('../../convert/compare.js')
      const options: Record<string, string> = typeof opts['origin'] === 'string' ? { origin: opts['origin'] } : {}
      const a = await openImage(args[0]!, { format: fmt(opts['format']), readOnly: true, options, forceShare: opts['forceShare'] === true })
      try {
        const b = await openImage(args[1]!, { format: fmt(opts['secondFormat']), readOnly: true, options, forceShare: opts['forceShare'] === true })
        try {
          const progress = opts['progress'] && io.isTTY && !opts['quiet'] ? await (await import('../progress.js')).startProgress(io, 'comparing') : undefined
          let r: Awaited<ReturnType<typeof compareImages>>
          try {
            r = await compareImages(a, b, { strict: Boolean(opts['strict']), hostFiles: true, onProgress: progress?.update })
          } finally {
            progress?.stop()
          }
          const out: string[] = []
          if (r.sizeMismatch && !opts['strict']) out.push('Warning: Image size mismatch!')
          out.push(r.identical ? 'Images are identical.' : r.message)
          if (!opts['quiet']) io.stdout.write(out.join('\n') + '\n')
          return r.identical ? 0 : 1
        } finally {
          await b.close()
        }
      } finally {
        await a.close()
      }
    } catch (e) {
      renderError(e, io.stderr)
      return 2
    }
  },
}
export default compare
