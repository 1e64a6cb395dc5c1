/**
 * Rebase and commit, the backing-chain operations (qemu-img rebase, qemu-img
 * commit). Each takes paths, opens what it writes with the write lock, and
 * opens only backing files the image names or the caller gives.
 */
import { resolve } from 'node:path'
import { UsageError, checkAborted } from '../errors.js'
import type { BlockDevice, DeviceOpener } from '../io/block-device.js'
import { openFileDevice } from '../io/file-device.js'
import { PassThroughDevice } from '../io/pass-through-device.js'
import type { DiskImage } from '../image/disk-image.js'
import { PROBE_BYTES, isFormatName, probeFormat } from '../image/probe.js'
import { openImage as openByPath, openImageOnDevice } from '../open.js'
import { escapeControls } from '../util/text.js'
import { formatOption, type OpenOptions } from './image.js'
import type { CommonOptions, MergeResult } from './ops.js'

type Qcow2Image = import('../formats/qcow2/index.js').Qcow2Image

export interface RebaseOptions extends CommonOptions {
  /** the image's format (probed when absent; it must be qcow2) */
  format?: OpenOptions['format']
  /** the new backing file's format (qemu-img rebase -F); required unless flattening */
  backingFormat?: string
  /** only change the name in the header; nothing is read or copied (qemu-img rebase -u) */
  unsafe?: boolean
  /** qemu-img 8.2's rebase -c: the clusters copied in are written compressed (safe mode only) */
  compress?: boolean
}

export interface RebaseResult {
  /** guest bytes copied into the image so that it reads the same over its new backing file */
  bytesCopied: number
  /** the backing file the header names now (undefined: none) */
  backingFile: string | undefined
  backingFormat: string | undefined
}

/**
 * Give a qcow2 image a new backing file, `''` for none (qemu-img rebase -b).
 * Safe mode copies into the image every cluster where the old and the new
 * backing chains read differently, flushes, then switches the header; the
 * image reads the same guest bytes before and after. A relative backing name
 * is stored as given and opened relative to the image's folder.
 */
export async function rebase(path: string, backingFile: string, o: RebaseOptions = {}): Promise<RebaseResult> {
  checkAborted(o.signal, 'rebase')
  const q = await import('../formats/qcow2/index.js')
  const flatten = backingFile === ''
  const name = flatten ? undefined : backingFile
  if (name !== undefined) {
    if (o.backingFormat === undefined) throw new UsageError(`Could not change the backing file to '${escapeControls(name)}': backing format must be specified`)
    const protocol = q.protocolPrefix(name)
    if (protocol !== undefined) {
      throw new UsageError(
        `${path}: backing file ${escapeControls(name)} names the protocol '${escapeControls(protocol)}:'; imgtool opens only plain file names`,
      )
    }
  }
  const backingFormat = flatten ? undefined : o.backingFormat
  if (!o.unsafe && backingFormat !== undefined && !isFormatName(backingFormat)) throw new UsageError(`Unknown driver '${escapeControls(backingFormat)}'`)
  // unsafe mode needs no working backing file: the image is opened alone (as qemu-img info opens it)
  const d = await openByPath(path, { format: formatOption(o.format), readOnly: false, infoOnly: o.unsafe === true })
  let newBacking: DiskImage | undefined
  try {
    if (d.format !== 'qcow2') throw new UsageError(`${d.format}: ${path}: rebase needs a qcow2 image`)
    if (!o.unsafe && name !== undefined) {
      const full = q.combinePath(path, name)
      if (resolve(full) === resolve(path)) throw new UsageError(`${path}: an image cannot be its own backing file`)
      newBacking = await openByPath(full, { format: formatOption(backingFormat), readOnly: true })
    }
    const r = await q.rebaseQcow2(d as Qcow2Image, {
      backingFile: name,
      backingFormat,
      newBacking,
      unsafe: o.unsafe === true,
      ...(o.compress ? { compress: true } : {}),
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    })
    return { bytesCopied: r.bytesCopied, backingFile: name, backingFormat }
  } finally {
    if (newBacking) await newBacking.close().catch(() => undefined)
    await d.close()
  }
}

export interface CommitOptions extends CommonOptions {
  /** the image's format (probed when absent): qcow2 commits into its backing chain, dmsnap merges into its origin */
  format?: OpenOptions['format']
  /** qcow2: commit into this image of the backing chain instead of the backing file (implies keepOverlay, as qemu-img commit -b) */
  base?: string
  /** qcow2: keep the overlay's data (qemu-img commit -d) */
  keepOverlay?: boolean
  /** dm-snapshot: the origin the store merges into */
  origin?: string
  /** dm-snapshot: the origin's format (probed when absent) */
  originFormat?: OpenOptions['format']
  /** qcow2: qemu-img commit -r, at most this many bytes copied per second (0: no limit) */
  rateLimit?: number
}

export interface CommitResult {
  format: 'qcow2' | 'dmsnap'
  /** qcow2: guest bytes written into the base */
  bytesCommitted: number
  /** qcow2: the image committed into */
  base?: string
  /** qcow2: whether the overlay was emptied */
  emptied: boolean
  /** dm-snapshot: what the merge did */
  merge?: MergeResult
}

/**
 * Commit an image into what lies below it, decided by the image's format:
 * a qcow2 overlay into its backing file (or `base` further down the chain,
 * with every layer between), then empties the overlay unless it is kept; a
 * dm-snapshot store merges into its origin (as merge()).
 */
