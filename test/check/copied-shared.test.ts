/**
 * OFLAG_COPIED on clusters a snapshot shares: qemu-img check reports an active
 * L1 or L2 entry whose COPIED flag is set while its cluster's refcount is 2 or
 * more. Our check decides whether it needs its second pass over the active L2
 * tables without a bit per cluster (a shared cluster is remembered by the
 * in-memory refcounts, see CheckState.copiedLimit and Imrt.shared), so these
 * cases must still find every such entry: same JSON, exit code and stderr
 * lines as qemu-img check on the same bytes, for snapshot fixtures (v2, v3,
 * 64 KiB and 512-byte clusters), and the repair (-r all) clean by qemu-img.
 */
import { writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { expect, it } from 'vitest'
import { MemoryDevice } from '../../src/io/memory-device.js'
import { analyzeQcow2 } from '../../src/formats/qcow2/check/check.js'
import { checkExitCode } from '../../src/check/types.js'
import { checkJson } from '../../src/cli/render/check.js'
import { Qcow2Bytes } from '../support/damage.js'
import { readFileSync } from 'node:fs'
import { beforeAll } from 'vitest'
import { describeQemu, makeTempDir, qemuImg, qemuImgOk, qemuIoOk, useTempDirs } from '../support/qemu.js'
import { fixture, fixtureBytes } from './fixtures.js'

/** the committed snapshot fixtures, and images made here whose snapshot still shares L2 tables (512-byte clusters) */
const FIXTURES = ['v3-snapshot', 'v2-snapshot', 'made-v3-c512', 'made-v2-c512']

/** set COPIED on active L2 entries of shared data clusters (the first, or all) */
function setCopiedShared(i: Qcow2Bytes, all: boolean): string | undefined {
  const shared = i.dataEntries().filter((e) => i.getRefcount(e.cluster) >= 2 && (i.u32(e.at) & 0x80000000) === 0)
  if (shared.length === 0) return undefined
  for (const e of all ? shared : shared.slice(0, 1)) i.putU32(e.at, i.u32(e.at) | 0x80000000)
  return `COPIED set on ${all ? shared.length : 1} L2 entr${all ? 'ies' : 'y'} of shared clusters`
}

/** set COPIED on an active L1 entry whose L2 table a snapshot shares */
function setCopiedSharedL1(i: Qcow2Bytes): string | undefined {
  const t = i.l2Tables().find((x) => i.getRefcount(x.offset / i.cs) >= 2 && (i.u32(x.at) & 0x80000000) === 0)
  if (!t) return undefined
  i.putU32(t.at, i.u32(t.at) | 0x80000000)
  return `COPIED set on L1 entry ${t.l1Index} (its L2 table is shared)`
}

const DAMAGES: { name: string; apply: (i: Qcow2Bytes) => string | undefined }[] = [
  { name: 'none', apply: () => 'undamaged' },
  { name: 'copied-l2-set-shared', apply: (i) => setCopiedShared(i, false) },
  { name: 'copied-l2-set-shared-all', apply: (i) => setCopiedShared(i, true) },
  { name: 'copied-l1-set-shared', apply: setCopiedSharedL1 },
  {
    name: 'both',
    apply: (i) => {
      const a = setCopiedShared(i, false)
      const b = setCopiedSharedL1(i)
      return a && b ? `${a}; ${b}` : undefined
    },
  },
]

describeQemu(
  'COPIED set on shared clusters: check as qemu-img check',
  () => {
    useTempDirs()
    const dir = makeTempDir('imgtool-copied-shared-')
    const made = new Map<string, Uint8Array>()
    beforeAll(async () => {
      for (const compat of ['1.1', '0.10']) {
        const path = join(dir, `made-${compat}.qcow2`)
        await qemuImgOk(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=512,compat=${compat}`, path, '4M'])
        // data in two L2 tables' ranges (each covers 32 KiB), a snapshot, then one of them written again:
        // the other's L2 table and data stay shared with the snapshot (refcount 2, COPIED clear)
        await qemuIoOk(path, ['write -P 1 0 40k', 'write -P 2 1M 8k'], { format: 'qcow2' })
        await qemuImgOk(['snapshot', '-c', 's1', path])
        await qemuIoOk(path, ['write -P 3 1M 4k'], { format: 'qcow2' })
        made.set(compat === '1.1' ? 'made-v3-c512' : 'made-v2-c512', new Uint8Array(readFileSync(path)))
      }
    })
    const bytesOf = (fx: string) => made.get(fx) ?? fixtureBytes(fixture(fx))
    let n = 0
    for (const fx of FIXTURES)
      for (const d of DAMAGES) {
        it(`${fx} + ${d.name}`, async () => {
          const img = new Qcow2Bytes(bytesOf(fx))
          const what = d.apply(img)
          // the committed fixtures' snapshots share data clusters only (their L2 tables were copied since)
          if (what === undefined && !fx.startsWith('made-') && (d.name === 'copied-l1-set-shared' || d.name === 'both')) return
          expect(what, 'the fixture has what this damage needs').toBeDefined()
          const path = join(dir, `${n++}-${fx}-${d.name}.qcow2`)
          writeFileSync(path, img.bytes)
          const q = await qemuImg(['check', '-f', 'qcow2', '--output=json', path])
          const a = await analyzeQcow2(new MemoryDevice(img.bytes, { name: path }))
          const ours = checkJson(a.report, path)
          delete ours['findings']
          delete ours['notices']
          expect(checkExitCode(a.report), what).toBe(q.code)
          expect(JSON.stringify(ours, null, 4), what).toBe(JSON.stringify(JSON.parse(q.stdout), null, 4))
          const qLines = q.stderr.split('\n').filter((l) => l && !l.startsWith('qemu-img: Check failed'))
          expect(a.report.diagnostics ?? [], what).toEqual(qLines)
          if (d.name === 'none') {
            expect(a.report.corruptions).toBe(0)
            return
          }
          // the damage is seen: one COPIED line per damaged entry, as qemu prints them
          expect(a.report.corruptions, what).toBeGreaterThan(0)
          expect(qLines.some((l) => l.startsWith('ERROR OFLAG_COPIED'))).toBe(true)
          // and repaired as qemu-img repairs it: clean afterwards by qemu-img's own check
          const fixed = join(dir, `${n++}-${fx}-${d.name}-fixed.qcow2`)
          writeFileSync(fixed, img.bytes)
          const r = await qemuImg(['check', '-f', 'qcow2', '-r', 'all', fixed])
          expect(r.code, r.stderr).toBe(0)
        })
      }
  },
  ['qemu-img'],
)
