/**
 * qcow2 create's -o options, parsed and checked as qemu-img create does. Kept apart from the creator so that the
 * layers which only validate options (convert's target check, the public API) do not load the writer.
 */
import { UnsupportedFeatureError, UsageError } from '../../../errors.js'
import type { CreateImageOptions } from '../../../image/context.js'
import { alignUp } from '../../../util/bytes.js'
import { parseSize } from '../../../util/size.js'
import * as C from '../spec/constants.js'

export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full'

export interface Qcow2CreateOptions {
  size: number
  version: 2 | 3
  clusterSize: number
  refcountBits: number
  lazyRefcounts: boolean
  extendedL2: boolean
  compressionType: 'zlib' | 'zstd'
  preallocation: Preallocation
  backingFile?: string | undefined
  backingFormat?: string | undefined
  dataFile?: string | undefined
  dataFileRaw: boolean
}

const KNOWN = new Set([
  'size',
  'compat',
  'version',
  'cluster_size',
  'refcount_bits',
  'lazy_refcounts',
  'extended_l2',
  'compression_type',
  'preallocation',
  'backing_file',
  'backing_fmt',
  'data_file',
  'data_file_raw',
  'encryption',
  'encrypt.format',
])

function bool(key: string, v: string | undefined, dflt: boolean): boolean {
  if (v === undefined) return dflt
  if (['on', 'true', 'yes'].includes(v)) return true
  if (['off', 'false', 'no'].includes(v)) return false
  throw new UsageError(`Parameter '${key}' expects 'on' or 'off', not '${v}'`)
}

/** Validate -o options the way qemu-img create does, with its messages where it has them. */
export function parseCreateOptions(o: CreateImageOptions): Qcow2CreateOptions {
  const opts = o.options
  for (const k of Object.keys(opts)) if (!KNOWN.has(k)) throw new UsageError(`Invalid parameter '${k}' for qcow2`)
  if (opts['encryption'] !== undefined || opts['encrypt.format'] !== undefined) {
    throw new UnsupportedFeatureError('qcow2: creating encrypted images is not supported')
  }
  let size = opts['size'] !== undefined ? parseSize(opts['size']) : o.size
  size = alignUp(size, 512)
  const compat = opts['compat'] ?? opts['version'] ?? '1.1'
  let version: 2 | 3
  if (compat === '0.10' || compat === 'v2') version = 2
  else if (compat === '1.1' || compat === 'v3') version = 3
  else throw new UsageError(`Invalid compatibility level: '${compat}'`)
  const clusterSize = opts['cluster_size'] !== undefined ? parseSize(opts['cluster_size'], 'cluster_size') : 65536
  const bits = Math.log2(clusterSize)
  if (!Number.isInteger(bits) || bits < C.MIN_CLUSTER_BITS || bits > C.MAX_CLUSTER_BITS) {
    throw new UsageError('Cluster size must be a power of two between 512 and 2048k')
  }
  const refcountBits = opts['refcount_bits'] !== undefined ? Number(opts['refcount_bits']) : 16
  if (!Number.isInteger(refcountBits) || refcountBits < 1 || refcountBits > 64 || !Number.isInteger(Math.log2(refcountBits))) {
    throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits')
  }
  if (version === 2 && refcountBits !== 16) {
    throw new UsageError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)')
  }
  const lazyRefcounts = bool('lazy_refcounts', opts['lazy_refcounts'], false)
  if (lazyRefcounts && version === 2) {
    throw new UsageError('Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)')
  }
  const extendedL2 = bool('extended_l2', opts['extended_l2'], false)
  if (extendedL2) {
    if (version === 2) throw new UsageError('Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)')
    if (clusterSize < 16384) throw new UsageError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes')
  }
  const ct = opts['compression_type'] ?? 'zlib'
  if (ct !== 'zlib' && ct !== 'zstd') throw new UsageError(`Invalid parameter value for 'compression_type': '${ct}' (zlib or zstd)`)
  if (ct === 'zstd' && version === 2) {
    throw new UsageError('Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)')
  }
  const pre = opts['preallocation'] ?? 'off'
  if (pre !== 'off' && pre !== 'metadata' && pre !== 'falloc' && pre !== 'full') {
    throw new UsageError(`Invalid parameter value for 'preallocation': '${pre}' (off, metadata, falloc or full)`)
  }
  const backingFile = opts['backing_file'] ?? o.backingFile
  const backingFormat = opts['backing_fmt'] ?? o.backingFormat
  if (backingFormat !== undefined && backingFile === undefined) throw new UsageError('Backing format cannot be used without backing file')
  if (backingFile !== undefined && pre !== 'off' && !extendedL2) {
    throw new UsageError('Backing file and preallocation can only be used at the same time if extended_l2 is on')
  }
  const dataFile = opts['data_file']
  const dataFileRaw = bool('data_file_raw', opts['data_file_raw'], false)
  if (dataFile !== undefined && version === 2)
    throw new UsageError('External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)')
  if (dataFileRaw && dataFile === undefined) throw new UsageError("'data-file-raw' requires 'data-file'")
  if (dataFileRaw && backingFile !== undefined) throw new UsageError('Backing file and data-file-raw cannot be used at the same time')
  if (backingFile !== undefined && Buffer.byteLength(backingFile) > C.MAX_BACKING_FILE_NAME) throw new UsageError('Backing file name too long')
  return {
    size,
    version,
    clusterSize,
    refcountBits,
    lazyRefcounts,
    extendedL2,
    compressionType: ct,
    preallocation: pre,
    backingFile,
    backingFormat,
    dataFile,
    dataFileRaw,
  }
}
