/**
 * The native data path of convert into a target that stores guest bytes in
 * place (DiskImage.inPlace: raw, a fixed VHD, a flat VMDK extent).
 *
 * A data chunk whose guest bytes are one host range (a raw source, a qcow2
 * source's run of contiguous clusters, a VHD block, a VMDK grain run or flat
 * extent) lands in such a target at one host range too: nothing to plan but
 * which blocks are zero. The addon's copySparse reads the chunk, scans it in -S
 * blocks and writes the non-zero runs on a libuv thread, so the bytes never
 * enter a JavaScript buffer and the main thread does one call per chunk
 * instead of a read, a scan and a write per run. The output is the one the
 * JavaScript path makes (same runs written, same holes; tested against it and
 * against qemu-img). Without the addon, or for any other chunk or target,
 * convert takes its ordinary path.
 *
 * The target's file is written through a descriptor of its own, as convert
 * -C's copy_file_range does: an in-place range has no metadata to order
 * against its data, and the target's flush at the end covers these writes
 * (fsync is per inode). Chunks may complete in any order, which such a range
 * does not mind.
 */
import { open, type FileHandle } from 'node:fs/promises'
import { getSystemErrorMap } from 'node:util'
import { fsError } from '../io/file-device.js'
import { COPY_SPARSE_MAX, COPY_SPARSE_WRITE_ERROR, copySparseAddon, type CopySparse } from '../io/seek-hole.js'
import { hex } from '../errors.js'
import type { DiskImage, WritesInPlace } from '../image/disk-image.js'

export type { CopySparse }

/** an errno as fs errors carry it (code and message), for fsError's one wording */
function errnoError(errno: number, syscall: string): NodeJS.ErrnoException {
  const [code, text] = getSystemErrorMap().get(-errno) ?? ['EIO', 'i/o error']
  return Object.assign(new Error(`${code}: ${text}, ${syscall}`), { code, errno: -errno, syscall })
}

export class SparseCopier {
  /** guest bytes of the chunks copied natively */
  bytes = 0
  private readonly targets = new Map<string, Promise<FileHandle | undefined>>()

  private constructor(
    private readonly dst: DiskImage & WritesInPlace,
    private readonly copy: CopySparse,
  ) {}

  /** a copier for `dst` when it stores guest bytes in place and the addon (or `inject`) has copySparse; else undefined */
  static for(dst: DiskImage, inject?: CopySparse): SparseCopier | undefined {
    if (typeof (dst as Partial<WritesInPlace>).inPlace !== 'function') return undefined
    const copy = inject ?? copySparseAddon()
    return copy ? new SparseCopier(dst as DiskImage & WritesInPlace, copy) : undefined
  }

  /** a read-write descriptor of the target's `file`; undefined for anything but a regular file */
  private async targetFd(file: string): Promise<number | undefined> {
    let h = this.targets.get(file)
    if (!h) {
      h = (async () => {
        try {
          const fh = await open(file, 'r+')
          if ((await fh.stat()).isFile()) return fh
          await fh.close()
        } catch {
          // not copied natively: the ordinary path meets whatever error there is
        }
        return undefined
      })()
      this.targets.set(file, h)
    }
    return (await h)?.fd
  }

  /**
   * Guest [offset, offset + length) from host descriptor `srcFd` at `srcOffset`, -S `block`: the bytes
   * written, or undefined when this chunk is not for the native path (the caller copies it as usual).
   */
  async copyChunk(srcFd: number, srcFile: string, srcOffset: number, offset: number, length: number, block: number): Promise<number | undefined> {
    if (length <= 0 || length > COPY_SPARSE_MAX || block <= 0) return undefined
    const at = this.dst.inPlace(offset, length)
    // -S blocks are aligned to guest offsets: a host range at another alignment would scan other blocks
    if (!at || (at.hostOffset - offset) % block !== 0) return undefined
    const fd = await this.targetFd(at.file)
    if (fd === undefined) return undefined
    const r = await this.copy(srcFd, srcOffset, fd, at.hostOffset, length, block)
    if (r < -COPY_SPARSE_WRITE_ERROR) {
      throw fsError(errnoError(-r - COPY_SPARSE_WRITE_ERROR, 'write'), at.file, `write data at ${hex(at.hostOffset)}+${hex(length)}`, at.hostOffset, 'data')
    }
    if (r < 0) throw fsError(errnoError(-r, 'read'), srcFile, `read data at ${hex(srcOffset)}`, srcOffset, 'data')
    this.bytes += length
    return r
  }

  async close(): Promise<void> {
    const all = [...this.targets.values()]
    this.targets.clear()
    for (const h of all) await (await h)?.close().catch(() => undefined)
  }
}
