/**
 * Compressing clusters the way QEMU does: raw deflate with a 4 KiB window
 * (windowBits -12, memLevel 9, default level) for zlib images, zstd at its
 * default level (3) for zstd images. A cluster that does not shrink below
 * the cluster size is written uncompressed (returns undefined), as QEMU does.
 *
 * zstd compression uses @bokuweb/zstd-wasm: the zstd C library compiled to
 * WebAssembly and shipped inside the npm package (no install script, no
 * download, no native build); Node 20 has no zstd, and fzstd only decompresses.
 *
 * `CompressPool` runs the codecs off the main thread so convert -c keeps every
 * core busy: deflate on libuv's thread pool (zlib's async API), zstd on
 * worker threads (one per core; plain JavaScript evaluated from a string, so
 * they run the same from src and dist).
 */
import { createRequire } from 'node:module'
import { availableParallelism } from 'node:os'
import { Worker } from 'node:worker_threads'
import { deflateRaw, deflateRawSync } from 'node:zlib'
import { ImgtoolError } from '../../../errors.js'
import { COMPRESSION_ZSTD } from '../spec/constants.js'
import { deflateAddon } from './deflate-addon.js'

const require = createRequire(import.meta.url)
const ZSTD_LEVEL = 3
/** QEMU's deflate parameters (qcow2_compress): default level, 4 KiB window, raw stream */
const DEFLATE = { level: 6, windowBits: 12, memLevel: 9 } as const

interface ZstdModule {
  init(): Promise<void>
  compress(data: Uint8Array, level: number): Uint8Array
}

let zstd: ZstdModule | undefined
let zstdReady: Promise<ZstdModule> | undefined

async function loadZstd(): Promise<ZstdModule> {
  if (zstd) return zstd
  zstdReady ??= (async () => {
    const m = require('@bokuweb/zstd-wasm') as ZstdModule
    await m.init()
    zstd = m
    return m
  })()
  return zstdReady
}

