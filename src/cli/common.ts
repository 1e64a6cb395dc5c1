/** Options shared by commands that open one image, parsed with zod. */
import type { Command } from 'commander'
import { createRequire } from 'node:module'
import { FORMAT_NAMES, UsageError, isFormatName, parseSize, type FormatName } from '../index.js'

/**
 * zod costs ~30 ms to load, more than reading a 1 TiB image's map takes; the
 * enum checks every command makes are done without it, and it is loaded only
 * where a schema is worth it.
 */
let zod: typeof import('zod') | undefined
function z(): typeof import('zod').z {
  zod ??= createRequire(import.meta.url)('zod') as typeof import('zod')
  return zod.z
}

export function addImageOptions(cmd: Command): Command {
  return cmd
    .option('-f, --format <fmt>', `image format (${FORMAT_NAMES.join(', ')}); probed when absent`)
    .option('-o, --options <opts>', 'format options as key=value[,key=value...] (e.g. origin=ORIGIN for dmsnap); may be repeated', accumulateOptions)
    .option('--origin <path>', 'dm-snapshot origin device or file (same as -o origin=PATH)')
}

/** --image-opts: the image argument(s) given as driver=FMT,file.filename=PATH (parseImageOptsArg) */
export function addImageOptsOption(cmd: Command): Command {
  return cmd.option('--image-opts', 'image arguments are driver=FMT,file.filename=PATH (qemu-img --image-opts; simple spellings only)')
}

export function addOutputOption(cmd: Command): Command {
  return cmd.option('--output <fmt>', 'output format: human or json', 'human').option('--json', 'same as --output json')
}

export interface ImageArgs {
  format: FormatName | undefined
  options: Record<string, string>
}

export function parseImageOptions(opts: Record<string, unknown>): ImageArgs {
  let format: FormatName | undefined
  if (opts['format'] !== undefined) {
    const f = opts['format']
    if (typeof f !== 'string' || !isFormatName(f)) throw new UsageError(`Unknown file format '${String(f)}' (known: ${FORMAT_NAMES.join(', ')})`)
    format = f
  }
  const options = parseKeyValues(opts['options'] as string | undefined)
  if (typeof opts['origin'] === 'string') options['origin'] = opts['origin']
  return { format, options }
}

/**
 * Commander's collector for a repeated -o: every -o counts, joined with ','
 * as qemu-img joins them (accumulate_options), so a later key overrides an
 * earlier one and the other keys stay: `-o cluster_size=4k -o lazy_refcounts=on`
 * is `cluster_size=4k,lazy_refcounts=on`. Use it as the option's parser:
 * `.option('-o, --options <opts>', '...', accumulateOptions)`.
 */
export function accumulateOptions(value: string, previous: string | undefined): string {
  return previous === undefined ? value : `${previous},${value}`
}

/** qemu-img's -o syntax: key=value,key=value (a doubled comma is a literal comma); a later key wins. */
export function parseKeyValues(text: string | undefined): Record<string, string> {
  const out: Record<string, string> = {}
  if (!text) return out
  const parts = text.replace(/,,/g, '\u0000').split(',')
  for (const p of parts) {
    if (!p) continue
    const eq = p.indexOf('=')
    const key = (eq < 0 ? p : p.slice(0, eq)).trim()
    const value = (eq < 0 ? 'on' : p.slice(eq + 1)).replace(/\u0000/g, ',')
    if (!key) throw new UsageError(`invalid option '${p}' in '${text}'`)
    out[key] = value
  }
  return out
}

export type OutputMode = 'human' | 'json'

export function parseOutput(opts: Record<string, unknown>): OutputMode {
  if (opts['json']) return 'json'
  const o = opts['output'] ?? 'human'
  if (o !== 'human' && o !== 'json') throw new UsageError(`--output must be 'human' or 'json', not '${String(opts['output'])}'`)
  return o
}

export function oneImageArg(args: string[], what = 'image file name'): string {
  if (args.length !== 1) throw new UsageError(`Expecting one ${what}`)
  return args[0]!
}

export function nonNegativeInt(text: unknown, what: string): number | undefined {
  if (text === undefined) return undefined
  const r = z().coerce.number().int().nonnegative().safeParse(text)
  if (!r.success) throw new UsageError(`${what} must be a non-negative whole number, not '${String(text)}'`)
  return r.data
}

/**
 * JSON as qemu-img prints it: 4-space indentation, newline at the end, and
 * strings ASCII only: every character outside 0x20..0x7e is \uXXXX with
 * uppercase hex (a file name "café" is "caf\u00E9"; \n, \t and the other
 * short escapes stay short).
 */
export function printJson(stdout: NodeJS.WritableStream, value: unknown): void {
  stdout.write(qemuJson(value) + '\n')
}

