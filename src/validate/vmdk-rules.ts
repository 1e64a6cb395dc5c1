/**
 * VMDK identity, references and limits from the hosted sparse header ("KDMV")
 * and the text descriptor (embedded, or the file itself), read here from the
 * bytes and judged by the format's own codec and strict descriptor grammar
 * (formats/vmdk/index.ts). Extent files and a delta disk's parent are
 * reported, never opened: validation reads this one file. The structural
 * check is the format's own (`imgtool check`) and runs only on a hosted
 * sparse file that names no parent (its extent is the file itself).
 */
import { CorruptImageError } from '../errors.js'
import type { BlockDevice } from '../io/block-device.js'
import { escapeControls } from '../util/text.js'
import {
  GD_AT_END,
  MAX_DESCRIPTOR_BYTES,
  MAX_GD_ENTRIES,
  SPARSE_MAGIC,
  decodeHeader,
  parseDescriptor,
  type Descriptor,
  type SparseHeader,
} from '../formats/vmdk/index.js'
import type { Policy, VmdkCreateType, VmdkVersion } from './policy.js'
import { overMemoryLimit } from './limits.js'
import type { ViolationSink } from './report.js'
import type { SignatureHit } from './signatures.js'

const SECTOR = 512
const HEADER = 512
/** what the reader holds besides the directories: its grain table cache (formats/vmdk/grains.ts) */
const GT_CACHE_BYTES = 4 * 1024 * 1024
const MAX_GRAIN_SECTORS = 0x200000
const MAX_GTES_PER_GT = 512
/** parentCID of a disk without a parent */
const NO_PARENT = 0xffffffff

export interface VmdkFacts {
  /** the header (if any) and the descriptor decode: the image can be opened */
  valid: boolean
  /** "KDMV" at 0: a hosted sparse extent with its descriptor embedded */
  hosted: boolean
  createType: string | undefined
  /** the hosted sparse header's version */
  version: number | undefined
  /** extent files or a parent are named: the guest bytes depend on files not opened */
  hasReferences: boolean
  /** why the structural check cannot run on this file alone (it names the files it would need) */
  structureSkip: string | undefined
  virtualSize: number | undefined
  /** a table larger than the limits: nothing more is read */
  overLimit: boolean
}

