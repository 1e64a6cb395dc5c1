/**
 * qemu-img convert writes its target with cache=unsafe by default: every
 * flush is skipped, the one at the end too (strace of qemu-img 7.2 convert: no
 * fdatasync after the first data write), so convert returns once the bytes
 * are in the host's page cache. `-t writeback` makes the target durable once,
 * at the end. A target that a crash interrupts is incomplete either way.
 *
 * Like QEMU's metadata caches under cache=unsafe, metadata writes (every tag
 * but guest data) are kept in memory, in 64 KiB pages, and written back once
 * when the device closes: a convert to qcow2 then issues one write per data
 * request instead of a data write, a refcount block write and an L2 write.
 * Reads see the cached pages; a data write that overlaps a cached page (small
 * clusters share pages with metadata) updates it too, so the write-back never
 * puts old bytes over new ones.
 */
import type { BlockDevice, DeviceOpener, IoTag } from '../io/block-device.js'
import { PassThroughDevice } from '../io/pass-through-device.js'

const PAGE = 64 * 1024
/** cached bytes before the pages are written back early (small clusters: metadata everywhere) */
const BUDGET = 32 * 1024 * 1024

/**
 * Tags written through at once; everything else is cached. Guest data, and the small structures a format writes
 * next to each new block of data at the end of the file (a VHD block's sector bitmap and the footer copy that
 * follows it): cached, each would cost a 64 KiB page that the next block's data overwrites and the write-back
 * writes again (a 4 GiB dynamic VHD: 2,048 such pages, 128 MiB written twice).
 */
function passesThrough(tag: IoTag | undefined): boolean {
  return tag === undefined || tag === 'data' || tag === 'compressed' || tag === 'footer' || tag === 'bitmap'
}

/** hostStatus and allocatedSize pass through; readInto and allocate do not (they would bypass the cache). */
class UnsafeCacheDevice extends PassThroughDevice {
  /** cached pages by page index: authoritative for their bytes */
  private readonly pages = new Map<number, Uint8Array>()
  /** pages being read in: a data write that lands meanwhile waits for them to overlay itself */
  private readonly loading = new Map<number, Promise<void>>()
  /** the size the file has once the cached pages are written */
  private end: number

  constructor(
    inner: BlockDevice,
    /** flush the file when the device closes (cache=writeback); cache=unsafe never does */
    private readonly flushOnClose: boolean,
  ) {
    super(inner, { forward: ['hostStatus', 'allocatedSize'] })
    this.end = inner.size
  }

  override get size(): number {
    return Math.max(this.inner.size, this.end)
  }

  override async read(offset: number, length: number, tag?: IoTag): Promise<Uint8Array> {
    const out = await this.inner.read(offset, length, tag)
    if (this.pages.size > 0) this.overlay(offset, out)
    return out
  }

  /** Copy cached bytes over `buf` (guest offset `offset`), or cached pages from `buf` (update). */
  private overlay(offset: number, buf: Uint8Array, update = false): void {
    const first = Math.floor(offset / PAGE)
    const last = Math.floor((offset + buf.byteLength - 1) / PAGE)
    for (let p = first; p <= last; p++) {
      const page = this.pages.get(p)
      if (!page) continue
      const a = Math.max(offset, p * PAGE)
      const b = Math.min(offset + buf.byteLength, (p + 1) * PAGE)
      if (update) page.set(buf.subarray(a - offset, b - offset), a - p * PAGE)
      else buf.set(page.subarray(a - p * PAGE, b - p * PAGE), a - offset)
    }
  }

  override async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    if (this.inner.readOnly || passesThrough(tag)) {
      await this.inner.write(offset, data, tag)
      if (this.loading.size > 0) await Promise.all([...this.loading.values()])
      if (this.pages.size > 0) this.overlay(offset, data, true)
      return
    }
    const first = Math.floor(offset / PAGE)
    const last = Math.floor((offset + data.byteLength - 1) / PAGE)
    for (let p = first; p <= last; p++) {
      while (this.loading.has(p)) await this.loading.get(p)
      if (this.pages.has(p)) continue
      // the page's current bytes: the file's (zeros past its end) with nothing cached yet
      const load = this.inner.read(p * PAGE, PAGE, tag).then((page) => void this.pages.set(p, page))
      this.loading.set(p, load)
      try {
        await load
      } finally {
        this.loading.delete(p)
      }
    }
    this.overlay(offset, data, true)
    this.end = Math.max(this.end, offset + data.byteLength)
    if (this.pages.size * PAGE > BUDGET) await this.writeBack()
  }

  /** Write the cached pages (never past the end the file would have). */
  private async writeBack(): Promise<void> {
    const pages = [...this.pages.keys()].sort((x, y) => x - y)
    for (const p of pages) {
      const page = this.pages.get(p)!
      const n = Math.min(PAGE, this.end - p * PAGE)
      if (n > 0) await this.inner.write(p * PAGE, n === PAGE ? page : page.subarray(0, n), 'metadata')
      this.pages.delete(p)
    }
  }

  override async flush(): Promise<void> {}

  override async truncate(size: number): Promise<void> {
    await this.writeBack()
    await this.inner.truncate(size)
    this.end = size
  }

  override async close(): Promise<void> {
    if (!this.inner.readOnly) {
      await this.writeBack()
      if (this.flushOnClose) await this.inner.flush()
    }
    await this.inner.close()
  }
}

/**
 * qemu's cache modes for a target: `unsafe` (no flush), `writeback` and `none` (one flush at the end;
 * `none` is O_DIRECT in QEMU, here the page cache is used and the end is made durable the same way),
 * `writethrough` and `directsync` (every write is flushed before it completes).
 */
export type CacheMode = 'unsafe' | 'writeback' | 'none' | 'writethrough' | 'directsync'
export const CACHE_MODES: readonly CacheMode[] = ['unsafe', 'writeback', 'none', 'writethrough', 'directsync']

/** Every write made durable before it completes (cache=writethrough/directsync): no metadata caching either. */
class WriteThroughDevice extends PassThroughDevice {
  constructor(inner: BlockDevice) {
    super(inner, { forward: ['hostStatus', 'allocatedSize'] })
  }
  override async write(offset: number, data: Uint8Array, tag?: IoTag): Promise<void> {
    await this.inner.write(offset, data, tag)
    await this.inner.flush()
  }
}

export function unsafeCacheDevice(inner: BlockDevice, mode: CacheMode = 'unsafe'): BlockDevice {
  if (mode === 'writethrough' || mode === 'directsync') return new WriteThroughDevice(inner)
  return new UnsafeCacheDevice(inner, mode === 'writeback' || mode === 'none')
}

export function unsafeCacheOpener(open: DeviceOpener, mode: CacheMode = 'unsafe'): DeviceOpener {
  return async (path, options) => unsafeCacheDevice(await open(path, options), mode)
}
