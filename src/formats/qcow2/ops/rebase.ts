/**
 * Rebase (qemu-img rebase): give a qcow2 image another backing file.
 *
 * Safe mode first copies into the image every piece the image does not
 * allocate itself and where the old backing chain and the new one read
 * differently (the old bytes, read through the backing file the header still
 * names), flushes, and only then rewrites the header to name the new backing
 * file: a crash before the switch leaves the old backing named and the image
 * reading the old bytes. Unsafe mode rewrites the header only.
 *
 * The header is laid out as QEMU's qcow2_update_header lays it out: the fields,
 * the crypto extension, the backing format extension (only when a format is
 * given), the other extensions in the order found, the end marker, then the
 * backing file name; the whole used region is one write.
 */
import { UnsupportedFeatureError, UsageError, checkAborted } from '../../../errors.js'
import type { DiskImage } from '../../../image/disk-image.js'
import { alignUp, putU32be, putU64be } from '../../../util/bytes.js'
import { EXT_BACKING_FORMAT, EXT_CRYPTO, MAX_BACKING_FILE_NAME } from '../spec/constants.js'
import { dataFileRaw, hasDataFile, readHeader, type Qcow2Header } from '../spec/header.js'
import type { Qcow2State } from '../read/state.js'
import { compressCluster } from '../write/compress-write.js'
import type { Qcow2Writer } from '../write/write.js'
import { writerOf, type Qcow2OpenImage } from './open-image.js'

export interface RebaseQcow2Options {
  /** the new backing file name as the header will store it; undefined: no backing file (flatten) */
  backingFile: string | undefined
  /** the new backing format (the backing format extension); undefined: none */
  backingFormat: string | undefined
  /** safe mode: the new backing image, open read-only (undefined when flattening) */
  newBacking?: DiskImage | undefined
  /** only rewrite the header (qemu-img rebase -u) */
  unsafe: boolean
  /**
   * qemu-img 8.2's rebase -c: each whole cluster copied in is written compressed (stored as it is when it
   * does not shrink, as convert -c); a cluster cut short by the image's end is written as it is
   */
  compress?: boolean
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

export interface RebaseQcow2Result {
  /** guest bytes copied into the image (safe mode) */
  bytesCopied: number
}

/** How much is compared and copied at a time. */
const CHUNK = 1024 * 1024

export async function rebaseQcow2(img: Qcow2OpenImage, o: RebaseQcow2Options): Promise<RebaseQcow2Result> {
  const w = writerOf(img)
  const state = img.state
  const file = state.filename
  const h = state.header
  if (o.backingFile !== undefined) {
    if (hasDataFile(h) && dataFileRaw(h)) {
      throw new UnsupportedFeatureError(`qcow2: ${file}: a backing file cannot be set on an image with a raw external data file (data-file-raw)`)
    }
    if (new TextEncoder().encode(o.backingFile).byteLength > MAX_BACKING_FILE_NAME) {
      throw new UsageError(`qcow2: ${file}: backing file name is longer than ${MAX_BACKING_FILE_NAME} bytes`)
    }
  }
  if (o.backingFormat !== undefined && new TextEncoder().encode(o.backingFormat).byteLength >= 16) {
    throw new UsageError(`qcow2: ${file}: backing format name '${o.backingFormat}' is longer than 15 bytes`)
  }
  // qemu-img 8.2 refuses -c only for a driver that cannot compress; with -u nothing is copied, so -c changes nothing
  if (o.compress && !o.unsafe && hasDataFile(h))
    throw new UnsupportedFeatureError(`qcow2: ${file}: compressed clusters are not possible with an external data file (rebase -c)`)
  let bytesCopied = 0
  if (!o.unsafe) bytesCopied = await copyDifferences(img, w, o)
  await w.mutex.run(async () => {
    w.assertUsable()
    await w.refcounts.persist()
    await w.flushNow()
    await switchBacking(w, state, o.backingFile, o.backingFormat)
    await w.flushNow()
  })
  return { bytesCopied }
}

/** Guest bytes of `d` at [offset, offset+length); zeros past its end (or without an image). */
async function readPadded(d: DiskImage | undefined, offset: number, length: number): Promise<Uint8Array> {
  if (!d) return new Uint8Array(length)
  const inside = Math.max(0, Math.min(length, d.virtualSize - offset))
  if (inside === length) return d.read(offset, length)
  const out = new Uint8Array(length)
  if (inside > 0) out.set(await d.read(offset, inside))
  return out
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.byteLength !== b.byteLength) return false
  const n = a.byteLength
  let i = 0
  if (a.byteOffset % 4 === 0 && b.byteOffset % 4 === 0 && n >= 4) {
    const wa = new Uint32Array(a.buffer, a.byteOffset, n >>> 2)
    const wb = new Uint32Array(b.buffer, b.byteOffset, n >>> 2)
    for (let k = 0; k < wa.length; k++) if (wa[k] !== wb[k]) return false
    i = wa.length * 4
  }
  for (; i < n; i++) if (a[i] !== b[i]) return false
  return true
}

/**
 * Write the old view into the image wherever the image does not allocate and
 * the old and new backing chains differ, cluster by cluster; flush at the end.
 */
