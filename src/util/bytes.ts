/**
 * Byte codecs over DataView and the 64-bit policy: u64 fields are read as
 * bigint and turned into numbers by `toSafeNumber`, which throws above 2^53.
 */
import { CorruptImageError } from '../errors.js'

export function view(buf: Uint8Array): DataView {
  return new DataView(buf.buffer, buf.byteOffset, buf.byteLength)
}

export const u8 = (b: Uint8Array, o: number): number => b[o] ?? 0
export const u16be = (b: Uint8Array, o: number): number => view(b).getUint16(o, false)
export const u32be = (b: Uint8Array, o: number): number => view(b).getUint32(o, false)
export const u64be = (b: Uint8Array, o: number): bigint => view(b).getBigUint64(o, false)
export const u32le = (b: Uint8Array, o: number): number => view(b).getUint32(o, true)
export const u64le = (b: Uint8Array, o: number): bigint => view(b).getBigUint64(o, true)

export function putU16be(b: Uint8Array, o: number, v: number): void {
  view(b).setUint16(o, v, false)
}
export function putU32be(b: Uint8Array, o: number, v: number): void {
  view(b).setUint32(o, v >>> 0, false)
}
export function putU64be(b: Uint8Array, o: number, v: bigint | number): void {
  view(b).setBigUint64(o, BigInt(v), false)
}
export function putU32le(b: Uint8Array, o: number, v: number): void {
  view(b).setUint32(o, v >>> 0, true)
}
export function putU64le(b: Uint8Array, o: number, v: bigint | number): void {
  view(b).setBigUint64(o, BigInt(v), true)
}

export const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER)

/** The one place a u64 becomes a number. `what` names the field for the error. */
export function toSafeNumber(v: bigint, what: string): number {
  if (v > MAX_SAFE || v < -MAX_SAFE) {
    throw new CorruptImageError(`${what} 0x${v.toString(16)} is too large (above 2^53)`, { structure: what })
  }
  return Number(v)
}

/** Split a u64 read as two u32 halves into a number, for hot loops (entries < 2^53 by masking). */
export function u64beMasked(dv: DataView, o: number, hiMask: number): number {
  const hi = dv.getUint32(o, false) & hiMask
  const lo = dv.getUint32(o + 4, false)
  return hi * 0x1_0000_0000 + lo
}

/** zeros to compare against, grown on first use up to ZERO_SPAN */
let zeroSpan = Buffer.alloc(0)
const ZERO_SPAN = 1024 * 1024

/** Every byte zero? Compared with memcmp (Buffer.equals) against a zero buffer, at most 1 MiB at a time. */
export function isAllZero(b: Uint8Array): boolean {
  const n = b.byteLength
  if (n === 0) return true
  if (b[0] !== 0 || b[n - 1] !== 0) return false
  if (zeroSpan.byteLength < Math.min(n, ZERO_SPAN)) zeroSpan = Buffer.alloc(Math.min(Math.max(n, 4096), ZERO_SPAN))
  for (let i = 0; i < n;) {
    const k = Math.min(zeroSpan.byteLength, n - i)
    if (!Buffer.from(b.buffer, b.byteOffset + i, k).equals(zeroSpan.subarray(0, k))) return false
    i += k
  }
  return true
}

export function concatBytes(parts: Uint8Array[]): Uint8Array {
  let total = 0
  for (const p of parts) total += p.byteLength
  const out = new Uint8Array(total)
  let o = 0
  for (const p of parts) {
    out.set(p, o)
    o += p.byteLength
  }
  return out
}

export const alignDown = (v: number, a: number): number => v - (v % a)
export const alignUp = (v: number, a: number): number => Math.ceil(v / a) * a
export const divCeil = (v: number, d: number): number => Math.ceil(v / d)
export const isPowerOfTwo = (v: number): boolean => v > 0 && Number.isInteger(Math.log2(v)) && 2 ** Math.log2(v) === v
