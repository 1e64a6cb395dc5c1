/**
 * Every committed regression case (test/fuzz/regressions/*.jsonl: a seed
 * recipe name plus the mutation list of a mutant that once failed) replayed:
 * every invariant must now hold for it. The full archive of failing mutants
 * (regressions/archive/) is replayed by `npm run fuzz -- --replay
 * test/fuzz/regressions/archive`.
 */
import { beforeAll, expect, it } from 'vitest'
import { describeQemu } from '../support/qemu.js'
import { loadRegressions } from './cases.js'
import type { CaseResult } from './harness.js'
import { runPool } from './pool.js'
import { openCase } from './open-defects.js'

const cases = loadRegressions()

describeQemu(
  'fuzz: regression cases replayed',
  () => {
    let results: Map<number, CaseResult>
    beforeAll(async () => {
      results = await runPool(
        cases.map((c, k) => ({ k, fc: { seed: c.seed, mutations: c.mutations, ...(c.cliCommand ? { cliCommand: c.cliCommand } : {}) } })),
        2,
      )
    }, 1_800_000)

    it('has regression cases', () => expect(cases.length).toBeGreaterThan(0))

    const title = (c: (typeof cases)[number]) => `${c.file}:${c.line} ${c.class ?? ''} ${c.invariant} (${c.seed}: ${c.mutations.map((m) => m.why).join('; ')})`
    const replay = (k: number) => {
      const r = results.get(k)!
      const failed = r.outcomes.filter((o) => o.status === 'fail').map((o) => `${o.invariant}: ${o.detail}`)
      expect(failed).toEqual([])
    }
    cases.forEach((c, k) => {
      const open = c.file.endsWith('cases.jsonl') ? openCase(c.line) : undefined
      // a case of an open defect must still fail; once it passes, take it off open-defects.ts
      if (open) it.fails(`${title(c)} [open: ${open.id}]`, () => replay(k))
      else it(title(c), () => replay(k))
    })
  },
  ['qemu-img', 'qemu-io'],
)
