/**
 * Writer workloads shared by the crash sweep and the fault sweep. Each runs
 * against an image on a device the sweep controls, and tells the harness what
 * it wrote (`ctx.note`) and where it made its data durable (`ctx.flush`).
 */
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { createQcow2 } from '../../src/formats/qcow2/ops/create.js'
import type { Qcow2Image } from '../../src/formats/qcow2/image.js'
import { compressCluster } from '../../src/formats/qcow2/write/compress-write.js'
import { applySnapshot, createSnapshot, deleteSnapshot } from '../../src/formats/qcow2/ops/snapshot-ops.js'
import { resizeQcow2 } from '../../src/formats/qcow2/ops/resize.js'
import { Prng } from '../support/prng.js'
import { MemFiles, Unclosable, openOn, pattern } from '../writer/helpers.js'

export interface WorkloadContext {
  img: Qcow2Image
  rng: Prng
  size: number
  write(offset: number, data: Uint8Array): Promise<void>
  zero(offset: number, length: number, discard?: boolean): Promise<void>
  compressed(clusterIndex: number, data: Uint8Array): Promise<void>
  /** a user-level flush: everything before it must survive any later crash */
  flush(): Promise<void>
  reopen(): Promise<void>
  /** the whole guest content may change (snapshot apply) */
  touchAll(): void
  snapshot(op: 'create' | 'apply' | 'delete', name: string): Promise<void>
  resize(size: number): Promise<void>
}

export interface Workload {
  name: string
  size: number
  options: Record<string, string>
  /** raw backing file bytes */
  backing?: Uint8Array
  /** narrower crash-state options for workloads with long epochs */
  sweep?: { exhaustiveLimit?: number; randomSubsets?: number; maxTornPerWrite?: number }
  /** create the image inside the workload (on the swept device) */
  createInside?: boolean
  /** preparation on the durable base, before the swept part */
  prepare?: (ctx: WorkloadContext) => Promise<void>
  run: (ctx: WorkloadContext) => Promise<void>
}

const K = 1024

