/**
 * qemu-img measure: how large a new image of a target format must be to hold
 * a given size, or the content of an existing image. Targets are qcow2 and
 * raw, as in qemu-img 7.2 (its vpc, vmdk and other drivers do not measure,
 * and neither does imgtool: the same refusal, in the same words).
 */
import { UsageError, checkAborted } from '../errors.js'
import type { DiskImage, SnapshotSelector } from '../image/disk-image.js'
import { mergeExtents } from '../image/range.js'
import { isFormatName } from '../image/probe.js'
import { openImage as openByPath } from '../open.js'
import { formatOption, openOptionsOf, type OpenOptions } from './image.js'

export interface MeasureOptions extends Pick<OpenOptions, 'format' | 'origin' | 'options' | 'forceShare' | 'signal'> {
  /** the target format (qemu-img's -O; default raw) */
  targetFormat?: string
  /** the target's create options (qemu-img's -o) */
  targetOptions?: Record<string, string>
  /** measure a new image of this many bytes instead of a source (qemu-img's --size) */
  size?: number
  /** an internal snapshot of the source (qemu-img's -l): the snapshot's content is measured */
  snapshot?: SnapshotSelector
}

/** qemu-img measure's answer, with its JSON names in the CLI. */
export interface MeasureResult {
  /** the file size the target needs for the source's data (or an empty image of `size`) */
  required: number
  /** the file size with every guest cluster allocated */
  fullyAllocated: number
  /** qcow2 targets from a source that keeps persistent bitmaps (qcow2 v3): the room its bitmaps take */
  bitmaps?: number
}

const MEASURABLE = new Set(['qcow2', 'raw'])
const KNOWN_TARGETS = new Set(['qcow2', 'raw', 'vpc', 'vmdk', 'vdi', 'vhdx', 'qed', 'luks', 'parallels', 'qcow', 'cloop', 'dmg', 'bochs', 'file'])

/**
 * Measure `source` (a path) or, with `size`, an empty image, as qemu-img
 * measure does; exactly one of them. The source is opened read-only.
 */
export async function measure(source: string | undefined, o: MeasureOptions = {}): Promise<MeasureResult> {
  checkAborted(o.signal, 'measure')
  if (source !== undefined && o.size !== undefined) throw new UsageError('--size N cannot be used together with a filename.')
  if (source === undefined && o.size === undefined) throw new UsageError('Either --size N or one filename must be specified.')
  if (source === undefined && (o.format !== undefined || o.snapshot !== undefined)) {
    throw new UsageError('--image-opts, -f, and -l require a filename argument.')
  }
  if (o.size !== undefined && (!Number.isSafeInteger(o.size) || o.size < 0)) throw new UsageError(`Invalid image size specified: ${o.size}`)
  let src: DiskImage | undefined
  let opened: DiskImage | undefined
  if (source !== undefined) {
    src = await openByPath(source, {
      format: formatOption(o.format),
      readOnly: true,
      options: openOptionsOf(o),
      forceShare: o.forceShare === true,
    })
    opened = src
  }
  try {
    if (src && o.snapshot !== undefined) {
      const { loadSnapshotOf } = await import('../convert/to-file.js')
      src = await loadSnapshotOf(src, o.snapshot)
    }
    const target = o.targetFormat ?? 'raw'
    if (!KNOWN_TARGETS.has(target) && !isFormatName(target)) throw new UsageError(`Unknown file format '${target}'`)
    if (!MEASURABLE.has(target)) throw new UsageError(`Block driver '${target}' does not support size measurement`)
    const opts = { ...(o.targetOptions ?? {}) }
    return target === 'qcow2' ? await measureQcow2Target(src, opts, o) : measureRawTarget(src, opts, o.size ?? 0)
  } finally {
    await src?.close()
    if (opened !== src) await opened?.close()
  }
}

const roundUp = (n: number, to: number): number => Math.ceil(n / to) * to

function measureRawTarget(src: DiskImage | undefined, opts: Record<string, string>, size: number): MeasureResult {
  for (const k of Object.keys(opts)) {
    if (!['size', 'preallocation', 'nocow', 'extent_size_hint'].includes(k)) {
      throw new UsageError(`Invalid parameter '${k}'\nInvalid options for file format 'raw'`)
    }
  }
  // unallocated sectors count towards a raw file's size
  const required = src ? src.virtualSize : roundUp(size, 512)
  return { required, fullyAllocated: required }
}

async function measureQcow2Target(src: DiskImage | undefined, opts: Record<string, string>, o: MeasureOptions): Promise<MeasureResult> {
  const q = await import('../formats/qcow2/index.js')
  const { parseSize } = await import('../util/size.js')
  const parsed = q.parseQcow2MeasureOptions(opts)
  const optSize = o.size ?? (opts['size'] !== undefined ? parseSize(opts['size']) : 0)
  q.checkQcow2MeasureSize(parsed, optSize)
  if (!src) return q.measureQcow2(parsed, optSize, 0)
  const virtual = roundUp(src.virtualSize, parsed.clusterSize)
  const data = parsed.hasBacking ? virtual : await dataClusterBytes(src, parsed.clusterSize, o.signal)
  const result: MeasureResult = q.measureQcow2(parsed, src.virtualSize, data)
  if (parsed.version >= 3) {
    const bitmaps = await persistentBitmaps(src)
    if (bitmaps) return { bitmaps: q.qcow2BitmapsSize(bitmaps, src.virtualSize, parsed.clusterSize), ...result }
  }
  return result
}

/**
 * The bytes of whole clusters that hold data anywhere in the source's chain,
 * as qemu's block status walk counts them: a range that reads as zeros is
 * skipped, a data range is counted from the start of its first cluster to the
 * end of its last, and the walk goes on after that cluster.
 */
async function dataClusterBytes(src: DiskImage, clusterSize: number, signal: AbortSignal | undefined): Promise<number> {
  let pos = 0
  let total = 0
  for await (const e of mergeExtents(src.extents(0, src.virtualSize))) {
    checkAborted(signal, 'measure')
    const end = e.start + e.length
    if (end <= pos) continue
    const start = Math.max(e.start, pos)
    if (e.zero || !(e.data && e.present)) {
      pos = end
      continue
    }
    const stop = roundUp(end, clusterSize)
    total += stop - Math.floor(start / clusterSize) * clusterSize
    pos = stop
  }
  return total
}

/** A source that keeps persistent bitmaps (a qcow2 v3 image): its bitmaps, else undefined. */
async function persistentBitmaps(src: DiskImage): Promise<Array<{ name: string; granularity: number }> | undefined> {
  const info = await src.info()
  if (info.format !== 'qcow2' || info.formatSpecific?.data['compat'] !== '1.1') return undefined
  const list = info.formatSpecific.data['bitmaps']
  return Array.isArray(list) ? (list as Array<{ name: string; granularity: number }>) : []
}
