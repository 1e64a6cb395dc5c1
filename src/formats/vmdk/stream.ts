/**
 * A streamOptimized VMDK written front to back, as VMware (ESXi, ovftool) and
 * the cloud importers expect it, so the output may be a pipe:
 *
 *   header (version 3, compressed + markers, gdOffset GD_AT_END)
 *   embedded descriptor, zeros up to the first grain (overhead: one grain)
 *   for every grain table's span, in guest order:
 *     each grain holding a nonzero byte: marker (lba, size) + zlib stream, padded to a sector
 *     when the span had grains: GT marker + the grain table
 *   GD marker + the grain directory
 *   footer marker + footer (the header, with the directory's real offset)
 *   end-of-stream marker
 *
 * Grains are deflated whole (the last grain of the disk zero-padded) with the
 * zlib stream format, level 6 (zlib's default, as QEMU's compress() call),
 * a batch of grains per call on libuv's thread pool (util/deflate.ts: the
 * system zlib through the optional addon, else Node's), several batches at once. Grains of zeros are not stored.
 *
 * Not a durable-in-place format: the file is valid only once the footer and
 * end-of-stream marker are written (before that, open refuses it: no
 * footer). Written to a file, the grains and tables are flushed before the
 * directory, and the directory before the footer, so a crash leaves a file
 * that open refuses or one that reads whole.
 */
import { checkAborted } from '../../errors.js'
import type { DiskImage } from '../../image/disk-image.js'
import { isAllZero, putU32le, putU64le } from '../../util/bytes.js'
import { zlibBlocks } from '../../util/deflate.js'
import { type VmdkCreateOptions, streamDescriptor } from './create.js'
import {
  COMPRESSION_DEFLATE,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NL_DETECT,
  GD_AT_END,
  MARKER_FOOTER,
  MARKER_GD,
  MARKER_GT,
  SECTOR,
  SPARSE_MAGIC,
  encodeHeader,
  encodeMarker,
} from './spec.js'

const GRAIN_SECTORS = 128
const GRAIN = GRAIN_SECTORS * SECTOR
const GTES = 512
const DESCRIPTOR_SECTORS = 20
/** grains read and deflated at once */
const BATCH = 32
/** batches being read and deflated while earlier ones are written */
const AHEAD = 3
/** bytes gathered before one call to the sink */
const SINK_CHUNK = 1 << 20

export interface StreamSink {
  /** the next bytes of the file, in order */
  write(data: Uint8Array): Promise<void>
  /** a file: make what was written durable (a pipe has none) */
  flush?(): Promise<void>
}

export interface StreamWriteOptions {
  onProgress?: (done: number, total: number) => void
  signal?: AbortSignal
}

export interface StreamWriteResult {
  bytesRead: number
  bytesWritten: number
  compressedClusters: number
}

/** Gathers small pieces into large sink writes; counts the bytes and sectors written. */
class Out {
  private parts: Uint8Array[] = []
  private held = 0
  written = 0
  constructor(private readonly sink: StreamSink) {}
  get sector(): number {
    return this.written / SECTOR
  }
  async put(b: Uint8Array): Promise<void> {
    this.parts.push(b)
    this.held += b.byteLength
    this.written += b.byteLength
    if (this.held >= SINK_CHUNK) await this.drain()
  }
  /** pad to a sector boundary */
  async pad(): Promise<void> {
    const r = this.written % SECTOR
    if (r) await this.put(new Uint8Array(SECTOR - r))
  }
  async drain(): Promise<void> {
    if (this.held === 0) return
    const all = new Uint8Array(this.held)
    let at = 0
    for (const p of this.parts) {
      all.set(p, at)
      at += p.byteLength
    }
    this.parts = []
    this.held = 0
    await this.sink.write(all)
  }
}

function header(o: VmdkCreateOptions, gdOffset: bigint, overhead: number): Uint8Array {
  return encodeHeader({
    magic: SPARSE_MAGIC,
    version: 3,
    flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
    capacity: BigInt(o.size / SECTOR),
    grainSize: BigInt(GRAIN_SECTORS),
    descriptorOffset: 1n,
    descriptorSize: BigInt(DESCRIPTOR_SECTORS),
    numGTEsPerGT: GTES,
    rgdOffset: 0n,
    gdOffset,
    overhead: BigInt(overhead),
    uncleanShutdown: 0,
    newlineChars: [0x0a, 0x20, 0x0d, 0x0a],
    compressAlgorithm: COMPRESSION_DEFLATE,
  })
}

/** The grain indices holding data (not unallocated, not zero), in order: from the source's extents. */
async function* dataGrains(src: DiskImage): AsyncGenerator<number> {
  let last = -1
  for await (const x of src.extents()) {
    if (x.zero || !x.data) continue
    const first = Math.max(last + 1, Math.floor(x.start / GRAIN))
    const end = Math.ceil((x.start + x.length) / GRAIN)
    for (let g = first; g < end; g++) yield g
    if (end - 1 > last) last = end - 1
  }
}

/**
 * Write `src` as a streamOptimized VMDK into `sink`, front to back. `o` is
 * parsed create options (its size is the source's, whole sectors);
 * `name` is the extent name the embedded descriptor gives.
 */