export const WORKLOADS: Workload[] = [
  {
    name: 'small writes (512 B clusters)',
    size: 128 * K,
    options: { cluster_size: '512' },
    run: async (c) => {
      for (let i = 0; i < 9; i++) {
        await c.write(c.rng.int(c.size - 800), pattern(i, 100 + c.rng.int(600), i))
        if (i % 3 === 2) await c.flush()
      }
    },
  },
  {
    name: 'a large write spanning several L2 tables',
    size: 256 * K,
    options: { cluster_size: '512' },
    run: async (c) => {
      await c.write(10_000, pattern(10_000, 150_000))
      await c.flush()
      await c.write(100_000, pattern(100_000, 80_000, 2))
    },
  },
  {
    name: 'partial clusters copied on write from a backing file',
    size: 128 * K,
    options: { cluster_size: '4096' },
    backing: pattern(0, 128 * K, 77),
    run: async (c) => {
      for (let i = 0; i < 6; i++) await c.write(i * 9000 + 100, pattern(i, 300, 3))
      await c.flush()
      await c.write(60_000, pattern(60_000, 10_000, 4))
    },
  },
  {
    name: 'refcount table growth (64-bit refcounts, 512 B clusters)',
    size: 3 * 1024 * K,
    options: { cluster_size: '512', refcount_bits: '64' },
    sweep: { exhaustiveLimit: 3, randomSubsets: 3, maxTornPerWrite: 1 },
    run: async (c) => {
      await c.write(0, pattern(0, 900_000))
      await c.flush()
      await c.write(900_000, pattern(900_000, 1_300_000))
      await c.flush()
      await c.write(2_500_000, pattern(1, 20_000))
    },
  },
  {
    name: 'refcount block growth',
    size: 2 * 1024 * K,
    options: { cluster_size: '1024', refcount_bits: '16' },
    run: async (c) => {
      for (let i = 0; i < 4; i++) {
        await c.write(i * 400_000, pattern(i, 300_000, i))
        if (i % 2 === 1) await c.flush()
      }
    },
  },
  {
    name: 'compressed writes (zlib)',
    size: 64 * K,
    options: { cluster_size: '1024' },
    run: async (c) => {
      for (let i = 0; i < 8; i++) {
        await c.compressed(i * 2, compressible(i, 1024))
        if (i % 3 === 2) await c.flush()
      }
    },
  },
  {
    // clusters that compress to a little over half their size: the bytes run on into the next
    // host cluster (qcow2_alloc_bytes packing), each spanning entry references two clusters
    name: 'compressed writes spanning host clusters (zlib)',
    size: 64 * K,
    options: { cluster_size: '1024' },
    run: async (c) => {
      for (let i = 0; i < 8; i++) {
        await c.compressed(i, halfCompressible(i, 1024))
        if (i % 3 === 2) await c.flush()
      }
      // overwrite two spanning clusters: their references are dropped from both clusters
      await c.write(1024 + 100, pattern(1, 300))
      await c.zero(3 * 1024, 1024)
    },
  },
  {
    name: 'compressed writes (zstd)',
    size: 64 * K,
    options: { cluster_size: '2048', compression_type: 'zstd' },
    run: async (c) => {
      for (let i = 0; i < 6; i++) {
        await c.compressed(i, compressible(i, 2048))
        if (i % 2 === 1) await c.flush()
      }
    },
  },
  {
    name: 'zero writes keeping the allocation',
    size: 64 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => c.write(0, pattern(0, 40_000)),
    run: async (c) => {
      await c.zero(2048, 8192)
      await c.flush()
      await c.zero(20_000, 3000)
      await c.write(3000, pattern(5, 500))
    },
  },
  {
    name: 'zero writes with discard (clusters freed)',
    size: 64 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => c.write(0, pattern(0, 40_000)),
    run: async (c) => {
      await c.zero(0, 16 * K, true)
      await c.flush()
      await c.write(1000, pattern(9, 3000))
      await c.zero(30_000, 8 * K, true)
    },
  },
  {
    name: 'v2 zero writes (clusters become unallocated)',
    size: 64 * K,
    options: { compat: '0.10', cluster_size: '1024' },
    prepare: async (c) => c.write(0, pattern(0, 30_000)),
    run: async (c) => {
      await c.zero(4096, 8192)
      await c.flush()
      await c.write(5000, pattern(1, 2000))
    },
  },
  {
    name: 'overwriting compressed clusters',
    size: 32 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => {
      for (let i = 0; i < 10; i++) await c.compressed(i, compressible(i, 1024))
    },
    run: async (c) => {
      await c.write(1024 + 100, pattern(1, 200))
      await c.flush()
      await c.write(4096, pattern(2, 3072))
      await c.zero(8192, 1024)
    },
  },
  {
    name: 'extended L2 subcluster writes',
    size: 256 * K,
    options: { cluster_size: '16384', extended_l2: 'on' },
    backing: pattern(0, 256 * K, 12),
    run: async (c) => {
      for (let i = 0; i < 6; i++) await c.write(i * 1500 + 7, pattern(i, 200))
      await c.flush()
      await c.write(40_000, pattern(3, 30_000))
    },
  },
  {
    name: 'extended L2 zero writes',
    size: 128 * K,
    options: { cluster_size: '32768', extended_l2: 'on' },
    prepare: async (c) => c.write(0, pattern(0, 100_000)),
    run: async (c) => {
      await c.zero(2048, 4096)
      await c.flush()
      await c.zero(32768, 32768, true)
      await c.zero(70_000, 100)
    },
  },
  {
    name: 'snapshot create, then copy-on-write',
    size: 64 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => c.write(0, pattern(0, 20_000)),
    run: async (c) => {
      await c.snapshot('create', 's1')
      await c.write(500, pattern(1, 3000))
      await c.flush()
      await c.write(40_000, pattern(2, 2000))
    },
  },
  {
    name: 'snapshot delete',
    size: 64 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 20_000))
      await c.snapshot('create', 's1')
      await c.write(100, pattern(1, 5000))
    },
    run: async (c) => {
      await c.snapshot('delete', 's1')
      await c.write(200, pattern(2, 100))
    },
  },
  {
    name: 'snapshot apply',
    size: 64 * K,
    options: { cluster_size: '2048' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 20_000))
      await c.snapshot('create', 's1')
      await c.write(100, pattern(1, 5000))
    },
    run: async (c) => {
      await c.snapshot('apply', 's1')
      await c.write(3000, pattern(2, 100))
    },
  },
  {
    name: 'snapshot apply that resizes (shrink, then grow past the L1 table)',
    size: 32 * K,
    options: { cluster_size: '512' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 9000))
      await c.snapshot('create', 'small')
      await c.resize(160 * K)
      await c.write(120 * K, pattern(1, 6000))
      await c.snapshot('create', 'big')
      await c.write(100, pattern(2, 3000))
    },
    run: async (c) => {
      await c.snapshot('apply', 'small')
      await c.write(20_000, pattern(3, 700))
      await c.flush()
      await c.snapshot('apply', 'big')
      await c.write(150 * K, pattern(4, 900))
    },
  },
  // v2 (compat=0.10) has no dirty bit: its snapshot operations must be leak-only at every crash point by themselves
  {
    name: 'v2 snapshot create on an image with data and a snapshot',
    size: 64 * K,
    options: { compat: '0.10', cluster_size: '1024' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 20_000))
      await c.snapshot('create', 'v2a')
      await c.write(30_000, pattern(1, 6000))
    },
    run: async (c) => {
      await c.snapshot('create', 'v2b')
      await c.write(500, pattern(2, 3000))
      await c.flush()
      await c.write(31_000, pattern(3, 2000))
    },
  },
  {
    name: 'v2 snapshot delete (of several)',
    size: 64 * K,
    options: { compat: '0.10', cluster_size: '1024' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 20_000))
      await c.snapshot('create', 'v2a')
      await c.write(100, pattern(1, 9000))
      await c.snapshot('create', 'v2b')
      await c.write(40_000, pattern(2, 4000))
      await c.snapshot('create', 'v2c')
      await c.write(3000, pattern(3, 3000))
    },
    run: async (c) => {
      // clusters only v2c and the active image share: their refcount drops to 1
      await c.snapshot('delete', 'v2c')
      await c.write(41_000, pattern(4, 100))
      await c.flush()
      await c.snapshot('delete', 'v2a')
      await c.write(200, pattern(5, 100))
    },
  },
  {
    name: 'v2 snapshot apply (of several), then writes',
    size: 64 * K,
    options: { compat: '0.10', cluster_size: '2048' },
    prepare: async (c) => {
      await c.write(0, pattern(0, 20_000))
      await c.snapshot('create', 'v2a')
      await c.write(100, pattern(1, 5000))
      await c.snapshot('create', 'v2b')
      await c.write(30_000, pattern(2, 9000))
    },
    run: async (c) => {
      await c.snapshot('apply', 'v2a')
      await c.write(3000, pattern(3, 100))
      await c.flush()
      await c.snapshot('apply', 'v2b')
      await c.write(50_000, pattern(4, 700))
    },
  },
  // v3 snapshot operations are shadow commits too (D22): leak-only at every crash point with the dirty bit clear
  {
    name: 'v3 snapshot create (4 KiB clusters, 4 L2 tables, compressed clusters, a snapshot)',
    size: 8 * 1024 * K,
    options: { cluster_size: '4096' },
    sweep: { exhaustiveLimit: 6, randomSubsets: 8, maxTornPerWrite: 2 },
    prepare: async (c) => {
      for (let i = 0; i < 4; i++) await c.write(i * 2048 * K + 1000, pattern(i, 25_000, i + 1))
      for (let i = 0; i < 3; i++) await c.compressed(512 + 8 + i, compressible(i, 4096))
      await c.snapshot('create', 'c4-old')
      await c.write(9000, pattern(5, 12_000, 3))
    },
    run: async (c) => {
      await c.snapshot('create', 'c4-new')
      await c.write(4096 + 10, pattern(6, 2000, 4))
      await c.flush()
      await c.write(2048 * K + 5000, pattern(7, 3000, 5))
    },
  },
  {
    name: 'v3 snapshot delete (64 KiB clusters, compressed clusters, of two snapshots)',
    size: 4 * 1024 * K,
    options: { cluster_size: '65536' },
    sweep: { exhaustiveLimit: 6, randomSubsets: 8, maxTornPerWrite: 2 },
    prepare: async (c) => {
      await c.write(1000, pattern(0, 300_000))
      for (let i = 0; i < 3; i++) await c.compressed(20 + i, compressible(i, 65536))
      await c.snapshot('create', 'd64-a')
      await c.write(70_000, pattern(1, 100_000, 2))
      await c.compressed(21, compressible(9, 65536))
      await c.snapshot('create', 'd64-b')
      await c.write(2 * 1024 * K, pattern(2, 80_000, 3))
    },
    run: async (c) => {
      await c.snapshot('delete', 'd64-a')
      await c.write(100, pattern(3, 500, 4))
    },
  },
  {
    name: 'v3 snapshot apply (64 KiB clusters, compressed clusters)',
    size: 4 * 1024 * K,
    options: { cluster_size: '65536' },
    sweep: { exhaustiveLimit: 6, randomSubsets: 8, maxTornPerWrite: 2 },
    prepare: async (c) => {
      await c.write(1000, pattern(0, 300_000))
      for (let i = 0; i < 3; i++) await c.compressed(20 + i, compressible(i, 65536))
      await c.snapshot('create', 'a64')
      await c.write(70_000, pattern(1, 100_000, 2))
      await c.compressed(21, compressible(9, 65536))
    },
    run: async (c) => {
      await c.snapshot('apply', 'a64')
      await c.write(3000, pattern(3, 700, 4))
    },
  },
  {
    name: 'resize grow (new L1 table)',
    size: 16 * K,
    options: { cluster_size: '512' },
    prepare: async (c) => c.write(0, pattern(0, 5000)),
    run: async (c) => {
      await c.resize(512 * K)
      await c.write(400 * K, pattern(1, 3000))
    },
  },
  {
    name: 'resize shrink',
    size: 256 * K,
    options: { cluster_size: '1024' },
    prepare: async (c) => c.write(0, pattern(0, 5000)),
    run: async (c) => {
      await c.resize(64 * K)
      await c.write(10 * K, pattern(1, 3000))
    },
  },
  {
    name: 'lazy refcounts',
    size: 128 * K,
    options: { cluster_size: '1024', lazy_refcounts: 'on' },
    run: async (c) => {
      await c.write(0, pattern(0, 10_000))
      await c.flush()
      await c.write(50_000, pattern(1, 20_000))
      await c.write(100, pattern(2, 100))
    },
  },
  {
    name: 'lazy refcounts with frees and a reopen',
    size: 128 * K,
    options: { cluster_size: '2048', lazy_refcounts: 'on' },
    prepare: async (c) => c.write(0, pattern(0, 60_000)),
    run: async (c) => {
      await c.zero(0, 20_000, true)
      await c.flush()
      await c.reopen()
      await c.write(70_000, pattern(3, 9000))
    },
  },
  {
    name: '1-bit refcounts with copy-on-write over compressed data',
    size: 32 * K,
    options: { cluster_size: '1024', refcount_bits: '1' },
    prepare: async (c) => {
      for (let i = 0; i < 4; i++) await c.compressed(i, compressible(i, 1024))
    },
    run: async (c) => {
      await c.write(1500, pattern(1, 1000))
      await c.flush()
      await c.write(100, pattern(2, 100))
    },
  },
  {
    name: 'preallocated metadata, then writes into zeroed clusters',
    size: 32 * K,
    options: { cluster_size: '1024', preallocation: 'metadata' },
    prepare: async (c) => c.zero(0, 16 * K),
    run: async (c) => {
      await c.write(1000, pattern(1, 2000))
      await c.flush()
      await c.write(20_000, pattern(2, 300))
    },
  },
  {
    name: 'concurrent writes on one image',
    size: 128 * K,
    options: { cluster_size: '512' },
    run: async (c) => {
      await Promise.all([c.write(0, pattern(0, 9000)), c.write(30_000, pattern(1, 9000)), c.write(70_000, pattern(2, 500)), c.flush()])
      await c.flush()
      await Promise.all([c.write(4000, pattern(3, 300)), c.zero(30_000, 4096)])
    },
  },
  // external data files: the data file loses its unflushed writes at the same crash point as the image
  {
    name: 'external data file: writes, partial clusters, zero writes',
    size: 128 * K,
    options: { cluster_size: '4096', data_file: 'img.data' },
    prepare: async (c) => c.write(0, pattern(0, 40_000)),
    run: async (c) => {
      await c.write(100, pattern(1, 9000))
      await c.flush()
      await c.write(50_000, pattern(2, 20_000))
      await c.zero(0, 8192)
      await c.flush()
      await c.zero(12_000, 10_000, true)
      await c.write(13_000, pattern(3, 500))
      await c.write(90_000, pattern(4, 300))
      await c.flush()
      await c.write(5000, pattern(5, 100))
    },
  },
  {
    name: 'external data file (data_file_raw): writes, partial clusters, zero writes',
    size: 128 * K,
    options: { cluster_size: '4096', data_file: 'img.data', data_file_raw: 'on' },
    prepare: async (c) => c.write(0, pattern(0, 40_000)),
    run: async (c) => {
      await c.write(100, pattern(1, 9000))
      await c.flush()
      await c.write(50_000, pattern(2, 20_000))
      await c.zero(0, 8192)
      await c.flush()
      await c.zero(12_000, 10_000, true)
      await c.write(13_000, pattern(3, 500))
      await c.flush()
      await c.write(90_000, pattern(4, 300))
    },
  },
  {
    name: 'external data file over a backing file: partial clusters copied on write, zero writes',
    size: 128 * K,
    options: { cluster_size: '4096', data_file: 'img.data' },
    backing: pattern(0, 128 * K, 41),
    run: async (c) => {
      for (let i = 0; i < 4; i++) await c.write(i * 9000 + 300, pattern(i, 700, 6))
      await c.flush()
      await c.zero(40_960, 8192)
      await c.zero(60_000, 9000, true)
      await c.flush()
      await c.write(61_000, pattern(7, 200))
      await c.write(100_000, pattern(8, 5000))
    },
  },
  {
    name: 'external data file with extended L2: subcluster writes and zero writes',
    size: 256 * K,
    options: { cluster_size: '16384', extended_l2: 'on', data_file: 'img.data' },
    prepare: async (c) => c.write(0, pattern(0, 30_000)),
    run: async (c) => {
      for (let i = 0; i < 4; i++) await c.write(40_000 + i * 1500, pattern(i, 200))
      await c.flush()
      await c.zero(2048, 4096)
      await c.zero(16_384, 16_384, true)
      await c.flush()
      await c.write(17_000, pattern(9, 600))
      await c.write(100_000, pattern(10, 20_000))
    },
  },
  {
    name: 'create',
    size: 64 * K,
    options: { cluster_size: '512' },
    createInside: true,
    run: async (c) => {
      await c.write(0, pattern(0, 3000))
    },
  },
  {
    name: 'create with preallocation=metadata, then writes',
    size: 64 * K,
    options: { cluster_size: '1024', preallocation: 'metadata' },
    createInside: true,
    run: async (c) => {
      await c.write(5000, pattern(0, 3000))
    },
  },
  {
    name: 'create with preallocation=falloc, then writes',
    size: 64 * K,
    options: { cluster_size: '1024', preallocation: 'falloc' },
    createInside: true,
    run: async (c) => {
      await c.write(2000, pattern(0, 5000))
      await c.zero(10 * K, 4 * K)
    },
  },
]

