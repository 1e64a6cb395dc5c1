/**
 * Compressed clusters: raw deflate (zlib compression type, as QEMU writes it)
 * and zstd (compression type 1). Node 20 has no zstd, so decompression uses
 * fzstd: pure JavaScript, no native build, no dependencies.
 */
import { inflateRawSync, constants as zc } from 'node:zlib'
import { decompress as zstdDecompress } from 'fzstd'
import { COMPRESSION_ZSTD } from './constants.js'

/** Decompress one cluster. Throws a plain Error with the codec's reason on bad data. */
export function decompressCluster(input: Uint8Array, clusterSize: number, compressionType: number): Uint8Array {
  if (compressionType === COMPRESSION_ZSTD) {
    const frame = input.subarray(0, zstdFrameLength(input))
    // Given an output buffer, fzstd allocates nothing more (memory stays bounded
    // whatever the frame header claims), but it neither says how many bytes it
    // wrote nor refuses a frame shorter or longer than the buffer. Decoding into
    // two buffers with different fill bytes tells: the bytes it wrote are equal
    // in both. QEMU fails a frame that does not fill the cluster exactly.
    const a = new Uint8Array(clusterSize + 1)
    const b = new Uint8Array(clusterSize + 1).fill(0xff)
    zstdDecompress(frame, a)
    zstdDecompress(frame, b)
    if (a[clusterSize] === b[clusterSize]) throw new Error(`zstd frame decompresses to more than ${clusterSize} bytes`)
    const out = a.subarray(0, clusterSize)
    if (!Buffer.from(out.buffer, out.byteOffset, clusterSize).equals(Buffer.from(b.buffer, b.byteOffset, clusterSize))) {
      let n = 0
      while (a[n] === b[n]) n++
      throw new Error(`zstd frame decompressed to ${n} bytes, expected ${clusterSize}`)
    }
    return out
  }
  // QEMU accepts a stream that fills the cluster even if it has no end marker, and ignores trailing bytes.
  // QEMU inflates with windowBits -12 but into one cluster-sized buffer, so zlib resolves matches
  // anywhere in the cluster: the full window here accepts the same streams.
  let out: Buffer
  try {
    out = inflateRawSync(input, { finishFlush: zc.Z_SYNC_FLUSH, maxOutputLength: clusterSize })
  } catch (e) {
    if (e instanceof RangeError) throw new Error(`deflate stream decompresses to more than ${clusterSize} bytes`)
    throw new Error(`deflate: ${(e as Error).message}`)
  }
  if (out.byteLength !== clusterSize) throw new Error(`deflate stream decompressed to ${out.byteLength} bytes, expected ${clusterSize}`)
  return new Uint8Array(out.buffer, out.byteOffset, out.byteLength)
}

/**
 * Length of the zstd frame at the start of `b` (the descriptor's byte range is
 * rounded to sectors, so bytes after the frame are whatever follows on disk).
 */
export function zstdFrameLength(b: Uint8Array): number {
  const fail = (why: string): never => {
    throw new Error(`zstd: ${why}`)
  }
  if (b.length < 6) fail('data too short for a frame header')
  const magic = (b[0]! | (b[1]! << 8) | (b[2]! << 16) | (b[3]! << 24)) >>> 0
  if (magic !== 0xfd2fb528) fail(`bad frame magic 0x${magic.toString(16)}`)
  const fhd = b[4]!
  const fcsFlag = fhd >> 6
  const singleSegment = (fhd >> 5) & 1
  const checksum = (fhd >> 2) & 1
  const dictIdFlag = fhd & 3
  let pos = 5
  if (!singleSegment) pos += 1 // window descriptor
  pos += [0, 1, 2, 4][dictIdFlag]!
  pos += fcsFlag === 0 ? (singleSegment ? 1 : 0) : [0, 2, 4, 8][fcsFlag]!
  for (;;) {
    if (pos + 3 > b.length) fail('frame runs past the end of the compressed data')
    const bh = b[pos]! | (b[pos + 1]! << 8) | (b[pos + 2]! << 16)
    const last = bh & 1
    const type = (bh >> 1) & 3
    const size = bh >>> 3
    if (type === 3) fail('reserved block type')
    pos += 3 + (type === 1 ? 1 : size)
    if (last) break
  }
  if (checksum) pos += 4
  if (pos > b.length) fail('frame runs past the end of the compressed data')
  return pos
}