export async function commit(path: string, o: CommitOptions = {}): Promise<CommitResult> {
  checkAborted(o.signal, 'commit')
  const format = formatOption(o.format) ?? (await probePath(path))
  if (format === 'dmsnap') {
    if (o.origin === undefined) throw new UsageError('commit: a dm-snapshot store commits into its origin: give --origin ORIGIN')
    if (o.base !== undefined) throw new UsageError('commit: -b goes with qcow2 backing chains; a dm-snapshot store commits into its origin')
    const { merge } = await import('./ops.js')
    const m = await merge(path, o.origin, {
      ...(o.originFormat ? { originFormat: o.originFormat } : {}),
      ...(o.onProgress ? { onProgress: o.onProgress } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    })
    return { format: 'dmsnap', bytesCommitted: m.chunksCopied * m.chunkSize, emptied: false, merge: m }
  }
  if (format !== 'qcow2') throw new UsageError(`${format}: ${path}: commit needs a qcow2 image (or a dm-snapshot store)`)
  if (o.origin !== undefined) throw new UsageError('commit: --origin goes with dm-snapshot stores')
  const chain = await chainOf(path)
  let depth = 1
  if (o.base !== undefined) {
    const { combinePath } = await import('../formats/qcow2/index.js')
    const wanted = new Set([resolve(o.base), resolve(combinePath(path, o.base))])
    depth = chain.findIndex((c, i) => i > 0 && wanted.has(resolve(c.path)))
    if (depth < 1) throw new UsageError(`Did not find '${escapeControls(o.base)}' in the backing chain of '${escapeControls(path)}'`)
  } else if (chain.length < 2) {
    throw new UsageError('Image does not have a backing file')
  }
  const base = chain[depth]!
  const keepOverlay = o.keepOverlay === true || o.base !== undefined
  // a base smaller than the overlay is grown first, as qemu-img commit grows it (what the overlay reads
  // past the base's old end, zeros, the grown base reads too); a crash after this leaves a larger base
  if (base.size < chain[0]!.size) await growBase(base.path, base.format, chain[0]!.size)
  // the base is opened for writing first; the overlay's chain reads it through a view of that
  // device, so one process holds one lock per file
  const baseDev = await openFileDevice(base.path, { readOnly: false })
  let baseImg: DiskImage | undefined
  try {
    baseImg = await openImageOnDevice(baseDev, { format: formatOption(base.format), readOnly: false, depth: 0, chain: [] })
    const basePath = resolve(base.path)
    const opener: DeviceOpener = (p, opts) => (resolve(p) === basePath ? Promise.resolve(new BaseView(baseDev)) : openFileDevice(p, opts))
    const top = await openByPath(path, { format: 'qcow2', readOnly: false, openDevice: opener })
    try {
      const q = await import('../formats/qcow2/index.js')
      const r = await q.commitQcow2(top as Qcow2Image, baseImg, depth, {
        keepOverlay,
        ...(o.rateLimit ? { rateLimit: o.rateLimit } : {}),
        ...(o.onProgress ? { onProgress: o.onProgress } : {}),
        ...(o.signal ? { signal: o.signal } : {}),
      })
      return { format: 'qcow2', bytesCommitted: r.bytesCommitted, base: base.path, emptied: !keepOverlay }
    } finally {
      await top.close()
    }
  } finally {
    if (baseImg) await baseImg.close()
    else await baseDev.close()
  }
}

async function growBase(path: string, format: string, size: number): Promise<void> {
  if (format === 'qcow2') {
    const { resize } = await import('./ops.js')
    await resize(path, size)
  } else if (format === 'raw') {
    const dev = await openFileDevice(path, { readOnly: false })
    try {
      await dev.truncate(size)
      await dev.flush()
    } finally {
      await dev.close()
    }
  } else {
    throw new UsageError(`${format}: ${path}: the base is smaller than the image committed into it, and imgtool cannot grow a ${format} base`)
  }
}

/** A read-only view of the base's device for the overlay's chain: closing it leaves the device open. */
class BaseView extends PassThroughDevice {
  constructor(inner: BlockDevice) {
    super(inner)
  }
  override get readOnly(): boolean {
    return true
  }
  override write(): Promise<void> {
    return Promise.reject(new UsageError(`${this.name}: the base is written through its own writer`))
  }
  override truncate(): Promise<void> {
    return Promise.reject(new UsageError(`${this.name}: the base is written through its own writer`))
  }
  override close(): Promise<void> {
    return Promise.resolve()
  }
}

async function probePath(path: string): Promise<NonNullable<OpenOptions['format']>> {
  const dev = await openFileDevice(path, { readOnly: true, forceShare: true })
  try {
    return probeFormat(await dev.read(0, Math.min(PROBE_BYTES, Math.max(dev.size, 4)), 'probe'))
  } finally {
    await dev.close()
  }
}

/** The backing chain's files, the image first, with the format each was opened as (read without locks). */
async function chainOf(path: string): Promise<Array<{ path: string; format: string; size: number }>> {
  const d = await openByPath(path, { format: 'qcow2', readOnly: true, forceShare: true })
  try {
    const out: Array<{ path: string; format: string; size: number }> = []
    for (let x: DiskImage | undefined = d; x; x = x.backing) out.push({ path: x.filename, format: x.format, size: x.virtualSize })
    return out
  } finally {
    await d.close()
  }
}
