/**
 * COW stores written (and repaired) by imgtool, judged by the real kernel.
 * The verdicts live in images/dmsnap/kernel-verdicts.json; this test rebuilds the
 * stores, checks they are byte-identical to the ones the kernel judged, and that
 * the kernel activated each one and served exactly our view. With
 * IMGTOOL_DMSNAP_ORACLE=1 it first boots the oracle (one VM) and rewrites the file.
 */
import { describe, expect, it } from 'vitest'
import { execFileSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, resolve } from 'node:path'
import { FIXTURES, md5 } from './helpers.js'
import { buildScenarios, makeOrigin, type Scenario } from './scenarios.js'

const VERDICTS = join(FIXTURES, 'kernel-verdicts.json')
const ORACLE = process.env.DMSNAP_ORACLE ?? resolve(__dirname, '..', '..', '..', 'shared', 'tools', 'dmsnap-oracle', 'make-fixture.sh')

interface Verdict {
  name: string
  cow_md5: string
  expected_view_md5: string | null
  expected_status: string
  kernel: { activated: boolean; status: string; snapshot_md5: string | null; cow_modified: boolean; messages: string[] }
}

function runOracle(scenarios: Scenario[]): Verdict[] {
  const dir = mkdtempSync(join(tmpdir(), 'dmsnap-verdicts-'))
  writeFileSync(join(dir, 'origin.img'), makeOrigin())
  const args = ['verify', '--origin', join(dir, 'origin.img'), '--out', join(dir, 'out')]
  for (const s of scenarios) {
    writeFileSync(join(dir, `${s.name}.img`), s.cow)
    args.push('--cow', join(dir, `${s.name}.img`))
  }
  execFileSync(ORACLE, args, { stdio: ['ignore', 'ignore', 'inherit'], timeout: 600_000 })
  const rep = JSON.parse(readFileSync(join(dir, 'out', 'verify.json'), 'utf8')) as {
    results: { activated: boolean; status: string; snapshot_md5: string; cow_modified_by_kernel: boolean; kernel_messages: string[] }[]
  }
  return scenarios.map((s, i) => {
    const r = rep.results[i]!
    return {
      name: s.name,
      cow_md5: md5(s.cow),
      expected_view_md5: s.viewMd5,
      expected_status: s.status,
      kernel: {
        activated: r.activated,
        status: r.status,
        snapshot_md5: r.snapshot_md5 ?? null,
        cow_modified: r.cow_modified_by_kernel,
        messages: r.kernel_messages,
      },
    }
  })
}

describe('stores written by imgtool, judged by the kernel', async () => {
  const scenarios = await buildScenarios()
  if (process.env.IMGTOOL_DMSNAP_ORACLE === '1') {
    writeFileSync(VERDICTS, JSON.stringify({ kernel: '6.1.0 (Debian linux-image-amd64, dmsnap-oracle verify)', stores: runOracle(scenarios) }, null, 1) + '\n')
  }
  const recorded = existsSync(VERDICTS) ? (JSON.parse(readFileSync(VERDICTS, 'utf8')) as { stores: Verdict[] }).stores : []

  it('has a recorded verdict for every store', () => {
    expect(recorded.map((v) => v.name)).toEqual(scenarios.map((s) => s.name))
  })

  for (const s of scenarios) {
    it(`${s.name}: the kernel ${s.viewMd5 ? 'serves our view' : 'sees it invalidated'}`, () => {
      const v = recorded.find((x) => x.name === s.name)!
      expect(v.cow_md5, 'the store is byte-identical to the one the kernel judged').toBe(md5(s.cow))
      expect(v.kernel.activated).toBe(true)
      expect(v.kernel.cow_modified).toBe(false)
      if (s.viewMd5) {
        expect(v.kernel.snapshot_md5).toBe(s.viewMd5)
        expect(v.kernel.status.split(' ').slice(3).join(' ')).toBe(s.status)
        if (s.sameViewAs) {
          // repaired, the store serves what the kernel served for it damaged
          const other = recorded.find((x) => x.name === s.sameViewAs)!
          expect(other.kernel.activated).toBe(true)
          expect(v.kernel.snapshot_md5, `the kernel's view of ${s.sameViewAs}`).toBe(other.kernel.snapshot_md5)
        }
      } else {
        expect(v.kernel.status).toMatch(/Invalid$/)
      }
    })
  }
})
