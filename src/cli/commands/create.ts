import type { CommandModule } from '../command.js'
import { accumulateOptions, parseKeyValues } from '../common.js'

/** imgtool create -f qcow2 [-o opt=val,...] [-b BACKING -F FMT] FILE [SIZE] (qemu-img create's syntax) */
const create: CommandModule = {
  name: 'create',
  description: 'create a new image (qemu-img create)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'image format (qcow2, raw, or dmsnap: a dm-snapshot COW store)', 'raw')
      .option('--origin <path>', 'dmsnap: the origin the store snapshots (same as -o origin=PATH)')
      .option(
        '-o, --options <opts>',
        'format options: key=value[,key=value...] (cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2, compression_type, preallocation, data_file, data_file_raw...); may be repeated',
        accumulateOptions,
      )
      .option('-b, --backing <file>', 'backing file')
      .option('-F, --backing-format <fmt>', 'backing file format')
      .option('-u', 'do not open the backing file (SIZE is then required)')
      .option('-q, --quiet', 'print nothing')
      .argument('<file>')
      .argument('[size]')
  },
  async run(args, opts, io) {
    const { UsageError } = await import('../../errors.js')
    const { parseSize } = await import('../../util/size.js')
    const [file, sizeText] = args
    if (!file) throw new UsageError('Expecting image file name')
    const format = String(opts['format'] ?? 'raw')
    if (format !== 'qcow2' && format !== 'raw' && format !== 'dmsnap') throw new UsageError(`Unknown file format '${format}' for create (qcow2, raw, dmsnap)`)
    const options = parseKeyValues(opts['options'] as string | undefined)
    if (typeof opts['origin'] === 'string') options['origin'] = opts['origin']
    if (options['origin'] !== undefined && format !== 'dmsnap') throw new UsageError('--origin goes with -f dmsnap')
    const backing = (opts['backing'] as string | undefined) ?? options['backing_file']
    const backingFormat = (opts['backingFormat'] as string | undefined) ?? options['backing_fmt']
    if (backing !== undefined && backingFormat === undefined) throw new UsageError(`${file}: Backing file specified without backing format`)
    const { openFileDevice } = await import('../../io/file-device.js')
    const { makeContext, openImage, driverFor } = await import('../../open.js')
    if (sizeText !== undefined && options['size'] !== undefined) throw new UsageError(`${file}: The image size must be specified only once`)
    let size: number | undefined = sizeText !== undefined ? parseSize(sizeText) : options['size'] !== undefined ? parseSize(options['size']) : undefined
    if (size === undefined && backing !== undefined && !opts['u']) {
      const { combinePath, protocolPrefix } = await import('../../formats/qcow2/spec/paths.js')
      const { isFormatName } = await import('../../image/probe.js')
      const { escapeControls } = await import('../../util/text.js')
      const protocol = protocolPrefix(backing)
      if (protocol !== undefined) {
        throw new UsageError(
          `${file}: backing file ${escapeControls(backing)} names the protocol '${escapeControls(protocol)}:'; imgtool opens only plain file names (give SIZE and -u to write the name without opening it)`,
        )
      }
      const b = await openImage(combinePath(file, backing), { format: isFormatName(backingFormat!) ? backingFormat : undefined, readOnly: true })
      size = b.virtualSize
      await b.close()
    }
    if (size === undefined) throw new UsageError('Image creation needs a size parameter')
    if (format === 'raw' && (backing !== undefined || Object.keys(options).some((k) => k !== 'size' && k !== 'preallocation'))) {
      throw new UsageError(`raw images take no options but size and preallocation`)
    }
    if (!opts['quiet']) io.stdout.write(`Formatting '${file}', fmt=${format}${formattingOptions(format, size, options, backing, backingFormat, parseSize)}\n`)
    // options checked before the file is touched: a mistake leaves no new file and an existing one intact, as qemu-img
    if (format === 'qcow2') {
      const { parseCreateOptions } = await import('../../formats/qcow2/ops/create.js')
      const o = { ...options }
      delete o['backing_file']
      delete o['backing_fmt']
      parseCreateOptions({ size, options: o, ...(backing !== undefined ? { backingFile: backing, backingFormat: backingFormat! } : {}) })
    } else if (format === 'raw' && options['preallocation'] !== 'metadata') {
      // (qemu-img creates the file before it refuses metadata for raw)
      const { parseRawPreallocation } = await import('../../formats/raw/create.js')
      parseRawPreallocation(options['preallocation'], file)
    }
    const { existsSync, rmSync } = await import('node:fs')
    const existed = existsSync(file)
    const dev = await openFileDevice(file, { readOnly: false, create: true })
    let ok = false
    try {
      if (format === 'dmsnap') {
        if (backing !== undefined) throw new UsageError('dmsnap stores take --origin, not a backing file')
        await driverFor('dmsnap').create!(dev, makeContext(openFileDevice), { size, options })
      } else if (format === 'raw') {
        await driverFor('raw').create!(dev, makeContext(openFileDevice), { size, options })
      } else {
        const extra: { backingFile?: string; backingFormat?: string } = {}
        if (backing !== undefined) {
          extra.backingFile = backing
          extra.backingFormat = backingFormat!
        }
        delete options['backing_file']
        delete options['backing_fmt']
        await driverFor('qcow2').create!(dev, makeContext(openFileDevice), { size, options, ...extra })
      }
      await dev.flush()
      ok = true
    } finally {
      await dev.close()
      // a qcow2 image that could not be made is not left behind half made (qemu-img leaves none)
      if (!ok && !existed && format === 'qcow2') rmSync(file, { force: true })
    }
    return 0
  },
}
export default create

/**
 * The options part of qemu-img create's "Formatting" line: qcow2 lists its
 * options in QEMU's order with their defaults (sizes as numbers, the rest as
 * given); raw lists size, then preallocation when given.
 */
function formattingOptions(
  format: string,
  size: number,
  o: Record<string, string>,
  backing: string | undefined,
  backingFormat: string | undefined,
  parseSize: (s: string) => number,
): string {
  const parts: string[] = []
  const num = (v: string | undefined, d: number): string => {
    if (v === undefined) return String(d)
    try {
      return String(parseSize(v))
    } catch {
      return v
    }
  }
  if (format === 'qcow2') {
    parts.push(`cluster_size=${num(o['cluster_size'], 65536)}`, `extended_l2=${o['extended_l2'] ?? 'off'}`)
    if (o['preallocation'] !== undefined) parts.push(`preallocation=${o['preallocation']}`)
    parts.push(`compression_type=${o['compression_type'] ?? 'zlib'}`, `size=${size}`)
    if (o['compat'] !== undefined) parts.push(`compat=${o['compat']}`)
    if (backing !== undefined) parts.push(`backing_file=${backing}`)
    if (backingFormat !== undefined) parts.push(`backing_fmt=${backingFormat}`)
    if (o['data_file'] !== undefined) parts.push(`data_file=${o['data_file']}`)
    if (o['data_file_raw'] !== undefined) parts.push(`data_file_raw=${o['data_file_raw']}`)
    parts.push(`lazy_refcounts=${o['lazy_refcounts'] ?? 'off'}`, `refcount_bits=${num(o['refcount_bits'], 16)}`)
  } else if (format === 'raw') {
    parts.push(`size=${size}`)
    if (o['preallocation'] !== undefined) parts.push(`preallocation=${o['preallocation']}`)
  } else {
    for (const [k, v] of Object.entries(o)) if (k !== 'size') parts.push(`${k}=${v}`)
    parts.push(`size=${size}`)
  }
  return parts.map((p) => ` ${p}`).join('')
}
