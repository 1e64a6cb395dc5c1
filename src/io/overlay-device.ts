import { ReadOnlyError } from '../errors.js'
import type { BlockDevice, IoTag } from './block-device.js'
import { PassThroughDevice } from './pass-through-device.js'

const PAGE = 4096

/**
 * A writable view of a device that keeps every write in memory and never
 * writes to the device under it: a dry run performs the real steps on it and
 * drops them. Memory grows with the bytes written (a repair writes metadata
 * only), not with the device.
 */
export class OverlayDevice extends PassThroughDevice {
  private readonly pages = new Map<number, Uint8Array>()
  private len: number
  /** base bytes at or past this offset were cut by a truncate: they read as zeros */
  private baseLimit: number
  private closed = false

  /** Only the name passes through: no optional member (host status, allocation) of the device under it. */
  constructor(base: BlockDevice) {
    super(base, { forward: [] })
    this.len = base.size
    this.baseLimit = base.size
  }

  override get size(): number {
    return this.len
  }
  override get readOnly(): boolean {
    return false
  }

  /** bytes held in memory for the writes so far */
  get heldBytes(): number {
    return this.pages.size * PAGE
  }

  private async page(index: number): Promise<Uint8Array> {
    let p = this.pages.get(index)
    if (!p) {
      p = await this.readBase(index * PAGE, PAGE)
      this.pages.set(index, p)
    }
    return p
  }

  /** the base's bytes as this view sees them: zeros where a truncate cut the base */
  private async readBase(offset: number, length: number): Promise<Uint8Array> {
    const out = new Uint8Array(length)
    const n = Math.max(0, Math.min(length, Math.min(this.len, this.baseLimit) - offset))
    if (n > 0) out.set(await this.inner.read(offset, n, 'overlay'))
    return out
  }

  override async read(offset: number, length: number, _tag?: IoTag): Promise<Uint8Array> {
    this.assertOpen()
    const out = await this.readBase(offset, length)
    const end = offset + length
    for (let i = Math.floor(offset / PAGE); i * PAGE < end; i++) {
      const p = this.pages.get(i)
      if (!p) continue
      const from = Math.max(offset, i * PAGE)
      const to = Math.min(end, (i + 1) * PAGE, this.len)
      if (to > from) out.set(p.subarray(from - i * PAGE, to - i * PAGE), from - offset)
    }
    return out
  }

  override async write(offset: number, data: Uint8Array, _tag?: IoTag): Promise<void> {
    this.assertOpen()
    const end = offset + data.byteLength
    for (let i = Math.floor(offset / PAGE); i * PAGE < end; i++) {
      const p = await this.page(i)
      const from = Math.max(offset, i * PAGE)
      const to = Math.min(end, (i + 1) * PAGE)
      p.set(data.subarray(from - offset, to - offset), from - i * PAGE)
    }
    if (end > this.len) this.len = end
  }

  override async flush(): Promise<void> {
    this.assertOpen()
  }

  override async truncate(size: number): Promise<void> {
    this.assertOpen()
    this.baseLimit = Math.min(this.baseLimit, size)
    if (size < this.len) {
      for (const [i, p] of this.pages) {
        if (i * PAGE >= size) this.pages.delete(i)
        else if ((i + 1) * PAGE > size) p.fill(0, size - i * PAGE)
      }
    }
    this.len = size
  }

  override async close(): Promise<void> {
    this.closed = true
    this.pages.clear()
  }

  private assertOpen(): void {
    if (this.closed) throw new ReadOnlyError(`${this.name}: overlay is closed`, { file: this.name })
  }
}
