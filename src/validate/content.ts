/**
 * Content: a layout-independent SHA-256 of the guest bytes (the same disk in
 * raw, qcow2 or any format hashes the same; zero extents are hashed from a
 * zero buffer, never read), and MBR/GPT sanity.
 */
import { createHash } from 'node:crypto'
import { crc32 } from 'node:zlib'
import type { DiskImage } from '../image/disk-image.js'
import type { GuestDigest } from './report.js'

const CHUNK = 1024 * 1024
const ZEROS = new Uint8Array(CHUNK)

export class DataLimitError extends Error {}
export class DeadlineError extends Error {}

export interface DigestBudget {
  maxDataBytes: number
  /** the time limit: polled before every chunk read */
  signal: AbortSignal
}

export async function guestDigest(img: DiskImage, budget: DigestBudget): Promise<GuestDigest> {
  const hash = createHash('sha256')
  let dataBytes = 0
  let zeroBytes = 0
  for await (const e of img.extents(0, img.virtualSize)) {
    if (e.zero || !e.data) {
      for (let done = 0; done < e.length; done += CHUNK) hash.update(ZEROS.subarray(0, Math.min(CHUNK, e.length - done)))
      zeroBytes += e.length
      continue
    }
    for (let done = 0; done < e.length; done += CHUNK) {
      const n = Math.min(CHUNK, e.length - done)
      if (dataBytes + n > budget.maxDataBytes)
        throw new DataLimitError(`guest data beyond limits.maxDataBytes ${budget.maxDataBytes} at guest offset 0x${(e.start + done).toString(16)}`)
      if (budget.signal.aborted) throw new DeadlineError(`stopped at guest offset 0x${(e.start + done).toString(16)}`)
      hash.update(await img.read(e.start + done, n))
      dataBytes += n
    }
  }
  return { algorithm: 'sha256', hex: hash.digest('hex'), dataBytes, zeroBytes }
}

/** Guest bytes the image holds as data (not zero, not a hole): what a reader would decompress or read. */
export async function guestDataBytes(img: DiskImage, signal: AbortSignal): Promise<number> {
  let n = 0
  for await (const e of img.extents(0, img.virtualSize)) {
    if (signal.aborted) throw new DeadlineError(`stopped at guest offset 0x${e.start.toString(16)}`)
    if (e.data && !e.zero && e.depth === 0) n += e.length
  }
  return n
}

export interface PartitionProblem {
  message: string
  structure: string
  offset: number
}

export interface PartitionFacts {
  kind: 'none' | 'mbr' | 'gpt'
  problems: PartitionProblem[]
}

const le32 = (b: Uint8Array, at: number): number => (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0
const le64 = (b: Uint8Array, at: number): number => le32(b, at) + le32(b, at + 4) * 2 ** 32

/** MBR and GPT (512-byte sectors): signatures, header and entry-array CRCs, partitions inside the disk and apart. */
export async function partitionFacts(img: DiskImage): Promise<PartitionFacts> {
  const size = img.virtualSize
  if (size < 1024) return { kind: 'none', problems: [] }
  const lba01 = await img.read(0, 1024)
  if (lba01[510] !== 0x55 || lba01[511] !== 0xaa) return { kind: 'none', problems: [] }
  const problems: PartitionProblem[] = []
  const sectors = Math.floor(size / 512)
  const ranges: Array<{ first: number; last: number; name: string; at: number }> = []
  let protective = false
  for (let i = 0; i < 4; i++) {
    const at = 446 + 16 * i
    const type = lba01[at + 4]!
    const first = le32(lba01, at + 8)
    const count = le32(lba01, at + 12)
    if (type === 0 || count === 0) continue
    if (type === 0xee) {
      protective = true
      continue
    }
    if (first + count > sectors)
      problems.push({
        message: `MBR partition ${i + 1} (sectors ${first}+${count}) ends past the disk (${sectors} sectors)`,
        structure: 'MBR entry',
        offset: at,
      })
    ranges.push({ first, last: first + count - 1, name: `MBR partition ${i + 1}`, at })
  }
  let kind: PartitionFacts['kind'] = 'mbr'
  if (protective || String.fromCharCode(...lba01.subarray(512, 520)) === 'EFI PART') {
    kind = 'gpt'
    ranges.length = 0
    await gpt(img, lba01.subarray(512), sectors, problems, ranges)
  }
  ranges.sort((a, b) => a.first - b.first)
  for (let i = 1; i < ranges.length; i++) {
    const a = ranges[i - 1]!
    const b = ranges[i]!
    if (b.first <= a.last)
      problems.push({ message: `${b.name} (from sector ${b.first}) overlaps ${a.name} (to sector ${a.last})`, structure: 'partition entry', offset: b.at })
  }
  return { kind, problems }
}

async function gpt(
  img: DiskImage,
  header: Uint8Array,
  sectors: number,
  problems: PartitionProblem[],
  ranges: Array<{ first: number; last: number; name: string; at: number }>,
): Promise<void> {
  if (String.fromCharCode(...header.subarray(0, 8)) !== 'EFI PART') {
    problems.push({ message: 'protective MBR without a GPT header at LBA 1', structure: 'GPT header', offset: 512 })
    return
  }
  const headerSize = le32(header, 12)
  if (headerSize < 92 || headerSize > 512) {
    problems.push({ message: `GPT header size ${headerSize} is outside 92..512`, structure: 'GPT header', offset: 512 + 12 })
    return
  }
  const copy = header.slice(0, headerSize)
  copy.fill(0, 16, 20)
  const stored = le32(header, 16)
  const crc = crc32(copy) >>> 0
  if (crc !== stored)
    problems.push({ message: `GPT header CRC32 0x${stored.toString(16)} does not match 0x${crc.toString(16)}`, structure: 'GPT header', offset: 512 + 16 })
  const firstUsable = le64(header, 40)
  const lastUsable = le64(header, 48)
  if (lastUsable >= sectors)
    problems.push({ message: `GPT last usable LBA ${lastUsable} is past the disk (${sectors} sectors)`, structure: 'GPT header', offset: 512 + 48 })
  const entriesLba = le64(header, 72)
  const count = le32(header, 80)
  const entrySize = le32(header, 84)
  if (entrySize < 128 || count * entrySize > 1024 * 1024 || entriesLba * 512 + count * entrySize > sectors * 512) {
    problems.push({
      message: `GPT entry array (${count} x ${entrySize} bytes at LBA ${entriesLba}) is out of bounds`,
      structure: 'GPT header',
      offset: 512 + 72,
    })
    return
  }
  const entries = await img.read(entriesLba * 512, count * entrySize)
  const arrayCrc = crc32(entries) >>> 0
  const storedArray = le32(header, 88)
  if (arrayCrc !== storedArray) {
    problems.push({
      message: `GPT entry array CRC32 0x${storedArray.toString(16)} does not match 0x${arrayCrc.toString(16)}`,
      structure: 'GPT entries',
      offset: entriesLba * 512,
    })
  }
  for (let i = 0; i < count; i++) {
    const at = i * entrySize
    if (entries.subarray(at, at + 16).every((b) => b === 0)) continue
    const first = le64(entries, at + 32)
    const last = le64(entries, at + 40)
    const off = entriesLba * 512 + at
    if (last < first || first < firstUsable || last > lastUsable) {
      problems.push({
        message: `GPT partition ${i + 1} (LBA ${first}..${last}) lies outside the usable area ${firstUsable}..${lastUsable}`,
        structure: 'GPT entry',
        offset: off,
      })
    }
    ranges.push({ first, last, name: `GPT partition ${i + 1}`, at: off })
  }
}
