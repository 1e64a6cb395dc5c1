import { describe, expect, it } from 'vitest'
import {
  decodeL1,
  decodeL2,
  encodeL1,
  encodeL2Compressed,
  encodeL2Standard,
  readBitmap,
  subclusterType,
  type L2DecodeContext,
  type L2Entry,
} from '../../../src/formats/qcow2/spec/entries.js'
import { Prng } from '../../support/prng.js'

function dvOf(v: bigint, extra?: { zero: number; alloc: number }): DataView {
  const b = new Uint8Array(16)
  const dv = new DataView(b.buffer)
  dv.setBigUint64(0, v, false)
  if (extra) {
    dv.setUint32(8, extra.zero, false)
    dv.setUint32(12, extra.alloc, false)
  }
  return dv
}

const std = (clusterBits = 16): L2DecodeContext => ({ clusterBits, extendedL2: false, dataFile: false })

// Host offsets on both sides of 2^31 and 2^32 (a sign bug at 2^31 was fixed), up to the 56-bit limit.
const BIG_OFFSETS = [
  0x200, 0x10000, 0x7fff_fe00, 0x8000_0000, 0x8000_0200, 0xc000_0000, 0xffff_fe00, 0x1_0000_0000, 0x1_8000_0000, 0x3_ffff_0000, 0x100_0000_0000, 0x7f_ffff_fe00,
  0x00ff_ffff_ffff_fe00,
]

describe('L1 entries', () => {
  it.each(BIG_OFFSETS)('round-trips L2 offset %s with and without COPIED', (off) => {
    for (const copied of [false, true]) {
      const e = decodeL1(dvOf(encodeL1({ l2Offset: off, copied })), 0)
      expect(e).toEqual({ l2Offset: off, copied, reservedBits: false })
    }
  })

  it('decodes offsets >= 2^31 as positive numbers', () => {
    const e = decodeL1(dvOf(0x8000_0000_0000_0000n | 0xffff_fe00n), 0)
    expect(e.l2Offset).toBe(0xffff_fe00)
    expect(e.l2Offset).toBeGreaterThan(0)
    expect(e.copied).toBe(true)
  })

  it('flags reserved bits 0-8 and 56-62 without letting them leak into the offset', () => {
    for (const bit of [0, 1, 8, 56, 62]) {
      const e = decodeL1(dvOf(0x10000n | (1n << BigInt(bit))), 0)
      expect(e.reservedBits, `bit ${bit}`).toBe(true)
      expect(e.l2Offset).toBe(0x10000)
    }
    expect(decodeL1(dvOf(0n), 0)).toEqual({ l2Offset: 0, copied: false, reservedBits: false })
  })
})

describe('standard L2 entries', () => {
  it.each(BIG_OFFSETS)('round-trips a normal cluster at %s', (off) => {
    for (const copied of [false, true]) {
      const e = decodeL2(dvOf(encodeL2Standard({ hostOffset: off, copied })), 0, std())
      expect(e).toEqual({ type: 'normal', hostOffset: off, copied, reservedBits: false })
    }
  })

  it.each(BIG_OFFSETS)('round-trips a preallocated zero cluster at %s', (off) => {
    const e = decodeL2(dvOf(encodeL2Standard({ hostOffset: off, copied: true, zero: true })), 0, std())
    expect(e).toEqual({ type: 'zero', hostOffset: off, copied: true, reservedBits: false })
  })

  it('decodes unallocated and plain zero entries', () => {
    expect(decodeL2(dvOf(0n), 0, std())).toEqual({ type: 'unallocated', copied: false, reservedBits: false })
    expect(decodeL2(dvOf(1n), 0, std())).toEqual({ type: 'zero', hostOffset: 0, copied: false, reservedBits: false })
    expect(encodeL2Standard({ hostOffset: 0, copied: false, zero: true })).toBe(1n)
    expect(encodeL2Standard({ hostOffset: 0, copied: false })).toBe(0n)
  })

  it('reads offset 0 with COPIED as a normal cluster only with an external data file', () => {
    const v = encodeL2Standard({ hostOffset: 0, copied: true })
    expect(decodeL2(dvOf(v), 0, std()).type).toBe('unallocated')
    expect(decodeL2(dvOf(v), 0, { ...std(), dataFile: true })).toEqual({ type: 'normal', hostOffset: 0, copied: true, reservedBits: false })
  })

  it('flags reserved bits 1-8 and 56-61', () => {
    for (const bit of [1, 2, 8, 56, 61]) {
      const e = decodeL2(dvOf(0x30000n | (1n << BigInt(bit))), 0, std())
      expect(e.reservedBits, `bit ${bit}`).toBe(true)
      expect(e).toMatchObject({ type: 'normal', hostOffset: 0x30000 })
    }
  })

  it('treats bit 0 as reserved with extended L2 (zero status lives in the bitmap)', () => {
    const e = decodeL2(dvOf(0x30001n), 0, { clusterBits: 16, extendedL2: true, dataFile: false })
    expect(e).toEqual({ type: 'normal', hostOffset: 0x30000, copied: false, reservedBits: true })
  })

  it('decodes entries at a byte offset inside a table', () => {
    const b = new Uint8Array(64)
    const dv = new DataView(b.buffer)
    dv.setBigUint64(24, encodeL2Standard({ hostOffset: 0x1_2345_0000, copied: true }), false)
    expect(decodeL2(dv, 24, std())).toMatchObject({ type: 'normal', hostOffset: 0x1_2345_0000 })
    expect(decodeL2(dv, 16, std()).type).toBe('unallocated')
  })
})

