import { describe, expect, it } from 'vitest'
import { UsageError } from '../../../src/errors.js'
import { humanSize, parseSize } from '../../../src/util/size.js'

describe('parseSize', () => {
  it.each([
    ['0', 0],
    ['4096', 4096],
    ['512b', 512],
    ['64K', 65536],
    ['64k', 65536],
    ['64KiB', 65536],
    ['64KB', 65536],
    ['1M', 1024 ** 2],
    ['1.5M', 1.5 * 1024 ** 2],
    ['1G', 1024 ** 3],
    ['2T', 2 * 1024 ** 4],
    ['1P', 1024 ** 5],
    [' 8M ', 8 * 1024 ** 2],
    ['0.5K', 512],
  ])('%s = %d bytes', (text, n) => {
    expect(parseSize(text)).toBe(n)
  })

  it.each(['', 'abc', '-1', '1X', '1.3', '0x100', '1e3', 'K', '1 2'])('refuses %j with a usage error', (text) => {
    expect(() => parseSize(text, 'offset')).toThrow(UsageError)
    expect(() => parseSize(text, 'offset')).toThrow(/invalid offset/)
  })

  it('refuses sizes that are not safe integers', () => {
    expect(() => parseSize('16E')).toThrow(/too large/)
    expect(() => parseSize('9007199254740993')).toThrow(/too large/)
  })
})

describe('humanSize', () => {
  it.each([
    [0, '0 B'],
    [512, '512 B'],
    [1023, '1023 B'],
    [1024, '1 KiB'],
    [65536, '64 KiB'],
    [1536, '1.5 KiB'],
    [1024 ** 2, '1 MiB'],
    [1.5 * 1024 ** 3, '1.5 GiB'],
    [10.3 * 1024 ** 3, '10.3 GiB'],
    [200 * 1024, '200 KiB'],
    [1000 * 1024 ** 2, '1000 MiB'],
    [120.5 * 1024 ** 2, '121 MiB'],
    [100 * 1024 ** 2, '100 MiB'],
    [1024 ** 4, '1 TiB'],
    [2 ** 53, '8 PiB'],
    [1024 ** 6, '1 EiB'],
  ])('%d -> %s', (n, s) => {
    expect(humanSize(n)).toBe(s)
  })
})
