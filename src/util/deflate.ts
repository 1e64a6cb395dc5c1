/**
 * The optional deflate addon built by `npm install` (native/zdeflate.c): raw
 * deflate of many blocks in one call on a libuv thread, with the system's zlib
 * linked in when the build found it (the zlib qemu-img uses: the same
 * compressed bytes, and faster than the zlib inside Node). Shared by the
 * formats that compress (qcow2's convert -c, vmdk's streamOptimized grains);
 * without the addon each falls back to Node's zlib.
 */
import { createRequire } from 'node:module'
import { deflate as deflateCb } from 'node:zlib'

export interface DeflateAddon {
  deflateClusters(
    input: Uint8Array,
    offsets: Int32Array,
    clusterSize: number,
    level: number,
    windowBits: number,
    memLevel: number,
    out: Uint8Array,
    sizes: Int32Array,
  ): Promise<number>
  zlibVersion(): string
}

let loaded: DeflateAddon | null | undefined

export function deflateAddon(): DeflateAddon | null {
  if (loaded !== undefined) return loaded
  if (process.env['IMGTOOL_NO_NATIVE_DEFLATE'] === '1') return (loaded = null)
  try {
    const require = createRequire(import.meta.url)
    const m = require('../../build/Release/zdeflate.node') as DeflateAddon
    loaded = typeof m.deflateClusters === 'function' ? m : null
  } catch {
    loaded = null
  }
  return loaded
}

/** Adler-32 of `b` (the zlib stream's trailer), in blocks of 5552 bytes between reductions as zlib does. */
export function adler32(b: Uint8Array): number {
  let a = 1
  let s = 0
  const n = b.byteLength
  let i = 0
  while (i < n) {
    const end = Math.min(n, i + 5552)
    for (; i + 8 <= end; i += 8) {
      a += b[i]!
      s += a
      a += b[i + 1]!
      s += a
      a += b[i + 2]!
      s += a
      a += b[i + 3]!
      s += a
      a += b[i + 4]!
      s += a
      a += b[i + 5]!
      s += a
      a += b[i + 6]!
      s += a
      a += b[i + 7]!
      s += a
    }
    for (; i < end; i++) {
      a += b[i]!
      s += a
    }
    a %= 65521
    s %= 65521
  }
  return ((s << 16) | a) >>> 0
}

function nodeZlib(data: Uint8Array, level: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    deflateCb(data, { level }, (err, out) => (err ? reject(err) : resolve(new Uint8Array(out.buffer, out.byteOffset, out.byteLength))))
  })
}

/**
 * zlib streams (RFC 1950: header, deflate, Adler-32; windowBits 15, memLevel 8,
 * as zlib's compress2()) of the `size`-byte blocks at `offsets` of `buf`. With
 * the addon, the blocks are deflated in one call on a libuv thread with the
 * system zlib, and wrapped here: a zlib stream is the raw stream between a
 * two-byte header and the Adler-32 of the input, so the bytes are those
 * compress2() gives. A block the addon cannot fit in `size - 1` bytes, and
 * every block without the addon, goes through Node's zlib.
 */
export async function zlibBlocks(buf: Uint8Array, offsets: readonly number[], size: number, level = 6): Promise<Uint8Array[]> {
  const addon = deflateAddon()
  const n = offsets.length
  if (!addon || n === 0 || level < 0 || level > 9) return Promise.all(offsets.map((o) => nodeZlib(buf.subarray(o, o + size), level)))
  const out = new Uint8Array(n * size)
  const sizes = new Int32Array(n)
  const rc = await addon.deflateClusters(buf, Int32Array.from(offsets), size, level, 15, 8, out, sizes)
  if (rc !== 0) throw new Error(`deflate: zlib could not set up a stream (error ${rc})`)
  // the header zlib writes for windowBits 15 and this level (FLEVEL from the level, FCHECK makes it a multiple of 31)
  const flevel = level < 2 ? 0 : level < 6 ? 1 : level === 6 ? 2 : 3
  const cmf = 0x78
  let flg = flevel << 6
  flg += 31 - ((cmf * 256 + flg) % 31)
  const result: Array<Uint8Array | Promise<Uint8Array>> = []
  for (let i = 0; i < n; i++) {
    const len = sizes[i]!
    const input = buf.subarray(offsets[i]!, offsets[i]! + size)
    if (len < 0) {
      result.push(nodeZlib(input, level))
      continue
    }
    const z = new Uint8Array(len + 6)
    z[0] = cmf
    z[1] = flg
    z.set(out.subarray(i * size, i * size + len), 2)
    const sum = adler32(input)
    z[len + 2] = sum >>> 24
    z[len + 3] = (sum >>> 16) & 0xff
    z[len + 4] = (sum >>> 8) & 0xff
    z[len + 5] = sum & 0xff
    result.push(z)
  }
  return Promise.all(result)
}
