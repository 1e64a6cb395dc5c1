/**
 * qemu-img measure -O qcow2: the file size a new qcow2 image needs, with
 * qemu 7.2's arithmetic (qcow2_measure, qcow2_calc_prealloc_size and the
 * refcount fixed point already used by preallocation). The caller supplies
 * how many guest bytes hold data (whole clusters, as qemu's block status walk
 * counts them); this file knows only the qcow2 layout.
 */
import { UnsupportedFeatureError, UsageError } from '../../../errors.js'
import { parseSize } from '../../../util/size.js'
import * as C from '../spec/constants.js'
import { refcountMetadataSize } from './refcount-size.js'

/** the keys qemu-img measure accepts for -O qcow2 (qcow2's create options and the file protocol's) */
const ACCEPTED = new Set([
  'size',
  'compat',
  'version',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'encryption',
  'encrypt.format',
  'cluster_size',
  'preallocation',
  'lazy_refcounts',
  'refcount_bits',
  'compression_type',
  'extended_l2',
  'nocow',
  'extent_size_hint',
])

const MAX_L1_BYTES = 32 * 1024 * 1024

export interface Qcow2MeasureOptions {
  clusterSize: number
  refcountOrder: number
  extendedL2: boolean
  version: 2 | 3
  preallocation: 'off' | 'metadata' | 'falloc' | 'full'
  /** a backing file is named: every cluster of a source counts as written */
  hasBacking: boolean
}

function invalid(first: string): UsageError {
  return new UsageError(`${first}\nInvalid options for file format 'qcow2'`)
}

function boolOpt(key: string, v: string | undefined): boolean {
  if (v === undefined) return false
  if (['on', 'yes', 'true', 'y'].includes(v)) return true
  if (['off', 'no', 'false', 'n'].includes(v)) return false
  throw invalid(`Parameter '${key}' expects 'on' or 'off'`)
}

function sizeOpt(key: string, v: string | undefined, dflt: number): number {
  if (v === undefined) return dflt
  try {
    return parseSize(v, key)
  } catch {
    throw invalid(`Parameter '${key}' expects a non-negative number below 2^64`)
  }
}

/**
 * The -o options as qcow2_measure reads them, in its order and with its
 * words: only extended_l2, cluster_size, compat, refcount_bits, preallocation,
 * backing_file and encrypt.format matter; the other create options are
 * accepted and change nothing (lazy_refcounts, data_file, compression_type...).
 */
export function parseQcow2MeasureOptions(opts: Record<string, string>): Qcow2MeasureOptions {
  for (const k of Object.keys(opts)) if (!ACCEPTED.has(k) && !k.startsWith('encrypt.')) throw invalid(`Invalid parameter '${k}'`)
  if (opts['refcount_bits'] !== undefined && !/^\s*\d+\s*$/.test(opts['refcount_bits'])) throw invalid(`Parameter 'refcount_bits' expects a number`)
  const extendedL2 = boolOpt('extended_l2', opts['extended_l2'])
  boolOpt('lazy_refcounts', opts['lazy_refcounts'])
  boolOpt('data_file_raw', opts['data_file_raw'])
  const clusterSize = sizeOpt('cluster_size', opts['cluster_size'], 65536)
  const bits = Math.log2(clusterSize)
  if (!Number.isInteger(bits) || bits < C.MIN_CLUSTER_BITS || bits > C.MAX_CLUSTER_BITS) {
    throw new UsageError('Cluster size must be a power of two between 512 and 2048k')
  }
  if (extendedL2 && clusterSize < 16384) throw new UsageError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes')
  const compat = opts['compat'] ?? opts['version'] ?? '1.1'
  let version: 2 | 3
  if (compat === '0.10' || compat === 'v2') version = 2
  else if (compat === '1.1' || compat === 'v3') version = 3
  else throw new UsageError(`Invalid compatibility level: '${compat}'`)
  const refcountBits = opts['refcount_bits'] !== undefined ? Number(opts['refcount_bits']) : 16
  if (refcountBits < 1 || refcountBits > 64 || !Number.isInteger(Math.log2(refcountBits))) {
    throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits')
  }
  if (version === 2 && refcountBits !== 16) {
    throw new UsageError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)')
  }
  const pre = opts['preallocation'] ?? 'off'
  if (pre !== 'off' && pre !== 'metadata' && pre !== 'falloc' && pre !== 'full') throw new UsageError(`invalid parameter value: ${pre}`)
  if (opts['encrypt.format'] !== undefined || opts['encryption'] !== undefined) {
    throw new UnsupportedFeatureError('qcow2: measuring encrypted images is not supported')
  }
  return {
    clusterSize,
    refcountOrder: Math.log2(refcountBits),
    extendedL2,
    version,
    preallocation: pre,
    hasBacking: opts['backing_file'] !== undefined,
  }
}

