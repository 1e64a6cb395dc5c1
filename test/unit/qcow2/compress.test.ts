import { deflateRawSync, constants as zc } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { decompressCluster, zstdFrameLength } from '../../../src/formats/qcow2/spec/compress.js'
import { COMPRESSION_ZLIB, COMPRESSION_ZSTD } from '../../../src/formats/qcow2/spec/constants.js'
import { Prng } from '../../support/prng.js'

const fromHex = (h: string): Uint8Array => Uint8Array.from(Buffer.from(h, 'hex'))
const concat = (...parts: Uint8Array[]): Uint8Array => Uint8Array.from(Buffer.concat(parts))

/** The 4096 bytes the zstd frames below were made from ("imgtool block %04d\n", i % 37). */
function zstdInput(): Uint8Array {
  let s = ''
  for (let i = 0; s.length < 4096; i++) s += `imgtool block ${String(i % 37).padStart(4, '0')}\n`
  return new TextEncoder().encode(s.slice(0, 4096))
}

// Made with the zstd 1.5 CLI: `zstd -19 --no-check` (93 bytes) and `zstd -3 --check` (134 bytes, with a content checksum).
const ZSTD_NO_CHECK = fromHex(
  '28b52ffd60000f9d0200b2830c11b0b9012f185b804926dbdddddd67160dc46035f1ec289a5713cf7ea27935f1ec269a5713cfc0ff8743141a0129b54a320125a811a0bbff06f0a5cd11fc87f4fdff3f033e15e69387cc3151af59520d',
)
const ZSTD_CHECK = fromHex(
  '28b52ffd64000fc50300a403696d67746f6f6c20626c6f636b20303030300a3132333435363738393130313233343536373839323031323334353637383933303132333435362620f0a5cd2e15e6c37c1ef3c43b8ff5848733f3c43b8f79e29dc73ce15d0f67e689771ef3c43b8f79e2dd1ececc13ef3ce689771ef3a47ab7cd320c0bedaf14',
)

/** A hand-made frame: single segment, 2-byte content size, then raw and RLE blocks. */
function handFrame(blocks: Array<{ type: 'raw'; data: Uint8Array } | { type: 'rle'; byte: number; n: number }>, checksum = false): Uint8Array {
  const total = blocks.reduce((s, b) => s + (b.type === 'raw' ? b.data.length : b.n), 0)
  // FHD: FCS flag 1 (2 bytes, value - 256), single segment, checksum flag
  const fhd = (1 << 6) | (1 << 5) | (checksum ? 1 << 2 : 0)
  const parts: Uint8Array[] = [Uint8Array.of(0x28, 0xb5, 0x2f, 0xfd, fhd, (total - 256) & 0xff, (total - 256) >> 8)]
  blocks.forEach((b, i) => {
    const last = i === blocks.length - 1 ? 1 : 0
    const size = b.type === 'raw' ? b.data.length : b.n
    const bh = last | ((b.type === 'raw' ? 0 : 1) << 1) | (size << 3)
    parts.push(Uint8Array.of(bh & 0xff, (bh >> 8) & 0xff, (bh >> 16) & 0xff))
    parts.push(b.type === 'raw' ? b.data : Uint8Array.of(b.byte))
  })
  if (checksum) parts.push(Uint8Array.of(1, 2, 3, 4))
  return concat(...parts)
}

describe('zstd frame length', () => {
  const garbage = new Prng(7).bytes(700)

  it('finds the end of real frames with trailing garbage (the descriptor is rounded to sectors)', () => {
    expect(zstdFrameLength(ZSTD_NO_CHECK)).toBe(ZSTD_NO_CHECK.length)
    expect(zstdFrameLength(concat(ZSTD_NO_CHECK, garbage))).toBe(ZSTD_NO_CHECK.length)
    expect(zstdFrameLength(ZSTD_CHECK)).toBe(ZSTD_CHECK.length)
    expect(zstdFrameLength(concat(ZSTD_CHECK, garbage))).toBe(ZSTD_CHECK.length)
  })

  it('walks multi-block frames of raw and RLE blocks, with and without a checksum', () => {
    const data = new Prng(3).bytes(300)
    const f = handFrame([
      { type: 'raw', data },
      { type: 'rle', byte: 0xab, n: 1000 },
      { type: 'raw', data: data.subarray(0, 10) },
    ])
    expect(f.length).toBe(7 + 3 + 300 + 3 + 1 + 3 + 10)
    expect(zstdFrameLength(concat(f, garbage))).toBe(f.length)
    const fc = handFrame([{ type: 'rle', byte: 1, n: 512 }], true)
    expect(zstdFrameLength(concat(fc, garbage))).toBe(7 + 3 + 1 + 4)
  })

  it('refuses bad magic, short data, truncated frames and reserved block types', () => {
    expect(() => zstdFrameLength(Uint8Array.of(1, 2, 3))).toThrow('zstd: data too short')
    expect(() => zstdFrameLength(garbage)).toThrow(/zstd: bad frame magic 0x[0-9a-f]+/)
    expect(() => zstdFrameLength(ZSTD_NO_CHECK.subarray(0, 40))).toThrow('frame runs past the end')
    expect(() => zstdFrameLength(ZSTD_CHECK.subarray(0, ZSTD_CHECK.length - 2))).toThrow('frame runs past the end')
    const reserved = handFrame([{ type: 'rle', byte: 0, n: 300 }])
    reserved[7] = reserved[7]! | 0b110 // block type 3
    expect(() => zstdFrameLength(reserved)).toThrow('reserved block type')
  })
})

