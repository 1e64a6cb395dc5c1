import type { CommandModule } from '../command.js'
import { accumulateOptions, parseImageOptions, parseImageOptsArg, parseKeyValues, parseSnapshotParam, printJson } from '../common.js'

/** imgtool measure [--output human|json] [-O FMT] [-o OPTS] [--size N | [-f FMT] [-l SNAPSHOT] FILENAME] (qemu-img measure's syntax) */
const measureCommand: CommandModule = {
  name: 'measure',
  description: 'the file size a new image needs (qemu-img measure)',
  configure(cmd) {
    cmd
      .option('--output <fmt>', 'output format: human or json', 'human')
      .option('--json', 'same as --output json')
      .option('-O, --output-format <fmt>', 'target format: qcow2 or raw', 'raw')
      .option(
        '-o, --options <opts>',
        'target create options (cluster_size, refcount_bits, extended_l2, preallocation, compat...); may be repeated',
        accumulateOptions,
      )
      .option('--size <size>', 'measure an empty image of SIZE bytes (instead of FILENAME)')
      .option('-f, --format <fmt>', 'source format (probed when absent)')
      .option('-l, --snapshot <param>', 'measure an internal snapshot of the source: snapshot.id=ID, snapshot.name=NAME, or a bare id or name')
      .option('-U, --force-share', 'open the source without image locks')
      .option('--image-opts', 'the source is given as driver=FMT,file.filename=PATH (qemu-img --image-opts; simple spellings only)')
      .argument('[filename...]')
  },
  async run(args, opts, io) {
    const { UsageError, measure, parseSize } = await import('../../index.js')
    if (args.length > 1) throw new UsageError('At most one filename argument is allowed.')
    const output = opts['json'] ? 'json' : String(opts['output'] ?? 'human')
    if (output !== 'human' && output !== 'json') throw new UsageError('--output must be used with human or json as argument.')
    let size: number | undefined
    if (opts['size'] !== undefined) {
      try {
        size = parseSize(String(opts['size']), 'image size')
      } catch {
        throw new UsageError(
          'Invalid image size specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
        )
      }
    }
    let { format } = parseImageOptions({ format: opts['format'] })
    let source = args[0]
    if (opts['imageOpts'] === true) {
      if (format !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive')
      if (source !== undefined) ({ path: source, format } = parseImageOptsArg(source))
    }
    const r = await measure(source, {
      ...(format !== undefined ? { format } : {}),
      targetFormat: String(opts['outputFormat'] ?? 'raw'),
      targetOptions: parseKeyValues(opts['options'] as string | undefined),
      ...(size !== undefined ? { size } : {}),
      ...(typeof opts['snapshot'] === 'string' ? { snapshot: parseSnapshotParam(opts['snapshot']) } : {}),
      forceShare: opts['forceShare'] === true,
      ...(io.signal ? { signal: io.signal } : {}),
    })
    if (output === 'json') {
      printJson(io.stdout, { ...(r.bitmaps !== undefined ? { bitmaps: r.bitmaps } : {}), required: r.required, 'fully-allocated': r.fullyAllocated })
    } else {
      io.stdout.write(`required size: ${r.required}\nfully allocated size: ${r.fullyAllocated}\n`)
      if (r.bitmaps !== undefined) io.stdout.write(`bitmaps size: ${r.bitmaps}\n`)
    }
    return 0
  },
}
export default measureCommand
