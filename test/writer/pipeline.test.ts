/**
 * Pipelined guest writes (src/formats/qcow2/write-pipeline.ts): several
 * requests in flight at once, the next one planned and its data written
 * while the previous one is committed. Proven here: the same bytes as one
 * request at a time, the ordering rules on the trace, FIFO with other
 * operations, failures of one request in flight (it and every later one
 * undone, nothing leaked, nothing linked freed) at every I/O, and crashes at
 * every point.
 */
import { describe, expect, it } from 'vitest'
import type { BlockDevice } from '../../src/io/block-device.js'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { Prng } from '../support/prng.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { CrashDevice } from '../support/crash-device.js'
import { FaultyDevice, type FaultOp } from '../support/faulty-device.js'
import { TracingDevice } from '../support/tracing-device.js'
import { MemFiles, Unclosable, checkCounts, createOn, openOn, pattern, sameBytes } from './helpers.js'

const META = ['l2', 'l1'] as const

/** Requests as convert issues them: whole clusters, consecutive, some leaving holes, some across L2 tables. */
function stream(cs: number, n: number): Array<{ offset: number; length: number }> {
  const out: Array<{ offset: number; length: number }> = []
  let pos = 0
  for (let i = 0; i < n; i++) {
    const clusters = 1 + ((i * 7) % 5)
    out.push({ offset: pos, length: clusters * cs })
    pos += (clusters + (i % 3 === 2 ? 2 : 0)) * cs
  }
  return out
}

async function fresh(size: number, options: Record<string, string>) {
  const base = new MemoryDevice(0, { name: 'p.qcow2' })
  const files = new MemFiles()
  await createOn(base, size, options, files)
  return { base, files }
}

