import { describe, expect, it } from 'vitest'
import { getRefcountEntry, maxRefcount, refcountsPerBlock, setRefcountEntry } from '../../../src/formats/qcow2/spec/refcount-codec.js'
import { Prng } from '../../support/prng.js'

const ORDERS = [0, 1, 2, 3, 4, 5, 6]

describe('refcount codec', () => {
  it('counts entries per block for every order', () => {
    expect(ORDERS.map((o) => refcountsPerBlock(512, o))).toEqual([4096, 2048, 1024, 512, 256, 128, 64])
    expect(refcountsPerBlock(65536, 4)).toBe(32768)
    expect(refcountsPerBlock(2 ** 21, 0)).toBe(2 ** 24)
  })

  it('knows the largest value of every width', () => {
    expect(ORDERS.map(maxRefcount)).toEqual([1, 3, 15, 255, 65535, 0xffff_ffff, Number.MAX_SAFE_INTEGER])
  })

  for (const order of ORDERS) {
    describe(`order ${order} (${2 ** order} bits)`, () => {
      const per = refcountsPerBlock(512, order)
      const max = maxRefcount(order)

      it('round-trips random values at every index without disturbing neighbours', () => {
        const prng = new Prng(1000 + order)
        const block = new Uint8Array(512)
        const model = new Array<number>(per).fill(0)
        for (let round = 0; round < 4 * per; round++) {
          const i = prng.int(per)
          const v = order === 6 ? prng.int(2 ** 32) * 2 ** 20 + prng.int(2 ** 20) : prng.int(max + 1)
          setRefcountEntry(block, i, order, v)
          model[i] = v
        }
        for (let i = 0; i < per; i++) expect(getRefcountEntry(block, i, order)).toBe(model[i])
      })

      it('stores the maximum and rejects one more', () => {
        const block = new Uint8Array(512)
        setRefcountEntry(block, per - 1, order, max)
        expect(getRefcountEntry(block, per - 1, order)).toBe(max)
        expect(getRefcountEntry(block, per - 2, order)).toBe(0)
        if (order < 6) expect(() => setRefcountEntry(block, 0, order, max + 1)).toThrow(`does not fit in ${2 ** order} bits`)
        expect(() => setRefcountEntry(block, 0, order, -1)).toThrow()
      })

      it('lays entries out as QEMU does', () => {
        const block = new Uint8Array(512)
        setRefcountEntry(block, 1, order, 1)
        const bits = 2 ** order
        if (bits < 8) {
          // sub-byte widths: LSB first within a byte
          expect(block[0]).toBe(1 << bits)
        } else {
          // byte widths and wider: big endian
          const bytes = bits / 8
          expect(Array.from(block.subarray(bytes, 2 * bytes))).toEqual([...new Array<number>(bytes - 1).fill(0), 1])
        }
      })
    })
  }

  it('reads absurd 64-bit refcounts as MAX_SAFE_INTEGER rather than a wrong small number', () => {
    const block = new Uint8Array(64)
    new DataView(block.buffer).setBigUint64(8, 0xffff_ffff_ffff_fff0n, false)
    expect(getRefcountEntry(block, 1, 6)).toBe(Number.MAX_SAFE_INTEGER)
    new DataView(block.buffer).setBigUint64(16, 2n ** 40n + 5n, false)
    expect(getRefcountEntry(block, 2, 6)).toBe(2 ** 40 + 5)
  })

  it('refuses an order above 6', () => {
    expect(() => getRefcountEntry(new Uint8Array(8), 0, 7)).toThrow('refcount_order 7')
  })

  it('reads entries inside a subarray of a larger buffer', () => {
    const big = new Uint8Array(1024)
    const block = big.subarray(512)
    setRefcountEntry(block, 3, 5, 0xdead_beef)
    expect(getRefcountEntry(block, 3, 5)).toBe(0xdead_beef)
    expect(Array.from(big.subarray(512 + 12, 512 + 16))).toEqual([0xde, 0xad, 0xbe, 0xef])
  })
})
