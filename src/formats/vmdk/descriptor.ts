/**
 * The VMDK text descriptor, parsed by a strict grammar (QEMU scans it with
 * strstr and sscanf; imgtool will not guess). A descriptor is lines, ended by
 * "\n" or "\r\n", up to the first NUL (an embedded descriptor is padded with
 * NULs). Each line, with leading and trailing blanks ignored, is one of:
 *
 *   (empty)
 *   # comment
 *   key = value                 key: [A-Za-z][A-Za-z0-9_.]*, value: "quoted" or one bare token
 *   ACCESS SECTORS TYPE "NAME" [OFFSET]
 *
 * ACCESS is RW, RDONLY or NOACCESS, SECTORS and OFFSET decimal, TYPE one of
 * FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, VMFSRDM, VMFSRAW, SESPARSE. version,
 * CID, parentCID and createType must each appear once. Anything else is an
 * error naming the file, the line and what is wrong.
 */
import { CorruptImageError } from '../../errors.js'
import { escapeControls, strictUtf8 } from '../../util/text.js'

export const EXTENT_TYPES = ['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'VMFSRDM', 'VMFSRAW', 'SESPARSE'] as const
export type ExtentType = (typeof EXTENT_TYPES)[number]
export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS'

export interface ExtentLine {
  line: number
  access: ExtentAccess
  sectors: bigint
  type: ExtentType
  name: string
  /** FLAT: sectors into the file where the extent starts */
  offset?: bigint
}

export interface Descriptor {
  version: number
  cid: number
  parentCid: number
  createType: string
  /** every key = value, unquoted, in file order */
  entries: Map<string, string>
  extents: ExtentLine[]
}

function fail(file: string, structure: string, baseOffset: number, line: number, what: string): never {
  throw new CorruptImageError(`vmdk: ${file}: ${structure} line ${line}: ${what}`, { file, structure, offset: baseOffset, line })
}

const KEY_RE = /^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)$/
const EXTENT_RE = /^(\S+)\s+(\S+)\s+(\S+)\s+"([^"]*)"(?:\s+(\S+))?$/
const U64_MAX = 2n ** 64n - 1n