describe('pipelined guest writes', () => {
  const optionSets: Array<Record<string, string>> = [
    { cluster_size: '512' },
    { cluster_size: '4096', refcount_bits: '1' },
    { cluster_size: '16384', extended_l2: 'on', compat: '1.1' },
    { cluster_size: '1024', compat: '0.10' },
    { cluster_size: '2048', lazy_refcounts: 'on' },
  ]
  for (const opts of optionSets) {
    it(`many writes in flight give the bytes of one at a time, in rule order (${JSON.stringify(opts)})`, async () => {
      const cs = Number(opts['cluster_size'])
      const reqs = stream(cs, 60)
      const size = reqs[reqs.length - 1]!.offset + 16 * cs
      const { base, files } = await fresh(size, opts)
      const dev = new TracingDevice(new Unclosable(base))
      const img = await openOn(dev, files)
      dev.clear()
      const expected = new Uint8Array(size)
      const pending: Array<Promise<void>> = []
      for (const [i, r] of reqs.entries()) {
        const data = pattern(r.offset, r.length, i + 1)
        expected.set(data, r.offset)
        pending.push(img.write(r.offset, data))
      }
      // in place over what the stream just wrote, still in flight
      const again = pattern(reqs[3]!.offset, cs, 77)
      expected.set(again, reqs[3]!.offset)
      pending.push(img.write(reqs[3]!.offset, again))
      await Promise.all(pending)
      sameBytes(await img.read(0, size), expected)
      await img.close()
      if (!opts['lazy_refcounts']) dev.assertFlushedBefore({ op: 'write', tag: 'refblock' }, { op: 'write', tag: [...META] })
      dev.assertFlushedBefore({ op: 'write', tag: 'data' }, { op: 'write', tag: [...META] })
      const c = await checkCounts(base)
      expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
      const ro = await openOn(base, files, true)
      sameBytes(await ro.read(0, size), expected)
    })
  }

  it('keeps the order of the calls with other operations in between (FIFO)', async () => {
    const cs = 4096
    const { base, files } = await fresh(1024 * 1024, { cluster_size: String(cs) })
    const img = await openOn(base, files)
    const model = new Uint8Array(1024 * 1024)
    const checks: Array<Promise<void>> = []
    const ops: Array<Promise<unknown>> = []
    for (let i = 0; i < 40; i++) {
      const off = ((i * 5) % 200) * cs
      const kind = i % 8
      if (kind === 3) {
        // partial cluster: the ordinary path, after the pipeline empties
        const d = pattern(off + 100, 700, i)
        model.set(d, off + 100)
        ops.push(img.write(off + 100, d))
      } else if (kind === 5) {
        model.fill(0, off, off + 2 * cs)
        ops.push(img.writeZeroes(off, 2 * cs, { discard: i % 16 === 5 }))
      } else if (kind === 6) {
        // a read called now sees exactly what was called before it
        const want = model.slice(0, 1024 * 1024)
        checks.push(img.read(0, 1024 * 1024).then((got) => sameBytes(got, want, `read after op ${i}`)))
      } else if (kind === 7) {
        ops.push(img.flush())
      } else {
        const d = pattern(off, 3 * cs, i)
        model.set(d, off)
        ops.push(img.write(off, d))
      }
    }
    await Promise.all([...ops, ...checks])
    sameBytes(await img.read(0, model.byteLength), model)
    await img.close()
    const c = await checkCounts(base)
    expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })

  it('a failure of one request in flight fails it and the later ones; nothing leaks, committed ones stay (every I/O)', async () => {
    const cs = 512
    const reqs = stream(cs, 24)
    const size = reqs[reqs.length - 1]!.offset + 16 * cs
    // clusters written before, in the holes the stream leaves: the run loads their L2 tables and refcounts
    const holes = reqs.filter((_, i) => i % 3 === 2).map((r) => r.offset + r.length)
    const prepared = async () => {
      const f = await fresh(size, { cluster_size: String(cs) })
      const img = await openOn(f.base, f.files)
      for (const h of holes) await img.write(h, pattern(h, cs, 99))
      await img.close()
      return f
    }
    // one clean run to count the I/Os of the workload
    const counting = await prepared()
    const probe = new FaultyDevice(new Unclosable(counting.base))
    probe.resetCounts()
    const pImg = await openOn(probe, counting.files)
    await Promise.all(reqs.map((r, i) => pImg.write(r.offset, pattern(r.offset, r.length, i + 1))))
    await pImg.flush()
    const total = { ...probe.counts }
    await pImg.close()
    let swept = 0
    let someLater = 0
    for (const op of ['write', 'flush', 'read'] as FaultOp[]) {
      for (let nth = 1; nth <= total[op]; nth++) {
        for (const errno of ['EIO', 'ENOSPC'] as const) {
          if (errno === 'ENOSPC' && op !== 'write') continue
          const { base, files } = await prepared()
          const dev = new FaultyDevice(new Unclosable(base))
          dev.failOn({ op, nth, errno })
          const img = await openOn(dev, files).catch(() => undefined)
          if (!img) {
            swept++
            continue // the open itself failed: nothing written
          }
          const results = await Promise.allSettled(reqs.map((r, i) => img.write(r.offset, pattern(r.offset, r.length, i + 1))))
          await img.flush().catch(() => undefined)
          dev.clearFaults()
          const rejected = results.filter((r) => r.status === 'rejected').length
          if (rejected > 1) someLater++
          await img.close().catch(() => undefined)
          const where = `${errno} at ${op} #${nth}`
          const a = await analyzeQcow2(base)
          expect(a.report, `${where}: ${a.report.diagnostics.join('\n')}`).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
          const ro = await openOn(base, files, true)
          for (const [i, r] of reqs.entries()) {
            const got = await ro.read(r.offset, r.length)
            if (results[i]!.status === 'fulfilled') sameBytes(got, pattern(r.offset, r.length, i + 1), `${where}: request ${i}`)
            else sameBytes(got, new Uint8Array(r.length), `${where}: failed request ${i} left nothing`)
          }
          for (const h of holes) sameBytes(await ro.read(h, cs), pattern(h, cs, 99), `${where}: data written before`)
          swept++
        }
      }
    }
    expect(swept).toBeGreaterThan(50)
    // the cascade was exercised: some failures took later requests in flight with them
    expect(someLater).toBeGreaterThan(0)
    console.log(
      `[pipeline fault sweep] ${swept} faults (${total.write} writes, ${total.flush} flushes, ${total.read} reads per run), ${someLater} took later requests with them`,
    )
  })

  it('a crash at any point of writes in flight: no corruption, flushed writes read back', async () => {
    const cs = 512
    const reqs = stream(cs, 12)
    const size = reqs[reqs.length - 1]!.offset + 16 * cs
    const { base, files } = await fresh(size, { cluster_size: String(cs) })
    const crash = new CrashDevice(base, { name: 'p.qcow2' })
    const img = await openOn(crash, files)
    const first = reqs.slice(0, 6)
    const second = reqs.slice(6)
    await Promise.all(first.map((r, i) => img.write(r.offset, pattern(r.offset, r.length, i + 1))))
    await img.flush()
    const durable = crash.flushCount
    await Promise.all(second.map((r, i) => img.write(r.offset, pattern(r.offset, r.length, i + 7))))
    await img.close()
    let states = 0
    for (const s of crash.allCrashStates({ subsets: true, torn: true })) {
      states++
      const a = await analyzeQcow2(s.device)
      expect(a.report.corruptions, `${s.description}: ${a.report.diagnostics.join('\n')}`).toBe(0)
      expect(a.report.checkErrors, s.description).toBe(0)
      if (s.flushes >= durable) {
        const ro = await openOn(s.device, files, true)
        for (const [i, r] of first.entries())
          sameBytes(await ro.read(r.offset, r.length), pattern(r.offset, r.length, i + 1), `${s.description}: flushed request ${i}`)
      }
    }
    expect(states).toBeGreaterThan(50)
    console.log(`[pipeline crash sweep] ${states} crash states`)
  })

  it('an overwrite in flight of a cluster an earlier request is still writing lands last (a device that reorders writes)', async () => {
    const cs = 4096
    const { base, files } = await fresh(64 * cs, { cluster_size: String(cs) })
    // writes complete after a random delay, so two writes in flight may land in either order
    const rng = new Prng(17)
    const reorder: BlockDevice = {
      get size() {
        return base.size
      },
      readOnly: false,
      name: 'reorder',
      read: (o, l, t) => base.read(o, l, t),
      write: async (o, d, t) => {
        await new Promise((r) => setTimeout(r, rng.int(4)))
        return base.write(o, d, t)
      },
      flush: () => base.flush(),
      truncate: (n) => base.truncate(n),
      close: async () => undefined,
    }
    const img = await openOn(reorder, files)
    const expected = new Uint8Array(64 * cs)
    for (let round = 0; round < 8; round++) {
      const ops: Array<Promise<void>> = []
      for (let k = 0; k < 6; k++) {
        const off = ((round * 6 + k) % 60) * cs
        const d = pattern(off, 2 * cs, round * 10 + k + 1)
        expected.set(d, off)
        ops.push(img.write(off, d))
      }
      await Promise.all(ops)
    }
    sameBytes(await img.read(0, expected.byteLength), expected)
    await img.close()
    const ro = await openOn(base, files, true)
    sameBytes(await ro.read(0, expected.byteLength), expected)
    const c = await checkCounts(base)
    expect(c, c.diagnostics.join('\n')).toMatchObject({ corruptions: 0, leaks: 0, checkErrors: 0 })
  })
})