async function copyDifferences(img: Qcow2OpenImage, w: Qcow2Writer, o: RebaseQcow2Options): Promise<number> {
  const state = img.state
  const size = state.header.size
  const cs = state.header.clusterSize
  const oldBacking = state.backing
  const newBacking = o.newBacking
  let copied = 0
  for (let pos = 0; pos < size; pos += CHUNK) {
    checkAborted(o.signal, 'rebase')
    const n = Math.min(CHUNK, size - pos)
    // the pieces this image does not allocate read from the backing chain
    const runs: Array<{ guest: number; length: number }> = []
    await w.mutex.shared(async () => {
      for await (const run of state.map(pos, n)) {
        if (run.type === 'unallocated' || run.type === 'unallocated-alloc') runs.push({ guest: run.guest, length: run.length })
      }
    })
    for (const run of runs) {
      const before = await readPadded(oldBacking, run.guest, run.length)
      const after = await readPadded(newBacking, run.guest, run.length)
      // compare per cluster: a differing cluster's old bytes are written whole (its part of the run)
      const end = run.guest + run.length
      for (let p = run.guest; p < end;) {
        const to = Math.min(end, (Math.floor(p / cs) + 1) * cs)
        const a = before.subarray(p - run.guest, to - run.guest)
        if (!equalBytes(a, after.subarray(p - run.guest, to - run.guest))) {
          const z = o.compress && p % cs === 0 && to - p === cs ? await compressCluster(a, cs, state.header.compressionType) : undefined
          if (z) await w.writeCompressed(p, z)
          else await w.write(p, a.slice())
          copied += to - p
        }
        p = to
      }
    }
    o.onProgress?.(pos + n, size)
  }
  // rule 2: the copied data is durable before the header names the new backing file
  await w.flush()
  return copied
}

/**
 * Rewrite the header cluster's used region: extensions in QEMU's order with
 * the new backing format extension, then the new backing file name. One
 * write; the in-memory header follows what was written.
 */
async function switchBacking(w: Qcow2Writer, state: Qcow2State, backingFile: string | undefined, backingFormat: string | undefined): Promise<void> {
  const h = state.header
  const dev = state.device
  const cs = h.clusterSize
  const file = state.filename
  const oldEnd = usedEnd(h)
  const onDisk = await dev.read(0, Math.min(cs, dev.size), 'header')
  const buf = new Uint8Array(cs)
  buf.set(onDisk.subarray(0, Math.min(onDisk.byteLength, h.version === 2 ? 72 : h.headerLength)))
  const enc = new TextEncoder()
  let pos = h.version === 2 ? 72 : h.headerLength
  const room = (need: number) => {
    if (pos + need > cs) throw new UsageError(`qcow2: ${file}: the header extensions and the backing file name do not fit in the header cluster (${cs} bytes)`)
  }
  const add = (magic: number, data: Uint8Array) => {
    room(8 + alignUp(data.byteLength, 8))
    putU32be(buf, pos, magic)
    putU32be(buf, pos + 4, data.byteLength)
    buf.set(data, pos + 8)
    pos += 8 + alignUp(data.byteLength, 8)
  }
  const others = h.extensions.filter((x) => x.magic !== EXT_BACKING_FORMAT)
  for (const x of others) if (x.magic === EXT_CRYPTO) add(x.magic, x.data)
  if (backingFormat !== undefined) add(EXT_BACKING_FORMAT, enc.encode(backingFormat))
  for (const x of others) if (x.magic !== EXT_CRYPTO) add(x.magic, x.data)
  room(8)
  pos += 8 // end marker
  let nameOffset = 0
  let nameSize = 0
  if (backingFile !== undefined) {
    const name = enc.encode(backingFile)
    room(name.byteLength)
    nameOffset = pos
    nameSize = name.byteLength
    buf.set(name, pos)
    pos += name.byteLength
  }
  putU64be(buf, 8, nameOffset)
  putU32be(buf, 16, nameSize)
  // the bytes the old layout used beyond the new one are cleared in the same write
  const length = Math.min(cs, alignUp(Math.max(pos, oldEnd), 8))
  await w.writeMetadata(0, buf.subarray(0, length), 'header')
  // the open image follows the header as written
  const fresh = await readHeader(dev, { file, readOnly: false, forCheck: false, infoOnly: true })
  h.backingFileOffset = fresh.backingFileOffset
  h.backingFileSize = fresh.backingFileSize
  h.extensions = fresh.extensions
  if (fresh.backingFile !== undefined) h.backingFile = fresh.backingFile
  else delete h.backingFile
  if (fresh.backingFormat !== undefined) h.backingFormat = fresh.backingFormat
  else delete h.backingFormat
}

/** Where the header's used bytes end: past the last extension and the backing file name. */
function usedEnd(h: Qcow2Header): number {
  let end = h.version === 2 ? 72 : h.headerLength
  for (const x of h.extensions) end = Math.max(end, x.offset + 8 + alignUp(x.data.byteLength, 8))
  end += 8
  if (h.backingFileOffset > 0) end = Math.max(end, h.backingFileOffset + h.backingFileSize)
  return end
}
