/**
 * The optional deflate addon built by `npm install` (native/zdeflate.c): raw
 * deflate of many clusters in one call on a libuv thread, with the system's
 * zlib linked in when the build found it (the zlib qemu-img uses: the same
 * compressed bytes, and faster than the zlib inside Node on this data).
 * Without the addon, compress-write.ts uses Node's zlib.
 */
import { createRequire } from 'node:module'

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
    const m = require('../../../../build/Release/zdeflate.node') as DeflateAddon
    loaded = typeof m.deflateClusters === 'function' ? m : null
  } catch {
    loaded = null
  }
  return loaded
}