export async function vmdkRules(dev: BlockDevice, hits: readonly SignatureHit[], policy: Policy, sink: ViolationSink): Promise<VmdkFacts> {
  const hosted = hits.some((h) => h.signature === 'vmdk' && h.offset === 0)
  const facts: VmdkFacts = {
    valid: false,
    hosted,
    createType: undefined,
    version: undefined,
    hasReferences: false,
    structureSkip: undefined,
    virtualSize: undefined,
    overLimit: false,
  }
  let text: Uint8Array
  let textAt = 0
  let header: SparseHeader | undefined
  const structure = hosted ? 'embedded descriptor' : 'descriptor'
  if (hosted) {
    header = await sparseHeader(dev, policy, sink, facts)
    if (!header) return facts
    const atBig = header.descriptorOffset * BigInt(SECTOR)
    const sizeBig = header.descriptorSize * BigInt(SECTOR)
    if (atBig === 0n || sizeBig === 0n) {
      sink.add('HEADER_INVALID', 'VMDK header names no embedded descriptor (descriptor offset or size is 0)', {
        structure: 'header descriptorOffset',
        offset: 28,
      })
      return facts
    }
    const want = sizeBig < BigInt(MAX_DESCRIPTOR_BYTES) ? Number(sizeBig) : MAX_DESCRIPTOR_BYTES
    if (atBig + BigInt(want) > BigInt(dev.size)) {
      sink.add('TRUNCATED', `VMDK embedded descriptor of ${sizeBig} bytes at 0x${atBig.toString(16)} ends past the end of the file (${dev.size} bytes)`, {
        structure: 'header descriptorOffset',
        offset: 28,
      })
      return facts
    }
    textAt = Number(atBig)
    text = await dev.read(textAt, want, 'header')
  } else {
    if (dev.size > MAX_DESCRIPTOR_BYTES) {
      sink.add('HEADER_INVALID', `a VMDK descriptor file of ${dev.size} bytes (at most 1 MiB)`, { structure: 'descriptor', offset: 0 })
      return facts
    }
    text = await dev.read(0, dev.size, 'header')
  }

  let d: Descriptor
  try {
    d = parseDescriptor(text, dev.name, structure, textAt)
  } catch (e) {
    if (!(e instanceof CorruptImageError)) throw e
    sink.add('VMDK_DESCRIPTOR', e.message.replace(`vmdk: ${dev.name}: `, ''), { structure, offset: textAt })
    // a descriptor file the grammar refuses may still name files: report every extent-like line
    if (!hosted) scanExtents(text, policy, sink)
    return facts
  }
  facts.createType = d.createType
  createTypeRules(d, header, textAt, structure, policy, sink)
  if (header) {
    // QEMU sizes a hosted file by its header, VMware by the descriptor: two readers must not see two disks
    const x = d.extents
    if (x.length !== 1 || x[0]!.sectors !== header.capacity) {
      sink.add(
        'VMDK_DESCRIPTOR',
        x.length !== 1
          ? `embedded descriptor has ${x.length} extent lines; a hosted sparse file is one extent of ${header.capacity} sectors`
          : `embedded descriptor line ${x[0]!.line}: an extent of ${x[0]!.sectors} sectors, but the header's capacity is ${header.capacity}`,
        { structure, offset: x.length === 1 ? textAt + lineOffset(text, x[0]!.line) : textAt },
      )
    }
  }
  if (d.parentCid !== NO_PARENT || d.entries.has('parentFileNameHint')) {
    facts.hasReferences = true
    facts.structureSkip = 'a delta disk: imgtool does not open VMDK delta disks (their grains fall through to the parent)'
    parentRules(d, text, textAt, structure, policy, sink)
  }
  if (!hosted) {
    if (d.extents.length === 0) {
      sink.add('VMDK_DESCRIPTOR', `descriptor names no extent`, { structure, offset: 0 })
      return facts
    }
    facts.hasReferences = true
    facts.structureSkip ??= 'the extents are other files, which validation does not open'
    let sectors = 0n
    for (const x of d.extents) {
      sectors += x.sectors
      extentRules(x.type, x.name, { structure: `descriptor line ${x.line} extent`, offset: lineOffset(text, x.line) }, policy, sink)
    }
    const size = sectors * BigInt(SECTOR)
    if (size <= BigInt(Number.MAX_SAFE_INTEGER)) facts.virtualSize = Number(size)
  }
  facts.valid = true
  return facts
}

