/**
 * qcow2 check, read-ahead: the Prefetcher that reads a known sequence of
 * tables (L2 tables, refcount blocks) a few at a time ahead of their use.
 */
import type { BlockDevice } from '../../io/block-device.js'

/**
 * Reads a known sequence of tables ahead of their use (a few in flight), so
 * the walk does not wait for one read at a time. Order of use is the order given.
 */
export class Prefetcher {
  private readonly inflight: Promise<Uint8Array>[] = []
  private next = 0
  constructor(
    private readonly dev: BlockDevice,
    private readonly items: ReadonlyArray<{ offset: number; length: number }>,
    private readonly tag: string,
    private readonly depth = 8,
  ) {}
  private fill(): void {
    while (this.inflight.length < this.depth && this.next < this.items.length) {
      const it = this.items[this.next++]!
      const p = this.dev.read(it.offset, it.length, this.tag)
      p.catch(() => undefined) // surfaced when taken
      this.inflight.push(p)
    }
  }
  take(): Promise<Uint8Array> {
    this.fill()
    const p = this.inflight.shift()
    if (!p) throw new Error('prefetcher: nothing left to read')
    this.fill()
    return p
  }
}
