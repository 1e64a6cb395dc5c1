/** Drawing cases from a run seed, and the regression-case file format. */
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { Prng } from '../support/prng.js'
import { drawMutations } from './mutate.js'
import { REPO, SEEDS, type BuiltSeed } from './seeds.js'
import type { FuzzCase, Invariant } from './harness.js'

/** Case k of run seed S: its own PRNG stream, so a case does not depend on the others or on --jobs. */
export function caseRng(runSeed: number, k: number): Prng {
  // two full murmur3 finalizer rounds: the run seed first, then the case index,
  // so (S, k) and (S', k') never share a stream by an XOR coincidence
  const fmix = (h: number): number => {
    h = Math.imul(h ^ (h >>> 16), 0x85ebca6b) >>> 0
    h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0
    return (h ^ (h >>> 16)) >>> 0
  }
  const s = fmix((runSeed >>> 0) ^ 0x9e3779b9)
  return new Prng(fmix((s + Math.imul(k + 1, 0x7f4a7c15)) >>> 0))
}

export function drawSeedName(p: Prng, names: readonly string[] = SEEDS.map((s) => s.name)): string {
  const ws = names.map((n) => SEEDS.find((s) => s.name === n)?.weight ?? 1)
  let x = p.next() * ws.reduce((a, b) => a + b, 0)
  for (let i = 0; i < names.length; i++) {
    x -= ws[i]!
    if (x < 0) return names[i]!
  }
  return names[names.length - 1]!
}

const CLI_COMMANDS = ['check', 'info', 'cat', 'map', 'repair'] as const

export function drawCase(runSeed: number, k: number, seeds: Map<string, BuiltSeed>, cliRate: number): FuzzCase {
  const p = caseRng(runSeed, k)
  const seed = drawSeedName(p, [...seeds.keys()])
  const built = seeds.get(seed)!
  const bytes = readFileSync(join(built.dir, built.recipe.main))
  const mutations = drawMutations(p, built.recipe.format, bytes)
  const fc: FuzzCase = { seed, mutations }
  if (p.chance(cliRate)) fc.cliCommand = CLI_COMMANDS[p.int(CLI_COMMANDS.length)]
  return fc
}

/** A committed regression case: one JSON object a line in test/fuzz/regressions/*.jsonl. */
export interface RegressionCase extends FuzzCase {
  /** the invariant it failed when found */
  invariant: Invariant
  /** what the harness said then */
  detail: string
  /** other invariants the same mutant failed */
  also?: Invariant[]
  /** the known defect(s) it is an instance of (D1..D22, comma-separated), or NEW-n (FINDINGS.md) */
  class?: string
  /** where it came from, e.g. "fuzz --seed 7 case 123" */
  found: string
}

export const REGRESSIONS_DIR = join(REPO, 'test', 'fuzz', 'regressions')

export function loadRegressions(dir = REGRESSIONS_DIR): Array<RegressionCase & { file: string; line: number }> {
  const out: Array<RegressionCase & { file: string; line: number }> = []
  for (const f of readdirSync(dir)
    .filter((x) => x.endsWith('.jsonl'))
    .sort()) {
    const lines = readFileSync(join(dir, f), 'utf8').split('\n')
    lines.forEach((l, i) => {
      if (l.trim()) out.push({ ...(JSON.parse(l) as RegressionCase), file: f, line: i + 1 })
    })
  }
  return out
}
