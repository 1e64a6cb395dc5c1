import { describe, expect, it } from 'vitest'
import { UsageError } from '../../../src/errors.js'
import type { Extent } from '../../../src/image/disk-image.js'
import { canMergeExtents, checkGuestRange, mergeExtents } from '../../../src/image/range.js'

async function* from<T>(items: T[]): AsyncGenerator<T> {
  for (const i of items) yield i
}

async function merged(items: Extent[]): Promise<Extent[]> {
  const out: Extent[] = []
  for await (const e of mergeExtents(from(items))) out.push(e)
  return out
}

const data = (start: number, length: number, hostOffset: number, depth = 0): Extent => ({
  start,
  length,
  depth,
  present: true,
  zero: false,
  data: true,
  hostOffset,
  file: 'img',
})
const zero = (start: number, length: number, depth = 0): Extent => ({ start, length, depth, present: true, zero: true, data: false })
const hole = (start: number, length: number, depth = 0): Extent => ({ start, length, depth, present: false, zero: true, data: false })

describe('mergeExtents', () => {
  it('merges host-contiguous data', async () => {
    expect(await merged([data(0, 4096, 0x10000), data(4096, 4096, 0x11000), data(8192, 100, 0x12000)])).toEqual([data(0, 8292, 0x10000)])
  })

  it('keeps data apart when the host offsets are not contiguous', async () => {
    expect(await merged([data(0, 4096, 0x10000), data(4096, 4096, 0x20000)])).toEqual([data(0, 4096, 0x10000), data(4096, 4096, 0x20000)])
    // backwards on the host
    expect(await merged([data(0, 4096, 0x11000), data(4096, 4096, 0x10000)])).toHaveLength(2)
  })

  it('merges host offsets above 2^32 exactly', async () => {
    const base = 2 ** 32 - 4096
    expect(await merged([data(0, 4096, base), data(4096, 4096, 2 ** 32), data(8192, 4096, 2 ** 32 + 4096)])).toEqual([data(0, 12288, base)])
  })

  it('merges zeros and holes of the same depth only', async () => {
    expect(await merged([zero(0, 10), zero(10, 20), hole(30, 5), hole(35, 5), hole(40, 5, 1), zero(45, 5)])).toEqual([
      zero(0, 30),
      hole(30, 10),
      hole(40, 5, 1),
      zero(45, 5),
    ])
  })

  it('does not merge extents of different files, or with and without a host offset', async () => {
    const a = data(0, 512, 0)
    const b = { ...data(512, 512, 512), file: 'other' }
    expect(await merged([a, b])).toHaveLength(2)
    const z1: Extent = { ...zero(0, 512), hostOffset: 0x1000, file: 'img' }
    expect(await merged([z1, zero(512, 512)])).toHaveLength(2)
    expect(await merged([z1, { ...zero(512, 512), hostOffset: 0x1200, file: 'img' }])).toEqual([{ ...z1, length: 1024 }])
  })

  it('never merges across a gap', async () => {
    expect(await merged([zero(0, 10), zero(11, 10)])).toHaveLength(2)
    expect(canMergeExtents(zero(0, 10), zero(11, 10))).toBe(false)
  })

  it('drops zero-length extents and yields nothing for nothing', async () => {
    expect(await merged([])).toEqual([])
    expect(await merged([zero(0, 0), zero(0, 5), zero(5, 0), zero(5, 5)])).toEqual([zero(0, 10)])
  })

  it('does not modify the extents it was given', async () => {
    const a = zero(0, 5)
    const b = zero(5, 5)
    await merged([a, b])
    expect(a.length).toBe(5)
    expect(b.length).toBe(5)
  })
})

describe('checkGuestRange', () => {
  it('accepts ranges inside the virtual size, the empty range at the end included', () => {
    expect(() => checkGuestRange('r', 0, 100, 100)).not.toThrow()
    expect(() => checkGuestRange('r', 100, 0, 100)).not.toThrow()
  })

  it.each([
    [-1, 1],
    [0, -1],
    [0.5, 1],
    [0, 101],
    [99, 2],
    [2 ** 53, 1],
    [Number.NaN, 1],
  ])('refuses offset %d length %d', (o, l) => {
    expect(() => checkGuestRange('qcow2: x: read', o, l, 100)).toThrow(UsageError)
  })
})
