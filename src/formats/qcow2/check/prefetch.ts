/**
 * qcow2 check, read-ahead: the Prefetcher that reads a known sequence of
 * tables (L2 tables, refcount blocks) a few at a time ahead of their use, into
 * a small pool of reused buffers.
 */
import { readInto, type BlockDevice } from '../../../io/block-device.js'

/**
 * Reads a known sequence of tables ahead of their use (a few in flight), so
 * the walk does not wait for one read at a time. Order of use is the order given.
 *
 * The buffers are reused (a fresh buffer per table was ~160 MB of garbage on a
 * 1 TiB image, freed only by scavenges it forced; see bench/README-check.md):
 * a table from take() belongs to the caller until it hands it back with
 * release(), and nothing may keep it, or a view of it, past that point. Callers
 * read numbers out of it and let go; a buffer that is never released is simply
 * not reused.
 */
export class Prefetcher {
  /** reads in flight, in order of use; `ok` once the read has filled `buf` */
  private readonly inflight: { p: Promise<Uint8Array>; buf: Uint8Array; ok: boolean }[] = []
  private next = 0
  /** buffers ready for the next reads */
  private readonly free: Uint8Array[] = []
  /** buffers being read into or lent to the caller */
  private readonly busy = new Set<Uint8Array>()
  constructor(
    private readonly dev: BlockDevice,
    /** the tables' offsets, in order of use (a typed array: no object per table; 16 Ki per TiB of L2 tables) */
    private readonly offsets: Float64Array,
    /** every table's length (one cluster) */
    private readonly length: number,
    private readonly tag: string,
    private readonly depth = 8,
  ) {}
  private fill(): void {
    while (this.inflight.length < this.depth && this.next < this.offsets.length) {
      const offset = this.offsets[this.next++]!
      const buf = this.buffer(this.length)
      const e = { p: undefined as unknown as Promise<Uint8Array>, buf, ok: false }
      e.p = readInto(this.dev, offset, buf, this.tag).then(() => {
        e.ok = true
        return buf
      })
      e.p.catch(() => undefined) // surfaced when taken
      this.inflight.push(e)
    }
  }
  private buffer(length: number): Uint8Array {
    let buf = this.free.pop()
    if (buf === undefined || buf.byteLength !== length) buf = new Uint8Array(length)
    this.busy.add(buf)
    return buf
  }
  /** the next table, read whole; the caller owns it until release() */
  take(): Promise<Uint8Array> {
    this.fill()
    const e = this.inflight.shift()
    if (!e) throw new Error('prefetcher: nothing left to read')
    this.fill()
    return e.p
  }
  /**
   * The next table if its read has already finished, else undefined (then take() it): lets
   * the walk go on without a promise per table while the read-ahead keeps up. A failed
   * read is never returned here; take() surfaces its error.
   */
  takeReady(): Uint8Array | undefined {
    this.fill()
    const e = this.inflight[0]
    if (e === undefined || !e.ok) return undefined
    this.inflight.shift()
    this.fill()
    return e.buf
  }
  /** hands a table from take() back for reuse: the caller must hold no reference to it any more */
  release(buf: Uint8Array): void {
    if (!this.busy.delete(buf)) throw new Error('prefetcher: release of a buffer it did not lend, or released twice')
    this.free.push(buf)
  }
}
