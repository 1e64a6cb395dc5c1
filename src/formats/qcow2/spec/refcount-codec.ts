/**
 * Refcount entries of every width (2^order bits, order 0..6). Sub-byte widths
 * are packed LSB-first within each byte, wider ones big endian (as QEMU does).
 */
import { CorruptImageError } from '../../../errors.js'

export function refcountsPerBlock(clusterSize: number, order: number): number {
  return (clusterSize * 8) >> order
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (2 ** order) - 1
}

export function getRefcountEntry(block: Uint8Array, index: number, order: number): number {
  switch (order) {
    case 0:
      return ((block[index >>> 3] ?? 0) >>> (index & 7)) & 1
    case 1:
      return ((block[index >>> 2] ?? 0) >>> ((index & 3) * 2)) & 3
    case 2:
      return ((block[index >>> 1] ?? 0) >>> ((index & 1) * 4)) & 15
    case 3:
      return block[index] ?? 0
    case 4: {
      const o = index * 2
      return ((block[o] ?? 0) << 8) | (block[o + 1] ?? 0)
    }
    case 5: {
      const dv = new DataView(block.buffer, block.byteOffset, block.byteLength)
      return dv.getUint32(index * 4, false)
    }
    case 6: {
      const dv = new DataView(block.buffer, block.byteOffset, block.byteLength)
      const hi = dv.getUint32(index * 8, false)
      const lo = dv.getUint32(index * 8 + 4, false)
      // values above 2^53 are absurd; saturate rather than lose the fact that they are huge
      return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 0x1_0000_0000 + lo
    }
    default:
      throw new CorruptImageError(`qcow2: refcount_order ${order} is not supported`)
  }
}

export function setRefcountEntry(block: Uint8Array, index: number, order: number, value: number): void {
  if (value < 0 || value > maxRefcount(order)) {
    throw new CorruptImageError(`qcow2: refcount ${value} does not fit in ${2 ** order} bits`)
  }
  switch (order) {
    case 0:
    case 1:
    case 2: {
      const bits = 1 << order
      const perByte = 8 >> order
      const byte = Math.floor(index / perByte)
      const shift = (index % perByte) * bits
      const mask = ((1 << bits) - 1) << shift
      block[byte] = ((block[byte] ?? 0) & ~mask) | (value << shift)
      return
    }
    case 3:
      block[index] = value
      return
    case 4:
      block[index * 2] = value >>> 8
      block[index * 2 + 1] = value & 0xff
      return
    case 5:
      new DataView(block.buffer, block.byteOffset, block.byteLength).setUint32(index * 4, value, false)
      return
    case 6:
      new DataView(block.buffer, block.byteOffset, block.byteLength).setBigUint64(index * 8, BigInt(value), false)
      return
  }
}
