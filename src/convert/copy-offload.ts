/**
 * convert -C: copy offloading as qemu-img 7.2 does it (qemu-img.c, convert_co_do_copy with s->copy_range).
 *
 * While offloading is on, every data chunk of the source is handed to the kernel whole: no read into memory,
 * and so no zero detection inside it (qemu-img -C allocates a data range of zeros as data, where a plain
 * convert leaves it sparse); zero and unallocated ranges are treated as without -C. The first chunk that
 * cannot be offloaded (copy_file_range fails: EXDEV, EOPNOTSUPP, EINVAL, ENOSYS..., copies short, or the
 * bytes are not plain host bytes: compressed clusters, a format without a host mapping) turns offloading off
 * for the rest of the run, and that chunk and all later ones are read and written as a plain convert does,
 * zero detection included: qemu-img sets s->copy_range = false and retries the chunk.
 *
 * Where the bytes go: a raw target is a plain host range (guest offset = file offset), written by
 * copy_file_range on a descriptor of its own (the target's flush at the end covers it: fsync is per inode).
 * Any other target (qcow2: allocation, then data, then the L2 entry that maps it) takes the chunk through its
 * own write path, whole, so the crash law and the allocation stay those of the ordinary writer; the layout
 * is qemu-img -C's (every cluster of a data range allocated).
 */
import { open, type FileHandle } from 'node:fs/promises'
import { copyRangeAddon, type CopyRange } from '../io/seek-hole.js'
import type { DiskImage } from '../image/disk-image.js'
import type { Source } from './host-reads.js'

export type { CopyRange }

/** What became of one offered chunk. */
export type OffloadResult = 'copied' | 'whole' | 'off'

export class CopyOffload {
  /** qemu-img's s->copy_range: true until the first chunk that cannot be offloaded */
  active: boolean
  /** chunks (and bytes) copied by copy_file_range */
  copiedChunks = 0
  copiedBytes = 0
  private readonly files = new Map<string, Promise<FileHandle | undefined>>()
  private target: Promise<FileHandle | undefined> | undefined

  constructor(
    src: DiskImage,
    private readonly dst: DiskImage,
    private readonly copyRange: CopyRange | null,
  ) {
    // without copy_file_range (no addon) the first data chunk fails, as qemu-img's does on ENOSYS; so does
    // a source format QEMU has no copy_range_from for (vpc, vmdk, dm-snapshot): only raw and qcow2 have it
    this.active = copyRange !== null && (src.format === 'raw' || src.format === 'qcow2')
  }

  /** -C from `src` to `dst`: the addon's copy_file_range, or `copyRange` (tests inject a failing one). */
  static create(src: DiskImage, dst: DiskImage, copyRange?: CopyRange): CopyOffload {
    return new CopyOffload(src, dst, copyRange ?? copyRangeAddon())
  }

  /**
   * Offer guest [offset, offset+length) whose bytes are at `source`: 'copied' (done by the kernel),
   * 'whole' (offloading is on but this target is written through its image: write the chunk whole, no
   * zero detection), or 'off' (offloading is now off: read and write it as a plain convert).
   */
  async offer(source: Source, offset: number, length: number): Promise<OffloadResult> {
    if (!this.active) return 'off'
    if (source.kind !== 'host') return this.stop()
    const src = await this.handle(source.file)
    if (!src) return this.stop()
    if (this.dst.format !== 'raw') return 'whole'
    this.target ??= this.open(this.dst.filename, 'r+')
    const dst = await this.target
    if (!dst) return this.stop()
    let done = 0
    while (done < length) {
      const n = await this.copyRange!(src.fd, source.offset + done, dst.fd, offset + done, length - done)
      // an error, or no progress (the host file ends early): qemu-img's file-posix gives up too (-ENOSPC)
      if (n <= 0) return this.stop()
      done += n
    }
    this.copiedChunks++
    this.copiedBytes += length
    return 'copied'
  }

  private stop(): 'off' {
    this.active = false
    return 'off'
  }

  private handle(file: string): Promise<FileHandle | undefined> {
    let h = this.files.get(file)
    if (!h) this.files.set(file, (h = this.open(file, 'r')))
    return h
  }

  /** a regular file's handle, or undefined (block devices and unopenable files are not offloaded) */
  private async open(file: string, flags: 'r' | 'r+'): Promise<FileHandle | undefined> {
    try {
      const fh = await open(file, flags)
      if ((await fh.stat()).isFile()) return fh
      await fh.close()
    } catch {
      // not offloaded: the ordinary path meets whatever error there is
    }
    return undefined
  }

  async close(): Promise<void> {
    const all = [...this.files.values(), ...(this.target ? [this.target] : [])]
    this.files.clear()
    this.target = undefined
    for (const h of all) await (await h)?.close().catch(() => undefined)
  }
}