/** The hosted sparse header: magic, version, the geometry the reader would refuse, and the grain directory against the limits. */
async function sparseHeader(dev: BlockDevice, policy: Policy, sink: ViolationSink, facts: VmdkFacts): Promise<SparseHeader | undefined> {
  if (dev.size < HEADER) {
    sink.add('TRUNCATED', `VMDK sparse header truncated: the file is ${dev.size} bytes, a header needs 512`, { structure: 'header', offset: 0 })
    return undefined
  }
  const h = decodeHeader(await dev.read(0, HEADER, 'header'))
  if (h.magic !== SPARSE_MAGIC) {
    sink.add('UNSUPPORTED_FORMAT', 'a VMDK3 (COWD) sparse extent: imgtool does not read this VMDK version', { structure: 'header magic', offset: 0 })
    return undefined
  }
  facts.version = h.version
  if (h.version < 1 || h.version > 3) {
    sink.add('HEADER_INVALID', `VMDK sparse header version ${h.version} (1, 2 or 3)`, { structure: 'header version', offset: 4 })
    return undefined
  }
  if (!policy.vmdk.versions.includes(h.version as VmdkVersion)) {
    sink.add('VMDK_VERSION', `VMDK sparse header version ${h.version} is not allowed (allowed: ${policy.vmdk.versions.join(', ') || 'none'})`, {
      structure: 'header version',
      offset: 4,
    })
  }
  let ok = true
  const bad = (field: string, offset: number, what: string): void => {
    sink.add('HEADER_INVALID', `VMDK sparse header ${field} ${what}`, { structure: `header ${field}`, offset })
    ok = false
  }
  if (h.compressAlgorithm > 1) bad('compressAlgorithm', 77, `${h.compressAlgorithm} (0 none, 1 deflate)`)
  if (h.numGTEsPerGT === 0 || h.numGTEsPerGT > MAX_GTES_PER_GT) bad('numGTEsPerGT', 44, `${h.numGTEsPerGT} (1 to ${MAX_GTES_PER_GT})`)
  if (h.grainSize === 0n || h.grainSize > BigInt(MAX_GRAIN_SECTORS)) bad('grainSize', 20, `${h.grainSize} sectors (1 to ${MAX_GRAIN_SECTORS})`)
  if (!ok) return undefined
  const perGt = BigInt(h.numGTEsPerGT) * h.grainSize
  const gdEntries = (h.capacity + perGt - 1n) / perGt
  if (gdEntries > BigInt(MAX_GD_ENTRIES)) {
    bad('capacity', 12, `${h.capacity} sectors needs ${gdEntries} grain directory entries (at most ${MAX_GD_ENTRIES})`)
    return undefined
  }
  facts.virtualSize = Number(h.capacity) * SECTOR
  const gdBytes = Number(gdEntries) * 4
  const copies = h.flags & 2 ? 2 : 1
  if (gdBytes > policy.limits.maxTableBytes) {
    sink.add(
      'LIMIT_TABLE_SIZE',
      `grain directory of ${gdEntries} entries (${gdBytes} bytes) is larger than limits.maxTableBytes ${policy.limits.maxTableBytes}: not read`,
      {
        structure: 'header capacity',
        offset: 12,
      },
    )
    facts.overLimit = true
  }
  const memory = gdBytes * copies + GT_CACHE_BYTES + Number(h.grainSize) * SECTOR
  if (overMemoryLimit(memory, 'the grain directories, the grain table cache and one grain', { structure: 'header', offset: 12 }, policy, sink))
    facts.overLimit = true
  // a stream whose directory is named by its footer: the reader finds the footer; the directory must lie inside the file
  if (h.gdOffset !== GD_AT_END && h.gdOffset * BigInt(SECTOR) + BigInt(gdBytes) > BigInt(dev.size)) {
    sink.add('TRUNCATED', `grain directory at sector ${h.gdOffset} (${gdBytes} bytes) ends past the end of the file (${dev.size} bytes)`, {
      structure: 'header gdOffset',
      offset: 56,
    })
    return undefined
  }
  return h
}

/** createType against the allow list; a hosted sparse file's header must be the layout its descriptor claims. */
function createTypeRules(d: Descriptor, h: SparseHeader | undefined, textAt: number, structure: string, policy: Policy, sink: ViolationSink): void {
  const ct = d.createType
  const at = { structure: `${structure} createType`, offset: textAt }
  if (!(policy.vmdk.createTypes as readonly string[]).includes(ct)) {
    sink.add('VMDK_CREATE_TYPE', `VMDK createType '${ct}' is not allowed (allowed: ${policy.vmdk.createTypes.join(', ') || 'none'})`, at)
  }
  if (h) {
    // QEMU names a hosted sparse file by its header: compressed grains make it streamOptimized
    const layout: VmdkCreateType = h.compressAlgorithm === 1 ? 'streamOptimized' : 'monolithicSparse'
    if (ct !== layout) {
      sink.add(
        'VMDK_CREATE_TYPE',
        `descriptor says createType '${ct}', but the sparse header (compressAlgorithm ${h.compressAlgorithm}) is a ${layout} one`,
        at,
      )
    }
  }
}