/** A cluster that deflates to a bit more than half its size (noise after a run of one byte). */
export function halfCompressible(seed: number, n: number): Uint8Array {
  const b = new Prng(seed + 77).bytes(n)
  b.fill(seed & 0xff, 0, Math.floor(n * 0.4))
  return b
}

export function compressible(seed: number, n: number): Uint8Array {
  const b = pattern(seed * 1000, n, seed)
  b.fill(seed + 1, 0, Math.floor(n * 0.75))
  return b
}

export interface Checkpoint {
  /** device flushes done when the checkpoint's flush returned */
  flushes: number
  content: Uint8Array
  /** index in `touched` of the first op issued after this checkpoint */
  touchedFrom: number
}

export interface RunRecord {
  checkpoints: Checkpoint[]
  touched: Array<{ offset: number; length: number }>
  expected: Uint8Array
  files: MemFiles
  /** device flushes done when the image first existed (create workload) */
  imageFrom: number
}

/** The external data file's name, if the workload has one. */
export function dataFileOf(w: Workload): string | undefined {
  return w.options['data_file']
}

/**
 * A copy of `files` for one run or one crash state: backing files shared (read
 * only), everything else (the data file) copied, or replaced by `override`.
 */
export function copyFiles(files: MemFiles, override: Record<string, BlockDevice> = {}): MemFiles {
  const out = new MemFiles()
  for (const [name, d] of files.files) {
    if (override[name]) continue
    out.files.set(name, name === 'base.raw' ? d : new MemoryDevice(snapshotOf(d), { name }))
  }
  for (const [name, d] of Object.entries(override)) out.files.set(name, d)
  return out
}