/** JSON.stringify with 4 spaces, a bigint printed as the exact integer it is (u64 values above 2^53) */
export function jsonText(value: unknown): string {
  let big = false
  const mark = `\u0000big${Math.random().toString(36).slice(2)}:`
  const text = JSON.stringify(
    value,
    (_k, v: unknown) => {
      if (typeof v !== 'bigint') return v
      big = true
      return mark + v.toString()
    },
    4,
  )
  if (!big) return text
  const escaped = JSON.stringify(mark)
    .slice(1, -1)
    .replace(/[.*+?^${}()|[\]\\]/g, '\\$&')
  return text.replace(new RegExp(`"${escaped}(-?\\d+)"`, 'g'), '$1')
}

/** jsonText with qemu's string escaping (see printJson) */
export function qemuJson(value: unknown): string {
  // left to right: an escaped backslash is taken whole, never read as the start of a \\u escape
  return jsonText(value).replace(/\\u[0-9a-f]{4}|\\.|[\u007f-\uffff]/g, (m) => {
    if (m.length === 1) return `\\u${m.charCodeAt(0).toString(16).toUpperCase().padStart(4, '0')}`
    return m.length === 6 ? m.toUpperCase().replace('\\U', '\\u') : m
  })
}

/**
 * qemu-img's -l (convert, measure): `snapshot.id=ID[,snapshot.name=NAME]` (qemu's internal snapshot
 * options), or a bare word tried as an id, then as a name.
 */
export function parseSnapshotParam(text: string): import('../index.js').SnapshotSelector {
  if (!text.startsWith('snapshot.')) return { idOrName: text }
  const sel: { id?: string; name?: string } = {}
  for (const part of text.replace(/,,/g, '\u0000').split(',')) {
    if (!part) continue
    const eq = part.indexOf('=')
    const key = eq < 0 ? part : part.slice(0, eq)
    const value = eq < 0 ? '' : part.slice(eq + 1).replace(/\u0000/g, ',')
    if (key === 'snapshot.id') sel.id = value
    else if (key === 'snapshot.name') sel.name = value
    else throw new UsageError(`Invalid parameter '${key.replace(/\u0000/g, ',')}'\nFailed in parsing snapshot param '${text}'`)
  }
  return sel
}

/**
 * qemu-img's --image-opts / --target-image-opts, in the simple spellings scripts use:
 * `driver=FMT,file.filename=PATH` (`file.driver=file` allowed; without `driver` the format is probed).
 * Anything else is refused: imgtool opens files by path, not through QEMU's block layer.
 */
export function parseImageOptsArg(text: string): { path: string; format: FormatName | undefined } {
  const kv: Record<string, string> = {}
  for (const part of text.replace(/,,/g, '\u0000').split(',')) {
    if (!part) continue
    const eq = part.indexOf('=')
    const key = eq < 0 ? part : part.slice(0, eq)
    if (eq < 0 || !['driver', 'file.filename', 'file.driver'].includes(key)) {
      throw new UsageError(
        `Could not open '${text}': imgtool takes --image-opts as driver=FMT,file.filename=PATH[,file.driver=file] only (not '${key.replace(/\u0000/g, ',')}')`,
      )
    }
    kv[key] = part.slice(eq + 1).replace(/\u0000/g, ',')
  }
  if (kv['file.driver'] !== undefined && kv['file.driver'] !== 'file') {
    throw new UsageError(`Could not open '${text}': imgtool reads local files only (file.driver=file), not file.driver=${kv['file.driver']}`)
  }
  const path = kv['file.filename']
  if (path === undefined || path === '') throw new UsageError(`Could not open '${text}': A block device must be specified for "file"`)
  const driver = kv['driver']
  if (driver !== undefined && !isFormatName(driver)) throw new UsageError(`Could not open '${text}': Unknown driver '${driver}'`)
  return { path, format: driver }
}

/**
 * The one image argument of info, check, map, cat: with --image-opts it is parsed as qemu-img's image
 * options (and -f is refused, as qemu-img refuses it).
 */
export function imageArg(args: string[], opts: Record<string, unknown>): ImageArgs & { path: string } {
  const path = oneImageArg(args)
  if (opts['imageOpts'] !== true) return { path, ...parseImageOptions(opts) }
  if (opts['format'] !== undefined) throw new UsageError('--image-opts and --format are mutually exclusive')
  const o = parseImageOptsArg(path)
  return { ...parseImageOptions(opts), path: o.path, format: o.format }
}

/** qemu-img's -r RATE (convert, commit): bytes per second with qemu's suffixes; 0 is no limit. */
export function parseRateLimit(text: unknown): number | undefined {
  if (text === undefined) return undefined
  try {
    return parseSize(String(text), 'rate limit')
  } catch {
    throw new UsageError(
      'Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\nkilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    )
  }
}
