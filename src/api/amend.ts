/**
 * qemu-img amend: change the format options of an existing image in place.
 */
import { UsageError, checkAborted } from '../errors.js'
import { openImage as openByPath } from '../open.js'
import { formatOption, type OpenOptions } from './image.js'

export interface AmendOptions {
  /**
   * The options to change, as qemu-img amend -o takes them: compat, size, lazy_refcounts, refcount_bits,
   * data_file, data_file_raw. With `help` (or `?`) among them nothing is changed: the result lists the options.
   */
  options: Record<string, string>
  /** the image's format; probed when absent (only qcow2 can be amended) */
  format?: OpenOptions['format']
  /** called with each note about the image met on opening it (e.g. stale refcounts rebuilt) */
  onNotice?: (notice: string) => void
  /** called at the start (0 of 1) and the end (1 of 1) */
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

/** An option amend takes, as `qemu-img amend -o help` lists it. */
export interface AmendOptionHelp {
  name: string
  /** qemu's type words: str, num, size, bool (on/off) */
  type: string
  help: string
}

export interface AmendResult {
  /** notes about the image met on the way */
  notices: string[]
  /** the options of the image's format, when `help` was asked for (nothing was changed) */
  help?: AmendOptionHelp[]
}

const isHelp = (options: Record<string, string>): boolean => 'help' in options || '?' in options

/** The options `amend` takes for `format` (qemu-img amend -f FMT -o help); other formats are refused with qemu's words. */
export async function amendOptionHelp(format: string): Promise<AmendOptionHelp[]> {
  if (format !== 'qcow2') throw new UsageError(`Format driver '${format}' does not support option amendment`)
  return [...(await import('../formats/qcow2/index.js')).QCOW2_AMEND_OPTIONS]
}

/**
 * Amend a qcow2 image's options, with qemu-img amend's refusals and words.
 * Everything that can be refused is checked before anything is written.
 */
export async function amend(path: string, o: AmendOptions): Promise<AmendResult> {
  checkAborted(o.signal, 'amend')
  if (Object.keys(o.options).length === 0) throw new UsageError('Must specify options (-o)')
  const help = isHelp(o.options)
  const d = await openByPath(path, { format: formatOption(o.format), readOnly: help })
  let handedOver = false
  try {
    if (d.format !== 'qcow2') throw new UsageError(`Format driver '${d.format}' does not support option amendment`)
    if (help) return { notices: [], help: await amendOptionHelp(d.format) }
    const q = await import('../formats/qcow2/index.js')
    const parsed = q.parseAmendOptions(o.options)
    const img = d as import('../formats/qcow2/index.js').Qcow2Image
    const notices = [...(img.writer?.notices ?? [])]
    for (const n of notices) o.onNotice?.(n)
    checkAborted(o.signal, 'amend')
    o.onProgress?.(0, 1)
    handedOver = true // amendQcow2 closes the image, whatever happens
    await q.amendQcow2(img, parsed)
    o.onProgress?.(1, 1)
    return { notices }
  } finally {
    if (!handedOver) await d.close()
  }
}