describe('decompressCluster', () => {
  it('decompresses real zstd frames followed by garbage', () => {
    const want = zstdInput()
    const garbage = new Prng(9).bytes(333)
    for (const f of [ZSTD_NO_CHECK, ZSTD_CHECK]) {
      expect(Buffer.from(decompressCluster(concat(f, garbage), 4096, COMPRESSION_ZSTD)).equals(Buffer.from(want))).toBe(true)
    }
  })

  it('refuses a zstd frame that does not fill the cluster exactly (QEMU fails these with EIO)', () => {
    expect(() => decompressCluster(ZSTD_NO_CHECK, 8192, COMPRESSION_ZSTD)).toThrow('zstd frame decompressed to 4096 bytes, expected 8192')
    expect(() => decompressCluster(ZSTD_NO_CHECK, 2048, COMPRESSION_ZSTD)).toThrow('zstd frame decompresses to more than 2048 bytes')
    // a frame ending in zeros is told apart from one that stops short
    const zeros = handFrame([
      { type: 'rle', byte: 9, n: 256 },
      { type: 'rle', byte: 0, n: 256 },
    ])
    expect(Array.from(decompressCluster(zeros, 512, COMPRESSION_ZSTD).subarray(250, 262))).toEqual([9, 9, 9, 9, 9, 9, 0, 0, 0, 0, 0, 0])
    expect(() => decompressCluster(zeros, 1024, COMPRESSION_ZSTD)).toThrow('zstd frame decompressed to 512 bytes, expected 1024')
    expect(() => decompressCluster(handFrame([{ type: 'rle', byte: 0, n: 1024 }]), 512, COMPRESSION_ZSTD)).toThrow('more than 512 bytes')
  })

  it('refuses zstd garbage with a codec message, not a crash', () => {
    expect(() => decompressCluster(new Prng(5).bytes(600), 4096, COMPRESSION_ZSTD)).toThrow(/^zstd: /)
  })

  it('decompresses raw deflate followed by trailing bytes', () => {
    const prng = new Prng(11)
    for (const cs of [512, 4096, 65536, 2 ** 21]) {
      const data = new Uint8Array(cs)
      for (let i = 0; i < cs; i += 97) data.set(prng.bytes(Math.min(20, cs - i)), i)
      const trailing = prng.bytes(511)
      const out = decompressCluster(concat(deflateRawSync(data, { windowBits: 12 }), trailing), cs, COMPRESSION_ZLIB)
      expect(Buffer.from(out).equals(Buffer.from(data)), `cluster size ${cs}`).toBe(true)
    }
  })

  it('accepts deflate whose matches reach more than 4 KiB back: QEMU inflates a whole cluster into one buffer', () => {
    const prng = new Prng(13)
    const block = prng.bytes(24576)
    const data = concat(block, block, prng.bytes(16384)) // the second copy matches 24 KiB back, across Node's 16 KiB output chunks
    for (const windowBits of [12, 15]) {
      const out = decompressCluster(deflateRawSync(data, { windowBits }), 65536, COMPRESSION_ZLIB)
      expect(Buffer.from(out).equals(Buffer.from(data))).toBe(true)
    }
  })

  it('accepts a deflate stream without a final block once it fills the cluster (as QEMU does)', () => {
    const data = new Prng(12).bytes(4096)
    const stream = deflateRawSync(data, { finishFlush: zc.Z_SYNC_FLUSH })
    expect(Buffer.from(decompressCluster(stream, 4096, COMPRESSION_ZLIB)).equals(Buffer.from(data))).toBe(true)
  })

  it('refuses deflate that is too short or garbage', () => {
    const data = new Uint8Array(4096).fill(3)
    expect(() => decompressCluster(deflateRawSync(data.subarray(0, 1000)), 4096, COMPRESSION_ZLIB)).toThrow(
      'deflate stream decompressed to 1000 bytes, expected 4096',
    )
    expect(() => decompressCluster(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff), 4096, COMPRESSION_ZLIB)).toThrow(/^deflate/)
  })
})
