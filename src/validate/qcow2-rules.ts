/**
 * qcow2 identity, references and features, from the header alone. The fixed
 * fields are decoded here from the first sector (so a header the parser
 * refuses still has its bits reported); extensions (backing and data file
 * names, bitmaps) come from the library's header parser.
 */
import type { BlockDevice } from '../io/block-device.js'
import { readBitmapDirectory, readHeader, BME_FLAG_IN_USE, type Qcow2Header } from '../formats/qcow2/index.js'
import { u32be, u64be } from '../util/bytes.js'
import { QCOW2_AUTOCLEAR, QCOW2_COMPATIBLE, QCOW2_INCOMPATIBLE, type Policy } from './policy.js'
import { overMemoryLimit } from './limits.js'
import type { ViolationSink } from './report.js'

export interface Qcow2Facts {
  version: number
  clusterSize: number
  virtualSize: number
  l1Size: number
  refcountTableClusters: number
  nbSnapshots: number
  /** the parsed header, when the parser accepted it */
  header?: Qcow2Header
  hasReferences: boolean
  /** crypt_method is set: the guest bytes cannot be read */
  encrypted: boolean
  /** a table larger than the limits: nothing more is read */
  overLimit: boolean
  /** metadata the check would hold at once, from the header (tables x entry width) */
  metadataBytes: number
}

const TABLES = { incompatible: QCOW2_INCOMPATIBLE, compatible: QCOW2_COMPATIBLE, autoclear: QCOW2_AUTOCLEAR } as const
const FIELD_AT = { incompatible: 72, compatible: 80, autoclear: 88 } as const

export async function qcow2Rules(dev: BlockDevice, policy: Policy, sink: ViolationSink): Promise<Qcow2Facts | undefined> {
  const file = sink.file
  const head = await dev.read(0, 512, 'header')
  if (dev.size < 72) {
    sink.add('TRUNCATED', `qcow2 header truncated: the file is ${dev.size} bytes, a header needs 72`, { structure: 'header', offset: 0 })
    return undefined
  }
  const version = u32be(head, 4)
  const clusterBits = u32be(head, 20)
  const compat = version === 2 ? '0.10' : version === 3 ? '1.1' : `version ${version}`
  if (!(policy.qcow2.compat as string[]).includes(compat)) {
    sink.add('VERSION_NOT_ALLOWED', `qcow2 compat ${compat} is not allowed (allowed: ${policy.qcow2.compat.join(', ') || 'none'})`, {
      structure: 'header version',
      offset: 4,
    })
  }
  const facts: Qcow2Facts = {
    version,
    clusterSize: clusterBits < 31 ? 2 ** clusterBits : 0,
    virtualSize: Number(u64be(head, 24)),
    l1Size: u32be(head, 36),
    refcountTableClusters: u32be(head, 56),
    nbSnapshots: u32be(head, 60),
    hasReferences: false,
    encrypted: false,
    overLimit: false,
    metadataBytes: 0,
  }
  if (!policy.qcow2.clusterSizes.includes(facts.clusterSize)) {
    sink.add('CLUSTER_SIZE', `cluster size ${facts.clusterSize} (2^${clusterBits}) is not allowed`, { structure: 'header cluster_bits', offset: 20 })
  }
  const cryptMethod = u32be(head, 32)
  facts.encrypted = cryptMethod !== 0
  if (cryptMethod !== 0 && !policy.qcow2.encryption) {
    sink.add('ENCRYPTED', `guest data is encrypted (crypt_method ${cryptMethod === 1 ? 'aes' : cryptMethod === 2 ? 'luks' : cryptMethod})`, {
      structure: 'header crypt_method',
      offset: 32,
    })
  }
  if (facts.nbSnapshots > policy.qcow2.maxSnapshots) {
    sink.add('SNAPSHOTS', `${facts.nbSnapshots} internal snapshot(s), at most ${policy.qcow2.maxSnapshots} allowed`, {
      structure: 'header nb_snapshots',
      offset: 60,
    })
  }
  if (version === 3 && dev.size >= 104) featureRules(head, policy, sink)
  if (version === 3) {
    const refcountBits = 2 ** u32be(head, 96)
    if (!policy.qcow2.refcountBits.includes(refcountBits)) {
      sink.add('REFCOUNT_WIDTH', `refcount width ${refcountBits} bits is not allowed (allowed: ${policy.qcow2.refcountBits.join(', ')})`, {
        structure: 'header refcount_order',
        offset: 96,
      })
    }
  }
  tableLimits(head, facts, policy, sink)
  facts.metadataBytes = checkMemory(head, facts, dev.size)
  const memoryWhat = 'L1 and refcount tables, refcount array, tables read ahead'
  if (overMemoryLimit(facts.metadataBytes, memoryWhat, { structure: 'header', offset: 36 }, policy, sink)) facts.overLimit = true
  truncation(head, facts, dev.size, sink)

  try {
    facts.header = await readHeader(dev, { file, readOnly: true, forCheck: true })
  } catch (e) {
    const err = e as Error & { details?: { structure?: string; offset?: number } }
    // unknown feature bits are reported above, with their own code
    if (!/Unsupported qcow2 feature/.test(err.message)) {
      sink.add('HEADER_INVALID', err.message, { structure: err.details?.structure ?? 'header', offset: err.details?.offset })
    }
    return facts
  }
  const h = facts.header
  referenceRules(h, policy, sink)
  facts.hasReferences = h.backingFile !== undefined || h.dataFile !== undefined || (h.incompatibleFeatures & 4n) !== 0n
  await bitmapRules(dev, h, policy, sink)
  return facts
}

