/**
 * Writing fixed and dynamic disks.
 *
 * A fixed disk is written in place. A dynamic disk writes into mapped blocks
 * in place and allocates a new block at the end of the file in three
 * durable steps, so that a crash at any point leaves at most a leak:
 *
 *   1. the footer copy is written at the new end of the file (flush): the file
 *      always ends in a valid footer copy;
 *   2. the block's data (the whole block when the space held older bytes)
 *      and its sector bitmap (flush): data before the entry that maps it;
 *   3. the BAT entry (flush).
 *
 * A step that fails undoes the allocation (the file is cut back and its old
 * footer copy rewritten), so a write that returned an error leaves no leak.
 * Requests are run one at a time, in the order they were made.
 */
import { CorruptImageError, UnsupportedFeatureError, hex } from '../../errors.js'
import type { BlockDevice } from '../../io/block-device.js'
import { isAllZero } from '../../util/bytes.js'
import type { VhdLayout } from './open.js'
import { BAT_UNUSED, FOOTER_SIZE, SECTOR } from './spec.js'

/** What a differencing disk's writer needs of its image: guest reads (bitmap and parent) and a stale-bitmap signal. */
export interface DifferencingHooks {
  /** guest bytes as they read now (sectors the child does not hold come from the parent) */
  readGuest(offset: number, length: number): Promise<Uint8Array>
  /** a block's bitmap changed on disk */
  bitmapChanged(): void
}

export class VhdWriter {
  private tail: Promise<void> = Promise.resolve()
  /**
   * The file's last sector as this writer left it (the footer copy an allocation wrote), with the
   * file size it ends: an allocation that finds the file so needs no read of its old tail for the undo
   * (one pread per new block less, 256 per GiB converted)
   */
  private lastTail: { size: number; bytes: Uint8Array } | undefined
  /** a new block's sector bitmap: every sector present (only ever read: never changed once made) */
  private fullBitmap: Uint8Array | undefined

  constructor(
    private readonly device: BlockDevice,
    private readonly layout: VhdLayout,
    private readonly diff?: DifferencingHooks,
  ) {}

  /** Forget what this writer knows of the file's tail (something else, a repair, wrote the file). */
  forgetTail(): void {
    this.lastTail = undefined
  }

  /** Resolves once every request made so far has finished (failed ones too). */
  idle(): Promise<void> {
    return this.tail.catch(() => undefined)
  }

