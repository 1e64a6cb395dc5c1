/**
 * A differencing disk's parent, found through its parent locators and the
 * header's parent name. Names are confined as qcow2 backing files are: a
 * relative name is taken relative to the child's directory, an absolute name
 * is used as it is, and a name QEMU would read as a protocol (`x:...`, which
 * includes Windows drive letters) is never opened.
 */
import { CorruptImageError, UnsupportedFeatureError, hex, isImgtoolError } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import type { OpenContext, OpenImageOptions } from '../../image/context.js'
import type { DiskImage } from '../../image/disk-image.js'
import type { DynamicHeader } from './spec.js'

export interface ParentCandidate {
  /** where the name came from: a locator's platform code, or 'parent name' */
  source: string
  name: string
  offset: number
}

const MAX_LOCATOR_BYTES = 64 * 1024

function utf16(b: Uint8Array, littleEndian: boolean): string {
  let s = ''
  for (let i = 0; i + 1 < b.byteLength; i += 2) {
    const c = littleEndian ? b[i]! | (b[i + 1]! << 8) : (b[i]! << 8) | b[i + 1]!
    if (c === 0) break
    s += String.fromCharCode(c)
  }
  return s
}

/** Windows and Mac spellings turned into the path a POSIX host opens. */
function posixName(name: string): string {
  let n = name
  if (n.startsWith('file://')) n = decodeURIComponent(n.slice('file://'.length))
  n = n.replace(/\\/g, '/')
  while (n.startsWith('./')) n = n.slice(2)
  return n
}

/** The names a differencing disk gives for its parent, most specific first. */
export async function parentCandidates(device: BlockDevice, header: DynamicHeader, headerOffset: number): Promise<ParentCandidate[]> {
  const file = device.name
  const out: ParentCandidate[] = []
  const order = ['W2ru', 'W2ku', 'MacX']
  const locs = header.locators
    .map((l, i) => ({ ...l, i }))
    .filter((l) => order.includes(l.platform) && l.dataLength > 0)
    .sort((a, b) => order.indexOf(a.platform) - order.indexOf(b.platform))
  for (const l of locs) {
    const at = Number(l.dataOffset)
    if (l.dataLength > MAX_LOCATOR_BYTES || l.dataOffset > BigInt(device.size) || at + l.dataLength > device.size) {
      throw new CorruptImageError(
        `vpc: ${file}: parent locator ${l.i} (${l.platform}) at ${hex(headerOffset + 576 + 24 * l.i)}: ${l.dataLength} bytes at ${hex(l.dataOffset)} do not lie inside the file (size ${hex(device.size)})`,
        { file, structure: 'parent locator', offset: headerOffset + 576 + 24 * l.i },
      )
    }
    const bytes = await device.read(at, l.dataLength, 'header')
    const name = l.platform === 'MacX' ? new TextDecoder().decode(bytes).replace(/\0.*$/s, '') : utf16(bytes, true)
    if (name) out.push({ source: `parent locator ${l.i} (${l.platform})`, name: posixName(name), offset: at })
  }
  if (header.parentName) out.push({ source: 'parent name', name: posixName(header.parentName), offset: headerOffset + 64 })
  return out
}

/** A name QEMU would hand to a protocol driver (a ':' before any '/'); Windows drive letters are among them. */
function protocolOf(name: string): string | undefined {
  const m = /^[^:/]*:/.exec(name)
  return m ? m[0].slice(0, -1) : undefined
}

function combine(base: string, name: string): string {
  if (name.startsWith('/')) return name
  const slash = base.lastIndexOf('/')
  return slash < 0 ? name : base.slice(0, slash + 1) + name
}

/** Open the parent: the first candidate that names a plain file which exists. */
export async function openParent(
  device: BlockDevice,
  header: DynamicHeader,
  headerOffset: number,
  context: OpenContext,
  options: OpenImageOptions,
): Promise<DiskImage> {
  const file = device.name
  const candidates = await parentCandidates(device, header, headerOffset)
  const refused: string[] = []
  for (const c of candidates) {
    const protocol = protocolOf(c.name)
    if (protocol !== undefined) {
      refused.push(`${c.source} '${c.name}' names '${protocol}:' (not a plain file name)`)
      continue
    }
    const path = combine(file, c.name)
    try {
      return await context.openImage(path, { readOnly: true, depth: (options.depth ?? 0) + 1, chain: options.chain ?? [] })
    } catch (e) {
      if (isImgtoolError(e) && e.code === 'NOT_FOUND') {
        refused.push(`${c.source} '${c.name}': no such file`)
        continue
      }
      throw e
    }
  }
  throw new UnsupportedFeatureError(
    `vpc: ${file}: the parent of this differencing disk cannot be opened: ${refused.length ? refused.join('; ') : 'it names no parent'} (dynamic header at ${hex(headerOffset)})`,
    { file, structure: 'parent locator', offset: headerOffset },
  )
}