function featureRules(head: Uint8Array, policy: Policy, sink: ViolationSink): void {
  const allowed: Record<keyof typeof TABLES, readonly string[]> = {
    incompatible: policy.qcow2.incompatibleFeatures,
    compatible: policy.qcow2.compatibleFeatures,
    autoclear: policy.qcow2.autoclearFeatures,
  }
  for (const table of ['incompatible', 'compatible', 'autoclear'] as const) {
    const at = FIELD_AT[table]
    const bits = u64be(head, at)
    for (let bit = 0; bit < 64; bit++) {
      if (((bits >> BigInt(bit)) & 1n) === 0n) continue
      const name = TABLES[table][bit]
      const where = { structure: `header ${table}_features bit ${bit}`, offset: at }
      if (name === undefined) {
        // an unknown compatible bit is harmless to a reader, but deny by default still names it
        sink.add('UNKNOWN_FEATURE', `unknown ${table} feature bit ${bit}`, { ...where, severity: table === 'incompatible' ? 'error' : 'warning' })
      } else if (name === 'corrupt') {
        sink.add('CORRUPT_BIT', 'the image is marked corrupt (incompatible feature bit 1)', where)
      } else if (name === 'dirty') {
        if (policy.qcow2.dirty === 'fail') sink.add('DIRTY_BIT', 'the image is marked dirty: refcounts may be stale', where)
        else if (policy.qcow2.dirty === 'warn') sink.add('DIRTY_BIT', 'the image is marked dirty: refcounts may be stale', { ...where, severity: 'warning' })
      } else if (name === 'external-data-file' || name === 'data-file-raw') {
        if (!policy.references.dataFile) sink.add('DATA_FILE', `the image has an external data file (${name} bit set)`, where)
      } else if (name === 'compression-type') {
        const type = head.length > 104 ? head[104] : 0
        const typeName = type === 1 ? 'zstd' : type === 0 ? 'zlib' : `type ${type}`
        if (!(policy.qcow2.compressionTypes as string[]).includes(typeName)) {
          sink.add('COMPRESSION_TYPE', `compression type ${typeName} is not allowed (allowed: ${policy.qcow2.compressionTypes.join(', ')})`, {
            structure: 'header compression_type',
            offset: 104,
          })
        }
        if (!allowed.incompatible.includes(name)) sink.add('FEATURE_NOT_ALLOWED', `incompatible feature ${name} is not allowed`, where)
      } else if (!allowed[table].includes(name)) {
        sink.add('FEATURE_NOT_ALLOWED', `${table} feature ${name} is not allowed`, where)
      }
    }
  }
}

function tableLimits(head: Uint8Array, f: Qcow2Facts, policy: Policy, sink: ViolationSink): void {
  const max = policy.limits.maxTableBytes
  const tables: Array<[string, number, number]> = [
    ['L1 table', f.l1Size * 8, 36],
    ['refcount table', f.refcountTableClusters * f.clusterSize, 56],
    ['snapshot table', f.nbSnapshots * 40, 60],
  ]
  for (const [name, bytes, at] of tables) {
    if (bytes > max) {
      sink.add('LIMIT_TABLE_SIZE', `${name} of ${bytes} bytes is larger than limits.maxTableBytes ${max}: not read`, { structure: 'header', offset: at })
      f.overLimit = true
    }
  }
  const clusters = (f.clusterSize > 0 ? Math.ceil(f.virtualSize / f.clusterSize) : 0) + f.l1Size
  if (clusters > policy.limits.maxClusters) {
    sink.add('LIMIT_CLUSTERS', `${clusters} guest clusters exceed limits.maxClusters ${policy.limits.maxClusters}: not checked`, {
      structure: 'header size',
      offset: 24,
    })
    f.overLimit = true
  }
  void head
}

/**
 * What qcow2 check holds in memory, from the header alone: the active L1
 * (l1_size x 8), the refcount table (clusters x cluster size), the in-memory
 * refcount array (one counter of the refcount width per host cluster of the
 * file), its OFLAG_COPIED bitmap (a bit per host cluster), and the L2 tables
 * and refcount blocks read ahead (8 + 8 clusters).
 */