export async function writeStreamOptimized(
  src: DiskImage,
  sink: StreamSink,
  o: VmdkCreateOptions,
  name: string,
  w: StreamWriteOptions = {},
): Promise<StreamWriteResult> {
  const out = new Out(sink)
  const overhead = GRAIN_SECTORS
  const capacity = o.size / SECTOR
  const gdEntries = Math.ceil(capacity / (GTES * GRAIN_SECTORS))
  const gd = new Uint8Array(Math.ceil((gdEntries * 4) / SECTOR) * SECTOR)
  const result: StreamWriteResult = { bytesRead: 0, bytesWritten: 0, compressedClusters: 0 }

  // header, descriptor, zeros to the first grain
  await out.put(header(o, GD_AT_END, overhead))
  const text = new TextEncoder().encode(streamDescriptor(o, name))
  const desc = new Uint8Array(DESCRIPTOR_SECTORS * SECTOR)
  desc.set(text.subarray(0, desc.byteLength))
  await out.put(desc)
  await out.put(new Uint8Array((overhead - 1 - DESCRIPTOR_SECTORS) * SECTOR))

  let table: Uint8Array | undefined
  let tableIndex = -1
  const closeTable = async (): Promise<void> => {
    if (!table) return
    await out.put(encodeMarker(table.byteLength / SECTOR, MARKER_GT))
    putU32le(gd, tableIndex * 4, out.sector)
    await out.put(table)
    table = undefined
  }

  const emit = async (grain: number, packed: Uint8Array): Promise<void> => {
    const t = Math.floor(grain / GTES)
    if (t !== tableIndex) {
      await closeTable()
      tableIndex = t
    }
    table ??= new Uint8Array(Math.ceil((GTES * 4) / SECTOR) * SECTOR)
    putU32le(table, (grain % GTES) * 4, out.sector)
    const marker = new Uint8Array(12)
    putU64le(marker, 0, BigInt(grain * GRAIN_SECTORS))
    putU32le(marker, 8, packed.byteLength)
    await out.put(marker)
    await out.put(packed)
    await out.pad()
    result.compressedClusters++
  }

  // a batch is read and deflated while the ones before it are emitted (in order, at most AHEAD in flight):
  // each run of consecutive grains in one read, the batch's grains deflated in one call (util/deflate.ts)
  const prepare = async (batch: number[]): Promise<Array<Uint8Array | undefined>> => {
    const packed: Array<Uint8Array | undefined> = new Array<Uint8Array | undefined>(batch.length).fill(undefined)
    const jobs: Array<Promise<void>> = []
    for (let i = 0; i < batch.length;) {
      let j = i + 1
      while (j < batch.length && batch[j] === batch[j - 1]! + 1) j++
      const at = batch[i]! * GRAIN
      const n = Math.min((j - i) * GRAIN, src.virtualSize - at)
      const first = i
      jobs.push(
        src.read(at, n).then(async (bytes) => {
          result.bytesRead += n
          // the disk's last grain, cut short by its end, is deflated zero-padded
          const buf = n % GRAIN === 0 ? bytes : padded(bytes, Math.ceil(n / GRAIN) * GRAIN)
          const offsets: number[] = []
          const index: number[] = []
          for (let k = 0; k * GRAIN < buf.byteLength; k++) {
            if (isAllZero(buf.subarray(k * GRAIN, (k + 1) * GRAIN))) continue
            offsets.push(k * GRAIN)
            index.push(first + k)
          }
          const zs = await zlibBlocks(buf, offsets, GRAIN, 6)
          for (const [k, z] of zs.entries()) packed[index[k]!] = z
        }),
      )
      i = j
    }
    await Promise.all(jobs)
    return packed
  }
  const inFlight: Array<{ batch: number[]; packed: Promise<Array<Uint8Array | undefined>> }> = []
  const emitOldest = async (): Promise<void> => {
    const { batch, packed } = inFlight.shift()!
    for (const [i, p] of (await packed).entries()) if (p) await emit(batch[i]!, p)
    checkAborted(w.signal, 'convert')
    w.onProgress?.(Math.min(src.virtualSize, (batch[batch.length - 1]! + 1) * GRAIN), src.virtualSize)
  }
  const submit = async (batch: number[]): Promise<void> => {
    const packed = prepare(batch)
    packed.catch(() => undefined) // awaited in order by emitOldest; an early failure is not unhandled
    inFlight.push({ batch, packed })
    while (inFlight.length > AHEAD) await emitOldest()
  }

  let batch: number[] = []
  try {
    for await (const g of dataGrains(src)) {
      batch.push(g)
      if (batch.length >= BATCH) {
        await submit(batch)
        batch = []
      }
    }
    if (batch.length > 0) await submit(batch)
    while (inFlight.length > 0) await emitOldest()
  } finally {
    // after a failure: let every deflate still running finish before the caller closes the source
    await Promise.allSettled(inFlight.map((x) => x.packed))
  }
  await closeTable()

  // directory, footer, end of stream; on a file each durable before what names it (grains and
  // tables before the directory, the directory before the footer), so a footer found means a whole file
  await out.drain()
  await sink.flush?.()
  await out.put(encodeMarker(gd.byteLength / SECTOR, MARKER_GD))
  const gdSector = out.sector
  await out.put(gd)
  await out.drain()
  await sink.flush?.()
  await out.put(encodeMarker(1, MARKER_FOOTER))
  await out.put(header(o, BigInt(gdSector), overhead))
  await out.put(new Uint8Array(SECTOR))
  await out.drain()
  w.onProgress?.(src.virtualSize, src.virtualSize)
  result.bytesWritten = out.written
  return result
}

function padded(b: Uint8Array, size: number): Uint8Array {
  const g = new Uint8Array(size)
  g.set(b)
  return g
}