function parseValue(raw: string): string | undefined {
  if (raw.startsWith('"')) {
    if (raw.length < 2 || !raw.endsWith('"') || raw.slice(1, -1).includes('"')) return undefined
    return raw.slice(1, -1)
  }
  if (raw === '' || /\s|"/.test(raw)) return undefined
  return raw
}

function parseCid(v: string): number | undefined {
  if (!/^[0-9a-fA-F]{1,8}$/.test(v)) return undefined
  return parseInt(v, 16)
}

function decimal(v: string): bigint | undefined {
  if (!/^[0-9]{1,20}$/.test(v)) return undefined
  const n = BigInt(v)
  return n <= U64_MAX ? n : undefined
}

/**
 * How a descriptor is read. 'strict' (validate): the whole grammar above.
 * 'qemu' (opening an image): the lines that decide what is read stay strict
 * (CID, parentCID, parentFileNameHint, and in a descriptor file createType and
 * every line whose first word is RW, RDONLY or NOACCESS); the lines QEMU never
 * reads are read as QEMU reads them: ignored when they do not parse (ddb.*,
 * version, unknown keys, stray text, a key given twice). `hosted`: the
 * descriptor embedded in a sparse file, where QEMU reads only CID, parentCID
 * and parentFileNameHint (block/vmdk.c: strstr in the 20 sectors at 0x200);
 * createType and extent lines are then not read either.
 */
export interface ParseOptions {
  mode?: 'strict' | 'qemu'
  hosted?: boolean
}

/** keys whose values decide what is read: refused when malformed, in every mode */
const DECIDING_KEYS = new Set(['CID', 'parentCID', 'parentFileNameHint'])

/**
 * Parse descriptor bytes. `structure` names where they sit ('descriptor' in
 * a descriptor file, 'embedded descriptor' in a sparse extent) and
 * `baseOffset` their host offset, for messages.
 */
export function parseDescriptor(bytes: Uint8Array, file: string, structure = 'descriptor', baseOffset = 0, options: ParseOptions = {}): Descriptor {
  const lenient = options.mode === 'qemu'
  const hosted = lenient && (options.hosted ?? false)
  const deciding = (key: string): boolean => !lenient || DECIDING_KEYS.has(key) || (key === 'createType' && !hosted)
  const nul = bytes.indexOf(0)
  const body = nul < 0 ? bytes : bytes.subarray(0, nul)
  // QEMU reads bytes, not UTF-8: in 'qemu' mode a byte that is not UTF-8 is kept as U+FFFD (only the
  // deciding lines must parse, and their grammar is ASCII)
  const text = lenient ? new TextDecoder('utf-8', { fatal: false }).decode(body) : strictUtf8(body)
  if (text === undefined) fail(file, structure, baseOffset, 1 + countLines(body), 'not valid UTF-8 text')
  const lines = text.split('\n')
  const entries = new Map<string, string>()
  const extents: ExtentLine[] = []
  for (let i = 0; i < lines.length; i++) {
    const n = i + 1
    let l = lines[i]!
    if (l.endsWith('\r')) l = l.slice(0, -1)
    l = l.trim()
    if (l === '' || l.startsWith('#')) continue
    const kv = KEY_RE.exec(l)
    const extentLike = !kv && /^(RW|RDONLY|NOACCESS)(\s|$)/.test(l)
    if (/[\u0000-\u0008\u000b-\u001f\u007f]/.test(l)) {
      if (!lenient || (kv && deciding(kv[1]!)) || (extentLike && !hosted)) fail(file, structure, baseOffset, n, 'control character in the line')
      continue
    }
    if (kv) {
      const key = kv[1]!
      const value = parseValue(kv[2]!.trim())
      if (!deciding(key)) {
        // a line QEMU does not read: kept when it parses, the first of a key given twice
        if (value !== undefined && !entries.has(key)) entries.set(key, value)
        continue
      }
      if (value === undefined)
        fail(file, structure, baseOffset, n, `value of '${key}' is neither a "quoted string" nor one bare word: ${escapeControls(kv[2]!)}`)
      if (entries.has(key)) fail(file, structure, baseOffset, n, `'${key}' given a second time`)
      entries.set(key, value)
      continue
    }
    const ex = EXTENT_RE.exec(l)
    if (lenient && (hosted || !extentLike)) {
      // QEMU skips a line whose first word is not RW, and reads no extent line of a hosted file
      if (ex && hosted) {
        try {
          extents.push(extentLine(ex, n, file, structure, baseOffset))
        } catch {
          // not read
        }
      }
      continue
    }
    if (!ex) fail(file, structure, baseOffset, n, `not a comment, a key = value line or an extent line: ${escapeControls(l.slice(0, 80))}`)
    extents.push(extentLine(ex, n, file, structure, baseOffset))
  }
  const need = (key: string): string => {
    const v = entries.get(key)
    if (v === undefined) fail(file, structure, baseOffset, lines.length, `no '${key}' line`)
    return v
  }
  let version = 1
  if (!lenient) {
    const versionText = need('version')
    if (!/^[123]$/.test(versionText)) fail(file, structure, baseOffset, lineOf(lines, 'version'), `version ${escapeControls(versionText)} (1, 2 or 3)`)
    version = Number(versionText)
  } else {
    const v = entries.get('version')
    if (v !== undefined && /^[123]$/.test(v)) version = Number(v)
  }
  const cid = parseCid(need('CID'))
  if (cid === undefined) fail(file, structure, baseOffset, lineOf(lines, 'CID'), `CID is not 1 to 8 hex digits`)
  const parentCid = parseCid(need('parentCID'))
  if (parentCid === undefined) fail(file, structure, baseOffset, lineOf(lines, 'parentCID'), `parentCID is not 1 to 8 hex digits`)
  const createType = hosted ? (entries.get('createType') ?? '') : need('createType')
  return { version, cid, parentCid, createType, entries, extents }
}

function extentLine(ex: RegExpExecArray, n: number, file: string, structure: string, baseOffset: number): ExtentLine {
  const [, access, sectorsText, type, name, offsetText] = ex
  if (access !== 'RW' && access !== 'RDONLY' && access !== 'NOACCESS')
    fail(file, structure, baseOffset, n, `extent access '${access}' (RW, RDONLY or NOACCESS)`)
  const sectors = decimal(sectorsText!)
  if (sectors === undefined || sectors === 0n) fail(file, structure, baseOffset, n, `extent size '${sectorsText}' is not a positive number of sectors`)
  if (!(EXTENT_TYPES as readonly string[]).includes(type!)) fail(file, structure, baseOffset, n, `extent type '${type}' (${EXTENT_TYPES.join(', ')})`)
  const t = type as ExtentType
  if (name === '') fail(file, structure, baseOffset, n, 'extent file name is empty')
  const out: ExtentLine = { line: n, access, sectors, type: t, name: name! }
  if (t === 'FLAT' || t === 'VMFSRDM' || t === 'VMFSRAW') {
    if (t === 'FLAT' && offsetText === undefined) fail(file, structure, baseOffset, n, 'a FLAT extent needs its offset in sectors after the file name')
    if (offsetText !== undefined) {
      const off = decimal(offsetText)
      if (off === undefined) fail(file, structure, baseOffset, n, `extent offset '${offsetText}' is not a number of sectors`)
      out.offset = off
    }
  } else if (offsetText !== undefined) {
    fail(file, structure, baseOffset, n, `a ${t} extent takes no offset after the file name`)
  }
  return out
}

function lineOf(lines: string[], key: string): number {
  const i = lines.findIndex((l) => new RegExp(`^\\s*${key}\\s*=`).test(l))
  return i < 0 ? lines.length : i + 1
}

function countLines(b: Uint8Array): number {
  let n = 0
  for (const c of b) if (c === 10) n++
  return n
}

/** True when bytes look like a descriptor file (the probe: "# Disk DescriptorFile" first). */
export function looksLikeDescriptor(head: Uint8Array): boolean {
  const sig = '# Disk DescriptorFile'
  if (head.length < sig.length) return false
  for (let i = 0; i < sig.length; i++) if (head[i] !== sig.charCodeAt(i)) return false
  return true
}

export interface DescriptorText {
  cid: number
  parentCid: number
  createType: string
  extents: Array<{ access: ExtentAccess; sectors: number; type: ExtentType; name: string; offset?: number }>
  ddb: Array<[string, string]>
}

/** CIDs as qemu writes them (block/vmdk.c: `%x`, no leading zeros) */
const hexCid = (n: number): string => (n >>> 0).toString(16)

/** A descriptor as qemu-img writes one. */
export function formatDescriptor(d: DescriptorText): string {
  let s = `# Disk DescriptorFile\nversion=1\nCID=${hexCid(d.cid)}\nparentCID=${hexCid(d.parentCid)}\ncreateType="${d.createType}"\n\n# Extent description\n`
  for (const e of d.extents) s += `${e.access} ${e.sectors} ${e.type} "${e.name}"${e.offset !== undefined ? ` ${e.offset}` : ''}\n`
  s += '\n# The Disk Data Base\n#DDB\n\n'
  for (const [k, v] of d.ddb) s += `${k} = "${v}"\n`
  return s
}
