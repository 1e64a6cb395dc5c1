import { describe, expect, it } from 'vitest'
import { CorruptImageError } from '../../../src/errors.js'
import {
  alignDown,
  alignUp,
  concatBytes,
  divCeil,
  isAllZero,
  isPowerOfTwo,
  putU16be,
  putU32be,
  putU32le,
  putU64be,
  putU64le,
  toSafeNumber,
  u16be,
  u32be,
  u32le,
  u64be,
  u64beMasked,
  u64le,
  u8,
  view,
} from '../../../src/util/bytes.js'

describe('byte codecs', () => {
  it('write and read every width in both byte orders', () => {
    const b = new Uint8Array(32)
    putU16be(b, 0, 0xbeef)
    putU32be(b, 2, 0xdeadbeef)
    putU64be(b, 6, 0x0123_4567_89ab_cdefn)
    putU32le(b, 14, 0x8000_0001)
    putU64le(b, 18, 2 ** 40 + 3)
    expect(u16be(b, 0)).toBe(0xbeef)
    expect(u32be(b, 2)).toBe(0xdeadbeef)
    expect(u64be(b, 6)).toBe(0x0123_4567_89ab_cdefn)
    expect(u32le(b, 14)).toBe(0x8000_0001)
    expect(u64le(b, 18)).toBe(2n ** 40n + 3n)
    expect(Array.from(b.subarray(0, 6))).toEqual([0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef])
    expect(Array.from(b.subarray(14, 18))).toEqual([0x01, 0x00, 0x00, 0x80])
    expect(u8(b, 0)).toBe(0xbe)
    expect(u8(b, 1000)).toBe(0)
  })

  it('reads u32 values >= 2^31 as positive numbers and stores negative ones as unsigned', () => {
    const b = new Uint8Array(8)
    putU32be(b, 0, -1)
    expect(u32be(b, 0)).toBe(0xffff_ffff)
    putU32le(b, 4, 0x8000_0000)
    expect(u32le(b, 4)).toBe(0x8000_0000)
  })

  it('respects the byte offset of a subarray', () => {
    const big = new Uint8Array(16)
    const sub = big.subarray(5)
    putU32be(sub, 1, 0x11223344)
    expect(Array.from(big.subarray(6, 10))).toEqual([0x11, 0x22, 0x33, 0x44])
    expect(view(sub).byteOffset).toBe(5)
    expect(view(sub).byteLength).toBe(11)
  })
})

describe('64-bit policy', () => {
  it('turns u64 into numbers up to 2^53 - 1', () => {
    expect(toSafeNumber(0n, 'x')).toBe(0)
    expect(toSafeNumber(2n ** 31n, 'x')).toBe(2 ** 31)
    expect(toSafeNumber(2n ** 53n - 1n, 'x')).toBe(Number.MAX_SAFE_INTEGER)
  })

  it('throws above 2^53, naming the field', () => {
    expect(() => toSafeNumber(2n ** 53n, 'l1_table_offset')).toThrow(CorruptImageError)
    expect(() => toSafeNumber(2n ** 64n - 1n, 'l1_table_offset')).toThrow('l1_table_offset 0xffffffffffffffff is too large (above 2^53)')
  })

  it('masks the high word in hot loops', () => {
    const b = new Uint8Array(8)
    putU64be(b, 0, 0x80ff_ffff_ffff_fe00n)
    expect(u64beMasked(view(b), 0, 0x00ff_ffff)).toBe(0x00ff_ffff_ffff_fe00)
    putU64be(b, 0, 0x0000_0000_8000_0000n)
    expect(u64beMasked(view(b), 0, 0x00ff_ffff)).toBe(0x8000_0000)
  })
})

describe('helpers', () => {
  it('isAllZero on aligned, unaligned, empty and large buffers', () => {
    expect(isAllZero(new Uint8Array(0))).toBe(true)
    const big = new Uint8Array(1 << 20)
    expect(isAllZero(big)).toBe(true)
    for (const at of [0, 7, 8, 4095, (1 << 20) - 1]) {
      big[at] = 1
      expect(isAllZero(big), `byte ${at}`).toBe(false)
      big[at] = 0
    }
    const unaligned = big.subarray(3, 3 + 1000)
    expect(isAllZero(unaligned)).toBe(true)
    big[3 + 999] = 5
    expect(isAllZero(unaligned)).toBe(false)
    expect(isAllZero(big.subarray(3, 3 + 999))).toBe(true)
    expect(isAllZero(Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1))).toBe(false)
  })

  it('concatBytes', () => {
    expect(Array.from(concatBytes([Uint8Array.of(1), new Uint8Array(0), Uint8Array.of(2, 3)]))).toEqual([1, 2, 3])
    expect(concatBytes([]).byteLength).toBe(0)
  })

  it('alignment and division', () => {
    expect(alignDown(0x12345, 0x1000)).toBe(0x12000)
    expect(alignUp(0x12345, 0x1000)).toBe(0x13000)
    expect(alignUp(0x13000, 0x1000)).toBe(0x13000)
    expect(alignDown(2 ** 40 + 5, 512)).toBe(2 ** 40)
    expect(alignUp(2 ** 40 + 5, 2 ** 21)).toBe(2 ** 40 + 2 ** 21)
    expect(divCeil(10, 3)).toBe(4)
    expect(divCeil(9, 3)).toBe(3)
    expect(divCeil(0, 3)).toBe(0)
  })

  it('isPowerOfTwo', () => {
    for (let i = 0; i < 53; i++) expect(isPowerOfTwo(2 ** i)).toBe(true)
    for (const v of [0, -2, 3, 6, 1000, 2 ** 20 + 1]) expect(isPowerOfTwo(v), String(v)).toBe(false)
  })
})
