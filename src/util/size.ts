import { UsageError } from '../errors.js'

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1024,
  m: 1024 ** 2,
  g: 1024 ** 3,
  t: 1024 ** 4,
  p: 1024 ** 5,
  e: 1024 ** 6,
}

/** qemu-img style sizes: 4096, 64K, 1.5M, 1G, 2T (binary units; a bare number is bytes). */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpe]?)(?:i?b)?\s*$/i.exec(text)
  if (!m) throw new UsageError(`invalid ${what} '${text}' (expected a number with an optional K/M/G/T suffix)`)
  const n = Number(m[1]) * (UNITS[(m[2] ?? '').toLowerCase()] ?? 1)
  if (!Number.isSafeInteger(n)) throw new UsageError(`invalid ${what} '${text}': not a whole number of bytes or too large`)
  return n
}

/** Human sizes the way qemu-img prints them: "1 MiB", "64 KiB", "1.5 GiB". */
export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB']
  let v = bytes
  let i = 0
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024
    i++
  }
  if (i === 0) return `${bytes} B`
  const s = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)
  // trim trailing zeros of a fraction only ("1.50" -> "1.5", "100" stays "100")
  return `${s.includes('.') ? s.replace(/\.?0+$/, '') : s} ${units[i]}`
}