function snapshotOf(d: BlockDevice): Uint8Array {
  const inner = d instanceof Unclosable ? d.inner : d
  if (!(inner instanceof MemoryDevice)) throw new Error(`copyFiles: ${d.name} is not a memory device`)
  return inner.snapshot()
}

/** A base image (durable) with the workload's preparation done. */
export async function prepareBase(w: Workload): Promise<{ base: MemoryDevice; files: MemFiles; expected: Uint8Array }> {
  const files = new MemFiles()
  const base = new MemoryDevice(0, { name: 'img.qcow2' })
  const expected = new Uint8Array(w.size)
  const extra: { backingFile?: string; backingFormat?: string } = {}
  if (w.backing) {
    files.files.set('base.raw', new MemoryDevice(w.backing, { name: 'base.raw' }))
    extra.backingFile = 'base.raw'
    extra.backingFormat = 'raw'
    expected.set(w.backing.subarray(0, w.size))
  }
  if (w.createInside) return { base, files, expected }
  await createQcow2(base, files.context, { size: w.size, options: w.options, ...extra })
  if (w.prepare) {
    const rec = emptyRecord(expected, files)
    const ctx = await makeContext(base, w, rec, () => 0)
    await w.prepare(ctx)
    await ctx.img.close()
  }
  return { base, files, expected }
}

