/**
 * dm-snapshot persistent exception store ("P"/"PO"): constants and the chunk
 * arithmetic of the on-disk layout `H | A0 | D×E | A1 | D×E | …`
 * (drivers/md/dm-snap-persistent.c).
 */

/** The bytes "SnAp" read as a little-endian u32. */
export const SNAP_MAGIC = 0x70416e53
export const SNAPSHOT_DISK_VERSION = 1
export const SECTOR_BYTES = 512
/** One exception record: old_chunk u64 LE, new_chunk u64 LE. */
export const RECORD_BYTES = 16
export const RECORDS_PER_SECTOR = SECTOR_BYTES / RECORD_BYTES
/** The kernel's default chunk size when the table says 0 (16 KiB). */
export const DEFAULT_CHUNK_SECTORS = 32
/** INT_MAX >> 9 rounded down to a power of two: 2^21 sectors (1 GiB). */
export const MAX_CHUNK_SECTORS = 2 ** 21
/** The in-memory table keeps a run length in the top 8 bits of new_chunk (DM_CHUNK_NUMBER_BITS). */
export const CHUNK_NUMBER_BITS = 56n
export const CHUNK_NUMBER_LIMIT = 1n << CHUNK_NUMBER_BITS

export function isValidChunkSectors(n: number): boolean {
  return Number.isInteger(n) && n >= 1 && n <= MAX_CHUNK_SECTORS && (n & (n - 1)) === 0
}

/** A u64 as a number when it is one exactly, else as a bigint (messages and JSON print it exactly either way). */
export function exact(v: bigint): number | bigint {
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v
}

/** Chunk arithmetic for one chunk size and COW size. All values are chunk indices unless named bytes. */
export class StoreLayout {
  readonly chunkBytes: number
  /** exceptions per area (E) */
  readonly perArea: number
  /** distance between two areas, E+1 chunks */
  readonly stride: number
  /** whole chunks the COW holds (a tail that is not a whole chunk is never used) */
  readonly cowChunks: number

  constructor(
    readonly chunkSectors: number,
    readonly cowBytes: number,
  ) {
    // every loop over areas and chunks is bounded by cowChunks: a chunk size of 0 made it Infinity (D9)
    if (!isValidChunkSectors(chunkSectors)) throw new RangeError(`dmsnap: chunk size ${chunkSectors} sectors is not a power of two in 1..2^21`)
    this.chunkBytes = chunkSectors * SECTOR_BYTES
    this.perArea = this.chunkBytes / RECORD_BYTES
    this.stride = this.perArea + 1
    this.cowChunks = Math.floor(cowBytes / this.chunkBytes)
  }

  /** area_location(): the chunk holding metadata area k */
  areaLocation(k: number): number {
    return 1 + k * this.stride
  }

  /** chunk 0 (header) or a metadata area */
  isMetadata(chunk: number): boolean {
    return chunk === 0 || chunk % this.stride === 1
  }

  /** The i-th data chunk in allocation order: 2, 3, …, skipping areas. */
  dataChunk(i: number): number {
    return 2 + Math.floor(i / this.perArea) * this.stride + (i % this.perArea)
  }

  /** The kernel's skip_metadata(): step over an area chunk. */
  skipMetadata(nextFree: number): number {
    return nextFree % this.stride === 1 ? nextFree + 1 : nextFree
  }

  /** byte offset of a chunk */
  offset(chunk: number): number {
    return chunk * this.chunkBytes
  }

  /** The chunk fits entirely inside the COW device. */
  fits(chunk: number): boolean {
    return chunk >= 0 && chunk < this.cowChunks
  }

  /** area and slot of the record with global table index g */
  slotOf(g: number): { area: number; slot: number } {
    return { area: Math.floor(g / this.perArea), slot: g % this.perArea }
  }
}