function checkMemory(head: Uint8Array, f: Qcow2Facts, fileSize: number): number {
  if (f.clusterSize === 0) return 0
  const order = f.version >= 3 && head.length >= 100 ? u32be(head, 96) : 4
  const counter = order <= 3 ? 1 : 2 ** (Math.min(order, 6) - 3)
  const hostClusters = Math.ceil(fileSize / f.clusterSize)
  return f.l1Size * 8 + f.refcountTableClusters * f.clusterSize + hostClusters * counter + Math.ceil(hostClusters / 8) + 16 * f.clusterSize
}

function truncation(head: Uint8Array, f: Qcow2Facts, fileSize: number, sink: ViolationSink): void {
  const l1Offset = Number(u64be(head, 40))
  const reftableOffset = Number(u64be(head, 48))
  if (f.l1Size > 0 && l1Offset + f.l1Size * 8 > fileSize) {
    sink.add('TRUNCATED', `L1 table of ${f.l1Size} entries ends past the end of the file (${fileSize} bytes)`, { structure: 'l1', offset: l1Offset })
  }
  const reftableBytes = f.refcountTableClusters * f.clusterSize
  if (reftableBytes > 0 && reftableOffset + reftableBytes > fileSize) {
    sink.add('TRUNCATED', `refcount table of ${f.refcountTableClusters} cluster(s) ends past the end of the file (${fileSize} bytes)`, {
      structure: 'reftable',
      offset: reftableOffset,
    })
  }
}

/** Backing and data file names: reported, never opened. */
function referenceRules(h: Qcow2Header, policy: Policy, sink: ViolationSink): void {
  const names: Array<[string, string, number | undefined]> = []
  if (h.backingFile !== undefined) {
    names.push(['backing file', h.backingFile, h.backingFileOffset])
    if (!policy.references.backingFile) {
      sink.add('BACKING_FILE', `names backing file '${h.backingFile}'${h.backingFormat ? ` (format ${h.backingFormat})` : ''}; not opened`, {
        structure: 'header backing_file',
        offset: h.backingFileOffset,
      })
    }
  }
  if (h.dataFile !== undefined) {
    const ext = h.extensions.find((x) => x.magic === 0x44415441)
    names.push(['data file', h.dataFile, ext?.offset])
    if (!policy.references.dataFile) {
      sink.add('DATA_FILE', `names external data file '${h.dataFile}'; not opened`, { structure: 'header extension data file', offset: ext?.offset })
    }
  }
  for (const [what, name, offset] of names) {
    const at = { structure: `${what} name`, offset }
    const protocol = /^[^:/]*:/.exec(name)
    if (protocol && !policy.references.protocolNames) sink.add('PROTOCOL_NAME', `${what} name '${name}' selects protocol '${protocol[0].slice(0, -1)}'`, at)
    if (name.split('/').includes('..') && !policy.references.parentDirNames) sink.add('PARENT_DIR_NAME', `${what} name '${name}' climbs with '..'`, at)
    if (name.startsWith('/') && !policy.references.absoluteNames) sink.add('ABSOLUTE_NAME', `${what} name '${name}' is an absolute path`, at)
  }
}

async function bitmapRules(dev: BlockDevice, h: Qcow2Header, policy: Policy, sink: ViolationSink): Promise<void> {
  const ext = h.bitmaps
  if (!ext || ext.nbBitmaps === 0) return
  if (ext.nbBitmaps > policy.qcow2.maxBitmaps) {
    sink.add('BITMAPS', `${ext.nbBitmaps} persistent bitmap(s), at most ${policy.qcow2.maxBitmaps} allowed`, {
      structure: 'bitmap directory',
      offset: ext.directoryOffset,
    })
  }
  if ((h.autoclearFeatures & 1n) === 0n) {
    sink.add('BITMAP_IN_USE', 'bitmaps are inconsistent: the bitmaps autoclear bit is clear (an old writer touched the image)', {
      structure: 'header autoclear_features',
      offset: 88,
    })
    return
  }
  if (ext.directorySize > policy.limits.maxTableBytes) {
    sink.add('LIMIT_TABLE_SIZE', `bitmap directory of ${ext.directorySize} bytes is larger than limits.maxTableBytes`, {
      structure: 'bitmap directory',
      offset: ext.directoryOffset,
    })
    return
  }
  try {
    for (const b of await readBitmapDirectory(dev, sink.file, ext)) {
      if (b.flags & BME_FLAG_IN_USE)
        sink.add('BITMAP_IN_USE', `bitmap '${b.name}' is in use (not saved cleanly)`, { structure: 'bitmap directory entry', offset: b.entryOffset })
    }
  } catch (e) {
    sink.add('HEADER_INVALID', (e as Error).message, { structure: 'bitmap directory', offset: ext.directoryOffset })
  }
}
