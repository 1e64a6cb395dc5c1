/**
 * Regression tests for the repair edge defects of issue 10 (D2, D3, D4, D8,
 * D11, D14, D21 in ../shared/findings/edge-defects-2026-12.md). Each image is
 * made by qemu-img/qemu-io, damaged in code (Qcow2Bytes), and compared with
 * qemu-img on the same bytes: the check verdict (exit code and counts), the
 * guest bytes after our repair against the guest bytes after
 * `qemu-img check -r all` (qemu-img convert -O raw of both), and qemu-img
 * check after our repair.
 */
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it, vi } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { ImgtoolError } from '../../src/errors.js'
import { analyzeQcow2, CheckFailedError, type Qcow2Analysis } from '../../src/formats/qcow2/check/check.js'
import { repairQcow2Device } from '../../src/formats/qcow2/repair/repair.js'
import { applyQcow2Undo } from '../../src/formats/qcow2/repair/journal.js'
import type { CheckReport, RepairResult } from '../../src/check/types.js'
import { Qcow2Bytes } from '../support/damage.js'
import { describeQemu, makeTempDir, md5File, parseJson, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'

type QemuJson = Record<string, number | string>

function exitOf(r: CheckReport): number {
  return r.checkErrors > 0 ? 1 : r.corruptions > 0 ? 2 : r.leaks > 0 ? 3 : 0
}

/** a qemu-made image: create options, virtual size, qemu-io commands */
async function made(dir: string, name: string, opts: string, size: string, io: string[], after?: (path: string) => Promise<void>): Promise<Uint8Array> {
  const p = join(dir, `${name}-orig.qcow2`)
  await qemuImgOk(['create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), p, size])
  if (io.length) await qemuIoOk(p, io, { format: 'qcow2' })
  if (after) await after(p)
  return new Uint8Array(readFileSync(p))
}

async function guestMd5(path: string): Promise<string> {
  const raw = `${path}.raw`
  await qemuImgOk(['convert', '-f', 'qcow2', '-O', 'raw', path, raw])
  return md5File(raw)
}

interface Outcome {
  /** qemu-img check on the damaged bytes */
  qemuBefore: { code: number; json: QemuJson | undefined }
  /** our check on the damaged bytes (undefined: the check failed, as qemu-img's "Check failed") */
  oursBefore: CheckReport | undefined
  analysis: Qcow2Analysis | undefined
  /** qemu-img check -r all on a copy */
  qemuRepair: { code: number; stderr: string }
  qemuRepairedMd5: string | undefined
  /** our repair (or its error) */
  result: RepairResult | undefined
  error: unknown
  ours: Uint8Array
  oursPath: string
  oursMd5: string | undefined
  /** qemu-img check on our repaired bytes */
  qemuAfter: { code: number; json: QemuJson | undefined }
  journal: MemoryDevice
}

async function compare(dir: string, name: string, bytes: Uint8Array): Promise<Outcome> {
  const damagedPath = join(dir, `${name}-damaged.qcow2`)
  writeFileSync(damagedPath, bytes)
  const qb = await qemuImg(['check', '-f', 'qcow2', '--output=json', damagedPath])
  let analysis: Qcow2Analysis | undefined
  try {
    analysis = await analyzeQcow2(new MemoryDevice(bytes, { name: damagedPath }))
  } catch (e) {
    if (!(e instanceof CheckFailedError)) throw e
  }
  const qemuPath = join(dir, `${name}-qemu.qcow2`)
  copyFileSync(damagedPath, qemuPath)
  const qr = await qemuImg(['check', '-f', 'qcow2', '-r', 'all', qemuPath])
  let qemuRepairedMd5: string | undefined
  try {
    qemuRepairedMd5 = await guestMd5(qemuPath)
  } catch {
    qemuRepairedMd5 = undefined // qemu-img left an image it cannot read
  }
  const dev = new MemoryDevice(bytes, { name: `${name}.qcow2` })
  const journal = new MemoryDevice(0, { name: 'journal' })
  let result: RepairResult | undefined
  let error: unknown
  try {
    result = await repairQcow2Device(dev, { repair: 'all', journal, journalPath: 'journal' })
  } catch (e) {
    error = e
  }
  const ours = dev.snapshot()
  const oursPath = join(dir, `${name}-ours.qcow2`)
  writeFileSync(oursPath, ours)
  const qa = await qemuImg(['check', '-f', 'qcow2', '--output=json', oursPath])
  let oursMd5: string | undefined
  try {
    oursMd5 = await guestMd5(oursPath)
  } catch {
    oursMd5 = undefined
  }
  const js = (s: string) => (s.trim() ? parseJson<QemuJson>(s) : undefined)
  return {
    qemuBefore: { code: qb.code ?? -1, json: js(qb.stdout) },
    oursBefore: analysis?.report,
    analysis,
    qemuRepair: { code: qr.code ?? -1, stderr: qr.stderr },
    qemuRepairedMd5,
    result,
    error,
    ours,
    oursPath,
    oursMd5,
    qemuAfter: { code: qa.code ?? -1, json: js(qa.stdout) },
    journal,
  }
}

/** our check verdict and counts equal qemu-img's */
function expectSameVerdict(ours: CheckReport | undefined, qemu: { code: number; json: QemuJson | undefined }): void {
  expect(ours, 'our check failed where qemu-img reported').toBeDefined()
  expect(exitOf(ours!)).toBe(qemu.code)
  expect({ corruptions: ours!.corruptions, leaks: ours!.leaks, checkErrors: ours!.checkErrors }).toEqual({
    corruptions: qemu.json?.['corruptions'] ?? 0,
    leaks: qemu.json?.['leaks'] ?? 0,
    checkErrors: qemu.json?.['check-errors'] ?? 0,
  })
}

const u64 = (b: Qcow2Bytes, o: number) => b.u64(o)

describeQemu('repair edge defects (issue 10), against qemu-img on the same bytes', () => {
  useTempDirs()
  // qemu-img conversions and repairs of up to 16 MiB images; a shared machine can be very slow
  vi.setConfig({ testTimeout: 900_000 })

  it('D2: an inflated refcount_table_clusters: the table is trimmed, every guest byte kept, as qemu-img', async () => {
    const dir = makeTempDir('imgtool-d2-')
    const img = new Qcow2Bytes(await made(dir, 'd2', 'cluster_size=4096', '16M', ['write -P 0x5a 0 1M']))
    img.putU32(56, 256) // 1 -> 256
    const o = await compare(dir, 'd2', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    expect(o.qemuRepair.code).toBe(0)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
    expect(o.qemuAfter.code).toBe(0)
    expect(exitOf(o.result!.after)).toBe(0)
    expect(o.result!.actions.some((a) => a.kind === 'trim-table')).toBe(true)
    expect(o.result!.actions.some((a) => a.kind === 'clear-l2-entry')).toBe(false)
    // a dry run performs the repair on an overlay: it lists every step the repair takes (the trim, and
    // nothing after it on this image) and predicts the clean result, and writes nothing
    const dry = new MemoryDevice(img.bytes, { name: 'd2.qcow2', readOnly: true })
    const plan = await repairQcow2Device(dry, { repair: 'all', dryRun: true })
    expect(plan.actions.map((a) => a.kind)).toEqual(o.result!.actions.map((a) => a.kind))
    expect(plan.actions.map((a) => a.kind)).toEqual(['trim-table'])
    expect(exitOf(plan.after)).toBe(0)
    expect(Buffer.from(dry.snapshot()).equals(Buffer.from(img.bytes))).toBe(true)
    expect(Buffer.from(dry.snapshot()).equals(Buffer.from(img.bytes))).toBe(true)
  })

  it('D3: an inflated l1_size: the L1 table is trimmed, every guest byte kept, qemu-img check clean', async () => {
    const dir = makeTempDir('imgtool-d3-')
    const img = new Qcow2Bytes(await made(dir, 'd3', 'cluster_size=4096', '4M', ['write -P 0x5a 0 64k']))
    const orig = new Qcow2Bytes(img.bytes)
    img.putU32(36, 4096) // 2 -> 4096
    const o = await compare(dir, 'd3', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    // qemu-img's own repair fails here (exit 1) but keeps the guest bytes, which are the undamaged image's
    writeFileSync(join(dir, 'd3-undamaged.qcow2'), orig.bytes)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
    expect(o.oursMd5).toBe(await guestMd5(join(dir, 'd3-undamaged.qcow2')))
    expect(o.qemuAfter.code).toBe(0)
    expect(new Qcow2Bytes(o.ours).l1Size).toBeLessThan(4096)
  })

  it('D4: l1_table_offset = 0: the header is never written, verdict and guest bytes as qemu-img -r all', async () => {
    const dir = makeTempDir('imgtool-d4-')
    const img = new Qcow2Bytes(await made(dir, 'd4', '', '4M', ['write -P 7 0 64k']))
    img.putU64(40, 0)
    const o = await compare(dir, 'd4', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    expect(Array.from(o.ours.subarray(0, 72))).toEqual(Array.from(img.bytes.subarray(0, 72)))
    expect(o.qemuAfter.code).toBe(o.qemuRepair.code) // 2: not repairable, by either
    expect(exitOf(o.result!.after)).toBe(o.qemuAfter.code)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  it('D4: a bit flip in refcount_table_offset with a snapshot table to rewrite: no write at the bogus offset', async () => {
    const dir = makeTempDir('imgtool-d4b-')
    const img = new Qcow2Bytes(
      await made(dir, 'd4b', 'cluster_size=512', '1M', ['write -P 9 0 64k'], async (p) => {
        await qemuImgOk(['snapshot', '-c', 's1', p])
      }),
    )
    img.putU32(u64(img, 64) + 36, 0) // snapshot entry 0: no extra data (v3: incomplete, -r all rewrites the table)
    img.putU64(48, u64(img, 48) + 2 ** 49) // refcount_table_offset bit 49 (before: "write reftable at 0x2000000000200 failed: EFBIG")
    const o = await compare(dir, 'd4b', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    expect(o.ours.byteLength).toBeLessThan(img.bytes.byteLength + 64 * 1024)
    expect(o.qemuRepair.code).toBe(0)
    expect(o.qemuAfter.code).toBe(0)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  it('D8: a refcount table entry of 2^62 on 512 B clusters: repair ends, clean, guest kept', async () => {
    const dir = makeTempDir('imgtool-d8-')
    const img = new Qcow2Bytes(await made(dir, 'd8', 'cluster_size=512', '1M', ['write -P 3 0 8k']))
    img.putU64(img.reftableOffset + 8, 2n ** 62n)
    const o = await compare(dir, 'd8', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    expect(o.qemuRepair.code).toBe(0)
    expect(o.qemuAfter.code).toBe(0)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  it('a guest cluster mapped at the end of the file and a snapshot table to rewrite: the new table goes past it (fuzz seed 12, case 500)', async () => {
    const dir = makeTempDir('imgtool-eof-snap-')
    const orig = await made(dir, 'eof', 'cluster_size=512', '256K', ['write -P 7 0 8k'], async (p) => {
      await qemuImgOk(['snapshot', '-c', 's1', p])
    })
    // the guest view qemu-img gives with only the entry moved to the end of the file: that range reads zeros
    const moved = new Qcow2Bytes(orig)
    const what = moved.dataPastEof(0)
    const movedPath = join(dir, 'eof-moved.qcow2')
    writeFileSync(movedPath, moved.bytes)
    const expected = await guestMd5(movedPath)
    // and a snapshot table repair must rewrite "past the end of the file"
    const img = new Qcow2Bytes(moved.bytes)
    img.snapshotExtraTooBig()
    const o = await compare(dir, 'eof', img.bytes)
    expect(o.error, what).toBeUndefined()
    expect(o.result!.actions.some((a) => a.kind === 'rewrite-snapshot-table')).toBe(true)
    const table = o.result!.actions.find((a) => a.kind === 'rewrite-snapshot-table')!.hostOffset!
    expect(table).toBeGreaterThan(moved.bytes.byteLength) // not the cluster at the end the entry maps
    expect(o.oursMd5).toBe(expected)
    expect(o.qemuAfter.code).toBe(0)
  })

  it('an external data file whose refcounts are lost: no data cluster is "copied" off the metadata it shares an index with (fuzz seed 12, case 45)', async () => {
    const dir = makeTempDir('imgtool-df-')
    const data = join(dir, 'df-orig.data')
    const orig = await made(dir, 'df', `data_file=${data},cluster_size=4096`, '256K', ['write -P 5 0 8k', 'write -P 6 64k 4k'])
    const img = new Qcow2Bytes(orig)
    img.putU64(img.reftableOffset, 0) // every refcount of the qcow2 file reads 0
    const dev = new MemoryDevice(img.bytes, { name: 'df.qcow2' })
    const r = await repairQcow2Device(dev, { repair: 'all', journal: new MemoryDevice(0, { name: 'journal' }), journalPath: 'journal' })
    expect(r.actions.filter((a) => a.kind === 'copy-data-cluster')).toEqual([])
    const ours = join(dir, 'df-orig.qcow2')
    writeFileSync(ours, dev.snapshot())
    const check = await qemuImg(['check', '-f', 'qcow2', ours])
    expect(check.code, check.stdout + check.stderr).toBe(0)
    const map = parseJson<Array<{ start: number; offset?: number }>>(await qemuImgOk(['map', '--output=json', '-f', 'qcow2', ours]))
    for (const m of map) if (m.offset !== undefined) expect(m.offset, 'a data-file offset equals its guest offset').toBe(m.start)
  })

  it('D11: a garbage refcount table entry and nb_snapshots 20: no internal error, a verdict as qemu-img', async () => {
    const dir = makeTempDir('imgtool-d11-')
    const img = new Qcow2Bytes(await made(dir, 'd11', 'refcount_bits=4,cluster_size=4096', '1M', ['write -P 1 0 8k']))
    img.poke(img.reftableOffset, new Array(8).fill(0xff))
    img.putU32(60, 20)
    const o = await compare(dir, 'd11', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore) // qemu-img: 25 corruptions, 7 check errors (exit 1)
    expect(o.error).toBeUndefined()
    // what we leave, qemu-img agrees with; the guest bytes are the ones qemu-img's own repair keeps
    expect(exitOf(o.result!.after)).toBe(o.qemuAfter.code)
    expect(o.result!.after.corruptions).toBe(o.qemuAfter.json?.['corruptions'] ?? 0)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  it('D11: refcount table entry 0 unaligned and nb_snapshots 2: the snapshot rewrite does not throw a plain Error', async () => {
    const dir = makeTempDir('imgtool-d11b-')
    const img = new Qcow2Bytes(await made(dir, 'd11b', 'cluster_size=4096', '1M', ['write -P 1 0 8k']))
    img.putU64(img.reftableOffset, u64(img, img.reftableOffset) + 0x200)
    img.putU32(60, 2)
    const o = await compare(dir, 'd11b', img.bytes)
    if (o.error !== undefined) {
      expect(o.error).toBeInstanceOf(ImgtoolError)
      expect((o.error as Error).message).not.toMatch(/\n/)
    } else {
      expect(exitOf(o.result!.after)).toBe(o.qemuAfter.code)
    }
    if (o.qemuRepairedMd5 !== undefined && o.oursMd5 !== undefined) expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  for (const v of [0x8000000000000000n, 0x1n, 0x100n, 0x4000000000000000n]) {
    it(`D14: an active L1 entry ${'0x' + v.toString(16)} (no L2 offset): check as qemu-img, repair clears it`, async () => {
      const dir = makeTempDir('imgtool-d14a-')
      const img = new Qcow2Bytes(await made(dir, 'd14a', 'cluster_size=4096', '4M', ['write -P 3 0 64k']))
      img.putU64(img.l1Offset + 8, v)
      const o = await compare(dir, 'd14a', img.bytes)
      expectSameVerdict(o.oursBefore, o.qemuBefore)
      expect(o.error).toBeUndefined()
      expect(o.qemuAfter.code).toBe(0)
      expect(exitOf(o.result!.after)).toBe(0)
      expect(o.oursMd5).toBe(o.qemuRepairedMd5)
    })
  }

  it('D14: L1[0] pointing at the L1 table itself: check as qemu-img; repair refuses, names both readings, writes nothing', async () => {
    const dir = makeTempDir('imgtool-d14b-')
    const img = new Qcow2Bytes(await made(dir, 'd14b', '', '4M', ['write -P 3 0 64k']))
    img.putU64(img.l1Offset, 2n ** 63n + BigInt(img.l1Offset))
    const o = await compare(dir, 'd14b', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeInstanceOf(ImgtoolError)
    expect((o.error as Error).message).toMatch(/refuses to choose: active L1 entry 0 .* either the L1 entry is wrong .* or that cluster is an L2 table/)
    expect(Buffer.from(o.ours).equals(Buffer.from(img.bytes))).toBe(true)
    expect(o.qemuRepair.code).toBe(1) // qemu-img cannot repair it either
  })

  it('D14: nb_snapshots 1 with snapshots_offset 0: the entry read from header bytes stays a corruption, as qemu-img says', async () => {
    const dir = makeTempDir('imgtool-d14c-')
    const img = new Qcow2Bytes(await made(dir, 'd14c', '', '4M', ['write -P 3 0 64k']))
    img.putU32(60, 1)
    const o = await compare(dir, 'd14c', img.bytes)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined()
    expect(o.qemuAfter.code).toBe(2)
    expect(exitOf(o.result!.after)).toBe(o.qemuAfter.code)
    expect(o.result!.after.corruptions).toBe(o.qemuAfter.json?.['corruptions'])
    expect(o.qemuRepair.code).toBe(2)
    expect(o.oursMd5).toBe(o.qemuRepairedMd5)
  })

  it('D21: a maximal L1 (0x400000 entries) on a small image with a bitmap: check as qemu-img in bounded memory, repair trims it', async () => {
    const dir = makeTempDir('imgtool-d21-')
    const bytes = await made(dir, 'd21', 'cluster_size=4096', '8M', ['write -P 1 0 1M'], async (p) => {
      await qemuImgOk(['bitmap', '--add', p, 'b0'])
      await qemuIoOk(p, ['write -P 2 2M 256k'], { format: 'qcow2' })
    })
    const img = new Qcow2Bytes(bytes)
    img.putU32(36, 0x400000)
    const o = await compare(dir, 'd21', img.bytes)
    // what the analysis keeps is bounded (the counts stay exact: 721,241 corruptions, as qemu-img)
    expect(o.analysis!.report.diagnostics.length).toBeLessThanOrEqual(100_001)
    expect(o.analysis!.pastEof.length).toBeLessThanOrEqual(100_000)
    expectSameVerdict(o.oursBefore, o.qemuBefore)
    expect(o.error).toBeUndefined() // before: "Maximum call stack size exceeded"
    expect(o.qemuAfter.code).toBe(0)
    // qemu-img cannot even open it read-write ("Can't update bitmap directory"): the undamaged guest bytes
    expect(o.qemuRepair.code).toBe(1)
    expect(o.oursMd5).toBe(await guestMd5(join(dir, 'd21-orig.qcow2')))
  })

  it('D11: a repair that fails after writing says so in one line and names the undo journal, which restores the image', async () => {
    const dir = makeTempDir('imgtool-d11c-')
    const img = new Qcow2Bytes(await made(dir, 'd11c', 'cluster_size=4096', '16M', ['write -P 0x5a 0 1M']))
    img.putU32(56, 256) // the trim phase writes the header first
    const journal = new MemoryDevice(0, { name: 'journal' })
    let writes = 0
    const dmg = new Qcow2Bytes(img.bytes)
    dmg.leak(2) // something for the refcount phase to write after the trim
    const dev2 = new MemoryDevice(dmg.bytes, { name: 'd11c.qcow2' })
    const failing2 = new Proxy(dev2, {
      get(t, k, r) {
        if (k === 'write') {
          return async (...args: Parameters<MemoryDevice['write']>) => {
            if (++writes > 1) throw new Error('injected failure after the first write')
            return t.write(...args)
          }
        }
        const v = Reflect.get(t, k, r) as unknown
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v
      },
    })
    let err: unknown
    try {
      await repairQcow2Device(failing2, { repair: 'all', journal, journalPath: '/tmp/x.imgtool-undo', filename: 'd11c.qcow2' })
    } catch (e) {
      err = e
    }
    expect(err).toBeInstanceOf(ImgtoolError)
    const m = (err as Error).message
    expect(m).not.toMatch(/\n/)
    expect(m).toMatch(/repair failed after it had written to the image: .*injected failure.*undo journal \/tmp\/x\.imgtool-undo restores the image/)
    await applyQcow2Undo(journal, dev2, { allowUnsealed: true }) // the repair failed: no seal
    expect(Buffer.from(dev2.snapshot()).equals(Buffer.from(dmg.bytes))).toBe(true)
  })
})
