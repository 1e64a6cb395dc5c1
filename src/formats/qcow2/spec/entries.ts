/**
 * L1/L2 entries decoded once, at the edge, into types that cannot be misused.
 * Nothing else in the code tests entry bits.
 */

/** L1 entry: bits 9-55 L2 table offset, bit 63 COPIED, the rest reserved. */
export interface L1Entry {
  l2Offset: number
  copied: boolean
  reservedBits: boolean
}

const TWO32 = 0x1_0000_0000

export function decodeL1(dv: DataView, byteOffset: number): L1Entry {
  const hi = dv.getUint32(byteOffset, false)
  const lo = dv.getUint32(byteOffset + 4, false)
  return {
    l2Offset: (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0),
    copied: (hi & 0x80000000) !== 0,
    reservedBits: (lo & 0x1ff) !== 0 || (hi & 0x7f000000) !== 0,
  }
}

/** Set or clear COPIED (bit 63) of the L1 or L2 entry at `byteOffset`, leaving every other bit as it is. */
export function setCopiedFlag(dv: DataView, byteOffset: number, copied: boolean): void {
  const hi = dv.getUint32(byteOffset, false)
  dv.setUint32(byteOffset, copied ? (hi | 0x80000000) >>> 0 : (hi & 0x7fffffff) >>> 0, false)
}

export function encodeL1(e: { l2Offset: number; copied: boolean }): bigint {
  return BigInt(e.l2Offset) | (e.copied ? 1n << 63n : 0n)
}

/**
 * A standard (cluster-level) L2 entry:
 * - unallocated: offset 0, no zero flag (reads from the backing file or zeros)
 * - zero: the zero flag (v3); hostOffset 0 = plain, otherwise a preallocated cluster
 * - normal: data at hostOffset
 * - compressed: `size` bytes at hostOffset (byte granular), `sectors` 512-byte sectors
 */
export type L2Entry =
  | { type: 'unallocated'; copied: boolean; reservedBits: boolean }
  | { type: 'zero'; hostOffset: number; copied: boolean; reservedBits: boolean }
  | { type: 'normal'; hostOffset: number; copied: boolean; reservedBits: boolean }
  | { type: 'compressed'; hostOffset: number; size: number; sectors: number; copied: boolean; reservedBits: boolean }

export interface L2DecodeContext {
  clusterBits: number
  /** extended L2: bit 0 of the descriptor is reserved, zero status lives in the bitmap */
  extendedL2: boolean
  /** external data file: offset 0 with COPIED is a normal cluster at 0 */
  dataFile: boolean
}

export function decodeL2(dv: DataView, byteOffset: number, ctx: L2DecodeContext): L2Entry {
  const hi = dv.getUint32(byteOffset, false)
  const lo = dv.getUint32(byteOffset + 4, false)
  const copied = (hi & 0x80000000) !== 0
  if (hi & 0x40000000) {
    // compressed: x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 additional sectors
    const v = (BigInt(hi) << 32n) | BigInt(lo)
    const shift = BigInt(70 - ctx.clusterBits)
    const hostOffset = Number(v & ((1n << shift) - 1n))
    const sectors = Number((v >> shift) & ((1n << BigInt(ctx.clusterBits - 8)) - 1n)) + 1
    return {
      type: 'compressed',
      hostOffset,
      sectors,
      size: sectors * 512 - (hostOffset % 512),
      copied,
      reservedBits: false,
    }
  }
  const hostOffset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0)
  const reservedBits = (lo & 0x1fe) !== 0 || (hi & 0x3f000000) !== 0 || (ctx.extendedL2 && (lo & 1) !== 0)
  if (!ctx.extendedL2 && lo & 1) return { type: 'zero', hostOffset, copied, reservedBits }
  if (hostOffset === 0 && !(ctx.dataFile && copied)) return { type: 'unallocated', copied, reservedBits }
  return { type: 'normal', hostOffset, copied, reservedBits }
}

/** Offsets that do not fit the compressed layout are impossible; callers bound them by the file size. */
export function encodeL2Standard(e: { hostOffset: number; copied: boolean; zero?: boolean }): bigint {
  return BigInt(e.hostOffset) | (e.copied ? 1n << 63n : 0n) | (e.zero ? 1n : 0n)
}

export function encodeL2Compressed(hostOffset: number, size: number, clusterBits: number): bigint {
  const shift = BigInt(70 - clusterBits)
  const sectors = Math.ceil(((hostOffset % 512) + size) / 512)
  return (1n << 62n) | (BigInt(sectors - 1) << shift) | BigInt(hostOffset)
}

/** Subcluster status in an extended L2 entry, as QEMU classifies it. */
export type SubclusterType = 'unallocated' | 'unallocated-alloc' | 'zero' | 'zero-alloc' | 'normal' | 'compressed' | 'invalid'

/** Extended L2 bitmap: bits 0-31 allocated, 32-63 reads-as-zero (high word = zero bits). */
export interface SubclusterBitmap {
  alloc: number
  zero: number
}

export function readBitmap(dv: DataView, byteOffset: number): SubclusterBitmap {
  return { zero: dv.getUint32(byteOffset + 8, false), alloc: dv.getUint32(byteOffset + 12, false) }
}

export function subclusterType(entry: L2Entry, bm: SubclusterBitmap, sc: number): SubclusterType {
  const bit = 1 << sc
  // QEMU reads a compressed cluster whatever its bitmap says; check reports a non-zero bitmap
  if (entry.type === 'compressed') return 'compressed'
  if (entry.type === 'normal') {
    if (bm.alloc & bm.zero) return 'invalid'
    if (bm.zero & bit) return 'zero-alloc'
    if (bm.alloc & bit) return 'normal'
    return 'unallocated-alloc'
  }
  // no host cluster
  if (bm.alloc !== 0) return 'invalid'
  return bm.zero & bit ? 'zero' : 'unallocated'
}
