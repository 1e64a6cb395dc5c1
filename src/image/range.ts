import { UsageError } from '../errors.js'

/** Validate a guest request against the virtual size. */
export function checkGuestRange(what: string, offset: number, length: number, virtualSize: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new UsageError(`${what}: invalid range offset=${offset} length=${length}`)
  }
  if (offset + length > virtualSize) {
    throw new UsageError(`${what}: range ${offset}+${length} is beyond the virtual size ${virtualSize}`)
  }
}

/** Merge adjacent extents with the same status, as qemu-img map does. */
export function canMergeExtents(
  a: { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; hostOffset?: number; file?: string },
  b: typeof a,
): boolean {
  return (
    a.start + a.length === b.start &&
    a.depth === b.depth &&
    a.present === b.present &&
    a.zero === b.zero &&
    a.data === b.data &&
    (a.hostOffset === undefined) === (b.hostOffset === undefined) &&
    (a.hostOffset === undefined || a.hostOffset + a.length === b.hostOffset) &&
    a.file === b.file
  )
}

type MergeableExtent = Parameters<typeof canMergeExtents>[0]

/** Merge a stream of extents the way qemu-img map merges its entries. */
export async function* mergeExtents<T extends MergeableExtent>(source: AsyncIterable<T>): AsyncGenerator<T> {
  let cur: T | undefined
  for await (const e of source) {
    if (e.length === 0) continue
    if (cur && canMergeExtents(cur, e)) {
      cur = { ...cur, length: cur.length + e.length }
      continue
    }
    if (cur) yield cur
    cur = { ...e }
  }
  if (cur) yield cur
}
