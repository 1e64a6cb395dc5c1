/**
 * Input generator shared by the benchmarks: the same bytes as bench/write.mjs makes
 * (runs of one random byte, 1..64 long, xorshift32 seeded per 8 MiB chunk).
 */
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs'

/** compressible but not trivial: runs of one random byte, 1..64 long */
export function mixedChunk(n, seed) {
  const b = Buffer.alloc(n)
  let x = seed >>> 0 || 1
  let i = 0
  while (i < n) {
    x ^= x << 13
    x >>>= 0
    x ^= x >>> 17
    x ^= x << 5
    x >>>= 0
    const len = 1 + (x & 63)
    b.fill((x >>> 8) & 0xff, i, Math.min(n, i + len))
    i += len
  }
  return b
}

/** A raw file of `size` bytes: `dataBytes` of mixed data, then a hole. */
export function writeRaw(path, dataBytes, size) {
  const fd = openSync(path, 'w')
  const chunk = 8 * 1024 * 1024
  for (let p = 0; p < dataBytes; p += chunk) {
    const n = Math.min(chunk, dataBytes - p)
    writeSync(fd, mixedChunk(n, p / chunk + 1), 0, n, p)
  }
  ftruncateSync(fd, size)
  closeSync(fd)
}
