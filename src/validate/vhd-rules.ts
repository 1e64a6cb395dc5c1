/**
 * VHD (qemu's `vpc`) identity, references and limits from the footer and the
 * dynamic disk header, decoded here from Microsoft's VHD specification so that
 * a footer the reader refuses is still reported field by field. A
 * differencing disk's parent (parent name, parent locators) is reported and
 * never opened. The structural check is the format's own (`imgtool check`).
 */
import type { BlockDevice } from '../io/block-device.js'
import { u32be, u64be } from '../util/bytes.js'
import type { Policy, VhdSubformat } from './policy.js'
import { overMemoryLimit } from './limits.js'
import type { ViolationSink } from './report.js'
import type { SignatureHit } from './signatures.js'

const FOOTER = 512
const HEADER = 1024
const MAX_LOCATOR_BYTES = 64 * 1024
const TYPES: Record<number, VhdSubformat> = { 2: 'fixed', 3: 'dynamic', 4: 'differencing' }

export interface VhdFacts {
  subformat: VhdSubformat | undefined
  /** where the footer that describes the disk is: 0 for sparse disks (the head copy), the last sector for fixed ones */
  footerOffset: number
  /** the footer and, for sparse disks, the dynamic header decode: the image can be opened */
  valid: boolean
  /** a parent is named (differencing disk) */
  hasReferences: boolean
  /** metadata the check holds: the BAT and one sector bitmap */
  metadataBytes: number
  /** a table larger than the limits: nothing more is read */
  overLimit: boolean
}

const ascii = (b: Uint8Array, at: number, n: number): string => String.fromCharCode(...b.subarray(at, at + n))

/** One's complement of the byte sum, the 4 checksum bytes counted as zero. */
function checksum(b: Uint8Array, at: number): number {
  let sum = 0
  for (let i = 0; i < b.length; i++) if (i < at || i >= at + 4) sum += b[i]!
  return ~sum >>> 0
}

export async function vhdRules(dev: BlockDevice, hits: readonly SignatureHit[], policy: Policy, sink: ViolationSink): Promise<VhdFacts> {
  const head = hits.some((h) => h.signature === 'vhd' && h.offset === 0)
  const footerOffset = head ? 0 : (hits.find((h) => h.signature === 'vhd')?.offset ?? dev.size - FOOTER)
  const facts: VhdFacts = { subformat: undefined, footerOffset, valid: false, hasReferences: false, metadataBytes: 0, overLimit: false }
  if (dev.size < footerOffset + FOOTER) {
    sink.add('TRUNCATED', `VHD footer truncated: the file is ${dev.size} bytes, a footer needs 512`, { structure: 'footer', offset: footerOffset })
    return facts
  }
  const footer = await dev.read(footerOffset, FOOTER, 'footer')
  const stored = u32be(footer, 64)
  const sum = checksum(footer, 64)
  let ok = true
  if (stored !== sum) {
    sink.add('HEADER_INVALID', `VHD footer checksum 0x${stored.toString(16)} does not match 0x${sum.toString(16)}`, {
      structure: 'footer checksum',
      offset: footerOffset + 64,
    })
    ok = false
  }
  const type = u32be(footer, 60)
  const subformat = TYPES[type]
  facts.subformat = subformat
  if (subformat === undefined) {
    sink.add('HEADER_INVALID', `VHD disk type ${type} is not fixed (2), dynamic (3) or differencing (4)`, {
      structure: 'footer disk type',
      offset: footerOffset + 60,
    })
    return facts
  }
  // a sparse disk starts with its footer copy; a fixed disk has its footer only at the end
  if ((subformat === 'fixed') !== !head) {
    sink.add(
      'HEADER_INVALID',
      head
        ? `a ${subformat} VHD footer at the start of the file must describe a dynamic or differencing disk`
        : `a ${subformat} VHD has no footer copy at the start of the file`,
      { structure: 'footer disk type', offset: footerOffset + 60 },
    )
    return facts
  }
  if (!policy.vhd.subformats.includes(subformat)) {
    sink.add('VHD_SUBFORMAT', `VHD subformat ${subformat} is not allowed (allowed: ${policy.vhd.subformats.join(', ') || 'none'})`, {
      structure: 'footer disk type',
      offset: footerOffset + 60,
    })
  }
  if (subformat === 'fixed') {
    facts.valid = ok
    return facts
  }

  // dynamic header: where the footer's data offset says
  const headerAt = u64be(footer, 16)
  if (headerAt + BigInt(HEADER) > BigInt(dev.size)) {
    sink.add('TRUNCATED', `VHD dynamic header at 0x${headerAt.toString(16)} ends past the end of the file (${dev.size} bytes)`, {
      structure: 'footer data offset',
      offset: footerOffset + 16,
    })
    return facts
  }
  const at = Number(headerAt)
  const header = await dev.read(at, HEADER, 'header')
  if (ascii(header, 0, 8) !== 'cxsparse') {
    sink.add('HEADER_INVALID', `no VHD dynamic header ('cxsparse') at 0x${at.toString(16)}`, { structure: 'dynamic header cookie', offset: at })
    return facts
  }
  const hStored = u32be(header, 36)
  const hSum = checksum(header, 36)
  if (hStored !== hSum) {
    sink.add('HEADER_INVALID', `VHD dynamic header checksum 0x${hStored.toString(16)} does not match 0x${hSum.toString(16)}`, {
      structure: 'dynamic header checksum',
      offset: at + 36,
    })
    ok = false
  }
  const batAt = u64be(header, 16)
  const entries = u32be(header, 28)
  const blockSize = u32be(header, 32)
  const batBytes = entries * 4
  facts.metadataBytes = batBytes + Math.ceil(blockSize / 512 / 8 / 512) * 512
  if (overMemoryLimit(facts.metadataBytes, 'the BAT and a sector bitmap', { structure: 'dynamic header', offset: at + 28 }, policy, sink))
    facts.overLimit = true
  if (batBytes > policy.limits.maxTableBytes) {
    sink.add('LIMIT_TABLE_SIZE', `BAT of ${entries} entries (${batBytes} bytes) is larger than limits.maxTableBytes ${policy.limits.maxTableBytes}: not read`, {
      structure: 'dynamic header max table entries',
      offset: at + 28,
    })
    facts.overLimit = true
  }
  if (batAt + BigInt(batBytes) > BigInt(dev.size)) {
    sink.add('TRUNCATED', `BAT of ${entries} entries at 0x${batAt.toString(16)} ends past the end of the file (${dev.size} bytes)`, {
      structure: 'BAT',
      offset: at + 16,
    })
    ok = false
  }
  facts.valid = ok
  if (subformat === 'differencing') {
    facts.hasReferences = true
    await parentRules(dev, header, at, policy, sink)
  }
  return facts
}

