/**
 * Raw images: the guest bytes are the file. Holes are reported as zero, as qemu-img map does.
 * The virtual size is the file's size rounded up to 512 bytes, as QEMU counts it
 * (whole sectors); the bytes past the end of the file read as zeros.
 */
import type { BlockDevice } from '../../io/block-device.js'
import type { DiskImage, Extent, ImageInfo, InPlaceRange, WritesInPlace } from '../../image/disk-image.js'
import type { FormatDriver } from '../../image/context.js'
import { checkGuestRange } from '../../image/range.js'
import { createRaw } from './create.js'

export class RawImage implements DiskImage, WritesInPlace {
  readonly format = 'raw'
  constructor(readonly device: BlockDevice) {}

  get filename(): string {
    return this.device.name
  }
  get virtualSize(): number {
    return Math.ceil(this.device.size / 512) * 512
  }
  get readOnly(): boolean {
    return this.device.readOnly
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    checkGuestRange(`raw: ${this.filename}: read`, offset, length, this.virtualSize)
    return this.device.read(offset, length, 'data')
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    checkGuestRange(`raw: ${this.filename}: write`, offset, data.byteLength, this.virtualSize)
    await this.device.write(offset, data, 'data')
  }

  /** every guest byte is the file's byte at the same offset */
  inPlace(offset: number, length: number): InPlaceRange | undefined {
    if (this.readOnly || offset < 0 || length <= 0 || offset + length > this.virtualSize) return undefined
    return { file: this.filename, hostOffset: offset }
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    checkGuestRange(`raw: ${this.filename}: write zeroes`, offset, length, this.virtualSize)
    const chunk = new Uint8Array(Math.min(length, 1 << 20))
    for (let o = 0; o < length; o += chunk.byteLength) {
      const n = Math.min(chunk.byteLength, length - o)
      await this.device.write(offset + o, n === chunk.byteLength ? chunk : chunk.subarray(0, n), 'data')
    }
  }

  async *extents(offset = 0, length = this.virtualSize - offset): AsyncIterable<Extent> {
    checkGuestRange(`raw: ${this.filename}: map`, offset, length, this.virtualSize)
    const end = offset + length
    const fileEnd = Math.min(end, this.device.size)
    let pos = offset
    while (pos < fileEnd) {
      const st = this.device.hostStatus ? await this.device.hostStatus(pos, fileEnd - pos) : { data: true, length: fileEnd - pos }
      yield {
        start: pos,
        length: st.length,
        depth: 0,
        present: true,
        zero: !st.data,
        data: st.data,
        hostOffset: pos,
        file: this.filename,
      }
      pos += st.length
    }
    // the rest of the last sector, past the end of the file: zeros (qemu-img map says the same)
    if (pos < end) yield { start: pos, length: end - pos, depth: 0, present: true, zero: true, data: false, hostOffset: pos, file: this.filename }
  }

  async info(): Promise<ImageInfo> {
    const info: ImageInfo = { filename: this.filename, format: 'raw', virtualSize: this.virtualSize }
    if (this.device.allocatedSize) info.actualSize = await this.device.allocatedSize()
    return info
  }

  flush(): Promise<void> {
    return this.device.flush()
  }
  close(): Promise<void> {
    return this.device.close()
  }
}

export const rawDriver: FormatDriver = {
  name: 'raw',
  async open(device) {
    return new RawImage(device)
  },
  async create(device, _context, options) {
    await createRaw(device, options)
  },
}