const roundUp = (n: number, to: number): number => Math.ceil(n / to) * to

/**
 * Refuse a size whose L1 table would pass qcow2's limit (32 MiB), as qemu
 * does before it looks at a source (with the -o/--size size, 0 for a file).
 */
export function checkQcow2MeasureSize(o: Qcow2MeasureOptions, size: number): void {
  const l2Entry = o.extendedL2 ? 16 : 8
  const virtual = roundUp(size, o.clusterSize)
  const l2Tables = Math.ceil(virtual / o.clusterSize / (o.clusterSize / l2Entry))
  if (l2Tables * 8 > MAX_L1_BYTES) throw new UsageError('The image size is too large (try using a larger cluster size)')
}

/**
 * The size of a qcow2 file holding every cluster of `size` guest bytes and
 * its metadata (header, L2 tables, L1 table, refcount structures).
 */
export function qcow2FullSize(size: number, o: Pick<Qcow2MeasureOptions, 'clusterSize' | 'refcountOrder' | 'extendedL2'>): number {
  const cs = o.clusterSize
  const l2Entry = o.extendedL2 ? 16 : 8
  const total = roundUp(size, cs)
  let meta = cs
  const l2Entries = roundUp(total / cs, cs / l2Entry)
  meta += l2Entries * l2Entry
  const l1Entries = roundUp((l2Entries * l2Entry) / cs, cs / 8)
  meta += l1Entries * 8
  const { blocks, table } = refcountMetadataSize((meta + total) / cs, cs, o.refcountOrder, false)
  meta += (blocks + table) * cs
  const full = meta + total
  if (!Number.isSafeInteger(full)) throw new UsageError(`qcow2: a measured size of ${size} bytes is past 2^53 bytes`)
  return full
}

export interface Qcow2Measure {
  required: number
  fullyAllocated: number
}

/**
 * qemu's answer for a target of `virtualSize` guest bytes of which
 * `dataBytes` (whole clusters) are written; without a source every cluster
 * is left unwritten (dataBytes 0).
 */
export function measureQcow2(o: Qcow2MeasureOptions, virtualSize: number, dataBytes: number): Qcow2Measure {
  const virtual = roundUp(virtualSize, o.clusterSize)
  const written = o.preallocation === 'full' || o.preallocation === 'falloc' ? virtual : dataBytes
  const fullyAllocated = qcow2FullSize(virtual, o)
  return { required: fullyAllocated - virtual + written, fullyAllocated }
}

/**
 * The room the persistent bitmaps of a source take in a qcow2 target with
 * `clusterSize` clusters: each bitmap whole, its table, and the directory.
 */
export function qcow2BitmapsSize(bitmaps: ReadonlyArray<{ name: string; granularity: number }>, virtualSize: number, clusterSize: number): number {
  let total = 0
  let directory = 0
  for (const b of bitmaps) {
    const bytes = Math.ceil(Math.ceil(virtualSize / b.granularity) / 8)
    const clusters = Math.ceil(bytes / clusterSize)
    total += clusters * clusterSize
    total += roundUp(clusters * 8, clusterSize)
    directory += roundUp(24 + Buffer.byteLength(b.name, 'utf8'), 8)
  }
  return total + roundUp(directory, clusterSize)
}
