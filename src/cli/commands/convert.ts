import type { CacheMode, SalvageEvent } from '../../index.js'
import type { CommandModule } from '../command.js'
import { accumulateOptions, parseKeyValues } from '../common.js'

/** imgtool convert [-f FMT] -O raw|qcow2|vpc|vmdk|dmsnap [-c] [-o ...] [-B BACKING] [-S SIZE] [-p] SRC DST (DST may be - for raw and streamOptimized vmdk) */
const convert: CommandModule = {
  name: 'convert',
  description: 'convert an image to another format (qemu-img convert)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'source format (probed when absent)')
      .option(
        '-O, --output-format <fmt>',
        'target format: raw (the default), qcow2, vpc, vmdk (-o subformat=monolithicSparse|monolithicFlat|streamOptimized), or dmsnap (a COW store against -o origin=PATH)',
      )
      .option('--origin <path>', 'origin of a dm-snapshot source (with -f dmsnap)')
      .option('-c, --compress', 'write compressed clusters (qcow2; accepted for vmdk, whose streamOptimized grains are always compressed)')
      .option('-o, --options <opts>', 'target format options (as for create); may be repeated', accumulateOptions)
      .option('-B, --backing <file>', 'target backing file: only data not in it is written')
      .option('-F, --backing-format <fmt>', 'format of the -B backing file')
      .option('-S, --sparse-size <size>', 'zero runs of at least SIZE bytes are left sparse (0: write all; default 4k)')
      .option('-m, --parallel <n>', 'chunks read or written at once, 1 to 16 (as qemu-img convert -m)', '4')
      .option('-W', 'out-of-order writes: a chunk is written as soon as it is read (qemu-img -W; same guest bytes, layout may differ)')
      .option(
        '-t, --cache <mode>',
        'target cache mode: unsafe (as qemu-img: no flush at all), writeback or none (flushed once, at the end), writethrough or directsync (every write flushed)',
        'unsafe',
      )
      .option('-T, --source-cache <mode>', 'source cache mode (accepted as qemu-img takes it; reads are the same in every mode)', 'writeback')
      .option('-n, --no-create', 'skip target creation: write into the existing target (opened as -O FMT), at least as large as the source')
      .option('--target-is-zero', 'with -n: the target already reads as zeros, so zero ranges are not written')
      .option('-p, --progress', "show progress (a terminal line; otherwise qemu-img's '    (NN.NN/100%)' lines)")
      .option('-q, --quiet', 'print nothing')
      .option('-U, --force-share', 'open the source without image locks (it may be in use)')
      .option('--bitmaps', 'copy the persistent bitmaps (qcow2 to qcow2)')
      .option('--skip-broken-bitmaps', 'with --bitmaps: skip in-use (inconsistent) bitmaps with a warning')
      .option('-l, --snapshot <param>', 'convert an internal snapshot of the source: snapshot.id=ID, snapshot.name=NAME, or a bare id or name')
      .option('--image-opts', 'the source is given as driver=FMT,file.filename=PATH (qemu-img --image-opts; simple spellings only)')
      .option('--target-image-opts', 'with -n: the target is given as driver=FMT,file.filename=PATH')
      .option('-r, --rate-limit <rate>', 'read at most RATE bytes per second (qemu suffixes: k, M, G...)')
      .option(
        '-C, --copy-range',
        'copy offloading, as qemu-img -C: data ranges copied whole by copy_file_range while the kernel can (not with -c, -S or --salvage)',
      )
      .option('--salvage', 'read errors of the source become zeros in the target, each failed sector reported on stderr (unless -q)')
      .argument('<source>')
      .argument('<target>')
  },
  async run(args, opts, io) {
    const { CACHE_MODES, UsageError, convert, isFormatName, parseSize } = await import('../../index.js')
    if (args.length !== 2) throw new UsageError('Expecting one source and one target')
    let [srcPath, dstPath] = args as [string, string]
    let outFmt = String(opts['outputFormat'] ?? 'raw')
    if (opts['imageOpts'] === true || opts['targetImageOpts'] === true) {
      const { parseImageOptsArg } = await import('../common.js')
      if (opts['imageOpts'] === true) {
        if (opts['format'] !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive')
        const o = parseImageOptsArg(srcPath)
        srcPath = o.path
        if (o.format !== undefined) opts['format'] = o.format
      }
      if (opts['targetImageOpts'] === true) {
        if (opts['create'] !== false) throw new UsageError('--target-image-opts requires use of -n flag')
        if (opts['outputFormat'] !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive')
        const t = parseImageOptsArg(dstPath)
        if (t.format === undefined) throw new UsageError(`Could not open '${dstPath}': imgtool needs the target's format (driver=FMT)`)
        dstPath = t.path
        outFmt = t.format
      }
    }
    if (outFmt !== 'raw' && outFmt !== 'qcow2' && outFmt !== 'dmsnap' && outFmt !== 'vpc' && outFmt !== 'vmdk')
      throw new UsageError(`Unknown target format '${outFmt}' (raw, qcow2, dmsnap, vpc, vmdk)`)
    const srcFmt = opts['format'] === undefined ? undefined : String(opts['format'])
    if (srcFmt !== undefined && !isFormatName(srcFmt)) throw new UsageError(`Unknown file format '${srcFmt}'`)
    const compress = Boolean(opts['compress'])
    if (opts['copyRange'] === true) {
      if (compress) throw new UsageError('Cannot enable copy offloading when -c is used')
      if (opts['sparseSize'] !== undefined) throw new UsageError('Cannot enable copy offloading when -S is used')
      if (opts['salvage'] === true) throw new UsageError('Cannot use copy offloading in salvaging mode')
    }
    const { parseRateLimit } = await import('../common.js')
    const rateLimit = parseRateLimit(opts['rateLimit'])
    if (compress && outFmt !== 'qcow2' && outFmt !== 'vmdk') throw new UsageError('Compression not supported for this file format')
    const minSparse = parseSize(String(opts['sparseSize'] ?? '4k'), '-S')
    const inFlight = parseCoroutines(String(opts['parallel'] ?? '4'))
    if (inFlight === undefined) throw new UsageError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16')
    const cache = String(opts['cache'] ?? 'unsafe') as CacheMode
    if (!CACHE_MODES.includes(cache)) throw new UsageError(`Invalid cache option: ${cache}`)
    const sourceCache = String(opts['sourceCache'] ?? 'writeback') as CacheMode
    if (!CACHE_MODES.includes(sourceCache) && String(sourceCache) !== 'writethrough') throw new UsageError(`Invalid source cache option: ${sourceCache}`)
    const skipCreate = opts['create'] === false
    const targetIsZero = opts['targetIsZero'] === true
    const options = parseKeyValues(opts['options'] as string | undefined)
    const backing = opts['backing'] as string | undefined
    if (backing !== undefined && outFmt !== 'qcow2') throw new UsageError('-B needs a target format with backing files (qcow2)')
    const origin = typeof opts['origin'] === 'string' ? { origin: opts['origin'] } : {}
    const { startProgress } = await import('../progress.js')
    const progressOptions = { requested: Boolean(opts['progress']), quiet: Boolean(opts['quiet']) }
    const common = {
      ...(srcFmt !== undefined ? { format: srcFmt } : {}),
      ...origin,
      forceShare: opts['forceShare'] === true,
      parallel: inFlight,
      ...(opts['W'] === true ? { outOfOrder: true } : {}),
      ...(rateLimit ? { rateLimit } : {}),
    }
    if (typeof opts['snapshot'] === 'string') {
      const { parseSnapshotParam } = await import('../common.js')
      Object.assign(common, { snapshot: parseSnapshotParam(opts['snapshot']) })
    }
    if (opts['salvage'] === true) {
      const quiet = Boolean(opts['quiet'])
      let corruption = false
      Object.assign(common, {
        salvage: (ev: SalvageEvent) => {
          // qemu's qcow2 driver reports a corrupt structure once, -q or not (a read-only source: not marked corrupt)
          const event = (ev.error as { details?: { qemuCorruption?: unknown } }).details?.qemuCorruption
          if (typeof event === 'string' && !corruption) {
            corruption = true
            io.stderr.write(`qcow2: Image is corrupt: ${event}; further non-fatal corruption events will be suppressed\n`)
          }
          if (!quiet) io.stderr.write(`imgtool: warning: ${salvageWarning(ev)}\n`)
        },
      })
    }
    // persistent bitmaps (--bitmaps, --skip-broken-bitmaps)
    Object.assign(common, {
      ...(opts['bitmaps'] ? { bitmaps: true } : {}),
      ...(opts['skipBrokenBitmaps'] ? { skipBrokenBitmaps: true } : {}),
      onWarning: (w: string) => void io.stderr.write(`imgtool: warning: ${w}\n`),
    })
    if (dstPath === '-') {
      // the guest bytes as raw, or a streamOptimized vmdk, on stdout (nothing is created, nothing to clean up)
      const stream = outFmt === 'vmdk' && options['subformat'] === 'streamOptimized'
      if (outFmt !== 'raw' && !stream) throw new UsageError('Only raw output, or -O vmdk -o subformat=streamOptimized, can go to stdout (-)')
      const progress = await startProgress(io, 'converting', { ...progressOptions, dataOnStdout: true })
      let ok = false
      try {
        await convert(srcPath, io.stdout, { ...common, ...(stream ? { targetFormat: 'vmdk' as const, options } : {}), onProgress: progress.update })
        ok = true
      } finally {
        progress.stop(ok)
      }
      return 0
    }
    const progress = await startProgress(io, 'converting', progressOptions)
    io.setGraceful?.(true)
    let ok = false
    try {
      await convert(srcPath, dstPath, {
        ...common,
        targetFormat: outFmt,
        options,
        ...(backing !== undefined ? { backingFile: backing, backingFormat: String(opts['backingFormat'] ?? 'qcow2') } : {}),
        compress,
        minSparse,
        cache,
        ...(skipCreate ? { skipCreate } : {}),
        ...(targetIsZero ? { targetIsZero } : {}),
        ...(opts['copyRange'] === true ? { copyRange: true } : {}),
        onProgress: progress.update,
        ...(io.signal ? { signal: io.signal } : {}),
      })
      ok = true
    } finally {
      progress.stop(ok)
    }
    return 0
  },
}
/** qemu-img's warning for a sector --salvage turned into zeros (the errno's text, as strerror words it) */
function salvageWarning(ev: SalvageEvent): string {
  const errno = (ev.error as { errno?: unknown }).errno
  const text = errno === 'ENOSPC' ? 'No space left on device' : errno === 'EACCES' ? 'Permission denied' : 'Input/output error'
  return ev.kind === 'read' ? `error while reading offset ${ev.offset}: ${text}` : `error while reading block status at offset ${ev.offset}: ${text}`
}

export default convert

/**
 * -m as qemu-img reads it (qemu_strtol, base 0: leading blanks and a sign allowed, 0x hex, a leading 0 octal,
 * nothing after the number), between 1 and MAX_COROUTINES (16); undefined for anything else.
 */
export function parseCoroutines(text: string): number | undefined {
  const m = /^\s*([+-]?)(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i.exec(text)
  const digits = m?.[2] ?? ''
  const magnitude = /^0x/i.test(digits) ? parseInt(digits.slice(2), 16) : digits.startsWith('0') ? parseInt(digits, 8) : parseInt(digits, 10)
  const n = m ? (m[1] === '-' ? -magnitude : magnitude) : NaN
  return n >= 1 && n <= 16 ? n : undefined
}
