/** The per-invariant table the runner and the tests print. */
import { INVARIANTS, type CaseResult } from './harness.js'
import { countOutcomes } from './pool.js'

export function summarize(results: Iterable<CaseResult>): string {
  const all = [...results]
  const c = countOutcomes(all)
  const lines = ['invariant          passed  failed  excepted']
  for (const inv of INVARIANTS)
    lines.push(`${inv.padEnd(18)} ${String(c[inv].pass).padStart(6)}  ${String(c[inv].fail).padStart(6)}  ${String(c[inv].excepted).padStart(8)}`)
  lines.push(`cases: ${all.length}, with a failure: ${all.filter((r) => r.outcomes.some((o) => o.status === 'fail')).length}`)
  return lines.join('\n')
}