describe('compressed L2 descriptors', () => {
  for (let clusterBits = 9; clusterBits <= 21; clusterBits++) {
    it(`round-trip for cluster_bits ${clusterBits}`, () => {
      const cs = 2 ** clusterBits
      const offsetBits = 70 - clusterBits // bits 0..x-1 hold the offset
      const maxOffset = Math.min(2 ** Math.min(offsetBits, 56), 2 ** 53) - 1
      const maxSectors = 2 ** (clusterBits - 8) // the field holds sectors - 1
      const prng = new Prng(clusterBits * 7919)
      const cases: Array<[number, number]> = [
        [0x200, 1],
        [0x10000 + 17, 100],
        [0x7fff_ffff, 1], // just below 2^31, odd byte offset
        [0x8000_0000, cs], // 2^31 exactly
        [0x8000_0001, Math.max(1, cs - 1)],
        [0xffff_ffff, 2],
        [0x1_0000_0000 + 511, cs],
        [0x1_2345_6789, Math.min(cs, 1000)],
        [maxOffset - (maxSectors * 512 - 1), maxSectors * 512 - 1],
      ]
      for (let i = 0; i < 50; i++) cases.push([prng.int(2 ** 40), 1 + prng.int(cs)])
      for (const [off, size] of cases) {
        if (off > maxOffset) continue
        const sectors = Math.ceil(((off % 512) + size) / 512)
        if (sectors > maxSectors) continue
        const v = encodeL2Compressed(off, size, clusterBits)
        for (const copied of [false, true]) {
          const e = decodeL2(dvOf(copied ? v | (1n << 63n) : v), 0, std(clusterBits))
          expect(e).toEqual({ type: 'compressed', hostOffset: off, sectors, size: sectors * 512 - (off % 512), copied, reservedBits: false })
          // the descriptor's byte range always covers what was written
          if (e.type === 'compressed') expect(e.size).toBeGreaterThanOrEqual(size)
        }
      }
    })
  }

  it('places the sector count at bit 70 - cluster_bits (QEMU csize_shift)', () => {
    // 64 KiB clusters: shift 54; 3 sectors are stored as 2
    expect(encodeL2Compressed(0x1000, 1500, 16)).toBe((1n << 62n) | (2n << 54n) | 0x1000n)
    // 2 MiB clusters: shift 49, 8192 sectors max
    expect(encodeL2Compressed(0, 2 ** 21, 21)).toBe((1n << 62n) | (4095n << 49n))
    // 512 B clusters: shift 61, one bit of sector count
    expect(encodeL2Compressed(0x8000_0000, 512, 9)).toBe((1n << 62n) | 0x8000_0000n)
    expect(encodeL2Compressed(0x8000_0001, 512, 9)).toBe((1n << 62n) | (1n << 61n) | 0x8000_0001n)
  })

  it('is not mistaken for another type with extended L2', () => {
    const v = encodeL2Compressed(0x9_0000_0123, 3000, 16)
    const e = decodeL2(dvOf(v, { zero: 0, alloc: 0 }), 0, { clusterBits: 16, extendedL2: true, dataFile: false })
    expect(e).toMatchObject({ type: 'compressed', hostOffset: 0x9_0000_0123, sectors: 7 }) // 0x123 + 3000 bytes span 7 sectors
  })
})

describe('extended L2 subclusters', () => {
  const normal: L2Entry = { type: 'normal', hostOffset: 0x40000, copied: true, reservedBits: false }
  const none: L2Entry = { type: 'unallocated', copied: false, reservedBits: false }
  const compressed: L2Entry = { type: 'compressed', hostOffset: 0x40000, size: 512, sectors: 1, copied: false, reservedBits: false }

  it('reads the bitmap as zero bits (high word) and allocation bits (low word)', () => {
    const dv = dvOf(0n, { zero: 0xf000_0000, alloc: 0x0000_000f })
    expect(readBitmap(dv, 0)).toEqual({ zero: 0xf000_0000, alloc: 0x0000_000f })
  })

  it('classifies every subcluster of an allocated cluster', () => {
    const bm = { alloc: 0b0011, zero: 0b0100 | (1 << 31) }
    expect(subclusterType(normal, bm, 0)).toBe('normal')
    expect(subclusterType(normal, bm, 1)).toBe('normal')
    expect(subclusterType(normal, bm, 2)).toBe('zero-alloc')
    expect(subclusterType(normal, bm, 3)).toBe('unallocated-alloc')
    expect(subclusterType(normal, bm, 31)).toBe('zero-alloc')
    expect(subclusterType(normal, { alloc: 1 << 5, zero: 1 << 5 }, 0)).toBe('invalid')
  })

  it('classifies subclusters without a host cluster', () => {
    expect(subclusterType(none, { alloc: 0, zero: 1 << 7 }, 7)).toBe('zero')
    expect(subclusterType(none, { alloc: 0, zero: 1 << 7 }, 6)).toBe('unallocated')
    expect(subclusterType(none, { alloc: 1, zero: 0 }, 3)).toBe('invalid')
  })

  it('reads compressed clusters whatever the bitmap says', () => {
    expect(subclusterType(compressed, { alloc: 0xffff_ffff, zero: 0xffff_ffff }, 0)).toBe('compressed')
  })
})
