import { UsageError } from '../../index.js'
import type { CommandModule } from '../command.js'

/** imgtool dd [-f FMT] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT (qemu-img dd's syntax) */
const ddCommand: CommandModule = {
  name: 'dd',
  description: 'copy blocks of an image into a new image (qemu-img dd)',
  configure(cmd) {
    cmd
      .option('-f, --format <fmt>', 'input format (probed when absent)')
      .option('-O, --output-format <fmt>', 'output format: raw, qcow2 or vpc', 'raw')
      .option('-U, --force-share', 'open the input without image locks')
      .argument('[operands...]', 'bs=BLOCK_SIZE count=BLOCKS skip=BLOCKS if=INPUT of=OUTPUT')
  },
  async run(args, opts, io) {
    const { dd, isFormatName } = await import('../../index.js')
    const o: { bs?: number; count?: number; skip?: number; if?: string; of?: string } = {}
    // as qemu-img: operands in order, the first bad one stops; a later one wins over an earlier one
    for (const arg of args) {
      const eq = arg.indexOf('=')
      const key = eq < 0 ? arg : arg.slice(0, eq)
      const value = arg.slice(eq + 1)
      if (eq < 0 || !['bs', 'count', 'skip', 'if', 'of'].includes(key)) throw new UsageError(`unrecognized operand ${eq < 0 ? arg : key}`)
      if (key === 'if') o.if = value
      else if (key === 'of') o.of = value
      else if (key === 'bs') o.bs = ddNumber('bs', value, 1, 2 ** 31 - 1)
      else o[key as 'count' | 'skip'] = ddNumber(key, value, 0, Number.MAX_SAFE_INTEGER)
    }
    if (o.if === undefined || o.of === undefined) throw new UsageError('Must specify both input and output files')
    const format = opts['format'] === undefined ? undefined : String(opts['format'])
    if (format !== undefined && !isFormatName(format)) throw new UsageError(`Unknown driver '${format}'`)
    const target = String(opts['outputFormat'] ?? 'raw')
    if (target !== 'raw' && target !== 'qcow2' && target !== 'vpc') {
      throw new UsageError(QEMU_FORMATS.has(target) ? `dd: imgtool does not write the '${target}' format (raw, qcow2, vpc)` : 'Unknown file format')
    }
    io.setGraceful?.(true)
    const r = await dd(o.if, o.of, {
      ...(format !== undefined ? { format } : {}),
      targetFormat: target,
      ...(o.bs !== undefined ? { blockSize: o.bs } : {}),
      ...(o.count !== undefined ? { count: o.count } : {}),
      ...(o.skip !== undefined ? { skip: o.skip } : {}),
      forceShare: opts['forceShare'] === true,
      ...(io.signal ? { signal: io.signal } : {}),
    })
    // qemu-img warns, leaves an empty output and succeeds (as dd(1))
    if (r.skippedPastEnd) io.stderr.write(`imgtool: ${o.if}: cannot skip to specified offset\n`)
    return 0
  },
}
export default ddCommand

/** formats qemu-img writes that imgtool does not */
const QEMU_FORMATS = new Set(['vmdk', 'vdi', 'vhdx', 'qed', 'luks', 'parallels', 'qcow', 'file'])

const UNITS: Record<string, number> = { '': 1, b: 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 }

/**
 * A dd operand's number as qemu-img takes it (qemu_strtosz: bytes, or k, M,
 * G, T, P, E suffixes), with its messages. Values that are valid to qemu but
 * past 2^53 (count=1E) are clamped to 2^53-1: no image is that large, so
 * they mean "to the end" (count) or "past the end" (skip) either way.
 */
function ddNumber(name: string, text: string, min: number, max: number): number {
  const m = /^\s*(\d+(?:\.\d*)?)([bkmgtpe]?)$/i.exec(text)
  if (!m) {
    throw new UsageError(
      `Invalid ${name} specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`,
    )
  }
  const v = Math.floor(Number(m[1]) * (UNITS[(m[2] ?? '').toLowerCase()] ?? 1))
  const limit = name === 'bs' ? max : 2 ** 63 - 1
  if (v < min || v > limit) throw new UsageError(`Invalid ${name} specified. Must be between ${min} and ${name === 'bs' ? max : '9223372036854775807'}.`)
  return Math.min(v, max)
}