function emptyRecord(expected: Uint8Array, files: MemFiles): RunRecord {
  return { checkpoints: [], touched: [], expected, files, imageFrom: 0 }
}

async function makeContext(dev: BlockDevice, w: Workload, rec: RunRecord, flushCount: () => number): Promise<WorkloadContext> {
  const files = rec.files
  const touch = (offset: number, length: number) => rec.touched.push({ offset, length })
  const ctx: WorkloadContext = {
    img: await openOn(dev, files),
    rng: new Prng(w.name.length * 7919),
    size: rec.expected.byteLength,
    async write(offset, data) {
      touch(offset, data.byteLength)
      await ctx.img.write(offset, data)
      rec.expected.set(data, offset)
    },
    async zero(offset, length, discard = false) {
      touch(offset, length)
      await ctx.img.writeZeroes(offset, length, { discard })
      rec.expected.fill(0, offset, offset + length)
    },
    async compressed(i, data) {
      const cs = ctx.img.clusterSize
      touch(i * cs, cs)
      const z = await compressCluster(data, cs, ctx.img.header.compressionType)
      if (!z) throw new Error('test data did not compress')
      await ctx.img.writeCompressed(i * cs, z)
      rec.expected.set(data, i * cs)
    },
    async flush() {
      await ctx.img.flush()
      rec.checkpoints.push({ flushes: flushCount(), content: rec.expected.slice(), touchedFrom: rec.touched.length })
    },
    async reopen() {
      await ctx.img.close()
      ctx.img = await openOn(dev, files)
      rec.checkpoints.push({ flushes: flushCount(), content: rec.expected.slice(), touchedFrom: rec.touched.length })
    },
    touchAll() {
      touch(0, rec.expected.byteLength)
    },
    async snapshot(op, name) {
      if (op === 'create') {
        await createSnapshot(ctx.img, name)
        snaps.set(name, rec.expected.slice())
      } else if (op === 'delete') {
        await deleteSnapshot(ctx.img, name)
      } else {
        const want = snaps.get(name)!
        touch(0, Math.max(want.byteLength, rec.expected.byteLength))
        await applySnapshot(ctx.img, name)
        // the image takes the snapshot's size (as qcow2_snapshot_goto)
        if (want.byteLength === rec.expected.byteLength) rec.expected.set(want)
        else rec.expected = want.slice()
        ctx.size = want.byteLength
      }
    },
    async resize(size) {
      touch(Math.min(size, rec.expected.byteLength), Math.abs(size - rec.expected.byteLength))
      await resizeQcow2(ctx.img, size)
      const next = new Uint8Array(size)
      next.set(rec.expected.subarray(0, Math.min(size, rec.expected.byteLength)))
      rec.expected = next
      ctx.size = size
      ctx.img = await openOn(dev, files)
    },
  }
  const snaps = snapshotMemory
  return ctx
}

/** snapshot contents by name, kept across prepare and run (tests run workloads one at a time) */
const snapshotMemory = new Map<string, Uint8Array>()

/** Run the swept part of a workload on `dev`; the image is closed cleanly at the end. */
export async function runWorkload(w: Workload, dev: BlockDevice, files: MemFiles, expected: Uint8Array, flushCount: () => number): Promise<RunRecord> {
  const rec = emptyRecord(expected, files)
  if (w.createInside) {
    const extra: { backingFile?: string; backingFormat?: string } = w.backing ? { backingFile: 'base.raw', backingFormat: 'raw' } : {}
    await createQcow2(new Unclosable(dev), files.context, { size: w.size, options: w.options, ...extra })
    rec.imageFrom = flushCount()
  }
  const ctx = await makeContext(dev, w, rec, flushCount)
  rec.checkpoints.push({ flushes: flushCount(), content: rec.expected.slice(), touchedFrom: 0 })
  try {
    await w.run(ctx)
  } catch (e) {
    await ctx.img.close().catch(() => undefined)
    throw e
  }
  await ctx.img.close()
  rec.checkpoints.push({ flushes: flushCount(), content: rec.expected.slice(), touchedFrom: rec.touched.length })
  return rec
}