/** Compress one cluster; undefined when the result would not be smaller than `clusterSize - 1` bytes. */
export async function compressCluster(data: Uint8Array, clusterSize: number, compressionType: number): Promise<Uint8Array | undefined> {
  let out: Uint8Array
  if (compressionType === COMPRESSION_ZSTD) {
    out = (await loadZstd()).compress(data, ZSTD_LEVEL)
  } else {
    out = deflateRawSync(data, DEFLATE)
  }
  return out.byteLength < clusterSize ? new Uint8Array(out.buffer, out.byteOffset, out.byteLength) : undefined
}

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads')
const zlib = require('node:zlib')
let zstdReady
function ready() {
  if (!zstdReady) {
    const m = require(workerData.zstdPath)
    zstdReady = m.init().then(() => m)
  }
  return zstdReady
}
parentPort.on('message', async (m) => {
  try {
    let out
    if (m.type === ${COMPRESSION_ZSTD}) out = (await ready()).compress(m.data, ${ZSTD_LEVEL})
    else out = zlib.deflateRawSync(m.data, ${JSON.stringify(DEFLATE)})
    const copy = new Uint8Array(out.byteLength)
    copy.set(out)
    parentPort.postMessage({ id: m.id, out: copy.byteLength < m.clusterSize ? copy : null }, [copy.buffer])
  } catch (e) {
    parentPort.postMessage({ id: m.id, error: String(e && e.message || e) })
  }
})
`

interface Job {
  resolve(v: Uint8Array | undefined): void
  reject(e: Error): void
}

/** A pool of compression workers. `close()` ends them. */
export class CompressPool {
  private readonly workers: Worker[] = []
  private readonly jobs = new Map<number, Job>()
  private readonly load: number[] = []
  private nextId = 1

  private started = false

  constructor(private readonly poolSize = Math.max(1, availableParallelism())) {}

  private start(): void {
    if (this.started) return
    this.started = true
    const zstdPath = require.resolve('@bokuweb/zstd-wasm')
    for (let i = 0; i < this.poolSize; i++) {
      // small heaps: a worker holds one cluster at a time
      const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { zstdPath }, resourceLimits: { maxYoungGenerationSizeMb: 2, maxOldGenerationSizeMb: 16 } })
      w.unref()
      w.on('message', (m: { id: number; out?: Uint8Array | null; error?: string }) => {
        const job = this.jobs.get(m.id)
        if (!job) return
        this.jobs.delete(m.id)
        this.load[i]!--
        if (m.error !== undefined) job.reject(new Error(`compression worker: ${m.error}`))
        else job.resolve(m.out ?? undefined)
        this.dispatch()
      })
      w.on('error', (e) => {
        for (const [id, job] of this.jobs) {
          job.reject(e)
          this.jobs.delete(id)
        }
      })
      this.workers.push(w)
      this.load.push(0)
    }
  }

  get size(): number {
    return this.poolSize
  }

  /** jobs not yet handed to a worker (each worker gets at most 2 at a time: bounded memory) */
  private readonly waiting: Array<{ id: number; data: Uint8Array; clusterSize: number; type: number }> = []

  compress(data: Uint8Array, clusterSize: number, compressionType: number): Promise<Uint8Array | undefined> {
    if (compressionType !== COMPRESSION_ZSTD) {
      // zlib runs on libuv's thread pool: parallel, without a JavaScript isolate per thread
      return new Promise((resolve, reject) => {
        deflateRaw(data, DEFLATE, (err, out) => {
          if (err) reject(err)
          else resolve(out.byteLength < clusterSize ? new Uint8Array(out.buffer, out.byteOffset, out.byteLength) : undefined)
        })
      })
    }
    this.start()
    const id = this.nextId++
    return new Promise((resolve, reject) => {
      this.jobs.set(id, { resolve, reject })
      this.waiting.push({ id, data, clusterSize, type: compressionType })
      this.dispatch()
    })
  }

  /**
   * Compress the whole clusters at `offsets` of `buf`: deflate through the
   * native addon in one call on a libuv thread when it is built (the system's
   * zlib: qemu-img's bytes), otherwise cluster by cluster as `compress`.
   */
  async compressMany(buf: Uint8Array, offsets: readonly number[], clusterSize: number, compressionType: number): Promise<Array<Uint8Array | undefined>> {
    const addon = compressionType === COMPRESSION_ZSTD ? null : deflateAddon()
    if (!addon || offsets.length === 0) return Promise.all(offsets.map((o) => this.compress(buf.subarray(o, o + clusterSize), clusterSize, compressionType)))
    const n = offsets.length
    const out = new Uint8Array(n * clusterSize)
    const sizes = new Int32Array(n)
    const rc = await addon.deflateClusters(buf, Int32Array.from(offsets), clusterSize, DEFLATE.level, DEFLATE.windowBits, DEFLATE.memLevel, out, sizes)
    if (rc !== 0) throw new ImgtoolError('INTERNAL', `qcow2: deflate: zlib could not set up a stream (error ${rc})`)
    const result: Array<Uint8Array | undefined> = []
    for (let i = 0; i < n; i++) result.push(sizes[i]! >= 0 ? out.subarray(i * clusterSize, i * clusterSize + sizes[i]!) : undefined)
    return result
  }

  private dispatch(): void {
    for (;;) {
      if (this.waiting.length === 0) return
      let best = -1
      for (let i = 0; i < this.load.length; i++) if (this.load[i]! < 2 && (best < 0 || this.load[i]! < this.load[best]!)) best = i
      if (best < 0) return
      const job = this.waiting.shift()!
      this.load[best]!++
      // a view would carry its whole underlying buffer through the structured clone: send a copy, transferred
      const copy = Uint8Array.prototype.slice.call(job.data) // a copy even for a Buffer (whose slice() is a view)
      this.workers[best]!.postMessage({ id: job.id, type: job.type, data: copy, clusterSize: job.clusterSize }, [copy.buffer])
    }
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()))
    this.workers.length = 0
  }
}
