/**
 * The long fuzz run:
 *
 *   npm run fuzz -- --count 500 --seed 1 --jobs 2 [--seeds a,b] [--timeout 60000] [--cli-rate 0.2] [--out DIR]
 *
 * Prints pass/fail/excepted counts per invariant, and writes every failing
 * case as a candidate regression case (JSON lines) under --out (default
 * $TMPDIR/imgtool-fuzz-out), with all results in results-seed<S>.jsonl.
 * Copy the candidates worth keeping into test/fuzz/regressions/.
 */
import { appendFileSync, mkdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { drawCase } from './cases.js'
import { DEFAULT_OPTIONS, Harness, INVARIANTS, type CaseResult } from './harness.js'
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
}

function parseArgs(argv: string[]): Args {
  const a: Args = { count: 100, seed: 1, jobs: 1, start: 0, timeout: DEFAULT_OPTIONS.timeoutMs, cliRate: 0.2, out: join(tmpdir(), 'imgtool-fuzz-out') }
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!
    const v = argv[i + 1]
    const num = (): number => {
      const n = Number(v)
      if (!Number.isFinite(n)) throw new Error(`fuzz: ${k} needs a number`)
      i++
      return n
    }
    if (k === '--count') a.count = num()
    else if (k === '--seed') a.seed = num()
    else if (k === '--jobs') a.jobs = Math.max(1, num())
    else if (k === '--start') a.start = num()
    else if (k === '--timeout') a.timeout = num()
    else if (k === '--cli-rate') a.cliRate = num()
    else if (k === '--seeds') {
      a.seeds = (v ?? '').split(',').filter(Boolean)
      i++
    } else if (k === '--out') {
      a.out = v ?? a.out
      i++
    } else throw new Error(`fuzz: unknown option ${k}`)
  }
  return a
}

export function summarize(results: CaseResult[]): string {
  const lines = ['invariant          passed  failed  excepted']
  for (const inv of INVARIANTS) {
    const c = { pass: 0, fail: 0, excepted: 0 }
    for (const r of results) for (const o of r.outcomes) if (o.invariant === inv) c[o.status]++
    lines.push(`${inv.padEnd(18)} ${String(c.pass).padStart(6)}  ${String(c.fail).padStart(6)}  ${String(c.excepted).padStart(8)}`)
  }
  const failing = results.filter((r) => r.outcomes.some((o) => o.status === 'fail')).length
  lines.push(`cases: ${results.length}, with a failure: ${failing}`)
  return lines.join('\n')
}

async function mainRun(): Promise<void> {
  const args = parseArgs(process.argv.slice(2))
  const names = args.seeds ?? SEEDS.map((s) => s.name)
  const seeds = await buildSeeds(names)
  mkdirSync(args.out, { recursive: true })
  const candidates = join(args.out, `candidates-seed${args.seed}.jsonl`)
  const resultsFile = join(args.out, `results-seed${args.seed}.jsonl`)
  const work = join(tmpdir(), `imgtool-fuzz-work-${process.pid}`)
  const results: CaseResult[] = []
  let next = args.start
  const end = args.start + args.count
  const t0 = Date.now()
  const job = async (j: number): Promise<void> => {
    const h = new Harness({ ...DEFAULT_OPTIONS, timeoutMs: args.timeout }, join(work, `job${j}`))
    try {
      for (;;) {
        const k = next++
        if (k >= end) return
        const fc = drawCase(args.seed, k, seeds, args.cliRate)
        const res = await h.runCase(seeds.get(fc.seed)!, fc, k)
        results.push(res)
        appendFileSync(resultsFile, JSON.stringify({ k, ...res }) + '\n')
        for (const o of res.outcomes.filter((x) => x.status === 'fail')) {
          appendFileSync(candidates, JSON.stringify({ seed: fc.seed, mutations: fc.mutations, ...(fc.cliCommand ? { cliCommand: fc.cliCommand } : {}), invariant: o.invariant, detail: o.detail, found: `fuzz --seed ${args.seed} case ${k}` }) + '\n')
        }
        const fails = res.outcomes.filter((o) => o.status === 'fail').map((o) => o.invariant)
        process.stdout.write(`[${results.length}/${args.count}] case ${k} ${fc.seed} ${res.ms} ms${fails.length ? ` FAIL ${fails.join(',')}` : ''}\n`)
      }
    } finally {
      h.close()
    }
  }
  await Promise.all(Array.from({ length: args.jobs }, (_, j) => job(j)))
  rmSync(work, { recursive: true, force: true })
  console.log(summarize(results))
  console.log(`${((Date.now() - t0) / 1000).toFixed(0)} s; results ${resultsFile}; candidate regression cases ${candidates}`)
}

await mainRun()
