/**
 * qemu-img dd as a library call: a block range of an image copied into a new
 * image of any format imgtool writes.
 */
import { UsageError, checkAborted } from '../errors.js'
import { formatOption, type OpenOptions } from './image.js'
import type { TargetFormat } from '../convert/to-file.js'

export interface DdOptions {
  /** the input's format (probed when absent) */
  format?: OpenOptions['format']
  /** the output's format (default raw) */
  targetFormat?: TargetFormat
  /** bytes per block, 1 to 2^31-1 (default 512) */
  blockSize?: number
  /** blocks to read from the start of the input, skipped ones included (default: to the end) */
  count?: number
  /** input blocks to skip (default 0) */
  skip?: number
  /** qemu-img's -U: open the input without image locks */
  forceShare?: boolean
  signal?: AbortSignal
}

export type { DdResult } from '../convert/dd.js'

/**
 * Copy blocks of `input` into a new image `output`, as qemu-img dd does:
 * the output is created with the size qemu-img gives it (the input's size or
 * count*bs, less skip*bs) and holds those guest bytes. An output that is any
 * file the input reads is refused before anything is touched; an output this
 * call created is removed when the copy fails.
 */
export async function dd(input: string, output: string, o: DdOptions = {}): Promise<import('../convert/dd.js').DdResult> {
  checkAborted(o.signal, 'dd')
  const target = o.targetFormat ?? 'raw'
  if (target !== 'raw' && target !== 'qcow2' && target !== 'vpc') throw new UsageError(`Unknown file format '${String(target)}' for dd (raw, qcow2, vpc)`)
  const { ddFile } = await import('../convert/dd.js')
  const format = formatOption(o.format)
  return ddFile(input, output, {
    ...(format !== undefined ? { sourceFormat: format } : {}),
    sourceForceShare: o.forceShare === true,
    targetFormat: target,
    ...(o.blockSize !== undefined ? { blockSize: o.blockSize } : {}),
    ...(o.count !== undefined ? { count: o.count } : {}),
    ...(o.skip !== undefined ? { skip: o.skip } : {}),
    ...(o.signal ? { signal: o.signal } : {}),
  })
}