/** A delta disk's parent: parentCID and parentFileNameHint, reported with the backing-file rules, never opened. */
function parentRules(d: Descriptor, text: Uint8Array, textAt: number, structure: string, policy: Policy, sink: ViolationSink): void {
  const hint = d.entries.get('parentFileNameHint')
  const at = { structure: `${structure} parentFileNameHint`, offset: textAt + keyOffset(text, hint === undefined ? 'parentCID' : 'parentFileNameHint') }
  const cid = d.parentCid.toString(16).padStart(8, '0')
  if (!policy.references.backingFile) {
    sink.add(
      'BACKING_FILE',
      hint === undefined
        ? `delta disk: parentCID ${cid} names a parent, without a parentFileNameHint; not opened`
        : `delta disk (parentCID ${cid}): parentFileNameHint names parent '${escapeControls(hint)}'; not opened`,
      at,
    )
  }
  if (hint !== undefined) nameRules('parent name', hint, at, policy, sink)
}

function extentRules(type: string, name: string, at: { structure: string; offset: number }, policy: Policy, sink: ViolationSink): void {
  if (!policy.references.dataFile) sink.add('EXTENT_FILE', `VMDK descriptor names ${type} extent '${escapeControls(name)}'; not opened`, at)
  nameRules('extent name', name, at, policy, sink)
}

/** The rules every referenced name gets (as a qcow2 backing name or a VHD parent locator). */
function nameRules(what: string, raw: string, at: { structure: string; offset: number }, policy: Policy, sink: ViolationSink): void {
  const name = escapeControls(raw)
  const posix = (raw.startsWith('file://') ? raw.slice('file://'.length) : raw).replace(/\\/g, '/')
  const drive = /^[A-Za-z]:\//.test(posix)
  const protocol = /^[^:/]*:/.exec(posix)
  if (protocol && !drive && !policy.references.protocolNames) sink.add('PROTOCOL_NAME', `${what} '${name}' selects protocol '${protocol[0].slice(0, -1)}'`, at)
  if (posix.split('/').includes('..') && !policy.references.parentDirNames) sink.add('PARENT_DIR_NAME', `${what} '${name}' climbs with '..'`, at)
  if ((posix.startsWith('/') || drive) && !policy.references.absoluteNames) sink.add('ABSOLUTE_NAME', `${what} '${name}' is an absolute path`, at)
}

/**
 * Extent-like lines (`RW 2048 FLAT "name" 0`) of a descriptor the grammar refused: a broken line
 * elsewhere must not hide the files it names. Reported, never opened.
 */
function scanExtents(bytes: Uint8Array, policy: Policy, sink: ViolationSink): void {
  const nul = bytes.indexOf(0)
  const text = new TextDecoder('latin1').decode(nul < 0 ? bytes : bytes.subarray(0, nul))
  for (const m of text.matchAll(/^[ \t]*(?:RW|RDONLY|NOACCESS)[ \t]+\d+[ \t]+(\w+)[ \t]+"([^"\r\n]*)"/gm)) {
    extentRules(m[1]!, m[2]!, { structure: 'VMDK descriptor extent', offset: m.index }, policy, sink)
  }
}

/** Byte offset of 1-based line `line` in the descriptor text. */
function lineOffset(text: Uint8Array, line: number): number {
  let at = 0
  for (let n = 1; n < line; n++) {
    const nl = text.indexOf(10, at)
    if (nl < 0) break
    at = nl + 1
  }
  return at
}

/** Byte offset of the line that sets `key` (0 when not found). */
function keyOffset(text: Uint8Array, key: string): number {
  const s = new TextDecoder('latin1').decode(text)
  const m = new RegExp(`^[ \\t]*${key}[ \\t]*=`, 'm').exec(s)
  return m?.index ?? 0
}
