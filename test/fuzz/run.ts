/**
 * The long fuzz run:
 *
 *   npm run fuzz -- --count 500 --seed 1 --jobs 2 [--start K] [--seeds a,b] [--timeout MS] [--cli-rate 0.2] [--out DIR]
 *   npm run fuzz -- --replay test/fuzz/regressions [--jobs 2]      (every committed regression case)
 *   npm run fuzz -- --minimize FILE.jsonl                          (shrink each case's mutation list)
 *   npm run fuzz -- --classify results-seedS.jsonl                 (failures by invariant and known-defect class)
 *   --keep leaves each case's directory (mutant, copies, journal) for a look by hand
 *
 * Prints pass/fail/excepted counts per invariant, and writes every failing
 * case as a candidate regression case (JSON lines) under --out (default
 * $TMPDIR/imgtool-fuzz-out), with all results in results-seed<S>.jsonl.
 * Copy the candidates worth keeping into test/fuzz/regressions/.
 */
import { appendFileSync, mkdirSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { drawCase, loadRegressions, type RegressionCase } from './cases.js'
import { DEFAULT_OPTIONS, type CaseResult, type FuzzCase } from './harness.js'
import { classify } from './classify.js'
import { minimize, runPool } from './pool.js'
import { summarize } from './summary.js'
import { buildSeeds, SEEDS } from './seeds.js'

interface Args {
  count: number
  seed: number
  jobs: number
  start: number
  seeds?: string[]
  timeout: number
  cliRate: number
  out: string
  replay?: string
  minimize?: string
  classify?: string
  keep: boolean
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    count: 100,
    seed: 1,
    jobs: 1,
    start: 0,
    timeout: DEFAULT_OPTIONS.timeoutMs,
    cliRate: 0.2,
    out: join(tmpdir(), 'imgtool-fuzz-out'),
    keep: false,
  }
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!
    const v = argv[i + 1]
    const num = (): number => {
      const n = Number(v)
      if (!Number.isFinite(n)) throw new Error(`fuzz: ${k} needs a number`)
      i++
      return n
    }
    const str = (): string => {
      if (v === undefined) throw new Error(`fuzz: ${k} needs a value`)
      i++
      return v
    }
    if (k === '--count') a.count = num()
    else if (k === '--seed') a.seed = num()
    else if (k === '--jobs') a.jobs = Math.max(1, num())
    else if (k === '--start') a.start = num()
    else if (k === '--timeout') a.timeout = num()
    else if (k === '--cli-rate') a.cliRate = num()
    else if (k === '--seeds') a.seeds = str().split(',').filter(Boolean)
    else if (k === '--out') a.out = str()
    else if (k === '--replay') a.replay = str()
    else if (k === '--minimize') a.minimize = str()
    else if (k === '--classify') a.classify = str()
    else if (k === '--keep') a.keep = true
    else throw new Error(`fuzz: unknown option ${k}`)
  }
  return a
}

function readCases(path: string): RegressionCase[] {
  if (statSync(path).isDirectory()) return loadRegressions(path)
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as RegressionCase)
}

