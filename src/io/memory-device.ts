import { ReadOnlyError } from '../errors.js'
import type { BlockDevice, IoTag } from './block-device.js'

/** A device in memory: for tests, and as the crash device's view of a disk. */
export class MemoryDevice implements BlockDevice {
  private buf: Uint8Array
  private len: number
  readonly readOnly: boolean
  readonly name: string
  private closed = false

  constructor(initial: Uint8Array | number = 0, options: { readOnly?: boolean; name?: string } = {}) {
    if (typeof initial === 'number') {
      this.buf = new Uint8Array(initial)
      this.len = initial
    } else {
      this.buf = new Uint8Array(initial) // copy: the caller keeps its bytes
      this.len = initial.byteLength
    }
    this.readOnly = options.readOnly ?? false
    this.name = options.name ?? 'memory'
  }

  get size(): number {
    return this.len
  }

  /** A copy of the whole content (tests only). */
  snapshot(): Uint8Array {
    return this.buf.slice(0, this.len)
  }

  async read(offset: number, length: number, _tag?: IoTag): Promise<Uint8Array> {
    this.assertOpen()
    const out = new Uint8Array(length)
    if (offset < this.len) out.set(this.buf.subarray(offset, Math.min(this.len, offset + length)))
    return out
  }

  /** read() into the caller's buffer: a copy, zeros past the end */
  async readInto(offset: number, buf: Uint8Array, _tag?: IoTag): Promise<void> {
    this.assertOpen()
    const n = offset < this.len ? Math.min(this.len - offset, buf.byteLength) : 0
    if (n > 0) buf.set(this.buf.subarray(offset, offset + n))
    if (n < buf.byteLength) buf.fill(0, n)
  }

  async write(offset: number, data: Uint8Array, _tag?: IoTag): Promise<void> {
    this.assertOpen()
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: device is read-only`, { file: this.name, offset })
    const end = offset + data.byteLength
    this.ensureCapacity(end)
    this.buf.set(data, offset)
    if (end > this.len) this.len = end
  }

  async flush(): Promise<void> {
    this.assertOpen()
  }

  async truncate(size: number): Promise<void> {
    this.assertOpen()
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: device is read-only`, { file: this.name })
    if (size < this.len) this.buf.fill(0, size, this.len)
    this.ensureCapacity(size)
    this.len = size
  }

  /** preallocation: the device grows to cover the range (zeros); bytes already there are kept */
  async allocate(offset: number, length: number): Promise<void> {
    this.assertOpen()
    if (this.readOnly) throw new ReadOnlyError(`${this.name}: device is read-only`, { file: this.name })
    if (length > 0 && offset + length > this.len) await this.truncate(offset + length)
  }

  async close(): Promise<void> {
    this.closed = true
  }

  private ensureCapacity(n: number): void {
    if (n <= this.buf.byteLength) return
    const next = new Uint8Array(Math.max(n, this.buf.byteLength * 2))
    next.set(this.buf.subarray(0, this.len))
    this.buf = next
  }

  private assertOpen(): void {
    if (this.closed) throw new Error(`${this.name}: device is closed`)
  }
}
