import type { CommandModule } from '../command.js'
import { addOutputOption, parseOutput, printJson } from '../common.js'

/** imgtool compare [-f FMT] [-F FMT] [-s] A B: exit 0 identical, 1 different, 2 error (as qemu-img) */
const compare: CommandModule = {
  name: 'compare',
  description: 'check whether two images have the same contents (qemu-img compare)',
  configure(cmd) {
    addOutputOption(cmd)
      .option('-f, --format <fmt>', 'format of the first image')
      .option('-F, --second-format <fmt>', 'format of the second image')
      .option('-s, --strict', 'strict mode: sizes and allocation must match too')
      .option('--origin <path>', 'origin of a dm-snapshot image among the two (-f/-F dmsnap)')
      .option('-p, --progress', "show progress (a terminal line; otherwise qemu-img's '    (NN.NN/100%)' lines)")
      .option('-q, --quiet', 'print nothing')
      .option('-U, --force-share', 'open without image locks (read-only; the image may be in use)')
      .option('--image-opts', 'both images are given as driver=FMT,file.filename=PATH (qemu-img --image-opts; simple spellings only)')
      .argument('<image1>')
      .argument('<image2>')
  },
  async run(args, opts, io) {
    const { renderError } = await import('../errors.js')
    try {
      const { UsageError, compare, isFormatName } = await import('../../index.js')
      if (args.length !== 2) throw new UsageError('Expecting two image file names')
      const fmt = (v: unknown) => {
        if (v === undefined) return undefined
        const f = String(v)
        if (!isFormatName(f)) throw new UsageError(`Unknown file format '${f}'`)
        return f
      }
      const formats: [ReturnType<typeof fmt>, ReturnType<typeof fmt>] = [fmt(opts['format']), fmt(opts['secondFormat'])]
      const paths = [args[0]!, args[1]!]
      if (opts['imageOpts'] === true) {
        if (formats[0] !== undefined || formats[1] !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive')
        const { parseImageOptsArg } = await import('../common.js')
        for (const i of [0, 1] as const) ({ path: paths[i], format: formats[i] } = parseImageOptsArg(paths[i]!))
      }
      const { startProgress } = await import('../progress.js')
      const json = parseOutput(opts) === 'json'
      const progress = await startProgress(io, 'comparing', { requested: Boolean(opts['progress']), quiet: Boolean(opts['quiet']), dataOnStdout: json })
      let r: Awaited<ReturnType<typeof compare>>
      try {
        r = await compare(paths[0]!, paths[1]!, {
          strict: Boolean(opts['strict']),
          formats,
          ...(typeof opts['origin'] === 'string' ? { origin: opts['origin'] } : {}),
          forceShare: opts['forceShare'] === true,
          onProgress: progress.update,
        })
      } catch (e) {
        progress.stop(false)
        throw e
      }
      const out: string[] = []
      if (r.sizeWarning) out.push('Warning: Image size mismatch!')
      out.push(r.identical ? 'Images are identical.' : r.message)
      // the verdict before the progress lines' last newline, where qemu-img prints it
      progress.stop(r.identical, () => {
        if (json)
          printJson(io.stdout, {
            identical: r.identical,
            'size-mismatch': r.sizeMismatch,
            ...(r.identical ? {} : { reason: r.reason, ...(r.offset !== undefined ? { offset: r.offset } : {}), message: r.message }),
          })
        else if (!opts['quiet']) io.stdout.write(out.join('\n') + '\n')
      })
      return r.identical ? 0 : 1
    } catch (e) {
      renderError(e, io.stderr)
      return 2
    }
  },
}
export default compare
