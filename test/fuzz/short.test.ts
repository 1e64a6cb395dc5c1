/**
 * The short seeded fuzz run (issue 10): a fixed run seed and count, so the
 * same mutants every time; each must keep every invariant (or meet a listed
 * exception, EXCEPTIONS.md). A failure prints each failing case as a
 * regression-case line for test/fuzz/regressions/. The long run is
 * `npm run fuzz -- --count N --seed S --jobs J`.
 *
 * Runs dist/ (npm run build first), as the CLI does.
 */
import { expect, it } from 'vitest'
import { describeQemu } from '../support/qemu.js'
import { drawCase } from './cases.js'
import type { FuzzCase } from './harness.js'
import { runPool } from './pool.js'
import { buildSeeds, SEEDS } from './seeds.js'
import { summarize } from './summary.js'
import { openDefectFor } from './open-defects.js'

const RUN_SEED = Number(process.env['IMGTOOL_FUZZ_SEED'] ?? 20261203)
const COUNT = Number(process.env['IMGTOOL_FUZZ_COUNT'] ?? 72)
const JOBS = 2

describeQemu(
  'fuzz: short seeded differential run against qemu-img',
  () => {
    it(`seed ${RUN_SEED}, ${COUNT} mutants: every invariant holds but for the listed open defects (open-defects.ts)`, { timeout: 900_000 }, async () => {
      const seeds = await buildSeeds(SEEDS.map((s) => s.name))
      const cases: Array<{ k: number; fc: FuzzCase }> = []
      for (let k = 0; k < COUNT; k++) cases.push({ k, fc: drawCase(RUN_SEED, k, seeds, 0.2) })
      const results = await runPool(cases, JOBS)
      const failures: string[] = []
      const open: string[] = []
      for (const [k, r] of [...results].sort((a, b) => a[0] - b[0])) {
        for (const o of r.outcomes.filter((x) => x.status === 'fail')) {
          const line = JSON.stringify({ ...r.case, invariant: o.invariant, detail: o.detail, found: `short run seed ${RUN_SEED} case ${k}` })
          const known = openDefectFor(o.invariant, o.detail ?? '')
          if (known) open.push(`[open: ${known.id}] ${line}`)
          else failures.push(line)
        }
      }
      if (failures.length || open.length) console.log(`${summarize(results.values())}\n${[...failures, ...open].join('\n')}`)
      expect(results.size).toBe(COUNT)
      // failures that no open defect (open-defects.ts) explains: a new class, or a regression
      expect(failures, `${failures.length} invariant failures (cases printed above)`).toEqual([])
    })
  },
  ['qemu-img', 'qemu-io'],
)
