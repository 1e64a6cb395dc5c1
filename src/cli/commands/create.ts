import type { CommandModule } from '../command.js'
import { accumulateOptions, parseKeyValues } from '../common.js'

/** imgtool create -f qcow2 [-o opt=val,...] [-b BACKING -F FMT] FILE [SIZE] (qemu-img create's syntax) */
const create: CommandModule = {
  name: 'create',
  description: 'create a new image (qemu-img create)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'image format (qcow2, raw, vpc, vmdk, or dmsnap: a dm-snapshot COW store)', 'raw')
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
    const { UsageError, createImage, parseSize } = await import('../../index.js')
    const [file, sizeText] = args
    if (!file) throw new UsageError('Expecting image file name')
    const format = String(opts['format'] ?? 'raw')
    if (format !== 'qcow2' && format !== 'raw' && format !== 'dmsnap' && format !== 'vpc' && format !== 'vmdk')
      throw new UsageError(`Unknown file format '${format}' for create (qcow2, raw, dmsnap, vpc, vmdk)`)
    const options = parseKeyValues(opts['options'] as string | undefined)
    if (typeof opts['origin'] === 'string') options['origin'] = opts['origin']
    if (options['origin'] !== undefined && format !== 'dmsnap') throw new UsageError('--origin goes with -f dmsnap')
    await createImage(file, {
      format,
      ...(sizeText !== undefined ? { size: sizeText } : {}),
      options,
      ...(typeof opts['backing'] === 'string' ? { backingFile: opts['backing'] } : {}),
      ...(typeof opts['backingFormat'] === 'string' ? { backingFormat: opts['backingFormat'] } : {}),
      openBacking: !opts['u'],
      onPlan: (p) => {
        if (!opts['quiet'])
          io.stdout.write(`Formatting '${file}', fmt=${format}${formattingOptions(format, p.size, p.options, p.backingFile, p.backingFormat, parseSize)}\n`)
      },
    })
    return 0
  },
}
export default create

/**
 * The options part of qemu-img create's "Formatting" line: qcow2 lists its
 * options in QEMU's order with their defaults (sizes as numbers, the rest as
 * given); raw lists size, then preallocation when given; vpc and vmdk list theirs in
 * their drivers' order.
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
  } else if (format === 'vpc') {
    // block/vpc.c's create options, in their order, those given
    parts.push(`size=${size}`)
    for (const k of ['subformat', 'force_size']) if (o[k] !== undefined) parts.push(`${k}=${o[k]}`)
  } else if (format === 'vmdk') {
    // block/vmdk.c's create options in their order; compat6 and hwversion show their defaults
    parts.push(`size=${size}`)
    if (o['adapter_type'] !== undefined) parts.push(`adapter_type=${o['adapter_type']}`)
    parts.push(`compat6=${o['compat6'] ?? 'off'}`, `hwversion=${o['hwversion'] ?? 'undefined'}`)
    for (const k of ['toolsversion', 'subformat', 'zeroed_grain']) if (o[k] !== undefined) parts.push(`${k}=${o[k]}`)
  } else {
    for (const [k, v] of Object.entries(o)) if (k !== 'size') parts.push(`${k}=${v}`)
    parts.push(`size=${size}`)
  }
  return parts.map((p) => ` ${p}`).join('')
}