  private serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.tail.catch(() => undefined).then(fn)
    this.tail = run.then(
      () => undefined,
      () => undefined,
    )
    return run
  }

  write(offset: number, data: Uint8Array): Promise<void> {
    return this.serial(() => this.writeNow(offset, data, false))
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.serial(async () => {
      const chunk = new Uint8Array(Math.min(length, 1 << 20))
      for (let p = 0; p < length; p += chunk.byteLength) {
        const n = Math.min(chunk.byteLength, length - p)
        await this.writeNow(offset + p, chunk.subarray(0, n), true)
      }
    })
  }

  private async writeNow(offset: number, data: Uint8Array, zeroes: boolean): Promise<void> {
    const s = this.layout.sparse
    const file = this.device.name
    if (!s) {
      if (this.layout.virtualSize > this.layout.footerOffset) {
        throw new CorruptImageError(
          `vpc: ${file}: the virtual size ${this.layout.virtualSize} reaches into the footer at ${hex(this.layout.footerOffset)}; not written`,
          { file, structure: 'footer', offset: this.layout.footerOffset },
        )
      }
      await this.device.write(offset, data, 'data')
      return
    }
    for (let pos = offset; pos < offset + data.byteLength;) {
      const index = Math.floor(pos / s.blockSize)
      const inBlock = pos - index * s.blockSize
      const n = Math.min(s.blockSize - inBlock, offset + data.byteLength - pos)
      const part = data.subarray(pos - offset, pos - offset + n)
      const v = s.bat[index]!
      if (this.diff) await this.writeDifferencing(index, inBlock, part)
      else if (v !== BAT_UNUSED) await this.device.write(v * SECTOR + s.bitmapSize + inBlock, part, 'data')
      else if (!(zeroes || isAllZero(part))) await this.allocate(index, inBlock, part)
      pos += n
    }
  }

  /**
   * A differencing disk holds whole sectors: a write is widened to sectors, the
   * bytes around it read as the guest sees them (from the parent where the
   * child has no copy). Into a mapped block: the data (flush), then the bitmap
   * bits for those sectors. A new block: allocated as a dynamic disk's, with
   * bitmap bits set only for the sectors written, so every other sector still
   * reads from the parent.
   */
  private async writeDifferencing(index: number, inBlock: number, part: Uint8Array): Promise<void> {
    const s = this.layout.sparse!
    const start = Math.floor(inBlock / SECTOR) * SECTOR
    const end = Math.ceil((inBlock + part.byteLength) / SECTOR) * SECTOR
    const guest = index * s.blockSize
    let buf = part
    if (start !== inBlock || end !== inBlock + part.byteLength) {
      buf = new Uint8Array(end - start)
      buf.set(await this.diff!.readGuest(guest + start, SECTOR), 0)
      if (end - start > SECTOR) buf.set(await this.diff!.readGuest(guest + end - SECTOR, SECTOR), end - start - SECTOR)
      buf.set(part, inBlock - start)
    }
    const first = start / SECTOR
    const last = end / SECTOR - 1
    const v = s.bat[index]!
    if (v === BAT_UNUSED) {
      const bits = new Uint8Array(s.bitmapSize)
      setBits(bits, first, last)
      await this.allocate(index, start, buf, bits)
      this.diff!.bitmapChanged()
      return
    }
    const block = v * SECTOR
    await this.device.write(block + s.bitmapSize + start, buf, 'data')
    // the bitmap sectors holding these bits
    const from = Math.floor(first / 8 / SECTOR) * SECTOR
    const to = Math.ceil((last + 1) / 8 / SECTOR) * SECTOR
    const bits = await this.device.read(block + from, to - from, 'bitmap')
    const before = bits.slice()
    setBits(bits, first - from * 8, last - from * 8)
    if (bits.every((b, i) => b === before[i])) return
    await this.device.flush() // the data is durable before the bits that make the guest read it
    await this.device.write(block + from, bits, 'bitmap')
    this.diff!.bitmapChanged()
  }

  private async allocate(index: number, inBlock: number, part: Uint8Array, bitmap?: Uint8Array): Promise<void> {
    const s = this.layout.sparse!
    const dev = this.device
    const file = dev.name
    const at = s.nextFree
    if (at % SECTOR !== 0 || at / SECTOR > 0xfffffffe) {
      throw new UnsupportedFeatureError(`vpc: ${file}: no room for block ${index} at ${hex(at)} (a BAT entry holds a sector number below 2^32)`, {
        file,
        structure: 'BAT',
        offset: s.batOffset + index * 4,
      })
    }
    const dataAt = at + s.bitmapSize
    const end = dataAt + s.blockSize
    const before = dev.size
    // bytes past the old footer copy (a block leaked by a crash) are not zero: write the whole block
    // (a differencing block's bitmap marks only what is written: the rest is never read from it)
    const stale = before > at + FOOTER_SIZE && bitmap === undefined
    const oldTail = this.lastTail?.size === before ? this.lastTail.bytes : await dev.read(before - FOOTER_SIZE, FOOTER_SIZE, 'footer')
    this.lastTail = undefined
    try {
      // 1. the file ends in a footer copy again
      await dev.write(end, this.layout.footerBytes, 'footer')
      await dev.flush()
      // 2. data and bitmap
      if (stale) {
        const whole = new Uint8Array(s.blockSize)
        whole.set(part, inBlock)
        await dev.write(dataAt, whole, 'data')
      } else {
        await dev.write(dataAt + inBlock, part, 'data')
      }
      await dev.write(at, bitmap ?? (this.fullBitmap ??= new Uint8Array(s.bitmapSize).fill(0xff)), 'bitmap')
      await dev.flush()
      // 3. the BAT entry
      const entry = new Uint8Array(4)
      new DataView(entry.buffer).setUint32(0, at / SECTOR, false)
      await dev.write(s.batOffset + index * 4, entry, 'bat')
      await dev.flush()
    } catch (e) {
      await this.undo(s.batOffset + index * 4, before, oldTail).catch(() => undefined)
      throw e
    }
    s.bat[index] = at / SECTOR
    s.nextFree = end
    if (stale && dev.size > end + FOOTER_SIZE) {
      // the leaked tail is gone: the footer copy written in step 1 ends the file
      await dev.truncate(end + FOOTER_SIZE)
      await dev.flush()
    }
    if (dev.size === end + FOOTER_SIZE) this.lastTail = { size: end + FOOTER_SIZE, bytes: this.layout.footerBytes }
  }

  /**
   * Put the file back as it was before a failed allocation: the BAT entry
   * unused again (its write may have landed though its flush failed), then
   * the old size and the old last sector (the footer copy).
   */
  private async undo(entryAt: number, size: number, oldTail: Uint8Array): Promise<void> {
    await this.device.write(entryAt, new Uint8Array(4).fill(0xff), 'bat')
    await this.device.flush()
    await this.device.truncate(size)
    await this.device.write(size - FOOTER_SIZE, oldTail, 'footer')
    await this.device.flush()
  }
}

/** Set bits first..last (sector numbers, most significant bit first) of a sector bitmap. */
function setBits(bits: Uint8Array, first: number, last: number): void {
  for (let i = first; i <= last; i++) bits[i >> 3] = bits[i >> 3]! | (0x80 >> (i & 7))
}