/** Failures of a results file by invariant and class, with the smallest case of each class. */
function printClasses(path: string): void {
  const rows = readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as CaseResult & { k: number })
  const byInv = new Map<string, Map<string, { label: string; n: number; example?: { k: number; fc: FuzzCase; detail: string } }>>()
  const mutants = new Map<string, Set<number>>()
  for (const r of rows) {
    for (const o of r.outcomes) {
      if (o.status !== 'fail') continue
      const c = classify(o.invariant, o.detail ?? '', r.case)
      const m = byInv.get(o.invariant) ?? new Map()
      byInv.set(o.invariant, m)
      const e = m.get(c.id) ?? { label: c.label, n: 0 }
      e.n++
      const size = (fc: FuzzCase): number => fc.mutations.length * 1000 + JSON.stringify(fc.mutations).length
      if (!e.example || size(r.case) < size(e.example.fc)) e.example = { k: r.k, fc: r.case, detail: o.detail ?? '' }
      m.set(c.id, e)
      const s = mutants.get(c.id) ?? new Set()
      s.add(r.k)
      mutants.set(c.id, s)
    }
  }
  console.log(`${rows.length} cases; failing mutants: ${new Set(rows.filter((r) => r.outcomes.some((o) => o.status === 'fail')).map((r) => r.k)).size}`)
  console.log('mutants per class: ' + [...mutants].map(([id, s]) => `${id} ${s.size}`).join(', '))
  for (const [inv, m] of byInv) {
    console.log(`\n## ${inv}`)
    for (const [id, e] of [...m].sort((a, b) => b[1].n - a[1].n)) {
      console.log(`- ${id} x${e.n}: ${e.label}`)
      if (e.example)
        console.log(
          `  case ${e.example.k}: ${JSON.stringify({ seed: e.example.fc.seed, mutations: e.example.fc.mutations, ...(e.example.fc.cliCommand ? { cliCommand: e.example.fc.cliCommand } : {}) })}\n  -> ${e.example.detail.slice(0, 400)}`,
        )
    }
  }
}

async function mainRun(): Promise<void> {
  const args = parseArgs(process.argv.slice(2))
  const hopts = { timeoutMs: args.timeout, keep: args.keep }
  if (args.classify) {
    printClasses(args.classify)
    return
  }
  if (args.minimize) {
    for (const rc of readCases(args.minimize)) {
      const m = await minimize(rc, rc.invariant, hopts)
      console.log(JSON.stringify({ ...rc, mutations: m.mutations, cliCommand: m.cliCommand }))
    }
    return
  }
  mkdirSync(args.out, { recursive: true })
  const tag = args.replay ? 'replay' : `seed${args.seed}`
  const candidates = join(args.out, `candidates-${tag}.jsonl`)
  const resultsFile = join(args.out, `results-${tag}.jsonl`)
  let cases: Array<{ k: number; fc: FuzzCase; found: string }>
  if (args.replay) {
    cases = readCases(args.replay).map((rc, k) => ({
      k,
      fc: { seed: rc.seed, mutations: rc.mutations, ...(rc.cliCommand ? { cliCommand: rc.cliCommand } : {}) },
      found: rc.found,
    }))
  } else {
    const seeds = await buildSeeds(args.seeds ?? SEEDS.map((s) => s.name))
    cases = []
    for (let k = args.start; k < args.start + args.count; k++)
      cases.push({ k, fc: drawCase(args.seed, k, seeds, args.cliRate), found: `fuzz --seed ${args.seed} case ${k}` })
  }
  const byK = new Map(cases.map((c) => [c.k, c]))
  const t0 = Date.now()
  let done = 0
  const results = await runPool(cases, args.jobs, hopts, (k, res) => {
    done++
    const c = byK.get(k)!
    appendFileSync(resultsFile, JSON.stringify({ k, ...res }) + '\n')
    for (const o of res.outcomes.filter((x) => x.status === 'fail')) {
      appendFileSync(candidates, JSON.stringify({ ...c.fc, invariant: o.invariant, detail: o.detail, found: c.found }) + '\n')
    }
    const fails = res.outcomes.filter((o) => o.status === 'fail').map((o) => o.invariant)
    process.stdout.write(`[${done}/${cases.length}] case ${k} ${c.fc.seed} ${res.ms} ms${fails.length ? ` FAIL ${fails.join(',')}` : ''}\n`)
  })
  console.log(summarize(results.values()))
  console.log(`${((Date.now() - t0) / 1000).toFixed(0)} s; results ${resultsFile}; candidate regression cases ${candidates}`)
  process.exitCode = [...results.values()].some((r) => r.outcomes.some((o) => o.status === 'fail')) ? 1 : 0
}

await mainRun()