function utf16(b: Uint8Array, littleEndian: boolean): string {
  let s = ''
  for (let i = 0; i + 1 < b.length; i += 2) {
    const c = littleEndian ? b[i]! | (b[i + 1]! << 8) : (b[i]! << 8) | b[i + 1]!
    if (c === 0) break
    s += String.fromCharCode(c)
  }
  return s
}

/** The parent name and every parent locator: each name reported with the rules a qcow2 backing name gets, none opened. */
async function parentRules(dev: BlockDevice, header: Uint8Array, headerAt: number, policy: Policy, sink: ViolationSink): Promise<void> {
  const names: Array<{ source: string; name: string; offset: number }> = []
  const parentName = utf16(header.subarray(64, 576), false)
  if (parentName) names.push({ source: 'parent name', name: parentName, offset: headerAt + 64 })
  for (let i = 0; i < 8; i++) {
    const e = headerAt + 576 + 24 * i
    const rel = 576 + 24 * i
    const platform = ascii(header, rel, 4)
    const length = u32be(header, rel + 8)
    const dataAt = u64be(header, rel + 16)
    if (platform === '\0\0\0\0' || length === 0) continue
    const source = `parent locator ${i} (${platform.replace(/\0/g, ' ').trim()})`
    if (length > MAX_LOCATOR_BYTES || dataAt + BigInt(length) > BigInt(dev.size)) {
      sink.add('TRUNCATED', `${source}: ${length} bytes at 0x${dataAt.toString(16)} do not lie inside the file (${dev.size} bytes)`, {
        structure: 'parent locator',
        offset: e,
      })
      continue
    }
    const bytes = await dev.read(Number(dataAt), length, 'header')
    const name = platform === 'MacX' ? new TextDecoder().decode(bytes).replace(/\0.*$/s, '') : utf16(bytes, true)
    if (name) names.push({ source, name, offset: Number(dataAt) })
  }
  if (names.length === 0) {
    sink.add('HEADER_INVALID', 'a differencing VHD that names no parent', { structure: 'dynamic header parent name', offset: headerAt + 64 })
    return
  }
  if (!policy.references.backingFile) {
    for (const n of names)
      sink.add('BACKING_FILE', `differencing disk: ${n.source} names parent '${n.name}'; not opened`, { structure: n.source, offset: n.offset })
  }
  for (const n of names) {
    const where = { structure: `${n.source} name`, offset: n.offset }
    const posix = (n.name.startsWith('file://') ? n.name.slice('file://'.length) : n.name).replace(/\\/g, '/')
    const drive = /^[A-Za-z]:\//.test(posix)
    const protocol = /^[^:/]*:/.exec(posix)
    if (protocol && !drive && !policy.references.protocolNames)
      sink.add('PROTOCOL_NAME', `parent name '${n.name}' selects protocol '${protocol[0].slice(0, -1)}'`, where)
    if (posix.split('/').includes('..') && !policy.references.parentDirNames) sink.add('PARENT_DIR_NAME', `parent name '${n.name}' climbs with '..'`, where)
    if ((posix.startsWith('/') || drive) && !policy.references.absoluteNames) sink.add('ABSOLUTE_NAME', `parent name '${n.name}' is an absolute path`, where)
  }
}
