/** Running many cases over J harnesses (one imgtool worker each), and shrinking a failing case. */
import { rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { DEFAULT_OPTIONS, Harness, INVARIANTS, type CaseResult, type FuzzCase, type HarnessOptions, type Invariant } from './harness.js'
import { buildSeeds, type BuiltSeed } from './seeds.js'

let poolSeq = 0

export async function runPool(
  cases: ReadonlyArray<{ k: number; fc: FuzzCase }>,
  jobs: number,
  opts: Partial<HarnessOptions> = {},
  onResult?: (k: number, r: CaseResult) => void,
): Promise<Map<number, CaseResult>> {
  const seeds = await buildSeeds([...new Set(cases.map((c) => c.fc.seed))])
  const work = join(tmpdir(), `imgtool-fuzz-work-${process.pid}-${++poolSeq}`)
  const out = new Map<number, CaseResult>()
  let next = 0
  const job = async (j: number): Promise<void> => {
    const h = new Harness({ ...DEFAULT_OPTIONS, ...opts }, join(work, `job${j}`))
    try {
      for (;;) {
        const c = cases[next++]
        if (!c) return
        const r = await h.runCase(seeds.get(c.fc.seed) as BuiltSeed, c.fc, c.k)
        out.set(c.k, r)
        onResult?.(c.k, r)
      }
    } finally {
      h.close()
    }
  }
  try {
    await Promise.all(Array.from({ length: Math.max(1, jobs) }, (_, j) => job(j)))
  } finally {
    if (opts.keep) console.log(`case directories kept under ${work}`)
    else rmSync(work, { recursive: true, force: true })
  }
  return out
}

/** Drop mutations one at a time while `invariant` still fails: the smallest list that shows it. */
export async function minimize(fc: FuzzCase, invariant: Invariant, opts: Partial<HarnessOptions> = {}): Promise<FuzzCase> {
  let cur = fc
  const fails = async (c: FuzzCase): Promise<boolean> => {
    const r = (await runPool([{ k: 0, fc: c }], 1, opts)).get(0)!
    return r.outcomes.some((o) => o.invariant === invariant && o.status === 'fail')
  }
  if (invariant !== 'cli' && cur.cliCommand && (await fails({ ...cur, cliCommand: undefined }))) cur = { seed: cur.seed, mutations: cur.mutations }
  for (let i = cur.mutations.length - 1; i >= 0 && cur.mutations.length > 1; i--) {
    const shorter = { ...cur, mutations: cur.mutations.filter((_, j) => j !== i) }
    if (await fails(shorter)) cur = shorter
  }
  return cur
}

export function countOutcomes(results: Iterable<CaseResult>): Record<Invariant, { pass: number; fail: number; excepted: number }> {
  const c = Object.fromEntries(INVARIANTS.map((i) => [i, { pass: 0, fail: 0, excepted: 0 }])) as Record<
    Invariant,
    { pass: number; fail: number; excepted: number }
  >
  for (const r of results) for (const o of r.outcomes) c[o.invariant][o.status]++
  return c
}
