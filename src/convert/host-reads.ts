/**
 * Guest bytes for convert and compare without a fresh buffer per read.
 *
 * Extents say where guest bytes live when they map 1:1 to a host range
 * (`hostOffset`, `file`: qemu-img map's offset and file). For such a range
 * the bytes are read straight from that host file, opened read-only here,
 * into buffers that are handed back and reused: profiles of compare and
 * convert showed a third of the time in allocating, zero-filling, faulting in
 * and collecting one new buffer per read (the image's own read path returns
 * a new buffer each time). Everything else (compressed clusters, ranges
 * without a host offset, images whose files cannot be opened here) goes
 * through `DiskImage.read` as before; extents that read as zeros are not
 * read at all.
 */
import { open, type FileHandle } from 'node:fs/promises'
import type { DiskImage, Extent } from '../image/disk-image.js'

/** Where the bytes of a guest range come from. */
export type Source = { kind: 'zero' } | { kind: 'host'; file: string; offset: number } | { kind: 'image' }

/** The source of the guest range starting at `pos` inside extent `e`. */
export function sourceOf(e: Extent, pos: number, hostFiles: boolean): Source {
  if (e.zero) return { kind: 'zero' }
  if (hostFiles && e.data && e.hostOffset !== undefined && e.file !== undefined) {
    return { kind: 'host', file: e.file, offset: e.hostOffset + (pos - e.start) }
  }
  return { kind: 'image' }
}

/**
 * Reusable read buffers of one size. They are plain Uint8Arrays (not Buffers,
 * whose slice() is a view): code downstream may slice() them for a copy.
 */
export class BufferPool {
  private readonly free: Uint8Array[] = []
  private readonly owned = new WeakSet<ArrayBufferLike>()
  private readonly idle = new WeakSet<ArrayBufferLike>()
  constructor(readonly size: number) {}
  get(): Uint8Array {
    const b = this.free.pop()
    if (b) {
      this.idle.delete(b.buffer)
      return b
    }
    // not zero-filled: every byte handed out is read (or zero-filled) first
    const fresh = new Uint8Array(Buffer.allocUnsafeSlow(this.size).buffer, 0, this.size)
    this.owned.add(fresh.buffer)
    return fresh
  }
  /** Give back a buffer from get(), or a view of one; anything else is ignored. */
  put(b: Uint8Array): void {
    if (!this.owned.has(b.buffer) || this.idle.has(b.buffer)) return
    this.idle.add(b.buffer)
    this.free.push(new Uint8Array(b.buffer, 0, this.size))
  }
}

/** Read-only handles on the host files extents name, opened on first use. */
export class HostFiles {
  private readonly handles = new Map<string, Promise<FileHandle | undefined>>()
  private readonly probed = new Set<DiskImage>()

  /**
   * Before the first host read for an image: one small read through the
   * image itself, so an image that refuses reads (encrypted, say) still
   * fails as it did.
   */
  async probe(img: DiskImage): Promise<void> {
    if (this.probed.has(img)) return
    this.probed.add(img)
    if (img.virtualSize > 0) await img.read(0, Math.min(512, img.virtualSize))
  }

  private handle(file: string): Promise<FileHandle | undefined> {
    let h = this.handles.get(file)
    if (!h) {
      h = open(file, 'r').then(
        async (fh) => {
          if ((await fh.stat()).isFile()) return fh
          await fh.close()
          return undefined
        },
        () => undefined,
      )
      this.handles.set(file, h)
    }
    return h
  }

  /** the read-only descriptor of `file` (a regular file), or undefined where it cannot be opened here */
  async fd(file: string): Promise<number | undefined> {
    return (await this.handle(file))?.fd
  }

  /**
   * Fill `buf[0, n)` with host bytes at `offset` of `file` (zeros past its
   * end, as the image layer reads them). False: the file cannot be read here.
   */
  async read(file: string, offset: number, buf: Uint8Array, n: number): Promise<boolean> {
    const fh = await this.handle(file)
    if (!fh) return false
    let done = 0
    while (done < n) {
      const { bytesRead } = await fh.read(buf, done, n - done, offset + done)
      if (bytesRead === 0) break
      done += bytesRead
    }
    if (done < n) buf.fill(0, done, n)
    return true
  }

  async close(): Promise<void> {
    const all = [...this.handles.values()]
    this.handles.clear()
    for (const h of all) await (await h)?.close().catch(() => undefined)
  }
}

/**
 * Guest bytes [pos, pos+n) of `img` whose source is `src` (not 'zero'):
 * from the host file into a pooled buffer where possible, else from the
 * image. The caller gives pooled buffers back with `pool.put`.
 */
export async function readGuest(img: DiskImage, src: Source, pos: number, n: number, files: HostFiles, pool: BufferPool): Promise<Uint8Array> {
  if (src.kind === 'host' && n <= pool.size) {
    await files.probe(img)
    const buf = pool.get()
    if (await files.read(src.file, src.offset, buf, n)) return n === buf.byteLength ? buf : buf.subarray(0, n)
    pool.put(buf)
  }
  // an image that reads into a caller's buffer (a capability, not a format: vmdk) fills a pooled one
  const into = (img as Partial<ReadsInto>).readInto
  if (typeof into === 'function' && n <= pool.size) {
    const buf = pool.get()
    const view = n === buf.byteLength ? buf : buf.subarray(0, n)
    try {
      await into.call(img, pos, view)
    } catch (e) {
      pool.put(buf)
      throw e
    }
    return view
  }
  return img.read(pos, n)
}

/** An image that writes guest bytes [offset, offset + buf.byteLength) into `buf`, every byte of it. */
export interface ReadsInto {
  readInto(offset: number, buf: Uint8Array): Promise<void>
}
