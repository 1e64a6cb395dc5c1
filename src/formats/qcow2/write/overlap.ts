/**
 * Metadata-overlap guard (QEMU's qcow2_check_metadata_overlap): every write the
 * writer issues is checked against the clusters known to hold metadata. A write
 * that would land on metadata of another kind is refused, and the image is
 * marked corrupt, as QEMU does: it means the refcounts lied about a cluster
 * being free, and writing on would destroy the image.
 */
import { CorruptImageError, hex } from '../../../errors.js'

/**
 * QEMU's overlap check knows only the bitmap directory (QCOW2_OL_BITMAP_DIRECTORY);
 * we also guard bitmap tables and data clusters: a write over them means the
 * refcounts lied just the same.
 */
export type OverlapKind =
  'header' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'snapshot' | 'snapshot-l1' | 'snapshot-l2' | 'bitmap' | 'bitmap-directory' | 'bitmap-table' | 'bitmap-data'

export class OverlapGuard {
  private readonly kinds = new Map<number, OverlapKind>()

  constructor(
    private readonly clusterSize: number,
    private readonly file: string,
  ) {}

  set(cluster: number, kind: OverlapKind | undefined): void {
    if (kind === undefined) this.kinds.delete(cluster)
    else this.kinds.set(cluster, kind)
  }

  setRange(offset: number, length: number, kind: OverlapKind | undefined): void {
    if (length <= 0) return
    const first = Math.floor(offset / this.clusterSize)
    const last = Math.floor((offset + length - 1) / this.clusterSize)
    for (let c = first; c <= last; c++) this.set(c, kind)
  }

  kindAt(cluster: number): OverlapKind | undefined {
    return this.kinds.get(cluster)
  }

  /**
   * The first conflict for a write of `length` bytes at `offset` that is meant
   * to be `allowed` (undefined: guest data, which may overlap no metadata).
   */
  conflict(offset: number, length: number, allowed?: OverlapKind): { cluster: number; kind: OverlapKind } | undefined {
    if (length <= 0) return undefined
    const first = Math.floor(offset / this.clusterSize)
    const last = Math.floor((offset + length - 1) / this.clusterSize)
    for (let c = first; c <= last; c++) {
      const k = this.kinds.get(c)
      if (k !== undefined && k !== allowed) return { cluster: c, kind: k }
    }
    return undefined
  }

  error(offset: number, length: number, what: string, hit: { cluster: number; kind: OverlapKind }): CorruptImageError {
    return new CorruptImageError(
      `qcow2: ${this.file}: Preventing invalid write on metadata (overlaps with ${hit.kind} at ${hex(hit.cluster * this.clusterSize)}); ` +
        `${what} of ${hex(length)} bytes at ${hex(offset)} refused; image marked corrupt`,
      { file: this.file, structure: hit.kind, offset },
    )
  }
}
